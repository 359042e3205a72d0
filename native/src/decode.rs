//! Collector side: OTLP trace request bodies -> span rows (owned by the collector work).

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
