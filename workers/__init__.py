"""The reference pipeline hoptrace ships with and tests itself against (DESIGN.md draws it).

- ``schema``: migrations (catalogue, payments + outbox, purchases, allocations, sessions).
- ``events``: typed, versioned payloads inside the one Envelope; ``validator`` for the runtime.
- ``payment_service``: ``POST /payments`` -> payment + outbox row; the relay emits
  PURCHASE_CONFIRMED (step ``payment.confirmed``).
- ``purchase_worker``, ``allocation_worker`` (calls ``admin_service`` over HTTP),
  ``session_worker``: handlers run by the hop runtime.
- ``faults``: the fault switches; ``run``: `hoptrace worker NAME`; ``topics``: `hoptrace topics
  ensure`; ``client``: `hoptrace pay` / `hoptrace demo traffic`; ``http``: shared HTTP helpers.
"""
