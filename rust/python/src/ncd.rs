//! Glue for lmkern_core::ncd (gzip sizes, NCD, ZIP-FIT alignment). Texts arrive as `bytes` (the
//! Python layer encodes str as UTF-8); outputs are written at the address of a C-contiguous float64
//! numpy array that the caller allocated with the documented length.
use crate::to_py;
use lmkern_core::ncd;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Borrow every item of a sequence of `bytes` (no copy); TypeError naming the first bad item.
fn bytes_items<'py>(name: &str, seq: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    if seq.is_instance_of::<PyBytes>() || seq.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a sequence of bytes, got a single {}",
            seq.get_type().name()?
        )));
    }
    let mut items = Vec::new();
    for (i, item) in seq.try_iter()?.enumerate() {
        let item = item?;
        match item.cast_into::<PyBytes>() {
            Ok(b) => items.push(b),
            Err(e) => {
                return Err(PyTypeError::new_err(format!(
                    "{name}[{i}]: expected bytes, got {}",
                    e.into_inner().get_type().name()?
                )))
            }
        }
    }
    Ok(items)
}

fn out_slice<'a>(out_addr: u64, len: usize) -> PyResult<&'a mut [f64]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if out_addr == 0 || !out_addr.is_multiple_of(std::mem::align_of::<f64>() as u64) {
        return Err(PyValueError::new_err(format!(
            "out_addr: expected the non-null, 8-byte aligned address of a float64 array, got {out_addr:#x}"
        )));
    }
    // SAFETY: the caller (lmkern.ncd) passes the data address of a C-contiguous float64 numpy array of
    // exactly `len` elements that it owns and does not touch until this call returns.
    Ok(unsafe { std::slice::from_raw_parts_mut(out_addr as usize as *mut f64, len) })
}

/// `len(gzip.compress(t, compresslevel=level))` for every bytes `t`.
#[pyfunction]
fn ncd_gzip_sizes(py: Python<'_>, texts: &Bound<'_, PyAny>, level: i32) -> PyResult<Vec<i64>> {
    let items = bytes_items("texts", texts)?;
    let slices: Vec<&[u8]> = items.iter().map(|b| b.as_bytes()).collect();
    py.detach(|| ncd::compressed_sizes(&slices, level)).map_err(to_py)
}

/// The bundled stock zlib (the test oracle): 18 + raw deflate length (wbits -15, memLevel 8).
#[pyfunction]
fn zlib_gzip_size(py: Python<'_>, data: &Bound<'_, PyBytes>, level: i32) -> PyResult<i64> {
    let d = data.as_bytes();
    py.detach(|| ncd::zlib_gzip_size(d, level)).map_err(to_py)
}

/// The bundled zlib's version string.
#[pyfunction]
fn zlib_version() -> String {
    ncd::zlib_version()
}

/// Scores sources against fixed targets (gzip-NCD / ZIP-FIT); see lmkern_core::ncd::NcdScorer.
#[pyclass(module = "lmkern._core", frozen)]
struct NcdScorer {
    inner: ncd::NcdScorer,
}

#[pymethods]
impl NcdScorer {
    #[new]
    fn new(py: Python<'_>, targets: &Bound<'_, PyAny>, level: i32) -> PyResult<Self> {
        let items = bytes_items("targets", targets)?;
        let owned: Vec<Vec<u8>> = items.iter().map(|b| b.as_bytes().to_vec()).collect();
        let inner = py.detach(|| ncd::NcdScorer::new(owned, level)).map_err(to_py)?;
        Ok(NcdScorer { inner })
    }

    #[getter]
    fn n_targets(&self) -> usize {
        self.inner.n_targets()
    }

    #[getter]
    fn level(&self) -> i32 {
        self.inner.level()
    }

    fn target_sizes(&self) -> Vec<i64> {
        self.inner.target_sizes().to_vec()
    }

    /// Writes len(sources) * n_targets float64, row-major, at out_addr.
    fn ncd_into(&self, py: Python<'_>, sources: &Bound<'_, PyAny>, out_addr: u64) -> PyResult<()> {
        let items = bytes_items("sources", sources)?;
        let slices: Vec<&[u8]> = items.iter().map(|b| b.as_bytes()).collect();
        let out = out_slice(out_addr, slices.len() * self.inner.n_targets())?;
        py.detach(|| self.inner.ncd_into(&slices, out)).map_err(to_py)
    }

    /// Writes len(sources) float64 alignments at out_addr.
    fn alignment_into(&self, py: Python<'_>, sources: &Bound<'_, PyAny>, out_addr: u64) -> PyResult<()> {
        let items = bytes_items("sources", sources)?;
        let slices: Vec<&[u8]> = items.iter().map(|b| b.as_bytes()).collect();
        if self.inner.n_targets() == 0 {
            return Err(PyValueError::new_err("targets: expected at least one target for an alignment, got none"));
        }
        let out = out_slice(out_addr, slices.len())?;
        py.detach(|| self.inner.alignment_into(&slices, out)).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!("NcdScorer(n_targets={}, level={})", self.inner.n_targets(), self.inner.level())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ncd_gzip_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(zlib_gzip_size, m)?)?;
    m.add_function(wrap_pyfunction!(zlib_version, m)?)?;
    m.add_class::<NcdScorer>()?;
    Ok(())
}
