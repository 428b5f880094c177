//! Fused RMSNorm and CRMSNorm (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers").
//!
//! Rows are the last dimension (length `n`); the caller flattens leading dims into `rows` and passes
//! contiguous buffers. Forward, with optional fused residual `h = x + residual` (h rounded to the
//! element type, as torch's composite would):
//!   RMSNorm  r = (Σh²/n + eps)^-½
//!   CRMSNorm r = ((Σh² + (Σh)²)/(n+1) + eps)^-½     (h is a zero-mean vector with its last entry dropped)
//!   y = h · r · (offset + w) · scale
//! Backward, with g = dy·(offset+w)·scale and c = Σ g·h per row:
//!   RMSNorm  dh = r·g − (r³/n)·c·h
//!   CRMSNorm dh = r·g − (r³/(n+1))·c·(h + Σh)
//!   dh += dh_out (gradient of the returned h)        dw = scale · Σ_rows dy·h·r
//! dw is reduced deterministically: each of `parts` fixed row ranges writes a float32 partial row,
//! then the partials are summed in order. `parts` depends on the shape only (see [`dw_parts`]).
use crate::error::{Error, Result};
use crate::tensor::{require_aligned, require_ptr, DType, Device, Ptr};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    Crms,
}

/// Sizes and scalars shared by every norm kernel.
#[derive(Debug, Clone, Copy)]
pub struct NormArgs {
    pub kind: NormKind,
    pub dtype: DType,
    pub rows: usize,
    pub n: usize,
    pub eps: f64,
    pub offset: f64,
    pub scale: f64,
}

impl NormArgs {
    /// The divisor of the mean square: n for RMSNorm, n + 1 for CRMSNorm.
    pub fn divisor(&self) -> f64 {
        match self.kind {
            NormKind::Rms => self.n as f64,
            NormKind::Crms => self.n as f64 + 1.0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.n == 0 && self.rows > 0 {
            return Err(Error::value("x: the normalized (last) dimension must not be empty"));
        }
        if self.n > i32::MAX as usize {
            return Err(Error::value(format!("x: last dimension {} exceeds the supported 2^31-1", self.n)));
        }
        if !self.eps.is_finite() || self.eps < 0.0 {
            return Err(Error::value(format!("eps: expected a finite value >= 0, got {}", self.eps)));
        }
        if !self.offset.is_finite() || !self.scale.is_finite() {
            return Err(Error::value(format!(
                "offset and scale must be finite, got offset={} scale={}",
                self.offset, self.scale
            )));
        }
        Ok(())
    }
}

/// Forward buffers. `x`, `y`, `h`, `residual`: rows·n elements of `dtype`; `weight`: n elements of
/// `dtype`; `rstd`: rows elements of the accumulation type (float64 for float64, float32 otherwise).
/// `residual` and `h` are both given or both 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct NormFwd {
    pub x: Ptr,
    /// Optional residual added to x before the norm (0: none).
    pub residual: Ptr,
    /// Optional weight (0: none, the factor (offset + w) is then 1).
    pub weight: Ptr,
    pub y: Ptr,
    /// Output h = x + residual, required iff `residual` is given.
    pub h: Ptr,
    /// Optional per-row 1/rms, saved for the backward (0: not stored, e.g. inference).
    pub rstd: Ptr,
}

/// Backward buffers. `dy`, `h` (the normalized input: x, or x + residual), `dh_out` (optional gradient
/// of the returned h), `dx`: rows·n elements of `dtype`; `weight`: n elements (0: none); `rstd` as saved
/// by the forward; `dw_partial`: parts·n scratch of the accumulation type and `dw`: n elements of
/// `dtype`, both given iff the weight gradient is wanted.
#[derive(Debug, Clone, Copy, Default)]
pub struct NormBwd {
    pub dy: Ptr,
    pub h: Ptr,
    pub weight: Ptr,
    pub rstd: Ptr,
    pub dh_out: Ptr,
    pub dx: Ptr,
    pub dw_partial: Ptr,
    pub dw: Ptr,
    pub parts: usize,
}

/// Number of row ranges the weight gradient is reduced over: a function of the shape only, so the
/// result does not depend on the thread count or the device. Enough ranges to fill a GPU, few enough
/// that the partials (parts·n floats) stay small next to the activations.
pub fn dw_parts(rows: usize, n: usize) -> usize {
    const ROWS_PER_PART: usize = 16;
    const MAX_PARTS: usize = 512;
    const MAX_PARTIAL_ELEMS: usize = 1 << 22;
    let by_rows = rows.div_ceil(ROWS_PER_PART);
    let by_size = (MAX_PARTIAL_ELEMS / n.max(1)).max(1);
    by_rows.min(MAX_PARTS).min(by_size).max(1)
}

/// Whether `p` asks for the in-place forward: y written over x and h over residual (`y == x`, and
/// `h == residual` when there is a residual).
pub fn is_in_place(p: &NormFwd) -> bool {
    p.x != 0 && p.y == p.x
}

/// # Safety
/// Every non-zero address in `p` is valid for the element count documented on [`NormFwd`], readable
/// (inputs) or writable (outputs) on `device`, and no output overlaps any other buffer — except in
/// place ([`is_in_place`]), where `y` is exactly `x` and `h` exactly `residual`, and `x`, `residual`
/// still overlap nothing else.
pub unsafe fn forward(device: Device, a: &NormArgs, p: &NormFwd) -> Result<()> {
    a.validate()?;
    if (p.residual == 0) != (p.h == 0) {
        return Err(Error::value("residual and h must be given together"));
    }
    if p.residual != 0 && is_in_place(p) != (p.h == p.residual) {
        return Err(Error::value("in place, y must be x and h must be residual (both or neither)"));
    }
    if a.rows == 0 {
        return Ok(());
    }
    require_ptr(p.x, "x")?;
    require_ptr(p.y, "y")?;
    let (es, acc) = (a.dtype.size(), a.dtype.acc_size());
    for (ptr, name, align) in
        [(p.x, "x", es), (p.residual, "residual", es), (p.weight, "weight", es), (p.y, "y", es), (p.h, "h", es), (p.rstd, "rstd", acc)]
    {
        require_aligned(ptr, align, name)?;
    }
    match device {
        Device::Cpu => cpu::forward(a, p),
        Device::Cuda { ordinal, stream } => cuda_forward(ordinal, stream, a, p),
    }
}

/// # Safety
/// As [`forward`], for the buffers documented on [`NormBwd`].
pub unsafe fn backward(device: Device, a: &NormArgs, p: &NormBwd) -> Result<()> {
    a.validate()?;
    if (p.dw_partial == 0) != (p.dw == 0) {
        return Err(Error::value("dw_partial and dw must be given together"));
    }
    if p.dw != 0 {
        if p.weight == 0 {
            return Err(Error::value("dw: a weight gradient needs the weight"));
        }
        if p.parts != dw_parts(a.rows, a.n) {
            return Err(Error::value(format!(
                "dw_partial: expected {} partial rows for shape [{}, {}], got {}",
                dw_parts(a.rows, a.n),
                a.rows,
                a.n,
                p.parts
            )));
        }
    }
    if a.rows == 0 && p.dw == 0 {
        return Ok(());
    }
    if a.rows > 0 {
        require_ptr(p.dy, "dy")?;
        require_ptr(p.h, "x")?;
        require_ptr(p.rstd, "rstd")?;
        require_ptr(p.dx, "dx")?;
    }
    let (es, acc) = (a.dtype.size(), a.dtype.acc_size());
    for (ptr, name, align) in [
        (p.dy, "dy", es),
        (p.h, "x", es),
        (p.weight, "weight", es),
        (p.rstd, "rstd", acc),
        (p.dh_out, "dh", es),
        (p.dx, "dx", es),
        (p.dw_partial, "dw_partial", acc),
        (p.dw, "dw", es),
    ] {
        require_aligned(ptr, align, name)?;
    }
    match device {
        Device::Cpu => cpu::backward(a, p),
        Device::Cuda { ordinal, stream } => cuda_backward(ordinal, stream, a, p),
    }
}

#[cfg(feature = "cuda")]
unsafe fn cuda_forward(ordinal: usize, stream: u64, a: &NormArgs, p: &NormFwd) -> Result<()> {
    if a.dtype == DType::F64 {
        return Err(Error::dtype("x: float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA"));
    }
    cuda::forward(ordinal, stream, a, p)
}

#[cfg(feature = "cuda")]
unsafe fn cuda_backward(ordinal: usize, stream: u64, a: &NormArgs, p: &NormBwd) -> Result<()> {
    if a.dtype == DType::F64 {
        return Err(Error::dtype("x: float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA"));
    }
    cuda::backward(ordinal, stream, a, p)
}

#[cfg(not(feature = "cuda"))]
unsafe fn cuda_forward(_: usize, _: u64, _: &NormArgs, _: &NormFwd) -> Result<()> {
    Err(Error::cuda("lmkern was built without CUDA support"))
}

#[cfg(not(feature = "cuda"))]
unsafe fn cuda_backward(_: usize, _: u64, _: &NormArgs, _: &NormBwd) -> Result<()> {
    Err(Error::cuda("lmkern was built without CUDA support"))
}
