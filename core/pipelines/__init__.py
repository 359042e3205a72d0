"""The reference pipeline's spec (``payments.toml``), shipped as this package's data: the reference
services' and ``hoptrace dev``'s default outside a checkout (kept equal to the checkout's
``pipelines/payments.toml`` by a test)."""
