//! Collector side: an OTLP `ExportTraceServiceRequest` body -> PostgreSQL binary COPY tuples for
//! the `spans` table, with exactly the semantics of `hoptrace.collector.decode.decode_request`
//! (the pure-Python reference; `tests/collector/test_native_decode.py` proves they agree).
//!
//! `decode_traces(body, received_us)` returns `None` when a span needs a Python-only rendering
//! (a step / pipeline / outcome attribute holding a double, array or kvlist: Python's `str()` of
//! it), so the caller takes the Python path for that request; malformed protobuf raises
//! `ValueError`. Nothing here panics on input.

use std::borrow::Cow;
use std::io::Write;

use prost::bytes::Bytes;
use prost::Message;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

// ------------------------------------------------------------------------------------------
// OTLP messages. Only what the store reads, plus every other string field of the schema. String
// fields are declared as bytes (zero-copy slices of the body: no allocation per string) and all
// UTF-8 checked by `valid_utf8` before use, as the Python (upb) parser checks them.

#[derive(Clone, PartialEq, Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
    #[prost(bytes = "bytes", tag = "3")]
    pub schema_url: Bytes,
}

#[derive(Clone, PartialEq, Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, repeated, tag = "3")]
    pub entity_refs: Vec<EntityRef>,
}

#[derive(Clone, PartialEq, Message)]
pub struct EntityRef {
    #[prost(bytes = "bytes", tag = "1")]
    pub schema_url: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub r#type: Bytes,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub id_keys: Vec<Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub description_keys: Vec<Bytes>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
    #[prost(bytes = "bytes", tag = "3")]
    pub schema_url: Bytes,
}

#[derive(Clone, PartialEq, Message)]
pub struct InstrumentationScope {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub version: Bytes,
    #[prost(message, repeated, tag = "3")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Span {
    #[prost(bytes = "bytes", tag = "1")]
    pub trace_id: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub span_id: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub trace_state: Bytes,
    #[prost(bytes = "bytes", tag = "4")]
    pub parent_span_id: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub name: Bytes,
    #[prost(int32, tag = "6")]
    pub kind: i32,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
    #[prost(message, repeated, tag = "13")]
    pub links: Vec<Link>,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(bytes = "bytes", tag = "2")]
    pub name: Bytes,
    #[prost(message, repeated, tag = "3")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Link {
    #[prost(bytes = "bytes", tag = "3")]
    pub trace_state: Bytes,
    #[prost(message, repeated, tag = "4")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Status {
    #[prost(bytes = "bytes", tag = "2")]
    pub message: Bytes,
    #[prost(int32, tag = "3")]
    pub code: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct KeyValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 2, 3, 4, 5, 6, 7, 8")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(bytes = "bytes", tag = "1")]
    StringValue(Bytes),
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
    #[prost(bytes = "bytes", tag = "7")]
    BytesValue(Bytes),
    /// Profiles' string-table index: not a value for traces (rendered as null, like Python).
    #[prost(int32, tag = "8")]
    StringValueStrindex(i32),
}

#[derive(Clone, PartialEq, Message)]
pub struct ArrayValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct KeyValueList {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<KeyValue>,
}

/// The same request seen only as far as its spans (each span a zero-copy slice): counting them
/// costs no span decoding.
#[derive(Clone, PartialEq, Message)]
pub struct SpanCountRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<SpanCountResource>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SpanCountResource {
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<SpanCountScope>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SpanCountScope {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub spans: Vec<Bytes>,
}

// ------------------------------------------------------------------------------------------
// Constants shared with collector/decode.py.

const CORRELATION_ATTR: &str = "hoptrace.correlation_id";
const PIPELINE_ATTR: &str = "hoptrace.pipeline";
const STEP_ATTR: &str = "hoptrace.step";
const OUTCOME_ATTR: &str = "hoptrace.step.outcome";
const SERVICE_ATTR: &str = "service.name";
/// Columns of a `spans` row (COLUMNS in decode.py).
const N_COLUMNS: i16 = 20;
/// Unix epoch -> PostgreSQL epoch (2000-01-01), in microseconds.
const PG_EPOCH_US: i64 = 946_684_800_000_000;
const DAY_US: i64 = 86_400_000_000;

// ------------------------------------------------------------------------------------------
// Text and JSON.

/// PostgreSQL text and jsonb cannot hold NUL: replaced by U+FFFD (as `_text` / `_scrub`).
fn scrub(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// A string field as text (every string field passed `valid_utf8` before any use).
fn text(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

fn utf8(b: &Bytes) -> bool {
    std::str::from_utf8(b).is_ok()
}

fn utf8_value(v: &AnyValue) -> bool {
    match &v.value {
        Some(Value::StringValue(s)) => utf8(s),
        Some(Value::ArrayValue(a)) => a.values.iter().all(utf8_value),
        Some(Value::KvlistValue(l)) => utf8_kvs(&l.values),
        _ => true,
    }
}

fn utf8_kvs(kvs: &[KeyValue]) -> bool {
    kvs.iter()
        .all(|kv| utf8(&kv.key) && kv.value.as_ref().is_none_or(utf8_value))
}

/// Every string field of the request is UTF-8 (protobuf's rule for `string`).
fn valid_utf8(req: &ExportTraceServiceRequest) -> bool {
    req.resource_spans.iter().all(|rs| {
        utf8(&rs.schema_url)
            && rs.resource.as_ref().is_none_or(|r| {
                utf8_kvs(&r.attributes)
                    && r.entity_refs.iter().all(|e| {
                        utf8(&e.schema_url)
                            && utf8(&e.r#type)
                            && e.id_keys.iter().all(utf8)
                            && e.description_keys.iter().all(utf8)
                    })
            })
            && rs.scope_spans.iter().all(|ss| {
                utf8(&ss.schema_url)
                    && ss.scope.as_ref().is_none_or(|sc| {
                        utf8(&sc.name) && utf8(&sc.version) && utf8_kvs(&sc.attributes)
                    })
                    && ss.spans.iter().all(|sp| {
                        utf8(&sp.trace_state)
                            && utf8(&sp.name)
                            && utf8_kvs(&sp.attributes)
                            && sp
                                .events
                                .iter()
                                .all(|e| utf8(&e.name) && utf8_kvs(&e.attributes))
                            && sp
                                .links
                                .iter()
                                .all(|l| utf8(&l.trace_state) && utf8_kvs(&l.attributes))
                            && sp.status.as_ref().is_none_or(|st| utf8(&st.message))
                    })
            })
    })
}

/// A JSON string (serde_json's escaping), NULs scrubbed; the common string that needs no
/// escaping is copied as is.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // no early exit: the scan vectorizes
    let plain = !s.bytes().fold(false, |esc, b| {
        esc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    let _ = serde_json::to_writer(&mut *out, &*scrub(s)); // writing to a Vec cannot fail
}

/// A double as orjson writes it: ryu's shortest form with an explicit `+` on positive
/// exponents (`1e+16`); NaN and infinities are null.
fn json_f64(out: &mut Vec<u8>, v: f64) {
    if !v.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    let mut buf = ryu::Buffer::new();
    let s = buf.format_finite(v);
    match s.find('e') {
        Some(i) if !s[i + 1..].starts_with('-') => {
            out.extend_from_slice(&s.as_bytes()[..=i]);
            out.push(b'+');
            out.extend_from_slice(&s.as_bytes()[i + 1..]);
        }
        _ => out.extend_from_slice(s.as_bytes()),
    }
}

/// An AnyValue as JSON (`any_value` in decode.py: bytes as lowercase hex, no value as null).
fn json_value(out: &mut Vec<u8>, v: Option<&AnyValue>) {
    match v.and_then(|a| a.value.as_ref()) {
        None | Some(Value::StringValueStrindex(_)) => out.extend_from_slice(b"null"),
        Some(Value::StringValue(s)) => json_str(out, text(s)),
        Some(Value::BoolValue(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Some(Value::IntValue(i)) => {
            let _ = write!(out, "{i}");
        }
        Some(Value::DoubleValue(d)) => json_f64(out, *d),
        Some(Value::ArrayValue(a)) => {
            out.push(b'[');
            for (i, x) in a.values.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_value(out, Some(x));
            }
            out.push(b']');
        }
        Some(Value::KvlistValue(kvs)) => json_object(out, &kvs.values),
        Some(Value::BytesValue(b)) => {
            out.push(b'"');
            out.extend_from_slice(hex(b).as_bytes());
            out.push(b'"');
        }
    }
}

/// Key-values as a JSON object. Duplicate keys are written as they come: jsonb keeps the last,
/// as the Python dict does. When a key holds a NUL, the Python dict is keyed by the raw key and
/// scrubbed afterwards, so the dict is rebuilt here first (first position, last value).
fn json_object(out: &mut Vec<u8>, kvs: &[KeyValue]) {
    out.push(b'{');
    if kvs.iter().any(|kv| kv.key.contains(&0)) {
        let mut dict: Vec<(&str, Option<&AnyValue>)> = Vec::with_capacity(kvs.len());
        for kv in kvs {
            let key = text(&kv.key);
            match dict.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = kv.value.as_ref(),
                None => dict.push((key, kv.value.as_ref())),
            }
        }
        for (i, (k, v)) in dict.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, k);
            out.push(b':');
            json_value(out, v);
        }
    } else {
        for (i, kv) in kvs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, text(&kv.key));
            out.push(b':');
            json_value(out, kv.value.as_ref());
        }
    }
    out.push(b'}');
}

/// Civil date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `datetime.isoformat()` of an aware UTC datetime at `ns` nanoseconds since the epoch.
fn isoformat(out: &mut Vec<u8>, ns: u64) {
    let us = (ns / 1000) as i64;
    let (secs, frac) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    let _ = write!(
        out,
        "\"{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    if frac != 0 {
        let _ = write!(out, ".{frac:06}");
    }
    out.extend_from_slice(b"+00:00\"");
}

/// The correlation id format (`hoptrace.ids.is_valid_correlation_id`):
/// `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`.
fn valid_cid(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// Python's `str()` of an attribute value as decode.py renders it; `Err(())` for the types
/// only Python renders faithfully (double, array, kvlist); `Ok(None)` for no value.
fn py_str(v: Option<&AnyValue>) -> Result<Option<Cow<'_, str>>, ()> {
    match v.and_then(|a| a.value.as_ref()) {
        None | Some(Value::StringValueStrindex(_)) => Ok(None),
        Some(Value::StringValue(s)) => Ok(Some(scrub(text(s)))),
        Some(Value::IntValue(i)) => Ok(Some(Cow::Owned(i.to_string()))),
        Some(Value::BoolValue(b)) => Ok(Some(Cow::Borrowed(if *b { "True" } else { "False" }))),
        Some(Value::BytesValue(b)) => Ok(Some(Cow::Owned(hex(b)))),
        Some(Value::DoubleValue(_) | Value::ArrayValue(_) | Value::KvlistValue(_)) => Err(()),
    }
}

/// The indexed correlation id (`_cid`): a string (or bytes as hex, or an integer) in the
/// correlation id format, else None.
fn cid_of(v: Option<&AnyValue>) -> Option<String> {
    let s = match v.and_then(|a| a.value.as_ref())? {
        Value::StringValue(s) => text(s).to_string(),
        Value::IntValue(i) => i.to_string(),
        Value::BytesValue(b) => hex(b),
        _ => return None,
    };
    valid_cid(&s).then_some(s)
}

/// The last value of `key` among key-values (a Python dict keeps the last).
fn last<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a KeyValue> {
    kvs.iter().rev().find(|kv| kv.key == key.as_bytes())
}

/// smallint columns: an enum value outside int16 is stored as 0 (unspecified) rather than
/// failing the whole batch's COPY (same rule in decode.py).
fn small(v: i32) -> i16 {
    i16::try_from(v).unwrap_or(0)
}

// ------------------------------------------------------------------------------------------
// Binary COPY fields.

struct Tuple<'a>(&'a mut Vec<u8>);

impl Tuple<'_> {
    fn begin(&mut self) {
        self.0.extend_from_slice(&N_COLUMNS.to_be_bytes());
    }
    fn null(&mut self) {
        self.0.extend_from_slice(&(-1i32).to_be_bytes());
    }
    fn text(&mut self, s: &str) {
        self.0.extend_from_slice(&(s.len() as i32).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt_text(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => self.null(),
        }
    }
    fn int2(&mut self, v: i16) {
        self.0.extend_from_slice(&2i32.to_be_bytes());
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn int8(&mut self, v: i64) {
        self.0.extend_from_slice(&8i32.to_be_bytes());
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn timestamptz(&mut self, unix_us: i64) {
        self.int8(unix_us - PG_EPOCH_US);
    }
    /// jsonb: version byte 1 + JSON text, written by `f` straight into the buffer.
    fn jsonb(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let at = self.0.len();
        self.0.extend_from_slice(&[0, 0, 0, 0, 1]);
        f(self.0);
        let len = (self.0.len() - at - 4) as i32;
        self.0[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    fn jsonb_raw(&mut self, json: &[u8]) {
        self.jsonb(|out| out.extend_from_slice(json));
    }
}

// ------------------------------------------------------------------------------------------
// The decoder.

/// One span's row prefix that the correlation fold needs (COLUMNS[:15]).
struct StepRow {
    trace: String,
    span: String,
    parent: Option<String>,
    name: String,
    service: String,
    kind: i16,
    start_us: i64,
    end_us: i64,
    status_code: i16,
    status_message: Option<String>,
    cid: Option<String>,
    pipeline: Option<String>,
    step: String,
    outcome: Option<String>,
}

/// A span without a step attribute that may still be a pipeline step or fail one (a consumer or
/// producer span, a span naming a messaging destination, a span with status ERROR): what the
/// collector's step matching reads (`hoptrace.contract`'s rules, applied in Python).
struct Candidate {
    trace: String,
    span: String,
    parent: Option<String>,
    name: String,
    service: String,
    kind: i16,
    start_us: i64,
    end_us: i64,
    status_code: i16,
    status_message: Option<String>,
    cid: Option<String>,
    destination: Option<String>,
    group: Option<String>,
    operation: Option<String>,
}

/// Attribute names the decoder reads, passed in by the caller (the contract's names).
#[pyclass(frozen, module = "hoptrace_native")]
pub struct Keys {
    /// correlation id carriers, in order of preference
    cid: Vec<String>,
    /// spellings of the messaging destination, consumer group and operation attributes; with
    /// none given, no candidates are collected
    destination: Vec<String>,
    group: Vec<String>,
    operation: Vec<String>,
    /// a resource attribute (key, value) marking services whose steps report themselves (their
    /// spans are never candidates)
    own: Option<(String, String)>,
}

#[pymethods]
impl Keys {
    #[new]
    #[pyo3(signature = (cid, destination=Vec::new(), group=Vec::new(), operation=Vec::new(), own=None))]
    fn new(
        cid: Vec<String>,
        destination: Vec<String>,
        group: Vec<String>,
        operation: Vec<String>,
        own: Option<(String, String)>,
    ) -> Self {
        Keys {
            cid,
            destination,
            group,
            operation,
            own,
        }
    }
}

impl Keys {
    fn default_keys() -> Self {
        Keys {
            cid: vec![CORRELATION_ATTR.to_string()],
            destination: Vec::new(),
            group: Vec::new(),
            operation: Vec::new(),
            own: None,
        }
    }
}

struct Output {
    copy: Vec<u8>,
    rows: usize,
    rejected: usize,
    steps: Vec<StepRow>,
    days: Vec<i64>,
    candidates: Vec<Candidate>,
}

/// The first key of `keys` holding a non-empty string value (bytes as lowercase hex, as the
/// stored attributes render them).
fn first_text(kvs: &[KeyValue], keys: &[String]) -> Option<String> {
    keys.iter().find_map(|k| match last(kvs, k).and_then(|kv| kv.value.as_ref()) {
        Some(AnyValue {
            value: Some(Value::StringValue(s)),
        }) if !s.is_empty() => Some(scrub(text(s)).into_owned()),
        Some(AnyValue {
            value: Some(Value::BytesValue(b)),
        }) if !b.is_empty() => Some(hex(b)),
        _ => None,
    })
}

/// The first carrier of `keys` holding a valid correlation id.
fn first_cid(kvs: &[KeyValue], keys: &[String]) -> Option<String> {
    keys.iter()
        .find_map(|k| cid_of(last(kvs, k).and_then(|kv| kv.value.as_ref())))
}

/// `None`: a value needs Python's rendering (see the module docs).
fn decode(
    req: &ExportTraceServiceRequest,
    received_us: i64,
    capacity: usize,
    keys: &Keys,
) -> Option<Output> {
    let mut out = Output {
        copy: Vec::with_capacity(capacity),
        rows: 0,
        rejected: 0,
        steps: Vec::new(),
        days: Vec::new(),
        candidates: Vec::new(),
    };
    let candidates = !keys.destination.is_empty();
    let empty: &[KeyValue] = &[];
    for rs in &req.resource_spans {
        let res_attrs = rs.resource.as_ref().map_or(empty, |r| &r.attributes[..]);
        let service: Cow<str> = match last(res_attrs, SERVICE_ATTR).and_then(|kv| kv.value.as_ref())
        {
            Some(AnyValue {
                value: Some(Value::StringValue(s)),
            }) if !s.is_empty() => scrub(text(s)),
            Some(AnyValue {
                value: Some(Value::BytesValue(b)),
            }) if !b.is_empty() => Cow::Owned(hex(b)),
            _ => Cow::Borrowed("unknown_service"),
        };
        let mut res_json = Vec::new();
        json_object(&mut res_json, res_attrs);
        let own = keys.own.as_ref().is_some_and(|(k, v)| {
            matches!(
                last(res_attrs, k).and_then(|kv| kv.value.as_ref()),
                Some(AnyValue { value: Some(Value::StringValue(s)) }) if s == v.as_bytes()
            )
        });
        for ss in &rs.scope_spans {
            let scope = ss
                .scope
                .as_ref()
                .map(|s| text(&s.name))
                .filter(|n| !n.is_empty());
            let scope = scope.map(scrub);
            for sp in &ss.spans {
                let (tid, sid) = (&sp.trace_id, &sp.span_id);
                if tid.len() != 16
                    || sid.len() != 8
                    || tid.iter().all(|b| *b == 0)
                    || sid.iter().all(|b| *b == 0)
                {
                    out.rejected += 1;
                    continue;
                }
                let attrs = &sp.attributes[..];
                let value = |key| last(attrs, key).and_then(|kv| kv.value.as_ref());
                let cid = first_cid(attrs, &keys.cid);
                let pipeline = py_str(value(PIPELINE_ATTR)).ok()?;
                let step = py_str(value(STEP_ATTR)).ok()?;
                let outcome = match step {
                    Some(_) => py_str(value(OUTCOME_ATTR)).ok()?,
                    None => None,
                };
                let start_us = match (sp.start_time_unix_nano / 1000) as i64 {
                    0 => received_us,
                    us => us,
                };
                let end_us = match (sp.end_time_unix_nano / 1000) as i64 {
                    0 => start_us,
                    us => us.max(start_us),
                };
                let parent = (sp.parent_span_id.len() == 8
                    && sp.parent_span_id.iter().any(|b| *b != 0))
                .then(|| hex(&sp.parent_span_id));
                let (code, message) = sp
                    .status
                    .as_ref()
                    .map_or((0, ""), |s| (s.code, text(&s.message)));
                let message = (!message.is_empty()).then(|| scrub(message));
                let name = scrub(text(&sp.name));
                let (trace_hex, span_hex) = (hex(tid), hex(sid));

                let mut t = Tuple(&mut out.copy);
                t.begin();
                t.text(&trace_hex);
                t.text(&span_hex);
                t.opt_text(parent.as_deref());
                t.text(&name);
                t.text(&service);
                t.int2(small(sp.kind));
                t.timestamptz(start_us);
                t.timestamptz(end_us);
                t.int8(end_us - start_us);
                t.int2(small(code));
                t.opt_text(message.as_deref());
                t.opt_text(cid.as_deref());
                t.opt_text(pipeline.as_deref());
                t.opt_text(step.as_deref());
                t.opt_text(outcome.as_deref());
                t.jsonb(|o| json_object(o, attrs));
                if sp.events.is_empty() {
                    t.jsonb_raw(b"[]");
                } else {
                    t.jsonb(|o| {
                        o.push(b'[');
                        for (i, ev) in sp.events.iter().enumerate() {
                            if i > 0 {
                                o.push(b',');
                            }
                            o.extend_from_slice(b"{\"name\":");
                            json_str(o, text(&ev.name));
                            o.extend_from_slice(b",\"time\":");
                            isoformat(o, ev.time_unix_nano);
                            o.extend_from_slice(b",\"attributes\":");
                            json_object(o, &ev.attributes);
                            o.push(b'}');
                        }
                        o.push(b']');
                    });
                }
                t.timestamptz(received_us);
                t.jsonb_raw(&res_json);
                t.opt_text(scope.as_deref());

                out.rows += 1;
                let day = start_us.div_euclid(DAY_US);
                if !out.days.contains(&day) {
                    out.days.push(day);
                }
                let kind = small(sp.kind);
                if step.is_none() && candidates && !own {
                    let destination = first_text(attrs, &keys.destination);
                    if kind == 4 || kind == 5 || code == 2 || destination.is_some() {
                        out.candidates.push(Candidate {
                            trace: trace_hex.clone(),
                            span: span_hex.clone(),
                            parent: parent.clone(),
                            name: name.to_string(),
                            service: service.to_string(),
                            kind,
                            start_us,
                            end_us,
                            status_code: small(code),
                            status_message: message.as_deref().map(str::to_string),
                            cid: cid.clone(),
                            destination,
                            group: first_text(attrs, &keys.group),
                            operation: first_text(attrs, &keys.operation),
                        });
                    }
                }
                if let Some(step) = step {
                    out.steps.push(StepRow {
                        trace: trace_hex,
                        span: span_hex,
                        parent,
                        name: name.into_owned(),
                        service: service.to_string(),
                        kind: small(sp.kind),
                        start_us,
                        end_us,
                        status_code: small(code),
                        status_message: message.map(Cow::into_owned),
                        cid,
                        pipeline: pipeline.map(Cow::into_owned),
                        step: step.into_owned(),
                        outcome: outcome.map(Cow::into_owned),
                    });
                }
            }
        }
    }
    Some(out)
}

fn parse(body: &[u8]) -> PyResult<ExportTraceServiceRequest> {
    let req = ExportTraceServiceRequest::decode(Bytes::copy_from_slice(body))
        .map_err(|e| PyValueError::new_err(format!("invalid protobuf: {e}")))?;
    if !valid_utf8(&req) {
        return Err(PyValueError::new_err(
            "invalid protobuf: a string field is not valid UTF-8",
        ));
    }
    Ok(req)
}

fn step_rows<'py>(py: Python<'py>, steps: Vec<StepRow>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for r in steps {
        let row: [Bound<'py, PyAny>; 15] = [
            r.trace.into_pyobject(py)?.into_any(),
            r.span.into_pyobject(py)?.into_any(),
            r.parent.into_pyobject(py)?.into_any(),
            r.name.into_pyobject(py)?.into_any(),
            r.service.into_pyobject(py)?.into_any(),
            r.kind.into_pyobject(py)?.into_any(),
            r.start_us.into_pyobject(py)?.into_any(),
            r.end_us.into_pyobject(py)?.into_any(),
            (r.end_us - r.start_us).into_pyobject(py)?.into_any(),
            r.status_code.into_pyobject(py)?.into_any(),
            r.status_message.into_pyobject(py)?.into_any(),
            r.cid.into_pyobject(py)?.into_any(),
            r.pipeline.into_pyobject(py)?.into_any(),
            r.step.into_pyobject(py)?.into_any(),
            r.outcome.into_pyobject(py)?.into_any(),
        ];
        out.append(PyTuple::new(py, row)?)?;
    }
    Ok(out)
}

fn candidate_rows<'py>(py: Python<'py>, rows: Vec<Candidate>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for r in rows {
        let row: [Bound<'py, PyAny>; 14] = [
            r.trace.into_pyobject(py)?.into_any(),
            r.span.into_pyobject(py)?.into_any(),
            r.parent.into_pyobject(py)?.into_any(),
            r.name.into_pyobject(py)?.into_any(),
            r.service.into_pyobject(py)?.into_any(),
            r.kind.into_pyobject(py)?.into_any(),
            r.start_us.into_pyobject(py)?.into_any(),
            r.end_us.into_pyobject(py)?.into_any(),
            r.status_code.into_pyobject(py)?.into_any(),
            r.status_message.into_pyobject(py)?.into_any(),
            r.cid.into_pyobject(py)?.into_any(),
            r.destination.into_pyobject(py)?.into_any(),
            r.group.into_pyobject(py)?.into_any(),
            r.operation.into_pyobject(py)?.into_any(),
        ];
        out.append(PyTuple::new(py, row)?)?;
    }
    Ok(out)
}

/// `decode_traces(body, received_us)` -> `(copy_tuples, n_rows, rejected, step_rows, days)` or
/// None (take the Python path). `copy_tuples`: binary COPY tuples for `spans` (no header or
/// trailer); `step_rows`: the first 15 columns (`COLUMNS[:15]`, times as integer microseconds
/// since the Unix epoch) of each span carrying a step attribute; `days`: the distinct UTC days
/// (microseconds // 86_400_000_000) of the rows' start times. The correlation id is read from
/// `hoptrace.correlation_id` only (see `decode_with`). Raises ValueError on malformed protobuf.
#[pyfunction]
fn decode_traces<'py>(
    py: Python<'py>,
    body: &[u8],
    received_us: i64,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let req = parse(body)?;
    // rows are about twice the protobuf size (hex ids, JSON, the resource per span)
    let Some(out) = decode(&req, received_us, body.len() * 2 + 1024, &Keys::default_keys()) else {
        return Ok(None);
    };
    let result = (
        PyBytes::new(py, &out.copy),
        out.rows,
        out.rejected,
        step_rows(py, out.steps)?,
        out.days,
    );
    Ok(Some(result.into_pyobject(py)?))
}

/// `decode_with(body, received_us, keys)` -> `decode_traces`'s tuple plus `candidates`: the
/// correlation id comes from the first of `keys.cid` holding a valid id, and `candidates` lists
/// the spans without a step attribute that are consumer/producer spans, name a messaging
/// destination (`keys.destination`) or have status ERROR (except spans of a resource marked
/// `keys.own`: services whose steps report themselves), as `(trace, span, parent, name,
/// service, kind, start_us, end_us, status_code, status_message, cid, destination, group,
/// operation)` (string attributes only; the first spelling present wins).
#[pyfunction]
fn decode_with<'py>(
    py: Python<'py>,
    body: &[u8],
    received_us: i64,
    keys: &Keys,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let req = parse(body)?;
    let Some(out) = decode(&req, received_us, body.len() * 2 + 1024, keys) else {
        return Ok(None);
    };
    let result = (
        PyBytes::new(py, &out.copy),
        out.rows,
        out.rejected,
        step_rows(py, out.steps)?,
        out.days,
        candidate_rows(py, out.candidates)?,
    );
    Ok(Some(result.into_pyobject(py)?))
}

/// `count_spans(body) -> int`: the spans in a request body, without decoding them (the receivers
/// refuse a request the write queue cannot take before decoding it). ValueError when the body
/// is not protobuf.
#[pyfunction]
fn count_spans(body: &[u8]) -> PyResult<usize> {
    let req = SpanCountRequest::decode(Bytes::copy_from_slice(body))
        .map_err(|e| PyValueError::new_err(format!("invalid protobuf: {e}")))?;
    Ok(req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum())
}

/// `is_valid_correlation_id(value: str) -> bool`, the native twin of hoptrace.ids' rule.
#[pyfunction]
fn is_valid_correlation_id(value: &str) -> bool {
    valid_cid(value)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_traces, m)?)?;
    m.add_function(wrap_pyfunction!(decode_with, m)?)?;
    m.add_class::<Keys>()?;
    m.add_function(wrap_pyfunction!(is_valid_correlation_id, m)?)?;
    m.add_function(wrap_pyfunction!(count_spans, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_454), (2026, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn correlation_ids() {
        assert!(valid_cid("pay-1") && valid_cid("a") && valid_cid(&"a".repeat(128)));
        assert!(
            !valid_cid("") && !valid_cid("-a") && !valid_cid("a b") && !valid_cid(&"a".repeat(129))
        );
        assert!(!valid_cid("é") && !valid_cid("a\0"));
    }

    #[test]
    fn floats_as_orjson() {
        let f = |v| {
            let mut o = Vec::new();
            json_f64(&mut o, v);
            String::from_utf8(o).unwrap()
        };
        assert_eq!(f(1e16), "1e+16");
        assert_eq!(f(1e-7), "1e-7");
        assert_eq!(f(1.0), "1.0");
        assert_eq!(f(f64::NAN), "null");
    }
}
