//! Borrowed tensor data as the kernels see it: a raw address, a dtype and a device.
//!
//! Memory is owned by the caller (torch). A kernel receives addresses of contiguous buffers and the
//! sizes that describe them; the caller guarantees that each address is valid for the number of
//! elements the op's arguments imply (see each op's `# Safety`), and that outputs do not overlap inputs.
use crate::error::{Error, Result};

/// Element types the kernels know. The integer codes are the ones the Python layer passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
}

impl DType {
    pub fn from_code(code: i32) -> Result<Self> {
        match code {
            0 => Ok(DType::F32),
            1 => Ok(DType::F64),
            2 => Ok(DType::F16),
            3 => Ok(DType::BF16),
            _ => Err(Error::dtype(format!("unknown dtype code {code}; expected 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Size of the type reductions accumulate in: float64 for float64, float32 otherwise.
    pub fn acc_size(self) -> usize {
        match self {
            DType::F64 => 8,
            _ => 4,
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Where the buffers live. For CUDA, `stream` is the raw `CUstream` to launch on (torch's current
/// stream), in the device's primary context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda { ordinal: usize, stream: u64 },
}

/// A raw address of a buffer, 0 meaning "not given".
pub type Ptr = u64;

pub(crate) fn require_ptr(ptr: Ptr, name: &str) -> Result<()> {
    if ptr == 0 {
        Err(Error::value(format!("{name}: expected a buffer, got a null address")))
    } else {
        Ok(())
    }
}

pub(crate) fn require_aligned(ptr: Ptr, align: usize, name: &str) -> Result<()> {
    if !ptr.is_multiple_of(align as u64) {
        Err(Error::value(format!("{name}: address {ptr:#x} is not aligned to its element size {align}")))
    } else {
        Ok(())
    }
}
