"""The SDK's own spans, built with less per-span work.

A hop makes two spans per record (its process span and the handler's asyncpg span), and on this
hardware the SDK's span construction was most of tracing's cost per hop: a generic sampler call,
``SamplingResult`` and ``TraceFlags`` objects, and a validation pass over every attribute value
(about 1 µs each) even when the value is a plain ``str``/``int``/``float``/``bool``.

``LeanTracerProvider`` is the SDK's ``TracerProvider`` whose tracers take a shorter path in the
common case and the SDK's own path otherwise:

* the spans are the SDK's ``_Span`` objects (see ``LeanSpan`` below), with the same fields,
  processors, limits, resource and scope, so every processor, exporter and instrumentation
  sees what it always sees;
* the fast path is taken only for the default sampler (``parentbased_always_on``), an enabled
  tracer, the SDK's internal span metrics off, and no links; anything else is ``super()``;
* attribute values of type ``str``/``bool``/``int``/``float`` within the limits are stored as
  they are (what the SDK's cleaning returns for them); any other value, key or a full attribute
  table goes through the SDK's ``BoundedAttributes`` code unchanged;
* the spans are ``LeanSpan``s (a ``_Span`` subclass): their events and links lists are made at
  the first event or link, and ``end`` hands the processors the ended span itself rather than
  a ``ReadableSpan`` copy of its fields (an ended span no longer changes).

``tests/instrumentation/test_lean_tracer.py`` builds the same spans through both paths and
compares everything an exporter reads, and checks that the fields set here are the fields the
SDK's constructor sets (so an SDK upgrade that adds one fails the test, not production).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer, TracerProvider, _Span
from opentelemetry.sdk.trace import sampling as _sampling
from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util import types

__all__ = ["LeanAttributes", "LeanSpan", "LeanTracer", "LeanTracerProvider"]

_log = logging.getLogger("opentelemetry.sdk.trace")  # where the SDK's span warnings go

#: Value types the SDK's cleaning returns unchanged (bool is an int, listed for clarity).
_PLAIN = frozenset((str, bool, int, float))
_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
_SAMPLED_RANDOM = trace_api.TraceFlags(
    trace_api.TraceFlags.SAMPLED | trace_api.TraceFlags.RANDOM_TRACE_ID
)
_UNSET = Status(StatusCode.UNSET)


class LeanAttributes(BoundedAttributes):
    """``BoundedAttributes`` that stores plain values (see module doc) without re-cleaning
    them; everything else, and a table at its limit, takes the SDK's path."""

    def __init__(
        self,
        maxlen: int | None = None,
        attributes: types.Attributes = None,
        immutable: bool = True,
        max_value_len: int | None = None,
    ) -> None:
        self._dict: dict[str, types.AnyValue] = {}
        self.maxlen = maxlen
        self.dropped = 0
        self.max_value_len = max_value_len
        self._lock = threading.Lock()
        self._immutable = False
        if attributes:
            self._set_items(attributes)
        self._immutable = immutable

    def _plain(self, key: Any, value: Any) -> bool:
        if type(value) not in _PLAIN or type(key) is not str or not key:
            return False
        limit = self.max_value_len
        return limit is None or type(value) is not str or len(value) <= limit

    def __setitem__(self, key: str, value: types.AnyValue) -> None:
        d = self._dict
        maxlen = self.maxlen
        if (
            self._immutable
            or not self._plain(key, value)
            or (maxlen is not None and key not in d and len(d) >= maxlen)
        ):
            super().__setitem__(key, value)
            return
        with self._lock:
            d.pop(key, None)  # the SDK re-inserts an existing key at the end
            d[key] = value

    def _set_items(self, attributes: Mapping[str, types.AnyValue]) -> None:
        d = self._dict
        maxlen = self.maxlen
        limit = self.max_value_len
        if self._immutable or (maxlen is not None and len(d) + len(attributes) > maxlen):
            super()._set_items(attributes)
            return
        # all plain, or the SDK's path for all (``_plain`` inlined: a call per attribute cost
        # 1.5 µs per hop)
        for key, value in attributes.items():
            kind = type(value)
            if (
                kind not in _PLAIN
                or type(key) is not str
                or not key
                or (kind is str and limit is not None and len(value) > limit)  # type: ignore[arg-type]
            ):
                super()._set_items(attributes)
                return
        with self._lock:
            if d.keys().isdisjoint(attributes):
                d.update(attributes)
            else:
                for key, value in attributes.items():
                    d.pop(key, None)  # the SDK re-inserts an existing key at the end
                    d[key] = value


class _NoneYet(BoundedList):
    """The events/links of a span that has none yet: one shared, empty, read-only list (a
    span gets its own at its first event or link). Appending to it is a bug in this module,
    never a silent write into every span's list."""

    def append(self, item: Any) -> None:
        raise RuntimeError("hoptrace lean_spans: append to the shared empty events/links list")

    def extend(self, seq: Any) -> None:
        raise RuntimeError("hoptrace lean_spans: extend of the shared empty events/links list")


_NONE_YET = _NoneYet(0)


class LeanSpan(_Span):
    """The SDK's ``_Span`` with two per-span costs taken out of the common case: its events
    and links lists are made at the first event or link (most spans have none), and ``end``
    hands the processors the span itself (ended, it no longer changes: every setter checks
    the end time under the span's lock) instead of a ``ReadableSpan`` copy of its fields."""

    def _add_event(self, event: Any) -> None:
        if self._events is _NONE_YET:
            with self._lock:
                if self._events is _NONE_YET:
                    self._events = self._new_events()
        super()._add_event(event)

    def _add_link(self, link: trace_api.Link) -> None:
        if self._links is _NONE_YET:
            with self._lock:
                if self._links is _NONE_YET:
                    self._links = self._new_links(())
        super()._add_link(link)

    def end(self, end_time: int | None = None) -> None:
        with self._lock:  # as the SDK's end
            if self._start_time is None:
                raise RuntimeError("Calling end() on a not started span.")
            if self._end_time is not None:
                _log.warning("Calling end() on an ended span.")
                return
            self._end_time = end_time if end_time is not None else time_ns()
            self._attributes._immutable = True  # type: ignore[attr-defined]
        if self._record_end_metrics:
            self._record_end_metrics()
        self._span_processor._on_ending(self)
        self._span_processor.on_end(self)


class LeanTracer(Tracer):
    """The SDK ``Tracer`` with a shorter ``start_span`` for the common case (module doc)."""

    def start_span(  # noqa: PLR0913 - the API's signature
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[trace_api.Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        parent = trace_api.get_current_span(context).get_span_context()
        if parent is not None and not isinstance(parent, trace_api.SpanContext):  # as the SDK
            raise TypeError("parent_span_context must be a SpanContext or None.")
        if (
            links
            or self.sampler is not _sampling.DEFAULT_ON
            or not self._tracer_config.is_enabled
            or type(self._tracer_metrics) is not NoOpTracerMetrics
            or (parent is not None and parent.is_valid and not parent.trace_flags.sampled)
        ):  # the SDK's own path (an unsampled parent: ParentBased drops the span there)
            return super().start_span(
                name,
                context,
                kind,
                attributes,
                links,
                start_time,
                record_exception,
                set_status_on_exception,
            )
        ids = self.id_generator
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = ids.generate_trace_id()
            random_id = ids.is_trace_id_random()
            trace_state = None
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
            trace_state = parent.trace_state
        span_context = trace_api.SpanContext(
            trace_id,
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=_SAMPLED_RANDOM if random_id else _SAMPLED,
            trace_state=trace_state,
        )
        limits = self._span_limits
        span: LeanSpan = LeanSpan.__new__(LeanSpan)
        # the fields _Span.__init__ sets (the test compares the two sets), values as it sets them
        span._name = name
        span._context = span_context
        span._kind = kind
        span._instrumentation_info = self.instrumentation_info
        span._instrumentation_scope = self._instrumentation_scope
        span._parent = parent
        span._end_time = None
        span._resource = self.resource
        span._status = _UNSET
        span._sampler = self.sampler
        span._trace_config = None
        span._record_exception = record_exception
        span._set_status_on_exception = set_status_on_exception
        span._span_processor = self.span_processor
        span._limits = limits
        span._lock = threading.Lock()
        span._attributes = LeanAttributes(
            limits.max_span_attributes,
            attributes,
            immutable=False,
            max_value_len=limits.max_span_attribute_length,
        )
        span._events = _NONE_YET  # LeanSpan makes its own at the first event / link
        span._links = _NONE_YET
        span._record_end_metrics = None
        span._start_time = start_time if start_time is not None else time_ns()
        self.span_processor.on_start(span, parent_context=context)
        return span


class LeanTracerProvider(TracerProvider):
    """The SDK ``TracerProvider`` whose tracers are ``LeanTracer``s (same state, same cache)."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace_api.Tracer:
        tracer = super().get_tracer(*args, **kwargs)
        if type(tracer) is Tracer:  # adds no state: the provider's cached tracer, leaner calls
            tracer.__class__ = LeanTracer
        return tracer
