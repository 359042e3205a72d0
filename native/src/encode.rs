//! SDK side: finished spans -> OTLP trace request bodies (owned by the instrumentation work).
//!
//! `encode_spans(spans) -> bytes` turns a batch of finished OpenTelemetry SDK spans
//! (`ReadableSpan`) into a serialized `ExportTraceServiceRequest`, the same message the SDK's
//! `opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans` builds: spans grouped
//! by resource, then by instrumentation scope (first-seen order, equal objects share a group),
//! the same span flags, status, trace state and dropped counts. An attribute whose value the
//! SDK cannot encode (unsupported type, integer outside int64, a string with lone surrogates)
//! is skipped, as the SDK skips it; anything else malformed raises `ValueError`.
//!
//! The messages are declared with prost derive (the OTLP field numbers of
//! opentelemetry-proto's trace, common and resource protos); only what is encoded is declared.
//! They are not shared with `decode.rs`, whose fields are zero-copy `Bytes` views of the body:
//! prost encodes a `Bytes` field by cloning it (a refcount promotion per string), which made
//! this encoder about 30% slower when tried (3.9 -> 5.2 µs per span).

use prost::Message;
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

#[derive(Clone, PartialEq, Message)]
struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, Message)]
struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
    #[prost(string, tag = "3")]
    schema_url: String,
}

#[derive(Clone, PartialEq, Message)]
struct Resource {
    #[prost(message, repeated, tag = "1")]
    attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    spans: Vec<Span>,
    #[prost(string, tag = "3")]
    schema_url: String,
}

#[derive(Clone, PartialEq, Message)]
struct InstrumentationScope {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    version: String,
    #[prost(message, repeated, tag = "3")]
    attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
struct Span {
    #[prost(bytes = "vec", tag = "1")]
    trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    span_id: Vec<u8>,
    #[prost(string, tag = "3")]
    trace_state: String,
    #[prost(bytes = "vec", tag = "4")]
    parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    name: String,
    #[prost(int32, tag = "6")]
    kind: i32,
    #[prost(fixed64, tag = "7")]
    start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    attributes: Vec<KeyValue>,
    #[prost(uint32, tag = "10")]
    dropped_attributes_count: u32,
    #[prost(message, repeated, tag = "11")]
    events: Vec<Event>,
    #[prost(uint32, tag = "12")]
    dropped_events_count: u32,
    #[prost(message, repeated, tag = "13")]
    links: Vec<Link>,
    #[prost(uint32, tag = "14")]
    dropped_links_count: u32,
    #[prost(message, optional, tag = "15")]
    status: Option<Status>,
    #[prost(fixed32, tag = "16")]
    flags: u32,
}

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(fixed64, tag = "1")]
    time_unix_nano: u64,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "3")]
    attributes: Vec<KeyValue>,
    #[prost(uint32, tag = "4")]
    dropped_attributes_count: u32,
}

#[derive(Clone, PartialEq, Message)]
struct Link {
    #[prost(bytes = "vec", tag = "1")]
    trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    span_id: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    attributes: Vec<KeyValue>,
    #[prost(uint32, tag = "5")]
    dropped_attributes_count: u32,
    #[prost(fixed32, tag = "6")]
    flags: u32,
}

#[derive(Clone, PartialEq, Message)]
struct Status {
    #[prost(string, tag = "2")]
    message: String,
    #[prost(int32, tag = "3")]
    code: i32,
}

#[derive(Clone, PartialEq, Message)]
struct KeyValue {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 2, 3, 4, 5, 6, 7")]
    value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Value {
    #[prost(string, tag = "1")]
    StringValue(String),
    #[prost(bool, tag = "2")]
    BoolValue(bool),
    #[prost(int64, tag = "3")]
    IntValue(i64),
    #[prost(double, tag = "4")]
    DoubleValue(f64),
    #[prost(message, tag = "5")]
    ArrayValue(ArrayValue),
    #[prost(message, tag = "6")]
    KvlistValue(KeyValueList),
    #[prost(bytes = "vec", tag = "7")]
    BytesValue(Vec<u8>),
}

#[derive(Clone, PartialEq, Message)]
struct ArrayValue {
    #[prost(message, repeated, tag = "1")]
    values: Vec<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
struct KeyValueList {
    #[prost(message, repeated, tag = "1")]
    values: Vec<KeyValue>,
}

/// SpanFlags: the "has is_remote" bit is always set; "is_remote" when the parent is remote.
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;

/// Per-call lookups: the abstract base classes the SDK's `isinstance` checks use.
struct Abc<'py> {
    sequence: Bound<'py, PyAny>,
    mapping: Bound<'py, PyAny>,
}

fn bad(what: &str, err: PyErr) -> PyErr {
    PyValueError::new_err(format!("cannot encode span {what}: {err}"))
}

/// A Python value -> AnyValue, in the SDK's order of checks (bool, str, int, float, bytes,
/// Sequence, Mapping). Err means the SDK would fail on it: the caller skips the attribute.
fn any_value(abc: &Abc<'_>, value: &Bound<'_, PyAny>) -> PyResult<AnyValue> {
    let v = if value.is_none() {
        None
    } else if let Ok(b) = value.cast::<PyBool>() {
        Some(Value::BoolValue(b.is_true()))
    } else if let Ok(s) = value.cast::<PyString>() {
        Some(Value::StringValue(s.to_str()?.to_owned()))
    } else if value.is_instance_of::<PyInt>() {
        Some(Value::IntValue(value.extract::<i64>()?))
    } else if let Ok(f) = value.cast::<PyFloat>() {
        Some(Value::DoubleValue(f.value()))
    } else if let Ok(b) = value.cast::<PyBytes>() {
        Some(Value::BytesValue(b.as_bytes().to_vec()))
    } else if let Ok(t) = value.cast::<PyTuple>() {
        let values = t
            .iter()
            .map(|v| any_value(abc, &v))
            .collect::<PyResult<_>>()?;
        Some(Value::ArrayValue(ArrayValue { values }))
    } else if let Ok(l) = value.cast::<PyList>() {
        let values = l
            .iter()
            .map(|v| any_value(abc, &v))
            .collect::<PyResult<_>>()?;
        Some(Value::ArrayValue(ArrayValue { values }))
    } else if value.is_instance(&abc.sequence)? {
        let mut values = Vec::new();
        for item in value.try_iter()? {
            values.push(any_value(abc, &item?)?);
        }
        Some(Value::ArrayValue(ArrayValue { values }))
    } else if value.is_instance(&abc.mapping)? {
        let mut values = Vec::new();
        for item in value
            .call_method0(intern!(value.py(), "items"))?
            .try_iter()?
        {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
            let key = k.str()?.to_str()?.to_owned();
            values.push(KeyValue {
                key,
                value: Some(any_value(abc, &v)?),
            });
        }
        Some(Value::KvlistValue(KeyValueList { values }))
    } else {
        return Err(PyValueError::new_err(format!(
            "invalid type {} of attribute value",
            value.get_type().name()?
        )));
    };
    Ok(AnyValue { value: v })
}

/// One attribute; None when the SDK would skip it (it logs and drops such a key).
fn key_value(abc: &Abc<'_>, key: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> Option<KeyValue> {
    let key = key.cast::<PyString>().ok()?.to_str().ok()?.to_owned();
    let value = any_value(abc, value).ok()?;
    Some(KeyValue {
        key,
        value: Some(value),
    })
}

/// An attribute mapping (dict, BoundedAttributes, MappingProxy or None) -> KeyValues.
fn attributes(abc: &Abc<'_>, attrs: &Bound<'_, PyAny>) -> PyResult<Vec<KeyValue>> {
    let py = attrs.py();
    if attrs.is_none() {
        return Ok(Vec::new());
    }
    // BoundedAttributes keeps a plain dict in `_dict`: iterate that without Python calls.
    let inner = if attrs.is_instance_of::<PyDict>() {
        Some(attrs.clone())
    } else {
        attrs.getattr(intern!(py, "_dict")).ok()
    };
    let dict = inner.as_ref().and_then(|d| d.cast::<PyDict>().ok());
    let mut out = Vec::new();
    if let Some(d) = dict {
        out.reserve(d.len());
        for (k, v) in d.iter() {
            out.extend(key_value(abc, &k, &v));
        }
        return Ok(out);
    }
    if !attrs.is_truthy()? {
        return Ok(out);
    }
    for item in attrs.call_method0(intern!(py, "items"))?.try_iter()? {
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
        out.extend(key_value(abc, &k, &v));
    }
    Ok(out)
}

fn opt_string(value: Bound<'_, PyAny>) -> PyResult<String> {
    if value.is_none() {
        Ok(String::new())
    } else {
        Ok(value.cast::<PyString>()?.to_str()?.to_owned())
    }
}

fn opt_u64(value: Bound<'_, PyAny>) -> PyResult<u64> {
    if value.is_none() {
        Ok(0)
    } else {
        value.extract()
    }
}

/// The fields of an SDK SpanContext: a tuple subclass laid out as (trace_id, span_id,
/// is_remote, trace_flags, trace_state, is_valid); read by index (no property calls), other
/// span context types by attribute.
struct Ctx<'py> {
    trace_id: Bound<'py, PyAny>,
    span_id: Bound<'py, PyAny>,
    is_remote: Bound<'py, PyAny>,
    trace_state: Bound<'py, PyAny>,
}

fn ctx_fields<'py>(ctx: &Bound<'py, PyAny>) -> PyResult<Ctx<'py>> {
    let py = ctx.py();
    if let Ok(t) = ctx.cast::<PyTuple>() {
        if t.len() == 6 && ctx.get_type().name()?.to_str()? == "SpanContext" {
            return Ok(Ctx {
                trace_id: t.get_item(0)?,
                span_id: t.get_item(1)?,
                is_remote: t.get_item(2)?,
                trace_state: t.get_item(4)?,
            });
        }
    }
    Ok(Ctx {
        trace_id: ctx.getattr(intern!(py, "trace_id"))?,
        span_id: ctx.getattr(intern!(py, "span_id"))?,
        is_remote: ctx.getattr(intern!(py, "is_remote"))?,
        trace_state: ctx.getattr(intern!(py, "trace_state"))?,
    })
}

fn trace_id(ctx: &Ctx<'_>) -> PyResult<Vec<u8>> {
    let id: u128 = ctx.trace_id.extract()?;
    Ok(id.to_be_bytes().to_vec())
}

fn span_id(ctx: &Ctx<'_>) -> PyResult<Vec<u8>> {
    let id: u64 = ctx.span_id.extract()?;
    Ok(id.to_be_bytes().to_vec())
}

/// The SDK's `_span_flags`: always "has is_remote", plus "is_remote" for a remote context.
fn flags(ctx: &Bound<'_, PyAny>) -> PyResult<u32> {
    let mut flags = FLAGS_HAS_IS_REMOTE;
    if !ctx.is_none() && ctx.is_truthy()? && ctx_fields(ctx)?.is_remote.is_truthy()? {
        flags |= FLAGS_IS_REMOTE;
    }
    Ok(flags)
}

fn push_pair(out: &mut String, k: &Bound<'_, PyAny>, v: &Bound<'_, PyAny>) -> PyResult<()> {
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(k.str()?.to_str()?);
    out.push('=');
    out.push_str(v.str()?.to_str()?);
    Ok(())
}

/// TraceState -> "k1=v1,k2=v2" (empty when there is none).
fn trace_state(ctx: &Ctx<'_>) -> PyResult<String> {
    let ts = &ctx.trace_state;
    let mut out = String::new();
    if ts.is_none() {
        return Ok(out);
    }
    // TraceState keeps its entries in a plain dict `_dict` (items() iterates that)
    if let Ok(d) = ts.getattr(intern!(ts.py(), "_dict")) {
        if let Ok(d) = d.cast::<PyDict>() {
            for (k, v) in d.iter() {
                push_pair(&mut out, &k, &v)?;
            }
            return Ok(out);
        }
    }
    for item in ts.call_method0(intern!(ts.py(), "items"))?.try_iter()? {
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
        push_pair(&mut out, &k, &v)?;
    }
    Ok(out)
}

/// The items of a BoundedList (its deque `_dq`, iterated without a Python call) or of any
/// other iterable.
fn items_of<'py>(list: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let inner = list.getattr(intern!(list.py(), "_dq")).ok();
    let source = inner.as_ref().unwrap_or(list);
    source.try_iter()?.collect()
}

fn dropped(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyString>) -> PyResult<u32> {
    obj.getattr(name)?.extract()
}

fn event(abc: &Abc<'_>, ev: &Bound<'_, PyAny>) -> PyResult<Event> {
    let py = ev.py();
    Ok(Event {
        time_unix_nano: opt_u64(ev.getattr(intern!(py, "timestamp"))?)?,
        name: opt_string(ev.getattr(intern!(py, "name"))?)?,
        attributes: attributes(abc, &ev.getattr(intern!(py, "attributes"))?)?,
        dropped_attributes_count: dropped(ev, intern!(py, "dropped_attributes"))?,
    })
}

fn link(abc: &Abc<'_>, ln: &Bound<'_, PyAny>) -> PyResult<Link> {
    let py = ln.py();
    let ctx = ln.getattr(intern!(py, "context"))?;
    let fields = ctx_fields(&ctx)?;
    Ok(Link {
        trace_id: trace_id(&fields)?,
        span_id: span_id(&fields)?,
        attributes: attributes(abc, &ln.getattr(intern!(py, "attributes"))?)?,
        dropped_attributes_count: dropped(ln, intern!(py, "dropped_attributes"))?,
        flags: flags(&ctx)?,
    })
}

/// `obj.<private>` (the SDK's ReadableSpan keeps its fields there: a plain attribute read,
/// no property call), else the public `obj.<public>` (other ReadableSpan implementations).
fn field<'py>(
    obj: &Bound<'py, PyAny>,
    private: &Bound<'py, PyString>,
    public: &Bound<'py, PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    match obj.getattr(private) {
        Ok(v) => Ok(v),
        Err(_) => obj.getattr(public),
    }
}

/// The SDK's `dropped_*` properties: `.dropped` of a BoundedAttributes/BoundedList, else 0.
fn dropped_of(container: &Bound<'_, PyAny>) -> PyResult<u32> {
    match container.getattr(intern!(container.py(), "dropped")) {
        Ok(v) => v.extract(),
        Err(_) => Ok(0),
    }
}

/// An Enum member's value: `_value_` is a plain attribute (`value` is a slower descriptor).
fn enum_value(member: &Bound<'_, PyAny>) -> PyResult<i32> {
    let py = member.py();
    field(member, intern!(py, "_value_"), intern!(py, "value"))?.extract()
}

/// One ReadableSpan -> Span (the SDK's `_encode_span`).
fn span(abc: &Abc<'_>, s: &Bound<'_, PyAny>) -> PyResult<Span> {
    let py = s.py();
    let ctx = match s.getattr(intern!(py, "_context")) {
        Ok(c) => c,
        Err(_) => s.call_method0(intern!(py, "get_span_context"))?,
    };
    let parent = field(s, intern!(py, "_parent"), intern!(py, "parent"))?;
    let parent_span_id = if parent.is_none() || !parent.is_truthy()? {
        Vec::new()
    } else {
        span_id(&ctx_fields(&parent)?)?
    };
    let kind = enum_value(&field(s, intern!(py, "_kind"), intern!(py, "kind"))?)?;
    if !(0..=4).contains(&kind) {
        return Err(PyValueError::new_err(format!("unknown span kind {kind}")));
    }
    let attrs = field(s, intern!(py, "_attributes"), intern!(py, "attributes"))?;
    let ev_list = field(s, intern!(py, "_events"), intern!(py, "events"))?;
    let mut events = Vec::new();
    for ev in items_of(&ev_list)? {
        events.push(event(abc, &ev)?);
    }
    let ln_list = field(s, intern!(py, "_links"), intern!(py, "links"))?;
    let mut links = Vec::new();
    for ln in items_of(&ln_list)? {
        links.push(link(abc, &ln)?);
    }
    let status = field(s, intern!(py, "_status"), intern!(py, "status"))?;
    let status = if status.is_none() {
        None
    } else {
        Some(Status {
            message: opt_string(status.getattr(intern!(py, "description"))?)?,
            code: enum_value(&status.getattr(intern!(py, "status_code"))?)?,
        })
    };
    let fields = ctx_fields(&ctx)?;
    Ok(Span {
        trace_id: trace_id(&fields)?,
        span_id: span_id(&fields)?,
        trace_state: trace_state(&fields)?,
        parent_span_id,
        name: opt_string(field(s, intern!(py, "_name"), intern!(py, "name"))?)?,
        kind: kind + 1, // SpanKind.INTERNAL (0) is SPAN_KIND_INTERNAL (1), and so on
        start_time_unix_nano: opt_u64(field(
            s,
            intern!(py, "_start_time"),
            intern!(py, "start_time"),
        )?)?,
        end_time_unix_nano: opt_u64(field(s, intern!(py, "_end_time"), intern!(py, "end_time"))?)?,
        attributes: attributes(abc, &attrs)?,
        dropped_attributes_count: dropped_of(&attrs)?,
        events,
        dropped_events_count: dropped_of(&ev_list)?,
        links,
        dropped_links_count: dropped_of(&ln_list)?,
        status,
        flags: flags(&parent)?,
    })
}

/// Index of the group whose key is `key` (identity first, then `==`, like a dict lookup).
fn group_of<'py, T>(
    groups: &[(Bound<'py, PyAny>, T)],
    key: &Bound<'py, PyAny>,
) -> PyResult<Option<usize>> {
    if let Some(i) = groups.iter().position(|(k, _)| k.is(key)) {
        return Ok(Some(i));
    }
    for (i, (k, _)) in groups.iter().enumerate() {
        if k.eq(key)? {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

fn encode_request(py: Python<'_>, spans: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let abc_mod = py.import("collections.abc")?;
    let abc = Abc {
        sequence: abc_mod.getattr("Sequence")?,
        mapping: abc_mod.getattr("Mapping")?,
    };
    type ScopeGroups<'py> = Vec<(Bound<'py, PyAny>, Vec<Span>)>;
    let mut groups: Vec<(Bound<'_, PyAny>, ScopeGroups<'_>)> = Vec::new();
    for s in spans.try_iter()? {
        let s = s?;
        let resource = field(&s, intern!(py, "_resource"), intern!(py, "resource"))?;
        let mut scope = field(
            &s,
            intern!(py, "_instrumentation_scope"),
            intern!(py, "instrumentation_scope"),
        )?;
        if !scope.is_none() && !scope.is_truthy()? {
            scope = py.None().into_bound(py);
        }
        let encoded = span(&abc, &s)?;
        let ri = match group_of(&groups, &resource)? {
            Some(i) => i,
            None => {
                groups.push((resource, Vec::new()));
                groups.len() - 1
            }
        };
        let scopes = &mut groups[ri].1;
        let si = match group_of(scopes, &scope)? {
            Some(i) => i,
            None => {
                scopes.push((scope, Vec::new()));
                scopes.len() - 1
            }
        };
        scopes[si].1.push(encoded);
    }
    let mut request = ExportTraceServiceRequest::default();
    for (resource, scopes) in groups {
        let mut scope_spans = Vec::with_capacity(scopes.len());
        for (scope, spans) in scopes {
            let (scope_msg, schema_url) = if scope.is_none() {
                (InstrumentationScope::default(), String::new())
            } else {
                (
                    InstrumentationScope {
                        name: opt_string(scope.getattr(intern!(py, "name"))?)?,
                        version: opt_string(scope.getattr(intern!(py, "version"))?)?,
                        attributes: attributes(&abc, &scope.getattr(intern!(py, "attributes"))?)?,
                    },
                    opt_string(scope.getattr(intern!(py, "schema_url"))?)?,
                )
            };
            scope_spans.push(ScopeSpans {
                scope: Some(scope_msg),
                spans,
                schema_url,
            });
        }
        request.resource_spans.push(ResourceSpans {
            resource: Some(Resource {
                attributes: attributes(&abc, &resource.getattr(intern!(py, "attributes"))?)?,
            }),
            scope_spans,
            schema_url: opt_string(resource.getattr(intern!(py, "schema_url"))?)?,
        });
    }
    Ok(request.encode_to_vec())
}

/// encode_spans(spans: Sequence[ReadableSpan]) -> bytes: a serialized ExportTraceServiceRequest.
#[pyfunction]
fn encode_spans<'py>(py: Python<'py>, spans: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let body = encode_request(py, spans).map_err(|e| bad("batch", e))?;
    Ok(PyBytes::new(py, &body))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode_spans, m)?)?;
    Ok(())
}
