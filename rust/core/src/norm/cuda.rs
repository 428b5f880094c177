//! CUDA launch code for the norm kernels in cuda/norm.cu.
//!
//! Kernel choice and launch shape depend on the shape, dtype and buffer alignment only, so results
//! are reproducible run to run:
//! - packing ([`Packing`]): 16-byte packs (VW = 16/sizeof(T) elements) from each row's start when
//!   n is a multiple of VW and every buffer is 16-byte aligned (`_v16` kernels); else, for rows of
//!   at least 32 packs whose row buffers agree mod 16, 16-byte packs between a head and a tail of
//!   single elements (`_s16`, row in registers only: CRMSNorm's odd d − 1, offset views); else one
//!   element at a time (plain kernels);
//! - row in registers (`_r<VPT>` kernels) when the row fits: blockDim.x = TX threads per row (a
//!   multiple of 32, at most 1024), each holding VPT packs, TX·VPT ≥ n/VW, and blockDim.y = RY rows
//!   per block (about 256 threads per block for small rows);
//! - otherwise a looped kernel, one row per 1024-thread block, that reads the row twice.
//!
//! Forward: grid over row groups. Backward: one block per weight-gradient part (see
//! [`super::dw_parts`]), then `norm_dw_reduce_<t>` sums the parts when dw is wanted.
use std::sync::OnceLock;

use super::{dw_parts, NormArgs, NormBwd, NormFwd, NormKind};
use crate::cuda::{self, clamp_grid, type_suffix, LaunchConfig, MAX_DEFAULT_SHARED_MEM};
use crate::error::Result;
use crate::tensor::DType;

// Kernel parameter blocks: field for field the structs of cuda/norm.cu (sizes asserted there too).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FwdParams {
    x: u64,
    residual: u64,
    weight: u64,
    y: u64,
    h: u64,
    rstd: u64,
    rows: i64,
    n: i32,
    crms: i32,
    eps: f32,
    inv_div: f32,
    offset: f32,
    scale: f32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct BwdParams {
    dy: u64,
    h: u64,
    weight: u64,
    rstd: u64,
    dh_out: u64,
    dx: u64,
    dw_partial: u64,
    rows: i64,
    parts: i64,
    n: i32,
    crms: i32,
    inv_div: f32,
    offset: f32,
    scale: f32,
    pad: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ReduceParams {
    partial: u64,
    dw: u64,
    parts: i64,
    n: i32,
    scale: f32,
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<FwdParams>() == 80);
    assert!(offset_of!(FwdParams, rows) == 48);
    assert!(offset_of!(FwdParams, n) == 56);
    assert!(offset_of!(FwdParams, eps) == 64);
    assert!(offset_of!(FwdParams, scale) == 76);
    assert!(size_of::<BwdParams>() == 96);
    assert!(offset_of!(BwdParams, rows) == 56);
    assert!(offset_of!(BwdParams, n) == 72);
    assert!(offset_of!(BwdParams, inv_div) == 80);
    assert!(offset_of!(BwdParams, scale) == 88);
    assert!(size_of::<ReduceParams>() == 32);
    assert!(offset_of!(ReduceParams, n) == 24);
    assert!(offset_of!(ReduceParams, scale) == 28);
};

/// Largest n/VW kept in registers: forward up to 4 packs per thread, backward up to 2, at 1024 threads.
const FWD_MAX_VPT: usize = 4;
const BWD_MAX_VPT: usize = 2;
const MAX_THREADS: usize = 1024;
/// Dynamic shared memory a backward launch may ask for: the default 48 KiB limit covers static and
/// dynamic together, and the kernels' static reduction scratch takes 256 bytes (1 KiB kept aside).
const MAX_DYNAMIC_SHARED_MEM: usize = MAX_DEFAULT_SHARED_MEM as usize - 1024;
/// Threads of the looped kernels.
const LOOP_THREADS: usize = 1024;

/// Launch-shape preferences. Defaults are the tuned ones; `LMKERN_CUDA_NORM_TUNE`, e.g.
/// `fwd_vpt=4,bwd_vpt=1,fwd_block=256,bwd_block=256,split=0`, overrides them for tuning
/// experiments (read once per process; unknown or out-of-range entries are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tune {
    /// Packs per thread the forward aims for (1, 2 or 4).
    pub fwd_vpt: usize,
    /// Packs per thread the backward aims for (1 or 2; 0: by dtype, see [`Tune::bwd_vpt_for`]).
    pub bwd_vpt: usize,
    /// Threads per block the forward aims for when several rows share a block.
    pub fwd_block: usize,
    /// The same for the backward.
    pub bwd_block: usize,
    /// Whether rows may be cut ([`Packing::Split`]); `split=0` sends them element-wise, to compare.
    pub split: bool,
}

impl Default for Tune {
    fn default() -> Self {
        // Measured on an H200 (benches/results/2026-11-26-h200-*): fwd_vpt 4 is best or equal at
        // n = 1024..16384; the backward wants 2 float32 packs per thread but 1 16-bit pack (the
        // 16-bit _r2 kernels spill).
        Tune { fwd_vpt: 4, bwd_vpt: 0, fwd_block: 256, bwd_block: 256, split: true }
    }
}

impl Tune {
    fn parse(text: &str) -> Tune {
        let mut t = Tune::default();
        for item in text.split(',') {
            let Some((k, v)) = item.split_once('=') else { continue };
            let Ok(v) = v.trim().parse::<usize>() else { continue };
            match k.trim() {
                "fwd_vpt" if matches!(v, 1 | 2 | 4) => t.fwd_vpt = v,
                "bwd_vpt" if matches!(v, 1 | 2) => t.bwd_vpt = v,
                "fwd_block" if (32..=MAX_THREADS).contains(&v) => t.fwd_block = v,
                "bwd_block" if (32..=MAX_THREADS).contains(&v) => t.bwd_block = v,
                "split" if v <= 1 => t.split = v == 1,
                _ => {}
            }
        }
        t
    }

    fn bwd_vpt_for(&self, dtype: DType) -> usize {
        match (self.bwd_vpt, dtype) {
            (0, DType::F32) => 2,
            (0, _) => 1,
            (v, _) => v,
        }
    }

    fn get() -> Tune {
        static TUNE: OnceLock<Tune> = OnceLock::new();
        *TUNE.get_or_init(|| std::env::var("LMKERN_CUDA_NORM_TUNE").map(|s| Tune::parse(&s)).unwrap_or_default())
    }
}

/// One kernel launch: which kernel, and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub name: String,
    pub grid: u32,
    pub block: (u32, u32),
    pub shared_mem: u32,
    /// Elements per pack (1 or 16/sizeof(T)).
    pub vw: usize,
    /// Packs per thread of a row-in-registers kernel; 0 for the looped kernels.
    pub vpt: usize,
}

impl Plan {
    fn config(&self) -> LaunchConfig {
        LaunchConfig { grid: (self.grid, 1, 1), block: (self.block.0, self.block.1, 1), shared_mem: self.shared_mem }
    }
}

/// How the kernels cut a row into loads and stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packing {
    /// One element at a time.
    Elements,
    /// 16-byte packs from each row's start (`_v16`): n a multiple of the pack, every buffer 16-byte
    /// aligned.
    Aligned,
    /// 16-byte packs between a head and a tail of single elements (`_s16`, cuda/norm.cu's
    /// RowSplit): any n, the row buffers' addresses equal mod 16; the weight is read element-wise.
    Split,
}

/// Rows of fewer 16-byte packs than this are not cut (`Split`): too short to gain from it.
const SPLIT_MIN_PACKS: usize = 32;

/// The packing for rows of n elements in the row-sized buffers `rows` and the column-indexed
/// buffers `cols` (the weight, dw's partials); 0 = not given.
pub(crate) fn packing(dtype: DType, n: usize, rows: &[u64], cols: &[u64], split: bool) -> Packing {
    let (size, vw) = (dtype.size() as u64, 16 / dtype.size());
    let given = || rows.iter().chain(cols).filter(|&&p| p != 0);
    if n.is_multiple_of(vw) && given().all(|&p| p.is_multiple_of(16)) {
        return Packing::Aligned;
    }
    let first = rows.iter().copied().find(|&p| p != 0).unwrap_or(0);
    let agree = rows.iter().all(|&p| p == 0 || (p.is_multiple_of(size) && p % 16 == first % 16));
    if split && agree && n / vw >= SPLIT_MIN_PACKS {
        Packing::Split
    } else {
        Packing::Elements
    }
}

/// Threads per row and packs per thread for a row of `nv` packs, aiming at `goal` packs per
/// thread: TX = nv/goal rounded up to a warp multiple, within [32, 1024]; VPT = ceil(nv/TX)
/// rounded up to 1, 2 or 4.
fn row_threads(nv: usize, goal: usize) -> (usize, usize) {
    let tx = nv.div_ceil(goal).div_ceil(32).saturating_mul(32).clamp(32, MAX_THREADS);
    let vpt = match nv.div_ceil(tx) {
        0 | 1 => 1,
        2 => 2,
        _ => 4,
    };
    (tx, vpt)
}

/// Elements per pack and kernel-name infix of a packing.
fn pack_kind(dtype: DType, packing: Packing) -> (usize, &'static str) {
    match packing {
        Packing::Elements => (1, ""),
        Packing::Aligned => (16 / dtype.size(), "_v16"),
        Packing::Split => (16 / dtype.size(), "_s16"),
    }
}

pub(crate) fn plan_fwd(dtype: DType, rows: usize, n: usize, packing: Packing, tune: Tune) -> Result<Plan> {
    let t = type_suffix(dtype)?;
    let (vw, v) = pack_kind(dtype, packing);
    let nv = n / vw;
    if nv <= MAX_THREADS * FWD_MAX_VPT {
        let (tx, vpt) = row_threads(nv, tune.fwd_vpt);
        let ry = (tune.fwd_block / tx).max(1).min(rows.max(1));
        Ok(Plan {
            name: format!("norm_fwd_{t}{v}_r{vpt}"),
            grid: clamp_grid(rows.div_ceil(ry)),
            block: (tx as u32, ry as u32),
            shared_mem: 0,
            vw,
            vpt,
        })
    } else if packing == Packing::Split {
        // No looped kernel cuts rows: beyond the registers, one element at a time.
        plan_fwd(dtype, rows, n, Packing::Elements, tune)
    } else {
        Ok(Plan {
            name: format!("norm_fwd_{t}{v}"),
            grid: clamp_grid(rows),
            block: (LOOP_THREADS as u32, 1),
            shared_mem: 0,
            vw,
            vpt: 0,
        })
    }
}

/// Dynamic shared memory of a `_s16` backward with a weight gradient: the part's dw sums, padded
/// (column j at j + j/32).
fn split_dw_bytes(n: usize) -> usize {
    (n + n / 32) * 4
}

pub(crate) fn plan_bwd(
    dtype: DType,
    rows: usize,
    n: usize,
    parts: usize,
    packing: Packing,
    want_dw: bool,
    tune: Tune,
) -> Result<Plan> {
    let t = type_suffix(dtype)?;
    let (vw, v) = pack_kind(dtype, packing);
    let nv = n / vw;
    let parts = parts.max(1);
    let fits = nv <= MAX_THREADS * BWD_MAX_VPT;
    if packing == Packing::Split {
        // One row per block; with dw, the part's sums in shared memory.
        let shared = if want_dw { split_dw_bytes(n) } else { 0 };
        if !fits || shared > MAX_DYNAMIC_SHARED_MEM {
            return plan_bwd(dtype, rows, n, parts, Packing::Elements, want_dw, tune);
        }
        let (tx, vpt) = row_threads(nv, tune.bwd_vpt_for(dtype).min(BWD_MAX_VPT));
        return Ok(Plan {
            name: format!("norm_bwd_{t}{v}_r{vpt}"),
            grid: clamp_grid(parts),
            block: (tx as u32, 1),
            shared_mem: shared as u32,
            vw,
            vpt,
        });
    }
    if fits {
        let (tx, vpt) = row_threads(nv, tune.bwd_vpt_for(dtype).min(BWD_MAX_VPT));
        let rows_per_part = rows.div_ceil(parts).max(1);
        // Rows beyond the first park their dw sums in shared memory: at most what fits.
        let slot_bytes = tx * vpt * vw * 4;
        let max_ry = if want_dw { 1 + MAX_DYNAMIC_SHARED_MEM / slot_bytes } else { MAX_THREADS };
        let ry = (tune.bwd_block / tx).max(1).min(rows_per_part).min(max_ry);
        let shared = if want_dw && ry > 1 { (ry - 1) * slot_bytes } else { 0 };
        Ok(Plan {
            name: format!("norm_bwd_{t}{v}_r{vpt}"),
            grid: clamp_grid(parts),
            block: (tx as u32, ry as u32),
            shared_mem: shared as u32,
            vw,
            vpt,
        })
    } else {
        Ok(Plan {
            name: format!("norm_bwd_{t}{v}"),
            grid: clamp_grid(parts),
            block: (LOOP_THREADS as u32, 1),
            shared_mem: 0,
            vw,
            vpt: 0,
        })
    }
}

pub(crate) fn plan_reduce(dtype: DType, n: usize) -> Result<Plan> {
    let t = type_suffix(dtype)?;
    Ok(Plan {
        name: format!("norm_dw_reduce_{t}"),
        grid: clamp_grid(n.div_ceil(32)),
        block: (32, 32),
        shared_mem: 0,
        vw: 1,
        vpt: 0,
    })
}

unsafe fn launch_with<P>(ordinal: usize, stream: u64, plan: &Plan, params: &mut P) -> Result<()> {
    cuda::launch_struct(ordinal, stream, &plan.name, plan.config(), params)
}

fn crms_flag(a: &NormArgs) -> i32 {
    match a.kind {
        NormKind::Rms => 0,
        NormKind::Crms => 1,
    }
}

/// # Safety
/// See [`super::forward`]: all addresses are device pointers valid on `ordinal`.
pub unsafe fn forward(ordinal: usize, stream: u64, a: &NormArgs, p: &NormFwd) -> Result<()> {
    if a.rows == 0 || a.n == 0 {
        return Ok(());
    }
    let h = if p.residual != 0 { p.h } else { 0 };
    let tune = Tune::get();
    let packing = packing(a.dtype, a.n, &[p.x, p.residual, p.y, h], &[p.weight], tune.split);
    let plan = plan_fwd(a.dtype, a.rows, a.n, packing, tune)?;
    let mut params = FwdParams {
        x: p.x,
        residual: p.residual,
        weight: p.weight,
        y: p.y,
        h,
        rstd: p.rstd,
        rows: a.rows as i64,
        n: a.n as i32,
        crms: crms_flag(a),
        eps: a.eps as f32,
        inv_div: (1.0 / a.divisor()) as f32,
        offset: a.offset as f32,
        scale: a.scale as f32,
    };
    launch_with(ordinal, stream, &plan, &mut params)
}

/// # Safety
/// See [`super::backward`].
pub unsafe fn backward(ordinal: usize, stream: u64, a: &NormArgs, p: &NormBwd) -> Result<()> {
    if a.n == 0 {
        return Ok(());
    }
    let want_dw = p.dw != 0;
    if a.rows == 0 && !want_dw {
        return Ok(());
    }
    // With dw, mod.rs has checked p.parts == dw_parts(rows, n); without, use the same partition.
    let parts = if want_dw { p.parts } else { dw_parts(a.rows, a.n) };
    let dw_partial = if want_dw { p.dw_partial } else { 0 };
    let tune = Tune::get();
    let packing = packing(a.dtype, a.n, &[p.dy, p.h, p.dh_out, p.dx], &[p.weight, dw_partial], tune.split);
    let plan = plan_bwd(a.dtype, a.rows, a.n, parts, packing, want_dw, tune)?;
    let mut params = BwdParams {
        dy: p.dy,
        h: p.h,
        weight: p.weight,
        rstd: p.rstd,
        dh_out: p.dh_out,
        dx: p.dx,
        dw_partial,
        rows: a.rows as i64,
        parts: parts as i64,
        n: a.n as i32,
        crms: crms_flag(a),
        inv_div: (1.0 / a.divisor()) as f32,
        offset: a.offset as f32,
        scale: a.scale as f32,
        pad: 0,
    };
    launch_with(ordinal, stream, &plan, &mut params)?;
    if want_dw {
        let plan = plan_reduce(a.dtype, a.n)?;
        let mut params =
            ReduceParams { partial: p.dw_partial, dw: p.dw, parts: parts as i64, n: a.n as i32, scale: a.scale as f32 };
        launch_with(ordinal, stream, &plan, &mut params)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    /// Every kernel name a plan can produce, as defined in cuda/norm.cu.
    fn all_kernel_names() -> Vec<String> {
        let mut v = Vec::new();
        for t in ["f32", "bf16", "f16"] {
            for vec in ["", "_v16"] {
                v.push(format!("norm_fwd_{t}{vec}"));
                v.push(format!("norm_bwd_{t}{vec}"));
                for r in [1, 2, 4] {
                    v.push(format!("norm_fwd_{t}{vec}_r{r}"));
                }
                for r in [1, 2] {
                    v.push(format!("norm_bwd_{t}{vec}_r{r}"));
                }
            }
            for r in [1, 2, 4] {
                v.push(format!("norm_fwd_{t}_s16_r{r}"));
            }
            for r in [1, 2] {
                v.push(format!("norm_bwd_{t}_s16_r{r}"));
            }
            v.push(format!("norm_dw_reduce_{t}"));
        }
        v
    }

    fn check_reg_plan(p: &Plan, nv: usize, max_vpt: usize) {
        let (tx, ry) = (p.block.0 as usize, p.block.1 as usize);
        assert_eq!(tx % 32, 0, "{p:?}");
        assert!((32..=1024).contains(&tx), "{p:?}");
        assert!(ry >= 1 && tx * ry <= 1024, "{p:?}");
        assert!(tx * ry / 32 <= 32, "{p:?}");
        assert!(matches!(p.vpt, 1 | 2 | 4) && p.vpt <= max_vpt, "{p:?}");
        assert!(tx * p.vpt >= nv, "row does not fit: nv={nv} {p:?}");
        assert!(p.grid >= 1);
    }

    #[test]
    fn plans_cover_every_row_length() {
        let names = all_kernel_names();
        let tunes = [
            Tune::default(),
            Tune::parse("fwd_vpt=1,bwd_vpt=2,fwd_block=1024,bwd_block=32"),
            Tune::parse("fwd_vpt=4,bwd_vpt=1,fwd_block=32,bwd_block=1024"),
            // Many rows per block, each parking 2 packs of dw sums: capped by shared memory.
            Tune::parse("fwd_vpt=2,bwd_vpt=2,fwd_block=256,bwd_block=1024"),
        ];
        let mut ns: Vec<usize> = (1..=300).collect();
        ns.extend([511, 512, 513, 1000, 1024, 2047, 2048, 2049, 4095, 4096, 4097, 5120, 8192, 8193, 12288]);
        ns.extend([16383, 16384, 16385, 16392, 32768, 32769, 32776, 65536, 65544, 131072, 262144, 1 << 20]);
        for &tune in &tunes {
            for dtype in DTYPES {
                for &n in &ns {
                    for packing in [Packing::Elements, Packing::Aligned, Packing::Split] {
                        let vec = 16 / dtype.size();
                        if packing == Packing::Aligned && n % vec != 0 {
                            continue;
                        }
                        for rows in [1usize, 3, 16, 17, 1000, 32768, 3_000_000] {
                            let f = plan_fwd(dtype, rows, n, packing, tune).unwrap();
                            assert!(names.contains(&f.name), "{f:?}");
                            let nv = n / f.vw;
                            assert_eq!(f.name.contains("_s16"), packing == Packing::Split && f.vw > 1, "{f:?}");
                            if f.vpt > 0 {
                                check_reg_plan(&f, nv, FWD_MAX_VPT);
                                let ry = f.block.1 as usize;
                                assert!(f.grid as usize * ry >= rows.min(i32::MAX as usize));
                                assert!(ry <= rows);
                            } else {
                                assert!(nv > 4096 && f.block == (1024, 1));
                            }
                            for want_dw in [false, true] {
                                let parts = dw_parts(rows, n);
                                let b = plan_bwd(dtype, rows, n, parts, packing, want_dw, tune).unwrap();
                                assert!(names.contains(&b.name), "{b:?}");
                                assert_eq!(b.grid as usize, parts);
                                let nv = n / b.vw;
                                if b.name.contains("_s16") {
                                    // One row per block; with dw, the padded sums in shared memory.
                                    check_reg_plan(&b, nv, BWD_MAX_VPT);
                                    assert_eq!(b.block.1, 1, "{b:?}");
                                    let need = if want_dw { (n + n / 32) * 4 } else { 0 };
                                    assert_eq!(b.shared_mem as usize, need);
                                    assert!(b.shared_mem as usize <= MAX_DYNAMIC_SHARED_MEM, "{b:?}");
                                } else if b.vpt > 0 {
                                    check_reg_plan(&b, nv, BWD_MAX_VPT);
                                    let ry = b.block.1 as usize;
                                    assert!(ry <= rows.div_ceil(parts).max(1));
                                    let need = if want_dw && ry > 1 {
                                        (ry - 1) * b.block.0 as usize * b.vpt * b.vw * 4
                                    } else {
                                        0
                                    };
                                    assert_eq!(b.shared_mem as usize, need);
                                    assert!(b.shared_mem as usize <= MAX_DYNAMIC_SHARED_MEM, "{b:?}");
                                } else {
                                    assert!(nv > 2048 && b.block == (1024, 1));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn default_plans_for_the_target_shape() {
        // bf16 [32768, 4096], 16-byte aligned: 512 packs per row.
        let t = Tune::default();
        let f = plan_fwd(DType::BF16, 32768, 4096, Packing::Aligned, t).unwrap();
        assert_eq!((f.name.as_str(), f.block, f.grid), ("norm_fwd_bf16_v16_r4", (128, 2), 16384));
        let b = plan_bwd(DType::BF16, 32768, 4096, dw_parts(32768, 4096), Packing::Aligned, true, t).unwrap();
        assert_eq!((b.name.as_str(), b.block, b.grid, b.shared_mem), ("norm_bwd_bf16_v16_r1", (512, 1), 512, 0));
        // float32 backward: two packs per thread (1024 packs per row -> 512 threads).
        let b = plan_bwd(DType::F32, 32768, 4096, dw_parts(32768, 4096), Packing::Aligned, true, t).unwrap();
        assert_eq!((b.name.as_str(), b.block, b.grid), ("norm_bwd_f32_v16_r2", (512, 1), 512));
        // Small rows share a block: n = 512 bf16 -> 64 packs, 32 threads, 8 rows per block.
        let f = plan_fwd(DType::BF16, 1000, 512, Packing::Aligned, t).unwrap();
        assert_eq!((f.name.as_str(), f.block, f.grid), ("norm_fwd_bf16_v16_r2", (32, 8), 125));
        // CRMSNorm's odd d - 1 = 4095: 511 whole packs at most, cut rows.
        let f = plan_fwd(DType::BF16, 2048, 4095, Packing::Split, t).unwrap();
        assert_eq!((f.name.as_str(), f.block, f.grid), ("norm_fwd_bf16_s16_r4", (128, 2), 1024));
        let b = plan_bwd(DType::BF16, 2048, 4095, dw_parts(2048, 4095), Packing::Split, true, t).unwrap();
        assert_eq!((b.name.as_str(), b.block, b.shared_mem), ("norm_bwd_bf16_s16_r1", (512, 1), (4095 + 127) * 4));
        // Too long for the registers or the dw sums in shared memory: one element at a time.
        let b = plan_bwd(DType::BF16, 64, 12000, 4, Packing::Split, true, t).unwrap();
        assert_eq!(b.name, "norm_bwd_bf16");
        let b = plan_bwd(DType::BF16, 64, 12000, 4, Packing::Split, false, t).unwrap();
        assert_eq!((b.name.as_str(), b.block), ("norm_bwd_bf16_s16_r2", (1024, 1)));
        let f = plan_fwd(DType::BF16, 64, 40000, Packing::Split, t).unwrap();
        assert_eq!(f.name, "norm_fwd_bf16");
    }

    #[test]
    fn packing_needs_alignment_divisibility_or_agreeing_rows() {
        use Packing::*;
        assert_eq!(packing(DType::BF16, 4096, &[256, 0, 512], &[1024], true), Aligned);
        // A row buffer off 16 bytes, all agreeing mod 16: cut rows; disagreeing: elements.
        assert_eq!(packing(DType::BF16, 4096, &[258, 0, 514], &[1024], true), Split);
        assert_eq!(packing(DType::BF16, 4096, &[256, 2, 512], &[1024], true), Elements);
        // n not a multiple of the pack (CRMSNorm's d - 1): cut rows, whatever the weight's alignment.
        assert_eq!(packing(DType::BF16, 4095, &[256, 512], &[1026], true), Split);
        assert_eq!(packing(DType::F32, 4098, &[256], &[0], true), Split);
        // A misaligned weight alone rules out 16-byte packs from the row start, not cut rows.
        assert_eq!(packing(DType::BF16, 4096, &[256], &[1026], true), Split);
        assert_eq!(packing(DType::F32, 4100, &[256], &[], true), Aligned);
        // Rows too short to cut, or addresses not multiples of the element.
        assert_eq!(packing(DType::BF16, 255, &[256], &[], true), Elements);
        assert_eq!(packing(DType::BF16, 256 + 1, &[256], &[], true), Split);
        assert_eq!(packing(DType::F32, 4095, &[258, 258], &[], true), Elements);
        assert_eq!(packing(DType::F16, 7, &[0], &[], true), Elements);
        // Cutting turned off (LMKERN_CUDA_NORM_TUNE=split=0): element-wise, aligned rows unchanged.
        assert_eq!(packing(DType::BF16, 4095, &[256, 512], &[1026], false), Elements);
        assert_eq!(packing(DType::BF16, 4096, &[256], &[1024], false), Aligned);
    }

    #[test]
    fn tune_parsing_ignores_junk() {
        assert_eq!(Tune::parse(""), Tune::default());
        assert_eq!(Tune::parse("fwd_vpt=3,bwd_vpt=4,fwd_block=5000,x=1,bwd_block"), Tune::default());
        let t = Tune::parse(" fwd_vpt = 2 , bwd_vpt=2,fwd_block=128,bwd_block=512");
        assert_eq!(t, Tune { fwd_vpt: 2, bwd_vpt: 2, fwd_block: 128, bwd_block: 512, split: true });
        assert!(!Tune::parse("split=0").split && Tune::parse("split=1").split && Tune::parse("split=2").split);
    }

    #[test]
    fn float64_is_a_type_error() {
        assert_eq!(plan_fwd(DType::F64, 1, 8, Packing::Elements, Tune::default()).unwrap_err().kind, crate::error::ErrorKind::Type);
    }

    #[test]
    fn kernels_named_by_plans_are_in_the_image() {
        // Every name a plan can produce is in the image, when kernels were built.
        use crate::cuda::image_has_symbol as has;
        if !has("norm_dw_reduce_f32") {
            return; // no kernels, or a compressed image: nothing to look at
        }
        for name in all_kernel_names() {
            assert!(has(&name), "{name} missing from the CUDA image");
        }
    }

    /// Without a driver (this build machine), a CUDA forward/backward is an error, not a panic.
    #[test]
    fn cuda_calls_without_a_gpu_are_errors() {
        if crate::cuda_status().is_ok() {
            return;
        }
        let a =
            NormArgs { kind: NormKind::Rms, dtype: DType::BF16, rows: 4, n: 64, eps: 1e-6, offset: 0.0, scale: 1.0 };
        let dev = Device::Cuda { ordinal: 0, stream: 0 };
        let fwd = NormFwd { x: 4096, y: 8192, rstd: 12288, ..Default::default() };
        let e = unsafe { super::super::forward(dev, &a, &fwd) }.unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Cuda, "{e}");
        let bwd = NormBwd {
            dy: 4096,
            h: 8192,
            weight: 16384,
            rstd: 12288,
            dx: 20480,
            dw_partial: 24576,
            dw: 28672,
            parts: dw_parts(4, 64),
            ..Default::default()
        };
        let e = unsafe { super::super::backward(dev, &a, &bwd) }.unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Cuda, "{e}");
        // The direct entry points as well.
        assert!(unsafe { forward(0, 0, &a, &fwd) }.is_err());
        assert!(unsafe { backward(0, 0, &a, &bwd) }.is_err());
    }
}
