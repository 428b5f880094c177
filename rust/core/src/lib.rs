//! lmkern-core: fused numeric kernels from language-model papers, CPU (rayon) and CUDA (cudarc).
//!
//! Knows nothing of Python: callers pass raw addresses of buffers they own (see [`tensor`]) and get a
//! [`error::Error`] back on bad input, never a panic.
pub(crate) mod cpu;
pub mod error;
pub mod ncd;
pub mod norm;
pub mod parallel;
pub mod quant;
pub mod tensor;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use error::{Error, ErrorKind, Result};
pub use tensor::{DType, Device, Ptr};

/// The instruction set the CPU kernels use here ("baseline", "avx2" or "avx512"): the widest the
/// CPU has, capped by the environment variable LMKERN_CPU_ISA when set.
pub fn cpu_isa() -> &'static str {
    cpu::isa().name()
}

/// Whether the CUDA path can run here: `Ok(())`, or why not (built without CUDA, no driver, no device).
pub fn cuda_status() -> std::result::Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        cuda::status()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("lmkern was built without the cuda feature".to_string())
    }
}
