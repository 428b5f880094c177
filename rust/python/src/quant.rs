//! Glue for lmkern_core::quant (power-exponent quantization).
use crate::{device, dtype, to_py};
use lmkern_core::quant::{self, LinearArgs, QuantArgs, SearchArgs};
use pyo3::prelude::*;
use std::sync::Mutex;

fn qargs(bits: u32, rows: usize, n: usize, group: usize, clip: f64) -> QuantArgs {
    QuantArgs { bits, rows, n, group, clip }
}

#[pyfunction]
fn quant_row_bytes(n: usize, bits: u32) -> usize {
    quant::row_bytes(n, bits)
}

/// See lmkern_core::quant::cuda_gemv_max_tokens.
#[pyfunction]
fn quant_cuda_gemv_max_tokens(dtype_code: i32, bits: u32, n: usize, group: usize) -> PyResult<usize> {
    Ok(quant::cuda_gemv_max_tokens(dtype(dtype_code)?, bits, n, group))
}

/// See lmkern_core::quant::cpu_gemv_max_tokens.
#[pyfunction]
fn quant_cpu_gemv_max_tokens(bits: u32, n: usize, group: usize) -> usize {
    quant::cpu_gemv_max_tokens(bits, n, group)
}

/// See lmkern_core::quant::cpu_bwd_gemv_max_tokens.
#[pyfunction]
fn quant_cpu_bwd_gemv_max_tokens(bits: u32, n: usize, group: usize) -> usize {
    quant::cpu_bwd_gemv_max_tokens(bits, n, group)
}

/// See lmkern_core::quant::quantize.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_quantize(
    py: Python<'_>, dtype_code: i32, device_index: i64, stream: u64, bits: u32, rows: usize, n: usize, group: usize,
    clip: f64, x: u64, a: u64, codes: u64, scales: u64,
) -> PyResult<()> {
    let (dt, dev, q) = (dtype(dtype_code)?, device(device_index, stream)?, qargs(bits, rows, n, group, clip));
    // SAFETY: lmkern.ops.quant allocates every buffer with torch for exactly these sizes and dtypes.
    py.detach(|| unsafe { quant::quantize(dev, dt, &q, x, a, codes, scales) }).map_err(to_py)
}

/// See lmkern_core::quant::dequantize.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_dequantize(
    py: Python<'_>, dtype_code: i32, device_index: i64, stream: u64, bits: u32, rows: usize, n: usize, group: usize,
    codes: u64, scales: u64, a: u64, out: u64,
) -> PyResult<()> {
    let (dt, dev, q) = (dtype(dtype_code)?, device(device_index, stream)?, qargs(bits, rows, n, group, 1.0));
    // SAFETY: as in quant_quantize.
    py.detach(|| unsafe { quant::dequantize(dev, dt, &q, codes, scales, a, out) }).map_err(to_py)
}

/// See lmkern_core::quant::dequantize_codebooks.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_dequantize_codebooks(
    py: Python<'_>, dtype_code: i32, device_index: i64, stream: u64, bits: u32, rows: usize, n: usize, group: usize,
    codes: u64, scales: u64, table: u64, out: u64,
) -> PyResult<()> {
    let (dt, dev, q) = (dtype(dtype_code)?, device(device_index, stream)?, qargs(bits, rows, n, group, 1.0));
    // SAFETY: as in quant_quantize.
    py.detach(|| unsafe { quant::dequantize_codebooks(dev, dt, &q, codes, scales, table, out) }).map_err(to_py)
}

/// See lmkern_core::quant::fake_quantize.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_fake(
    py: Python<'_>, dtype_code: i32, device_index: i64, stream: u64, bits: u32, rows: usize, n: usize, group: usize,
    clip: f64, x: u64, a: u64, y: u64, scales: u64,
) -> PyResult<()> {
    let (dt, dev, q) = (dtype(dtype_code)?, device(device_index, stream)?, qargs(bits, rows, n, group, clip));
    // SAFETY: as in quant_quantize.
    py.detach(|| unsafe { quant::fake_quantize(dev, dt, &q, x, a, y, scales) }).map_err(to_py)
}

/// See lmkern_core::quant::fake_quantize_backward.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_fake_backward(
    py: Python<'_>, dtype_code: i32, device_index: i64, stream: u64, bits: u32, rows: usize, n: usize, group: usize,
    dy: u64, x: u64, scales: u64, a: u64, dx: u64, da: u64,
) -> PyResult<()> {
    let (dt, dev, q) = (dtype(dtype_code)?, device(device_index, stream)?, qargs(bits, rows, n, group, 1.0));
    // SAFETY: as in quant_quantize.
    py.detach(|| unsafe { quant::fake_quantize_backward(dev, dt, &q, dy, x, scales, a, dx, da) }).map_err(to_py)
}

/// See lmkern_core::quant::linear.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_linear(
    py: Python<'_>, dtype_code: i32, device_index: i64, stream: u64, bits: u32, out_features: usize,
    in_features: usize, group: usize, tokens: usize, x: u64, codes: u64, scales: u64, table: u64, bias: u64, y: u64,
) -> PyResult<()> {
    let (dt, dev) = (dtype(dtype_code)?, device(device_index, stream)?);
    let l = LinearArgs { q: qargs(bits, out_features, in_features, group, 1.0), tokens };
    // SAFETY: as in quant_quantize.
    py.detach(|| unsafe { quant::linear(dev, dt, &l, x, codes, scales, table, bias, y) }).map_err(to_py)
}

#[pyfunction]
fn quant_codebook(py: Python<'_>, bits: u32, rows: usize, a: u64, out: u64) -> PyResult<()> {
    // SAFETY: as in quant_quantize.
    py.detach(|| unsafe { quant::codebook(bits, rows, a, out) }).map_err(to_py)
}

/// See lmkern_core::quant::linear_backward.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_linear_backward(
    py: Python<'_>, dtype_code: i32, device_index: i64, stream: u64, bits: u32, out_features: usize,
    in_features: usize, group: usize, tokens: usize, dy: u64, codes: u64, scales: u64, table: u64, dx: u64,
) -> PyResult<()> {
    let (dt, dev) = (dtype(dtype_code)?, device(device_index, stream)?);
    let l = LinearArgs { q: qargs(bits, out_features, in_features, group, 1.0), tokens };
    // SAFETY: as in quant_quantize.
    py.detach(|| unsafe { quant::linear_backward(dev, dt, &l, dy, codes, scales, table, dx) }).map_err(to_py)
}

/// See lmkern_core::quant::codebook (CPU).
/// See lmkern_core::quant::search_exponent (CPU, float32 w and z).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quant_search(
    py: Python<'_>, bits: u32, rows: usize, n: usize, group: usize, clip: f64, per_row: bool, z_rows: usize, lo: f64,
    grid: usize, refine: usize, w: u64, z: u64, out: u64, interruptible: bool,
) -> PyResult<()> {
    let s = SearchArgs { q: qargs(bits, rows, n, group, clip), per_row, z_rows, lo, grid, refine };
    // Ctrl-C during a long search: the core polls this on this thread, which takes the GIL back for
    // a moment to run Python's signal handlers; their exception (KeyboardInterrupt) is raised here.
    // Only when called on the main thread (`interruptible`): handlers run nowhere else, and a daemon
    // thread re-attaching while the interpreter finalizes may be ended in the middle of the call.
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let poll = || {
        Python::attach(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                true
            }
        })
    };
    // SAFETY: as in quant_quantize.
    let result = py.detach(|| {
        // (made on this thread: the one that polls)
        let stop = if interruptible { lmkern_core::parallel::Stop::new(&poll) } else { lmkern_core::parallel::Stop::never() };
        unsafe { quant::search_exponent_stoppable(lmkern_core::Device::Cpu, &s, w, z, out, &stop) }
    });
    if let Some(e) = raised.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    result.map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quant_row_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(quant_cuda_gemv_max_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(quant_cpu_gemv_max_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(quant_cpu_bwd_gemv_max_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(quant_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant_dequantize_codebooks, m)?)?;
    m.add_function(wrap_pyfunction!(quant_fake, m)?)?;
    m.add_function(wrap_pyfunction!(quant_fake_backward, m)?)?;
    m.add_function(wrap_pyfunction!(quant_codebook, m)?)?;
    m.add_function(wrap_pyfunction!(quant_linear, m)?)?;
    m.add_function(wrap_pyfunction!(quant_linear_backward, m)?)?;
    m.add_function(wrap_pyfunction!(quant_search, m)?)?;
    Ok(())
}
