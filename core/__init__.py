"""hoptrace: follow one payment through an event-driven Kafka pipeline.

The distribution maps four folders onto this namespace: ``hoptrace.instrumentation``,
``hoptrace.workers``, ``hoptrace.collector`` and ``hoptrace.dashboard``. This root package holds
only what they share: settings, the command line and the local (no-Docker) stack.
"""

__version__ = "0.1.0"
