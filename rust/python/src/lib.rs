//! lmkern._core: PyO3 glue over lmkern-core. Converts arguments and errors; computes nothing.
//!
//! Tensors arrive as raw addresses (`Tensor.data_ptr()`, 0 for None) plus the sizes the Python layer
//! has already checked against the tensors it allocated. This module is private: `lmkern.ops` is the
//! only caller, and it guarantees the buffer sizes each core function documents.
use lmkern_core::{DType, Device, Error, ErrorKind};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

mod ncd;
mod norm;
mod quant;

pub(crate) fn to_py(e: Error) -> PyErr {
    match e.kind {
        ErrorKind::Value => PyValueError::new_err(e.message),
        ErrorKind::Type => PyTypeError::new_err(e.message),
        ErrorKind::Cuda => PyRuntimeError::new_err(e.message),
        ErrorKind::Interrupted => PyKeyboardInterrupt::new_err(e.message),
    }
}

/// `device` is -1 for CPU, else the CUDA ordinal; `stream` the raw CUstream (CUDA only).
pub(crate) fn device(device: i64, stream: u64) -> PyResult<Device> {
    match device {
        -1 => Ok(Device::Cpu),
        d if d >= 0 => Ok(Device::Cuda { ordinal: d as usize, stream }),
        d => Err(PyValueError::new_err(format!("device: expected -1 (cpu) or a CUDA ordinal, got {d}"))),
    }
}

pub(crate) fn dtype(code: i32) -> PyResult<DType> {
    DType::from_code(code).map_err(to_py)
}

/// None when the CUDA path works here, else the reason it does not.
#[pyfunction]
fn cuda_status() -> Option<String> {
    lmkern_core::cuda_status().err()
}

/// The instruction set of the CPU kernels: "baseline", "avx2" or "avx512" (LMKERN_CPU_ISA caps it).
#[pyfunction]
fn cpu_isa() -> &'static str {
    lmkern_core::cpu_isa()
}

/// Without the GIL: starting or stopping thousands of threads takes seconds.
#[pyfunction]
fn set_num_threads(py: Python<'_>, threads: usize) {
    py.detach(|| lmkern_core::parallel::set_num_threads(threads))
}

#[pyfunction]
fn get_num_threads() -> usize {
    lmkern_core::parallel::num_threads()
}

/// Run the CPU kernels on the threads of the OpenMP runtime at `path`, already loaded (torch's).
#[pyfunction]
fn share_openmp_runtime(path: &str) -> PyResult<()> {
    lmkern_core::parallel::share_openmp_runtime(path).map_err(pyo3::exceptions::PyRuntimeError::new_err)
}

/// Back to lmkern's own thread pool.
#[pyfunction]
fn stop_sharing_openmp() {
    lmkern_core::parallel::stop_sharing_openmp()
}

/// The path of the OpenMP runtime the CPU kernels share, or None (lmkern's own pool).
#[pyfunction]
fn shared_openmp_runtime() -> Option<String> {
    lmkern_core::parallel::shared_openmp_runtime()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_status, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(share_openmp_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(stop_sharing_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(shared_openmp_runtime, m)?)?;
    norm::register(m)?;
    quant::register(m)?;
    ncd::register(m)?;
    Ok(())
}
