//! Glue for lmkern_core::norm.
use crate::{device, dtype, to_py};
use lmkern_core::norm::{self, NormArgs, NormBwd, NormFwd, NormKind};
use pyo3::prelude::*;

fn kind(crms: bool) -> NormKind {
    if crms {
        NormKind::Crms
    } else {
        NormKind::Rms
    }
}

#[pyfunction]
fn norm_dw_parts(rows: usize, n: usize) -> usize {
    norm::dw_parts(rows, n)
}

/// Forward of RMSNorm (crms=False) or CRMSNorm (crms=True); see lmkern_core::norm::NormFwd.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn norm_forward(
    py: Python<'_>,
    crms: bool,
    dtype_code: i32,
    device_index: i64,
    stream: u64,
    rows: usize,
    n: usize,
    eps: f64,
    offset: f64,
    scale: f64,
    x: u64,
    residual: u64,
    weight: u64,
    y: u64,
    h: u64,
    rstd: u64,
) -> PyResult<()> {
    let args = NormArgs { kind: kind(crms), dtype: dtype(dtype_code)?, rows, n, eps, offset, scale };
    let ptrs = NormFwd { x, residual, weight, y, h, rstd };
    let dev = device(device_index, stream)?;
    // SAFETY: lmkern.ops.norm allocates every buffer with torch for exactly these sizes and dtype.
    py.detach(|| unsafe { norm::forward(dev, &args, &ptrs) }).map_err(to_py)
}

/// Backward of RMSNorm/CRMSNorm; see lmkern_core::norm::NormBwd.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    py: Python<'_>,
    crms: bool,
    dtype_code: i32,
    device_index: i64,
    stream: u64,
    rows: usize,
    n: usize,
    offset: f64,
    scale: f64,
    dy: u64,
    h: u64,
    weight: u64,
    rstd: u64,
    dh_out: u64,
    dx: u64,
    dw_partial: u64,
    dw: u64,
    parts: usize,
) -> PyResult<()> {
    let args = NormArgs { kind: kind(crms), dtype: dtype(dtype_code)?, rows, n, eps: 0.0, offset, scale };
    let ptrs = NormBwd { dy, h, weight, rstd, dh_out, dx, dw_partial, dw, parts };
    let dev = device(device_index, stream)?;
    // SAFETY: as in norm_forward.
    py.detach(|| unsafe { norm::backward(dev, &args, &ptrs) }).map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(norm_dw_parts, m)?)?;
    m.add_function(wrap_pyfunction!(norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(norm_backward, m)?)?;
    Ok(())
}
