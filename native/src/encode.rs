//! SDK side: finished spans -> OTLP trace request bodies (owned by the instrumentation work).

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
