//! Power-exponent quantization: PowerQuant (ICLR 2023) and NUPES (Yvinec et al.); PAPERS.md §2.
//!
//! # The operator
//! b bits (b ∈ {2, 3, 4, 8}), `qmax = 2^(b−1) − 1`, exponent `0 < a ≤ 1` (one per row), groups of
//! `g` contiguous elements of a row (g divides the row length n), per group `m = clip · max|x|`:
//!   `q = clamp(round(qmax · sign(x) · (|x|/m)^a), −qmax, qmax)`   (round half away from zero)
//!   `x̂ = m · sign(q) · (|q|/qmax)^(1/a)`                         (m = 0 gives x̂ = 0)
//! a = 1 is plain symmetric absmax integer quantization.
//!
//! The quantizer never raises to a power per element: for a given a, `|q| = k` exactly when
//! `t_(k−1) ≤ |x|/m < t_k` with the fixed boundaries `t_k = ((k + 0.5)/qmax)^(1/a)`, k = 0..qmax−1.
//! Per group the kernels compare |x| with `T_k = t_k · m`, computed in float64 and rounded UP to the
//! comparison type (float32 for float32/bfloat16/float16 input, float64 for float64 input), so
//! `|x| ≥ T_k` in that type is exactly `|x|/m ≥ t_k` up to the float64 rounding of `t_k · m`. The
//! dequantizer is a table of `2^b` values `sign(q)·(|q|/qmax)^(1/a)` per row, times m per group.
//!
//! # Packed layout (shared with the rotation quantizer, PAPERS.md §3)
//! For a tensor of shape [..., n], `rows` = product of the leading dims.
//! - **codes**: uint8 `[rows, row_bytes(n, b)]`, `row_bytes = ceil(n·b/8)`. The code of element j of a
//!   row is the b-bit two's-complement field of q (`q & (2^b − 1)`); a row's fields form a
//!   little-endian bit stream, LSB first: field j occupies bits `[j·b, (j+1)·b)` of the row, bit i of
//!   the stream being bit `i % 8` of byte `i / 8`. So 8-bit codes are plain int8, 4-bit codes are two
//!   per byte (element 2i in the low nibble of byte i, 2i+1 in the high nibble), 2-bit codes four per
//!   byte (element 4i+s in bits 2s..2s+1), and 3-bit codes eight per three bytes (as a 24-bit
//!   little-endian word, element 8i+s in bits 3s..3s+2; a field may straddle two bytes). Each row
//!   starts on a byte boundary; unused high bits of a row's last byte are 0.
//! - The field value f (0..2^b−1) means `q = f − 2^b` if `f ≥ 2^(b−1)` else `f` (sign extension).
//!   The most negative field, `−2^(b−1)`, never occurs in codes made here (|q| ≤ qmax); should it
//!   appear, it dequantizes by the same formula with |q| = 2^(b−1).
//! - **scales**: float32 `[rows, n/g]`, `m` of each group (group i of a row covers elements
//!   `[i·g, (i+1)·g)`), rounded to float32 from `clip · max|x|`; the codes are made against this
//!   stored float32 value.
//! - **exponents**: float32 `[rows]`, one a per row (a scalar exponent is stored expanded).
//!
//! Dequantizing element j of row r: `x̂ = scales[r, j / g] · lut_r[field(r, j)]` with
//! `lut_r[f] = sign(q_f) · (|q_f|/qmax)^(1/a_r)` (computed in float64, used in float32).
use crate::error::{Error, Result};
use crate::tensor::{require_aligned, require_ptr, DType, Device, Ptr};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// The bit widths the kernels support.
pub const BITS: [u32; 4] = [2, 3, 4, 8];

/// Bytes of one packed row of `n` b-bit codes.
pub fn row_bytes(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// `2^(b−1) − 1`, the largest |q|.
pub fn qmax(bits: u32) -> i32 {
    (1 << (bits - 1)) - 1
}

/// The signed code a b-bit field stands for (sign extension of its two's complement).
pub fn field_to_code(field: u8, bits: u32) -> i32 {
    let f = field as i32 & ((1 << bits) - 1);
    if f >= 1 << (bits - 1) {
        f - (1 << bits)
    } else {
        f
    }
}

/// Pack signed codes (|q| < 2^(b−1)) into one row of the layout above; `out` has
/// `row_bytes(codes.len(), bits)` bytes and is fully written.
pub fn pack_row(codes: &[i8], bits: u32, out: &mut [u8]) {
    debug_assert_eq!(out.len(), row_bytes(codes.len(), bits));
    match bits {
        8 => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = c as u8;
            }
        }
        4 => {
            // Eight codes at a time as one little-endian u64, their nibbles gathered by shifts
            // (the byte-pair loop compiled to a byte gather: ~1/3 of the quantizer's time).
            let words = codes.chunks_exact(8);
            let rest = words.remainder();
            for (o, c) in out.chunks_exact_mut(4).zip(words) {
                let c: [i8; 8] = c.try_into().unwrap();
                let x = u64::from_le_bytes(c.map(|v| v as u8)) & 0x0f0f_0f0f_0f0f_0f0f;
                let x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff; // byte pairs in the u16 lanes
                let x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff; // u16 pairs in the u32 lanes
                o.copy_from_slice(&((x | (x >> 16)) as u32).to_le_bytes());
            }
            let o = &mut out[codes.len() / 8 * 4..];
            for (i, &c) in rest.iter().enumerate() {
                let v = c as u8 & 0xf;
                o[i / 2] = if i % 2 == 0 { v } else { o[i / 2] | v << 4 };
            }
        }
        2 | 3 => {
            // As 4 bits: eight codes (b bytes) at a time, their fields gathered by shifts in
            // three steps (the bit accumulator below branches per byte: ~1/3 of the quantizer).
            let b = bits as usize;
            let words = codes.chunks_exact(8);
            let rest = words.remainder();
            for (o, c) in out.chunks_exact_mut(b).zip(words) {
                let c: [i8; 8] = c.try_into().unwrap();
                let x = u64::from_le_bytes(c.map(|v| v as u8));
                let v = if b == 2 {
                    let x = x & 0x0303_0303_0303_0303;
                    let x = (x | (x >> 6)) & 0x000f_000f_000f_000f; // 4 bits in each u16 lane
                    let x = (x | (x >> 12)) & 0x0000_00ff_0000_00ff; // 8 bits in each u32 lane
                    x | (x >> 24)
                } else {
                    let x = x & 0x0707_0707_0707_0707;
                    let x = (x | (x >> 5)) & 0x003f_003f_003f_003f; // 6 bits in each u16 lane
                    let x = (x | (x >> 10)) & 0x0000_0fff_0000_0fff; // 12 bits in each u32 lane
                    x | (x >> 20)
                };
                o.copy_from_slice(&v.to_le_bytes()[..b]);
            }
            pack_fields(rest, bits, &mut out[codes.len() / 8 * b..]);
        }
        _ => pack_fields(codes, bits, out),
    }
}

/// [`pack_row`]'s general form: the codes' fields through a bit accumulator, a byte out whenever 8
/// bits are in.
fn pack_fields(codes: &[i8], bits: u32, out: &mut [u8]) {
    let mask = (1u32 << bits) - 1;
    let (mut acc, mut nb, mut o) = (0u32, 0u32, 0usize);
    for &c in codes {
        acc |= (c as u8 as u32 & mask) << nb;
        nb += bits;
        while nb >= 8 {
            out[o] = acc as u8;
            o += 1;
            acc >>= 8;
            nb -= 8;
        }
    }
    if nb > 0 {
        out[o] = acc as u8;
    }
}

/// Unpack the fields (raw b-bit values, 0..2^b−1) of elements `[start, start + out.len())` of a row.
pub fn unpack_fields(row: &[u8], bits: u32, start: usize, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(&row[start..start + out.len()]),
        4 if start.is_multiple_of(2) => {
            let bytes = &row[start / 2..];
            let pairs = out.chunks_exact_mut(2);
            for (p, &b) in pairs.zip(bytes) {
                p[0] = b & 0xf;
                p[1] = b >> 4;
            }
            if out.len() % 2 == 1 {
                let last = out.len() - 1;
                out[last] = bytes[last / 2] & 0xf;
            }
        }
        _ => {
            let mask = (1u32 << bits) - 1;
            for (i, o) in out.iter_mut().enumerate() {
                let bit = (start + i) * bits as usize;
                let (byte, shift) = (bit / 8, bit % 8);
                let lo = row[byte] as u32;
                let hi = if shift as u32 + bits > 8 { (row[byte + 1] as u32) << 8 } else { 0 };
                *o = (((lo | hi) >> shift) & mask) as u8;
            }
        }
    }
}

/// The dequantization table of one row: `lut[f] = sign(q_f)·(|q_f|/qmax)^(1/a)` for every field f.
pub fn row_lut(bits: u32, a: f32) -> Vec<f64> {
    let qm = qmax(bits) as f64;
    let inv_a = 1.0 / a as f64;
    (0..1u32 << bits)
        .map(|f| {
            let q = field_to_code(f as u8, bits);
            let v = (q.unsigned_abs() as f64 / qm).powf(inv_a);
            if q < 0 {
                -v
            } else {
                v
            }
        })
        .collect()
}

/// The code boundaries of |x|/m for exponent a: `t_k = ((k + 0.5)/qmax)^(1/a)`, k = 0..qmax−1.
pub fn boundaries(bits: u32, a: f32) -> Vec<f64> {
    let qm = qmax(bits) as f64;
    let inv_a = 1.0 / a as f64;
    (0..qmax(bits)).map(|k| ((k as f64 + 0.5) / qm).powf(inv_a)).collect()
}

/// Sizes and options of a quantized tensor: `rows` rows of `n` elements, groups of `group`.
#[derive(Debug, Clone, Copy)]
pub struct QuantArgs {
    pub bits: u32,
    pub rows: usize,
    pub n: usize,
    pub group: usize,
    /// m = clip · max|x| (quantize only).
    pub clip: f64,
}

impl QuantArgs {
    pub fn groups(&self) -> usize {
        self.n.checked_div(self.group).unwrap_or(0)
    }

    pub fn row_bytes(&self) -> usize {
        row_bytes(self.n, self.bits)
    }

    pub fn validate(&self) -> Result<()> {
        if !BITS.contains(&self.bits) {
            return Err(Error::value(format!("bits: expected one of 2, 3, 4, 8; got {}", self.bits)));
        }
        if self.n > i32::MAX as usize {
            return Err(Error::value(format!("x: last dimension {} exceeds the supported 2^31-1", self.n)));
        }
        if self.n > 0 && (self.group == 0 || !self.n.is_multiple_of(self.group)) {
            return Err(Error::value(format!(
                "group_size: expected a positive divisor of the last dimension {}; got {}",
                self.n, self.group
            )));
        }
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return Err(Error::value(format!("clip: expected a finite value > 0; got {}", self.clip)));
        }
        Ok(())
    }
}

/// Check every exponent: finite and in (0, 1].
pub fn validate_exponents(a: &[f32]) -> Result<()> {
    for (i, &v) in a.iter().enumerate() {
        if !(v > 0.0 && v <= 1.0) {
            return Err(Error::value(format!("a: expected exponents in (0, 1]; got {v} (row {i})")));
        }
    }
    Ok(())
}

/// Check every scale: finite and >= 0 (as [`quantize`] writes them, m = clip·max|x|); a negative
/// scale from elsewhere would flip its group's signs silently.
pub fn validate_scales(scales: &[f32]) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    const BLOCK: usize = 1 << 16;
    // `&`, not `&&` or a range's `contains`: no branch, so the fold below vectorizes. False for NaN.
    #[allow(clippy::manual_range_contains)]
    let ok = |v: f32| (v >= 0.0) & (v < f32::INFINITY);
    let bad = AtomicBool::new(false);
    // Blocks folded without a branch per element (vectorized; `all` stops early and is not), on
    // the pool's threads as the dequantizer that follows: group size 1 has as many scales as codes.
    crate::parallel::for_each_task(scales.len().div_ceil(BLOCK), scales.len(), |t| {
        let c = &scales[t * BLOCK..((t + 1) * BLOCK).min(scales.len())];
        if !c.iter().fold(true, |acc, &v| acc & ok(v)) {
            bad.store(true, Ordering::Relaxed);
        }
    });
    if !bad.load(Ordering::Relaxed) {
        return Ok(());
    }
    let v = scales.iter().copied().find(|&v| !ok(v)).unwrap_or(f32::NAN);
    Err(Error::value(format!("scales: expected finite scales >= 0 (m = clip·max|x| of each group); got {v}")))
}

fn check_ptrs(list: &[(Ptr, &str, usize)]) -> Result<()> {
    for &(p, name, align) in list {
        require_ptr(p, name)?;
        require_aligned(p, align, name)?;
    }
    Ok(())
}

fn cpu_only(device: Device, what: &str) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda { .. } => Err(Error::dtype(format!("{what}: CPU only in lmkern-core"))),
    }
}

/// The exponents are read on the host for CPU tensors only; CUDA kernels never fail on them (a row
/// outside (0, 1] gets NaN tables) and lmkern.ops.quant checks them on the device.
unsafe fn host_exponents(device: Device, a: Ptr, rows: usize) -> Result<()> {
    match device {
        Device::Cpu => validate_exponents(crate::cpu::slice(a, rows)),
        Device::Cuda { .. } => Ok(()),
    }
}

#[cfg(feature = "cuda")]
fn cuda_dtype(dtype: DType) -> Result<()> {
    if dtype == DType::F64 {
        return Err(Error::dtype("x: float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA"));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_dtype(_: DType) -> Result<()> {
    Err(Error::cuda("lmkern was built without CUDA support"))
}

/// Quantize `x` (rows·n elements of `dtype`) with exponents `a` (float32 \[rows\]) into `codes`
/// (uint8 [rows, row_bytes]) and `scales` (float32 [rows, n/group]).
/// Errors (ValueError kind) on an exponent outside (0, 1], or on NaN/inf in x (or a scale that
/// overflows float32); outputs are then unspecified.
///
/// # Safety
/// Every address is valid for the sizes above (inputs readable, outputs writable, no overlap).
pub unsafe fn quantize(device: Device, dtype: DType, q: &QuantArgs, x: Ptr, a: Ptr, codes: Ptr, scales: Ptr) -> Result<()> {
    if !exponent_checks(device, dtype, q, a)? || q.n == 0 {
        return Ok(());
    }
    check_ptrs(&[(x, "x", dtype.size()), (codes, "codes", 1), (scales, "scales", 4)])?;
    match device {
        Device::Cpu => cpu::quantize(dtype, q, x, a, codes, scales),
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal, stream } => cuda::forward(ordinal, stream, dtype, q, x, a, codes, 0, scales),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => unreachable!("cuda_dtype refused"),
    }
}

/// The checks the ops over `q` and per-row exponents `a` start with: the arguments, the dtype on
/// CUDA, and the exponents (read on the host). Ok(false) when there are no rows (nothing to do).
///
/// # Safety
/// `a` is valid for q.rows float32 on `device` when q.rows > 0.
unsafe fn exponent_checks(device: Device, dtype: DType, q: &QuantArgs, a: Ptr) -> Result<bool> {
    q.validate()?;
    if let Device::Cuda { .. } = device {
        cuda_dtype(dtype)?;
    }
    if q.rows == 0 {
        return Ok(false);
    }
    check_ptrs(&[(a, "a", 4)])?;
    host_exponents(device, a, q.rows)?;
    Ok(true)
}

/// Where the dequantizers take each row's table `lut_r` from.
#[derive(Debug, Clone, Copy)]
pub enum Tables {
    /// Computed from the row's exponent: float32 \[rows\].
    Exponents(Ptr),
    /// Read from the row's codebook as given: float32 \[rows, 2^b\] (see [`codebook`]).
    Codebooks(Ptr),
}

/// Dequantize `codes`/`scales`/`a` (as [`quantize`] writes them) into `out`: rows·n elements of `dtype`.
/// Errors (ValueError kind) on an exponent outside (0, 1] and, on CPU, on a scale negative or not finite.
///
/// # Safety
/// As [`quantize`].
pub unsafe fn dequantize(device: Device, dtype: DType, q: &QuantArgs, codes: Ptr, scales: Ptr, a: Ptr, out: Ptr) -> Result<()> {
    if !exponent_checks(device, dtype, q, a)? || q.n == 0 {
        return Ok(());
    }
    if let Device::Cpu = device {
        // (On CUDA the Python layer checks them on the device, with the exponents.)
        check_ptrs(&[(scales, "scales", 4)])?;
        validate_scales(crate::cpu::slice(scales, q.rows * q.groups()))?;
    }
    dequantize_rows(device, dtype, q, codes, scales, Tables::Exponents(a), out)
}

/// Dequantize through the rows' codebooks (float32 \[rows, 2^b\], as [`codebook`] makes them and
/// [`linear`] reads them, unchecked: a NaN entry gives NaN outputs): `out = scales[r, j/g] ·
/// table[r, field(r, j)]`, the product in float32 (float64 for float64 out). This is the Ŵ that
/// [`linear`] multiplies by without forming it; the Python layer forms it for matmuls with many tokens.
///
/// # Safety
/// As [`quantize`]; `table` is valid for rows·2^b float32.
pub unsafe fn dequantize_codebooks(
    device: Device, dtype: DType, q: &QuantArgs, codes: Ptr, scales: Ptr, table: Ptr, out: Ptr,
) -> Result<()> {
    q.validate()?;
    if let Device::Cuda { .. } = device {
        cuda_dtype(dtype)?;
    }
    if q.rows == 0 || q.n == 0 {
        return Ok(());
    }
    check_ptrs(&[(table, "table", 4)])?;
    dequantize_rows(device, dtype, q, codes, scales, Tables::Codebooks(table), out)
}

/// The part of [`dequantize`] and [`dequantize_codebooks`] after their own checks; rows, n > 0.
unsafe fn dequantize_rows(
    device: Device, dtype: DType, q: &QuantArgs, codes: Ptr, scales: Ptr, tables: Tables, out: Ptr,
) -> Result<()> {
    check_ptrs(&[(codes, "codes", 1), (scales, "scales", 4), (out, "out", dtype.size())])?;
    match device {
        Device::Cpu => {
            cpu::dequantize(dtype, q, codes, scales, tables, out);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal, stream } => cuda::dequantize(ordinal, stream, dtype, q, codes, scales, tables, out),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => unreachable!("cuda_dtype refused"),
    }
}

/// Fake quantization `y = x̂` (rows·n of `dtype`), writing the scales it used (float32 [rows, n/group]).
///
/// # Safety
/// As [`quantize`].
pub unsafe fn fake_quantize(device: Device, dtype: DType, q: &QuantArgs, x: Ptr, a: Ptr, y: Ptr, scales: Ptr) -> Result<()> {
    if !exponent_checks(device, dtype, q, a)? || q.n == 0 {
        return Ok(());
    }
    check_ptrs(&[(x, "x", dtype.size()), (y, "y", dtype.size()), (scales, "scales", 4)])?;
    match device {
        Device::Cpu => cpu::fake_quantize(dtype, q, x, a, y, scales),
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal, stream } => cuda::forward(ordinal, stream, dtype, q, x, a, 0, y, scales),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => unreachable!("cuda_dtype refused"),
    }
}

/// Added to u = |x|/m inside the logarithms of the fake-quantizer's gradients (PAPERS.md §2).
pub const FAKE_GRAD_EPS: f64 = 1e-12;

/// Straight-through gradients of [`fake_quantize`], m held constant. With `u = |x|/m`, `s = sign(x)`,
/// `lu = ln(u + ε)` (ε = [`FAKE_GRAD_EPS`]), `q` the code, `r = |q|/qmax`, and `R = r^(1/a − 1)`
/// (for q = 0: 1 if a = 1 else 0):
///   `∂x̂/∂x = R · exp((a − 1)·lu)`
///   `∂x̂/∂a = −(m/a²)·s·r^(1/a)·ln r  +  (m/a)·s·R·exp(a·lu)·lu`   (first term 0 for q = 0)
/// both 0 where x = 0, m = 0 or |x| > m (clamped). `dx = dy·∂x̂/∂x` (rows·n of `dtype`);
/// `da[r] = Σ_row dy·∂x̂/∂a` (float32 \[rows\], 0: not wanted), summed in a fixed order in float64.
///
/// # Safety
/// As [`quantize`]; `scales` as [`fake_quantize`] wrote them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn fake_quantize_backward(
    device: Device, dtype: DType, q: &QuantArgs, dy: Ptr, x: Ptr, scales: Ptr, a: Ptr, dx: Ptr, da: Ptr,
) -> Result<()> {
    if !exponent_checks(device, dtype, q, a)? {
        return Ok(());
    }
    if da != 0 {
        require_aligned(da, 4, "da")?;
    }
    if q.n > 0 {
        let es = dtype.size();
        check_ptrs(&[(dy, "dy", es), (x, "x", es), (scales, "scales", 4), (dx, "dx", es)])?;
    }
    match device {
        Device::Cpu => cpu::fake_quantize_backward(dtype, q, dy, x, scales, a, dx, da),
        #[cfg(feature = "cuda")]
        // Also with n = 0: the kernel then only writes da = 0.
        Device::Cuda { ordinal, stream } => return cuda::fake_backward(ordinal, stream, dtype, q, dy, x, scales, a, dx, da),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => unreachable!("cuda_dtype refused"),
    }
    Ok(())
}

/// A quantized linear layer `y = x @ Ŵᵀ + b`: Ŵ has `out_features` rows of `in_features` (quantized
/// as above, `QuantArgs { rows: out_features, n: in_features }`); x has `tokens` rows.
#[derive(Debug, Clone, Copy)]
pub struct LinearArgs {
    pub q: QuantArgs,
    pub tokens: usize,
}

/// The codebooks of rows with exponents `a` (float32 \[rows\]) into `out` (float32 \[rows, 2^b\]):
/// `out[r, f] = sign(q_f)·(|q_f|/qmax)^(1/a_r)`, what [`linear`] and [`dequantize_codebooks`] read.
///
/// Host memory only (lmkern.ops.quant builds the codebooks of CUDA exponents on the CPU).
///
/// # Safety
/// `a` and `out` valid for those sizes.
pub unsafe fn codebook(bits: u32, rows: usize, a: Ptr, out: Ptr) -> Result<()> {
    if !BITS.contains(&bits) {
        return Err(Error::value(format!("bits: expected one of 2, 3, 4, 8; got {bits}")));
    }
    if rows == 0 {
        return Ok(());
    }
    check_ptrs(&[(a, "a", 4), (out, "out", 4)])?;
    validate_exponents(crate::cpu::slice(a, rows))?;
    cpu::codebook(bits, rows, a, out);
    Ok(())
}

/// Whether the CUDA tensor-core linear can take this shape (cuda.rs, `mma_fits`, adds the buffers'
/// alignment): bfloat16 or float16 activations, 4-bit codes, `n` and the group size multiples of 128
/// (a warp step is 128 columns of one group).
pub fn tensor_core_shape(dtype: DType, bits: u32, n: usize, group: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && bits == 4 && n.is_multiple_of(128) && group.is_multiple_of(128)
}

/// The most tokens for which [`linear`] on a CUDA device is worth calling rather than dequantizing
/// Ŵ and a cuBLAS matmul (lmkern.ops.quant picks the path). On the H200 (benches/results/
/// 2026-11-27-h200-9-quant-staged-mma, 4096², bf16 4-bit g128) the dequantize + cuBLAS path takes
/// ~33.5 µs at 16-64 tokens; the FFMA kernels re-read the codes per tile of 8 tokens, one tile
/// costing 24.5 µs, so they stop at 8; the tensor-core kernel (bf16/f16, 4 bits, n and the group
/// size multiples of 128) took 15.0 µs at 16 tokens, 26.7 at 32 and 50.2 at 64, so it runs up to 32.
pub fn cuda_gemv_max_tokens(dtype: DType, bits: u32, n: usize, group: usize) -> usize {
    if tensor_core_shape(dtype, bits, n, group) {
        CUDA_MMA_GEMV_MAX_TOKENS
    } else {
        CUDA_GEMV_MAX_TOKENS
    }
}

/// See [`cuda_gemv_max_tokens`].
pub const CUDA_GEMV_MAX_TOKENS: usize = 8;
pub const CUDA_MMA_GEMV_MAX_TOKENS: usize = 32;

/// The most tokens for which [`linear`] on the CPU is worth calling rather than forming Ŵ a chunk
/// of rows at a time for torch's matmul (lmkern.ops.quant picks the path). The AVX-512 4-bit GEMV
/// (4 bits, `n` and the group size multiples of 32, a CPU with AVX-512) where the CPU runs 512-bit
/// operations at half width (`crate::cpu::avx512_half_width`: Zen 4, whose matmul peak is half a
/// full-width core's) won up to 1024 tokens at 4096² on an AVX-512 EPYC (130 ms against 172 at 1024,
/// 57 against 96 at 512; lost at 2048, 447 against 334, once the activations outgrow the L3:
/// benches/results/2026-11-27-cpu-quant-many-tokens-avx512.txt); on a full-width Xeon (two 512-bit
/// FMA units) up to 64 (12 ms against 13 at 64, lost 29 against 17 at 96 and 141 against 54 at 512:
/// benches/results/2026-11-29-cpu-quant-many-tokens-xeon.txt). The others stop at 48 (the AVX2 GEMV
/// against the chunks on a Zen 3 VM: benches/results/2026-11-26-cpu-quant-many-tokens.txt), at 32
/// on a full-width AVX-512 CPU (on the Xeon at 32 tokens the 2- and 3-bit GEMVs took 0.94 and 1.08×
/// the chunks' time, the 8-bit one by byte planes (AVX512-VBMI) 0.79×; at 48 1.29, 1.34, 1.05×;
/// same results file). The row-blocked GEMV of 2-4-bit codes in groups of multiples of 128
/// ([`cpu::rows512_shape`]) on a full-width CPU: 4-bit up to 96 tokens (0.91-0.99× the chunks'
/// time at 96, 1.04-1.13× at 112-128), 2- and 3-bit up to 64 (0.77-0.84× at 64; at 96 2-bit 0.89-0.97×,
/// 3-bit 1.07×): benches/results/2026-11-29-cpu-quant-row-blocked-xeon.txt.
pub fn cpu_gemv_max_tokens(bits: u32, n: usize, group: usize) -> usize {
    let full_width = crate::cpu::has_avx512() && !crate::cpu::avx512_half_width();
    if full_width && cpu::rows512_shape(bits, group) {
        return if bits == 4 { CPU_ROWS512_4BIT_GEMV_MAX_TOKENS } else { CPU_ROWS512_GEMV_MAX_TOKENS };
    }
    match (cpu::avx512_shape(bits, n, group), full_width) {
        (true, true) => CPU_AVX512_GEMV_MAX_TOKENS,
        (true, false) => CPU_AVX512_HALF_WIDTH_GEMV_MAX_TOKENS,
        (false, true) => CPU_FULL_WIDTH_GEMV_MAX_TOKENS,
        (false, false) => CPU_GEMV_MAX_TOKENS,
    }
}

/// See [`cpu_gemv_max_tokens`].
pub const CPU_GEMV_MAX_TOKENS: usize = 48;
pub const CPU_FULL_WIDTH_GEMV_MAX_TOKENS: usize = 32;
pub const CPU_AVX512_GEMV_MAX_TOKENS: usize = 64;
pub const CPU_ROWS512_4BIT_GEMV_MAX_TOKENS: usize = 96;
pub const CPU_ROWS512_GEMV_MAX_TOKENS: usize = 64;
pub const CPU_AVX512_HALF_WIDTH_GEMV_MAX_TOKENS: usize = 1024;

/// The most tokens for which [`linear_backward`] on the CPU is worth calling rather than Ŵ in
/// chunks for torch's matmul: 0 but for the shapes of its SIMD kernels. 4-bit codes with `n` and
/// the group size multiples of 32: with AVX-512 at half width 512 (at 4096² its kernel beat the
/// chunks 1.3-1.5× up to 512 tokens on the EPYC, tied at 768 and lost at 1024, 256 against 166 ms,
/// once its column blocks narrowed with the token count:
/// benches/results/2026-11-27-cpu-quant-narrow-input-gradient.txt), at full width 64 (the Xeon:
/// 10 ms against 14 at 64, lost 22 against 18 at 128 and 134 against 60 at 512:
/// benches/results/2026-11-29-cpu-quant-many-tokens-xeon.txt), else 24 (AVX2: lost at 48 on a Zen
/// 3 VM, benches/results/2026-11-26-cpu-quant-many-tokens.txt).
/// 2-, 3- and 8-bit codes with `n` and the group size multiples of 16, with AVX-512 at half width:
/// 48 (at 4096² it won 1.3-1.5× at 48 tokens on the EPYC and lost or tied at 64-96 for 2 and 3
/// bits; same results file as the 4-bit EPYC numbers), at full width 32 (the Xeon: 0.78-0.94× the
/// chunks' time at 32 tokens, 1.02-1.19× at 48); multiples of 8, with AVX2: 16 (won 1.0-1.6× at 16
/// tokens in two runs, lost at 24 for 2 and 3 bits in both).
pub fn cpu_bwd_gemv_max_tokens(bits: u32, n: usize, group: usize) -> usize {
    if cpu::avx512_narrow_bwd_shape(bits, n, group) {
        if crate::cpu::avx512_half_width() {
            CPU_AVX512_HALF_WIDTH_NARROW_BWD_GEMV_MAX_TOKENS
        } else {
            CPU_AVX512_NARROW_BWD_GEMV_MAX_TOKENS
        }
    } else if cpu::narrow_bwd_shape(bits, n, group) {
        CPU_NARROW_BWD_GEMV_MAX_TOKENS
    } else if !(bits == 4 && n.is_multiple_of(32) && group.is_multiple_of(32)) {
        0
    } else if !cpu::avx512_shape(bits, n, group) {
        CPU_BWD_GEMV_MAX_TOKENS
    } else if crate::cpu::avx512_half_width() {
        CPU_AVX512_HALF_WIDTH_BWD_GEMV_MAX_TOKENS
    } else {
        CPU_AVX512_BWD_GEMV_MAX_TOKENS
    }
}

/// See [`cpu_bwd_gemv_max_tokens`].
pub const CPU_BWD_GEMV_MAX_TOKENS: usize = 24;
pub const CPU_AVX512_BWD_GEMV_MAX_TOKENS: usize = 64;
pub const CPU_AVX512_HALF_WIDTH_BWD_GEMV_MAX_TOKENS: usize = 512;
pub const CPU_AVX512_NARROW_BWD_GEMV_MAX_TOKENS: usize = 32;
pub const CPU_AVX512_HALF_WIDTH_NARROW_BWD_GEMV_MAX_TOKENS: usize = 48;
pub const CPU_NARROW_BWD_GEMV_MAX_TOKENS: usize = 16;

/// `y = x @ Ŵᵀ + bias` with x `[tokens, in]` and y `[tokens, out]` of `dtype`, bias float32 \[out\]
/// (0: none), `table` the rows' codebooks (float32 [out, 2^b], see [`codebook`]). Ŵ is never formed:
/// each row's codebook times its group scales meets x directly (4 bits with in and the group size
/// multiples of 32: with AVX-512 per 32 weights two `vpermps` over the codebook in one register,
/// with AVX2 four `vpshufb` over its byte planes and unpacks to float32; FMA into float32
/// accumulators, up to 8 tokens per decoded block; 8 bits with the group size a multiple of 16:
/// with AVX-512 per 16 codes eight `vpermt2ps` over the codebook in 16 registers and a blend tree
/// (with AVX512-VBMI and the group size a multiple of 64: per 64 codes eight `vpermi2b` over the
/// codebook's four byte planes and eight unpacks), with AVX2 one gather per 8 codes; 2 and 3 bits with the group size a multiple of 8: shifts and
/// one `vpermps` per 8 codes with AVX2, per 16 with AVX-512 where the group size is a multiple of
/// 16; a scalar table path otherwise). On CUDA
/// (`cuda.rs`, float32/bfloat16/float16) the GEMV kernels copy each row's codebook from `table`
/// into shared memory, unchecked: a NaN codebook row gives NaN outputs.
///
/// # Safety
/// As [`quantize`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear(
    device: Device, dtype: DType, l: &LinearArgs, x: Ptr, codes: Ptr, scales: Ptr, table: Ptr, bias: Ptr, y: Ptr,
) -> Result<()> {
    l.q.validate()?;
    if let Device::Cuda { .. } = device {
        cuda_dtype(dtype)?;
    }
    if l.tokens == 0 || l.q.rows == 0 {
        return Ok(());
    }
    check_ptrs(&[(y, "y", dtype.size()), (table, "table", 4)])?;
    if bias != 0 {
        require_aligned(bias, 4, "bias")?;
    }
    if l.q.n > 0 {
        check_ptrs(&[(x, "x", dtype.size()), (codes, "codes", 1), (scales, "scales", 4)])?;
    }
    match device {
        Device::Cpu => cpu::linear(dtype, l, x, codes, scales, table, bias, y),
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal, stream } => return cuda::linear(ordinal, stream, dtype, l, x, codes, scales, table, bias, y),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => unreachable!("cuda_dtype refused"),
    }
    Ok(())
}

/// `dx = dy @ Ŵ` with dy `[tokens, out]` and dx `[tokens, in]` of `dtype` (the input gradient of
/// [`linear`]), through the same codebooks: tasks own up to 256 columns of dx (fewer past 32 tokens,
/// so that their float32 sums stay in L1) and sum the rows in order. SIMD forms decode a few rows'
/// weights Ŵ = m·table\[field\] for a block of columns, then add them to every token's sums: 4 bits
/// with in and the group size multiples of 32 (AVX-512 or AVX2); 2, 3 and 8 bits with multiples of
/// 16 (AVX-512) or 8 (AVX2); a scalar table path otherwise. Meant for few tokens
/// ([`cpu_bwd_gemv_max_tokens`]): past them the Python layer forms Ŵ in chunks for a matmul.
///
/// # Safety
/// As [`quantize`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear_backward(
    device: Device, dtype: DType, l: &LinearArgs, dy: Ptr, codes: Ptr, scales: Ptr, table: Ptr, dx: Ptr,
) -> Result<()> {
    l.q.validate()?;
    cpu_only(device, "power_quant_linear_backward (on CUDA, lmkern.ops.quant computes dy @ dequantize(W) with torch)")?;
    if l.tokens == 0 || l.q.n == 0 {
        return Ok(());
    }
    check_ptrs(&[(dx, "dx", dtype.size())])?;
    if l.q.rows > 0 {
        check_ptrs(&[(dy, "dy", dtype.size()), (codes, "codes", 1), (scales, "scales", 4), (table, "table", 4)])?;
    }
    cpu::linear_backward(dtype, l, dy, codes, scales, table, dx);
    Ok(())
}

/// Options of [`search_exponent`]: a coarse grid of `grid` evenly spaced exponents on `[lo, 1]`,
/// then a fine grid of `refine` points on the two coarse cells around each of the 4 best coarse
/// local minima; the best exponent evaluated is returned (ties: the larger). Without a metric, a
/// row's error at any exponent is read off its sorted |w|/m and prefix sums (qmax counts per
/// evaluation), so fine grids are cheap; with a metric, prefix sums of z's columns in that order
/// (z_rows·n per row) make each evaluation cost qmax·z_rows.
#[derive(Debug, Clone, Copy)]
pub struct SearchArgs {
    pub q: QuantArgs,
    pub per_row: bool,
    /// Rows of the metric z (0: the weight error itself).
    pub z_rows: usize,
    pub lo: f64,
    pub grid: usize,
    pub refine: usize,
}

/// The exponent(s) minimizing the quantization error of `w` (float32 [rows, n]): per row
/// `Σ (w − ŵ_a)²`, or with a metric `z` (float32 [z_rows, n]) `‖z·(w − ŵ_a)‖²` (z = the calibration
/// activations X, or any R with RᵀR = XᵀX). `out`: float32 \[rows\] (`per_row`) or \[1\] (one exponent
/// minimizing the sum over rows).
///
/// # Safety
/// As [`quantize`].
pub unsafe fn search_exponent(device: Device, s: &SearchArgs, w: Ptr, z: Ptr, out: Ptr) -> Result<()> {
    search_exponent_stoppable(device, s, w, z, out, &crate::parallel::Stop::never())
}

/// [`search_exponent`] that stops when `stop` says so (see [`crate::parallel::Stop`]: its poll,
/// e.g. Ctrl-C, asked on the calling thread), within a group of rows, with an
/// [`crate::error::ErrorKind::Interrupted`] error (`out` is then incomplete). A search of a large
/// weight with calibration activations takes seconds to minutes: Ctrl-C should not wait for it.
///
/// # Safety
/// As [`search_exponent`].
pub unsafe fn search_exponent_stoppable(
    device: Device, s: &SearchArgs, w: Ptr, z: Ptr, out: Ptr, stop: &crate::parallel::Stop,
) -> Result<()> {
    s.q.validate()?;
    cpu_only(device, "search_exponent (on CUDA, lmkern.ops.quant copies w and x to the host)")?;
    if !(s.lo > 0.0 && s.lo <= 1.0) || s.grid < 2 {
        return Err(Error::value(format!("search: expected 0 < lo <= 1 and grid >= 2; got lo={} grid={}", s.lo, s.grid)));
    }
    let outs = if s.per_row { s.q.rows } else { 1 };
    if outs == 0 {
        return Ok(());
    }
    check_ptrs(&[(out, "out", 4)])?;
    if s.q.rows > 0 && s.q.n > 0 {
        check_ptrs(&[(w, "w", 4)])?;
        if s.z_rows > 0 {
            check_ptrs(&[(z, "x", 4)])?;
        }
    }
    cpu::search_exponent(s, w, z, out, stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_every_width_and_length() {
        for bits in BITS {
            let qm = qmax(bits);
            for n in [0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100] {
                let codes: Vec<i8> = (0..n).map(|i| ((i as i32 * 7 + 3) % (2 * qm + 1) - qm) as i8).collect();
                let mut packed = vec![0xAAu8; row_bytes(n, bits)];
                pack_row(&codes, bits, &mut packed);
                for start in 0..n.min(9) {
                    let mut f = vec![0u8; n - start];
                    unpack_fields(&packed, bits, start, &mut f);
                    for (i, &v) in f.iter().enumerate() {
                        assert_eq!(field_to_code(v, bits), codes[start + i] as i32, "bits {bits} n {n} start {start} i {i}");
                    }
                }
                // Unused high bits of the last byte are zero.
                if !(n * bits as usize).is_multiple_of(8) {
                    let used = (n * bits as usize) % 8;
                    assert_eq!(packed[packed.len() - 1] >> used, 0);
                }
            }
        }
    }

    #[test]
    fn documented_bit_positions() {
        // 4-bit: low nibble first. q = -1 is field 0xF, q = 3 is 0x3.
        let mut p = [0u8; 1];
        pack_row(&[-1, 3], 4, &mut p);
        assert_eq!(p, [0x3F]);
        // 2-bit: four per byte, element 0 in bits 0..1.
        pack_row(&[1, -1, 0, 1], 2, &mut p);
        assert_eq!(p, [0b01_00_11_01]);
        // 3-bit: eight codes in three bytes as a 24-bit little-endian word.
        let codes = [1i8, -1, 2, -3, 0, 3, -2, 1];
        let mut p3 = [0u8; 3];
        pack_row(&codes, 3, &mut p3);
        let word: u32 = codes.iter().enumerate().map(|(i, &c)| ((c as u8 as u32) & 7) << (3 * i)).sum();
        assert_eq!(p3, [word as u8, (word >> 8) as u8, (word >> 16) as u8]);
        // 8-bit: int8.
        let mut p8 = [0u8; 2];
        pack_row(&[-127, 5], 8, &mut p8);
        assert_eq!(p8, [0x81, 5]);
    }
}
