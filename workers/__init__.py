"""The reference pipeline hoptrace ships with and tests itself against (``pipelines/payments.toml``;
``docs/architecture.md`` draws it): payment-service -> purchase-worker -> allocation-worker
(calls admin-service over HTTP) -> session-worker.

- ``service``: what a service is (kind, handler or app factory, consumed event type, fault
  switches, port setting); ``registry``: the five services by name, the one list of them.
- ``payment_service``: ``POST /payments`` -> payment + outbox row; the relay emits
  PURCHASE_CONFIRMED (step ``payment.confirmed``). ``admin_service``: ``POST /allocations``.
- ``purchase_worker``, ``allocation_worker``, ``session_worker``: handlers run by the hop runtime.
- ``faults``: the hop workers' fault switches and what faults need at run time.
- ``run``: `hoptrace worker NAME`; ``tuning``: its figures; ``db`` and ``http``: the HTTP
  services' pools and server helpers.
- ``schema``: migrations (catalogue, payments + outbox, purchases, allocations, sessions).
- ``events``: typed, versioned payloads inside the one Envelope; ``validator`` for the runtime.
- ``topics``: `hoptrace topics ensure`; ``client``: `hoptrace pay` / `hoptrace demo traffic`.
"""
