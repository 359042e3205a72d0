"""hoptrace.repair: ``hoptrace redrive`` sends stuck correlations on from where they stopped,
once the cause is fixed.

It reads through the collector's read facade (``hoptrace.collector.api``: the diagnosis and its
evidence) and writes through ``hoptrace.instrumentation`` (the re-published record carries the
correlation headers, baggage and a traceparent of the redrive's span) and the pipeline's
database (a processed mark removed, the ``redrives`` audit row). The collector never imports it:
the command line hands its HTTP route to the collector.

- ``plan``: pure, a diagnosis plus what was found -> the safe action per cause, or a refusal;
- ``sources``: where the record is (dead-letter topic, its topic, the emitter's stored event,
  the producer's outbox), the processed mark, a previous redrive still in flight;
- ``apply``: the redrive span, the mark removed, the record published, the audit row;
- ``audit``: the ``redrives`` table;
- ``runner``: one redrive of ids or of the stuck correlations, with its report;
- ``cli`` / ``http``: ``hoptrace redrive`` and the collector's ``POST /redrive``.
"""
