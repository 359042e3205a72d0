"""hoptrace's contract: what services, the collector, the dashboard, the CLI and outside checks
agree on. Every part imports these names from here; nobody else spells them.

- ``spec`` / ``spec_loader``: the pipeline spec model (steps, topics, groups, tables, deadlines,
  the DAG, where correlation ids and processed marks are) and its TOML loader;
- ``matching``: which spans are a pipeline's steps (hoptrace's and any SDK's), and whose
  correlation; ``progress``: where a correlation is in the pipeline's DAG;
- ``conventions``: span attribute names and values (hoptrace's and the OpenTelemetry messaging
  semantic conventions in every spelling), Kafka header and dead-letter names;
- ``causes``: cause codes with their meanings, step statuses, correlation states, outcomes, the
  trace JSON schema version.
"""

from . import conventions
from .causes import (
    CAUSES,
    OUTCOMES,
    STATES,
    STATUSES,
    TRACE_SCHEMA_VERSION,
    Cause,
    Outcome,
    RedriveResult,
    State,
    StepStatus,
)
from .spec import (
    DEFAULT_CORRELATION_COLUMN,
    CorrelationCarriers,
    PipelineSpec,
    ProcessedTable,
    SpecError,
    Step,
    parse_duration,
)
from .spec_loader import load_spec, parse_spec

__all__ = [
    "CAUSES",
    "DEFAULT_CORRELATION_COLUMN",
    "OUTCOMES",
    "STATES",
    "STATUSES",
    "TRACE_SCHEMA_VERSION",
    "Cause",
    "CorrelationCarriers",
    "Outcome",
    "PipelineSpec",
    "ProcessedTable",
    "RedriveResult",
    "SpecError",
    "State",
    "Step",
    "StepStatus",
    "conventions",
    "load_spec",
    "parse_duration",
    "parse_spec",
]
