//! hoptrace_native: the OTLP codec hot paths, as a Python extension module.
//!
//! - `decode`: collector side, an ExportTraceServiceRequest body -> binary COPY rows for `spans`.
//! - `encode`: SDK side, finished spans -> an ExportTraceServiceRequest body.
//!
//! Each submodule registers its own functions; hoptrace imports this module optionally and
//! falls back to its pure-Python codec when it is missing.

use pyo3::prelude::*;

mod decode;
mod encode;

#[pymodule]
fn hoptrace_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    decode::register(m)?;
    encode::register(m)?;
    Ok(())
}
