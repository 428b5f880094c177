//! CUDA launch code for the power-quantization kernels in cuda/quant.cu.
//!
//! Launch shapes depend on the shape, dtype and buffer alignment only, so results are reproducible
//! run to run:
//! - row kernels (quantize, fake quantize forward/backward, dequantize): blockDim.x = TX threads per
//!   row, the row's units of 8 elements over TX rounded up to a warp multiple, within [32, 256];
//!   blockDim.y = RY = min(256/TX, 8, rows) rows per block; grid over row groups;
//! - linear: 256 threads, tokens in tiles of NT ∈ {1, 2, 4, 8}. The tiled kernel
//!   (`quant_lintile<bits>_*`: R output rows per block, the input dimension split over the block's
//!   threads in slices of CPL columns, see [`tile_shape`]) when n and the group size are multiples of
//!   CPL, x is 16-byte aligned and the codes are aligned to a slice's load width; else the generic
//!   kernel (`quant_linear_*`: one warp per output row, 8 rows per block, any shape and alignment).
//!   From 3 tokens, where it fits ([`mma_fits`]: bf16/f16, 4-bit, n and the group size multiples
//!   of 128), the tensor-core kernel instead (`quant_linmma4_*`: 16 output rows per block, token
//!   tiles of 8 or 16; [`MMA_MIN_TOKENS`]). On sm_90+ the tiled kernel is launched with
//!   programmatic dependent launch at 1 token and where a row is one pass of the block's slices
//!   ([`pdl_by_default`]), the tensor-core kernel where n ≤ 4096 ([`mma_pdl_by_default`]): it may
//!   start while the kernel before it ends, prefetches codes into L2 meanwhile, and waits for that
//!   kernel before it reads anything. LMKERN_CUDA_QUANT_TUNE overrides these choices ([`Tune`]).
//! - dequantize: the tiled kernel (`quant_deqtile<bits>_*`, [`deq_tiled`]) where it fits, else the
//!   row kernel.
//!
//! Nothing here reads device memory on the host: exponents outside (0, 1] give NaN tables (NaN
//! outputs; linear reads the codebooks it is given), NaN/inf inputs NaN scales; the Python layer
//! checks what it must (lmkern.ops.quant).
// The module docs link the private launch rules they describe (rustdoc --document-private-items).
#![allow(rustdoc::private_intra_doc_links)]

use super::{LinearArgs, QuantArgs, Tables};
use crate::cuda::{self, clamp_grid, type_suffix, LaunchConfig};
use crate::error::{Error, Result};
use crate::tensor::{DType, Ptr};
use std::sync::OnceLock;

// Kernel parameter blocks: field for field the structs of cuda/quant.cu (sizes asserted there too).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct QuantParams {
    x: u64,
    a: u64,
    codes: u64,
    y: u64,
    scales: u64,
    clip: f64,
    rows: i64,
    n: i32,
    group: i32,
    bits: i32,
    row_bytes: i32,
    vec: i32,
    pad: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DeqParams {
    codes: u64,
    scales: u64,
    a: u64,
    table: u64,
    out: u64,
    rows: i64,
    n: i32,
    group: i32,
    bits: i32,
    row_bytes: i32,
    vec: i32,
    pad: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FakeBwdParams {
    dy: u64,
    x: u64,
    scales: u64,
    a: u64,
    dx: u64,
    da: u64,
    rows: i64,
    n: i32,
    group: i32,
    bits: i32,
    pad: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct LinearParams {
    x: u64,
    codes: u64,
    scales: u64,
    /// float32 [out, 2^bits]: the rows' codebooks, row stride 2^bits.
    table: u64,
    bias: u64,
    y: u64,
    tokens: i64,
    out_features: i32,
    in_features: i32,
    group: i32,
    bits: i32,
    row_bytes: i32,
    /// LINEAR_PDL or 0.
    flags: i32,
}

/// LinearParams.flags: launched with programmatic dependent launch (LINEAR_PDL in cuda/quant.cu):
/// the tiled and tensor-core kernels then prefetch their row tiles' codes into L2 before they wait
/// for the previous kernel.
const LINEAR_PDL: i32 = 1;

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<QuantParams>() == 80);
    assert!(offset_of!(QuantParams, clip) == 40);
    assert!(offset_of!(QuantParams, rows) == 48);
    assert!(offset_of!(QuantParams, n) == 56);
    assert!(offset_of!(QuantParams, vec) == 72);
    assert!(size_of::<DeqParams>() == 72);
    assert!(offset_of!(DeqParams, rows) == 40);
    assert!(offset_of!(DeqParams, vec) == 64);
    assert!(size_of::<FakeBwdParams>() == 72);
    assert!(offset_of!(FakeBwdParams, rows) == 48);
    assert!(offset_of!(FakeBwdParams, bits) == 64);
    assert!(size_of::<LinearParams>() == 80);
    assert!(offset_of!(LinearParams, table) == 24);
    assert!(offset_of!(LinearParams, tokens) == 48);
    assert!(offset_of!(LinearParams, out_features) == 56);
    assert!(offset_of!(LinearParams, row_bytes) == 72);
};

/// Threads of a block (row kernels: at most; linear: exactly).
const BLOCK: usize = 256;
/// Row slots per block of the row kernels (the kernels' shared tables hold 8).
const MAX_SLOTS: usize = 8;
/// Largest token tile of the linear kernels.
pub const MAX_TILE: usize = 8;

/// One kernel launch: which kernel, and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub name: String,
    pub grid: u32,
    pub block: (u32, u32),
    /// Dynamic shared memory, bytes.
    pub shared_mem: u32,
}

impl Plan {
    fn config(&self) -> LaunchConfig {
        LaunchConfig { grid: (self.grid, 1, 1), block: (self.block.0, self.block.1, 1), shared_mem: self.shared_mem }
    }
}

/// Shape of a row kernel for `rows` rows of `n` elements.
pub(crate) fn plan_rows(kernel: &str, dtype: DType, rows: usize, n: usize) -> Result<Plan> {
    let t = type_suffix(dtype)?;
    let units = n.div_ceil(8);
    let tx = units.div_ceil(32).saturating_mul(32).clamp(32, BLOCK);
    let ry = (BLOCK / tx).clamp(1, MAX_SLOTS).min(rows.max(1));
    Ok(Plan { name: format!("quant_{kernel}_{t}"), grid: clamp_grid(rows.div_ceil(ry)), block: (tx as u32, ry as u32), shared_mem: 0 })
}

/// Token tile of the linear kernels.
pub(crate) fn token_tile(tokens: usize) -> usize {
    match tokens {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => MAX_TILE,
    }
}

/// The tiled linear kernel's (columns per slice CPL, output rows per block R) for a token tile and
/// code width; must match LMKERN_QUANT_LINTILES in cuda/quant.cu. x takes NT·CPL registers, the
/// sums R·NT and the codes R·CPL·bits/32; the shapes are the fastest of the sweeps in
/// benches/results/2026-11-26-h200-*-quant-* (4-bit). 8-bit codes take 8 rows at 1 and 2 tokens:
/// 16 rows of 16 code bytes spilled (ptxas: 644 bytes at 2 tokens).
pub(crate) fn tile_shape(nt: usize, bits: u32) -> (usize, usize) {
    match nt {
        1 | 2 => (16, if bits == 8 { 8 } else { 16 }),
        4 => (8, 8),
        _ => (8, 4),
    }
}

/// Whether the tiled kernel applies: every slice whole and in one group, x 16-byte aligned, and the
/// codes aligned to the width the kernel loads a slice's CPL·bits/8 bytes with (its largest
/// power-of-two divisor, at most 16; rows are whole slices, so every row start is aligned too).
pub(crate) fn tiled(q: &QuantArgs, tokens: usize, x: Ptr, codes: Ptr) -> bool {
    let (cpl, _) = tile_shape(token_tile(tokens), q.bits);
    q.n.is_multiple_of(cpl)
        && q.group.is_multiple_of(cpl)
        && x.is_multiple_of(16)
        && codes.is_multiple_of(slice_load_width(cpl, q.bits as usize))
}

/// The width load_codes in cuda/quant.cu reads a slice of `cpl` codes of `bits` bits with: the
/// largest power of two dividing its cpl·bits/8 bytes, at most 16.
fn slice_load_width(cpl: usize, bits: usize) -> u64 {
    1u64 << (cpl * bits / 8).trailing_zeros().min(4)
}

/// A launch-shape variant of the bf16 4-bit linear, for tuning only: as cuda/quant.cu compiles it,
/// with token tile `nt`, `cpl` columns per slice, `rows` output rows and `threads` threads per
/// block; `shape`: the (in_features, group size) it is specialized for, and may run on only, if
/// any; `body`: the kernel it instantiates.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Variant {
    k: usize,
    nt: usize,
    cpl: usize,
    rows: usize,
    threads: usize,
    shape: Option<(usize, usize)>,
    body: Body,
}

/// The kernel a [`Variant`] instantiates.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Body {
    /// linear_tiled (LMKERN_QUANT_LINTILE_VARIANT, `quant_lintile4_bf16_n<nt>_v<k>`): replaces the
    /// tiled kernel of its token tile.
    Tiled,
    /// linear_bulk (the same names): the row tiles by bulk copies, sm_90+ where [`bulk_fits`].
    Bulk,
    /// linear_mma_lp (LMKERN_QUANT_LINMMA_LP_VARIANT, `quant_linmma<rows>_bf16_n<nt>_v<k>`): the
    /// tensor-core linear with lane-private pair tables, `rows` (8 or 16) rows a block, `nt` tokens a
    /// tile, where [`mma_fits`]; replaces the tiled or the tensor-core kernel at up to 8 tokens (nt =
    /// 8) or past 8 (nt = 16). Its pair tables ([`mma_lp_pair_bytes`]) in dynamic shared memory.
    MmaLp,
    /// linear_mma_lp with x in shared memory (`quant_linmma<rows>_bf16_n1_v<k>`): at 1 token, n at most
    /// [`MMA_LP_X_MAX_N`]; [`mma_lp_x_bytes`] more dynamic shared memory.
    MmaLpX,
}

const fn tile_variant(k: usize, nt: usize, cpl: usize, rows: usize, threads: usize) -> Variant {
    Variant { k, nt, cpl, rows, threads, shape: None, body: Body::Tiled }
}

const fn fixed_variant(k: usize, nt: usize, n: usize, group: usize) -> Variant {
    Variant { k, nt, cpl: 16, rows: 16, threads: BLOCK, shape: Some((n, group)), body: Body::Tiled }
}

const fn bulk_variant(k: usize, nt: usize) -> Variant {
    Variant { k, nt, cpl: 16, rows: 16, threads: BLOCK, shape: None, body: Body::Bulk }
}

const fn mma_lp_variant(k: usize, rows: usize, nt: usize, threads: usize, body: Body) -> Variant {
    Variant { k, nt, cpl: 128, rows, threads, shape: None, body }
}

/// linear_mma_lp's pair tables for `rows` rows a block (MMA_LP_PAIR_BYTES in cuda/quant.cu): 32 KB
/// for 8 rows; 64 KB for 16, above the 48 KB a launch may take unless the kernel opts in
/// (crate::cuda does that).
const fn mma_lp_pair_bytes(rows: usize) -> u32 {
    (256 * (rows / 8) * 32 * 4) as u32
}

/// The longest rows Body::MmaLpX takes: its x copy then fits beside the tables with 2 blocks an SM.
const MMA_LP_X_MAX_N: usize = 16384;

/// Body::MmaLpX's shared copy of one token's x (bf16): mma_lp_x_offset(n) in cuda/quant.cu, 16
/// bytes of padding every 64 columns.
fn mma_lp_x_bytes(n: usize) -> u32 {
    (2 * n + 16 * (n / 64)) as u32
}

impl Variant {
    /// The kernel's name in the CUDA image.
    fn kernel_name(&self) -> String {
        match self.body {
            Body::Tiled | Body::Bulk => format!("quant_lintile4_bf16_n{}_v{}", self.nt, self.k),
            Body::MmaLp | Body::MmaLpX => format!("quant_linmma{}_bf16_n{}_v{}", self.rows, self.nt, self.k),
        }
    }

    /// Its dynamic shared memory for rows of n columns, bytes.
    fn shared_mem_for(&self, n: usize) -> u32 {
        match self.body {
            Body::Tiled | Body::Bulk => 0,
            Body::MmaLp => mma_lp_pair_bytes(self.rows),
            Body::MmaLpX => mma_lp_pair_bytes(self.rows) + mma_lp_x_bytes(n),
        }
    }
}

/// BULK_MAX_GROUPS in cuda/quant.cu: the most groups per row whose scales fit linear_bulk's tile.
const BULK_MAX_GROUPS: usize = 128;

/// Whether linear_bulk (cuda/quant.cu) takes this shape: whole 16-byte row segments (n a multiple
/// of 2·cpl), 16-byte rows of scales, at most BULK_MAX_GROUPS of them, and the codes, scales and
/// codebooks 16-byte aligned (the bulk copies' rule). The device must be sm_90+ (the caller checks).
fn bulk_fits(v: &Variant, q: &QuantArgs, codes: Ptr, scales: Ptr, table: Ptr) -> bool {
    let ng = if q.n == 0 { 0 } else { q.n / q.group };
    q.n.is_multiple_of(2 * v.cpl)
        && ng.is_multiple_of(4)
        && ng <= BULK_MAX_GROUPS
        && codes.is_multiple_of(16)
        && scales.is_multiple_of(16)
        && table.is_multiple_of(16)
}

/// The sweeps in benches/results/ (2026-11-26-h200-6-quant-tiled-sweep to 2026-11-27-h200-9-quant-
/// staged-mma) settled variants 1-32 (other tiled shapes and prefetches, a streamed, a cp.async and
/// a staged kernel, the codebooks by cp.async: they lost or tied, and are gone) but these two,
/// blocks of 128 threads, 4 per SM, which leave room on every SM for the next kernel's blocks: at 1
/// token with PDL (bf16 4-bit, µs at 4096 → 4096 / 4096 → 14336 / 14336 → 4096 against the default's
/// 5.85 / 18.8 / 16.8) 24, a prefetch per line: 7.96 / 16.2 / 24.0; 25, in bulk: 7.96 / 16.2 / 23.9.
/// They win where there are many row tiles (4096 → 14336: 3.4 waves of the default's blocks); one
/// shape is not enough for a rule. 40-42 (unmeasured): the default 1- and 2-token kernels
/// specialized for in_features 4096 and groups of 128, and the 1-token kernel for in_features
/// 14336, where a full row tile's code and scale loads take immediate offsets (sm_90 SASS: ~140
/// instructions from griddep_wait to the tile's barrier against ~340, of ~1,550 a thread issues at
/// 4096²). 43-47 (unmeasured; cuda/quant.cu, TILE_UNIFORM): the default 1- and 2-token kernels for
/// every shape with a full row tile's loads at plain row strides and the block's sums through
/// shared memory (43, 44: ~200 instructions from the wait to the barrier, ~100 for the sums against
/// ~150), 40 and 41 with those sums (45, 46), the 1-token kernel with the plain strides alone (47).
/// 48-50 (unmeasured; cuda/quant.cu, linear_bulk, sm_90+): a row tile's codes, scales and codebooks
/// by bulk copies, lookups on the first rows while the later ones land (1 and 2 tokens in chunks of
/// 4 rows; 1 token in one chunk of 16). 51-58 (unmeasured; cuda/quant.cu, linear_mma_lp): the
/// tensor-core linear with lane-private pair tables (no bank conflicts). 8 rows a block (51-54, ~2.7
/// instructions a weight per chunk, sm_90 SASS, against the FFMA kernel's ~6): up to 8 tokens with
/// rings of 4 and 2 chunks a warp in blocks of 128 threads (51, 52) and of 4 in blocks of 256 (54),
/// 16-token tiles (53). 16 rows a block, the lookups' addresses one byte permute each (55-58, ~1.7
/// instructions a weight per chunk), 64 KB of pair tables: up to 8 tokens with rings of 2 and 3
/// chunks (55, 56), 16-token tiles (57); at 1 token with x in shared memory and a ring of 4 (58:
/// every chunk of a 4096-column row in flight at once); the same with 8 rows a block, a ring of 8 in
/// blocks of 128 threads (59).
const TILE_VARIANTS: [Variant; 22] = [
    tile_variant(24, 1, 16, 16, 128),
    tile_variant(25, 1, 16, 16, 128),
    fixed_variant(40, 1, 4096, 128),
    fixed_variant(41, 2, 4096, 128),
    fixed_variant(42, 1, 14336, 128),
    tile_variant(43, 1, 16, 16, BLOCK),
    tile_variant(44, 2, 16, 16, BLOCK),
    fixed_variant(45, 1, 4096, 128),
    fixed_variant(46, 2, 4096, 128),
    tile_variant(47, 1, 16, 16, BLOCK),
    bulk_variant(48, 1),
    bulk_variant(49, 2),
    bulk_variant(50, 1),
    mma_lp_variant(51, 8, 8, 128, Body::MmaLp),
    mma_lp_variant(52, 8, 8, 128, Body::MmaLp),
    mma_lp_variant(53, 8, 16, 128, Body::MmaLp),
    mma_lp_variant(54, 8, 8, BLOCK, Body::MmaLp),
    mma_lp_variant(55, 16, 8, BLOCK, Body::MmaLp),
    mma_lp_variant(56, 16, 8, BLOCK, Body::MmaLp),
    mma_lp_variant(57, 16, 16, BLOCK, Body::MmaLp),
    mma_lp_variant(58, 16, 1, BLOCK, Body::MmaLpX),
    mma_lp_variant(59, 8, 1, 128, Body::MmaLpX),
];

/// Tuning variants that replace the default kernel wherever they fit ([`variant_for`]), the first
/// that fits first (they are compiled for bf16 activations only, so only bf16 calls take them).
/// Empty: none has been measured faster yet. A GPU session that measures one faster puts its
/// number here (for example `&[58, 55, 43]`: x in shared memory at 1 token, else the 16-row
/// tensor-core kernel up to 8 tokens, else TILE_UNIFORM with the shared-memory sums);
/// `LMKERN_CUDA_QUANT_TUNE=variant=0` then times the plain kernels. The
/// tuned-launch test (tests/test_quant_cuda.py, TUNED_SCRIPT's `want`) expects the plain kernel's
/// name where no variant is asked for: it must learn the default too.
const DEFAULT_VARIANTS: &[usize] = &[];

/// Whether the tiled linear is launched with programmatic dependent launch on sm_90+
/// ([`cuda::launch_struct_pdl`]) when LMKERN_CUDA_QUANT_TUNE does not say: at 1 token, and at 2
/// where a row is at most one pass of the block's slices (n ≤ 256·CPL). With PDL a block prefetches
/// the codes of its tile's first pass into L2 while the kernel before it ends. On the H200 (bf16
/// 4-bit g128; benches/results/2026-11-27-h200-8-quant-pdl and -9-quant-staged-mma) it took
/// 4096 → 4096 from 6.97 to 5.8 µs at 1 token, 9.06 to 7.9 at 2, 4096 → 14336 from 18.9 to 18.4-18.8,
/// and 14336 → 4096 (3.5 passes) from 16.8 to 15.3 at 1 token (17.9 when it prefetched the tile's
/// every pass); 2 tokens over several passes are not measured.
fn pdl_by_default(q: &QuantArgs, tokens: usize) -> bool {
    let nt = token_tile(tokens);
    nt == 1 || q.n <= BLOCK * tile_shape(nt, q.bits).0
}

/// As [`pdl_by_default`], for the tensor-core linear: where n ≤ 4096 (at most 4 chunks of 128
/// columns per warp). On the H200 (benches/results/2026-11-27-h200-9-quant-staged-mma, bf16 4-bit
/// g128) PDL took 4096 → 4096 from 11.0 / 11.4 / 12.4 / 15.5 / 27.2 µs to 9.8 / 10.1 / 11.5 / 15.0 /
/// 26.7 at 3 / 4 / 8 / 16 / 32 tokens and 4096 → 14336 from 36.8 to 36.3 at 8; 14336 → 4096 from
/// 33.1 to 34.4 at 8 and 43.2 to 44.7 at 16.
fn mma_pdl_by_default(q: &QuantArgs) -> bool {
    q.n <= 4096
}

/// Tuning switches from LMKERN_CUDA_QUANT_TUNE (comma-separated, read once per process):
/// `variant=<k>` (a [`TILE_VARIANTS`] entry for the linear; `variant=0`: none, not even one of
/// [`DEFAULT_VARIANTS`]), `pdl=1` / `pdl=0` (with
/// programmatic dependent launch or not, overriding [`pdl_by_default`]), `blocks_per_sm=<b>`
/// (the tiled linear's grid at most b blocks per multiprocessor; each block then takes several row
/// tiles, leaving room on every SM for the next kernel's blocks), `mma=1` (the tensor-core
/// linear where it fits, [`mma_fits`], at every token count) and `mma=0` (never).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Tune {
    variant: Option<Variant>,
    /// `variant=0`: the plain tiled kernel even where a default variant fits.
    plain: bool,
    pdl: Option<bool>,
    blocks_per_sm: Option<usize>,
    mma: Option<bool>,
}

impl Tune {
    fn parse(text: &str) -> Tune {
        let mut t = Tune::default();
        for item in text.split(',') {
            match item.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("variant", "0")) => t.plain = true,
                Some(("variant", v)) => {
                    t.variant = v.parse::<usize>().ok().and_then(|k| TILE_VARIANTS.iter().copied().find(|e| e.k == k))
                }
                Some(("pdl", "1")) => t.pdl = Some(true),
                Some(("pdl", "0")) => t.pdl = Some(false),
                Some(("blocks_per_sm", v)) => t.blocks_per_sm = v.parse::<usize>().ok().filter(|&b| b > 0),
                Some(("mma", "1")) => t.mma = Some(true),
                Some(("mma", "0")) => t.mma = Some(false),
                _ => {}
            }
        }
        t
    }

    fn get() -> Tune {
        static TUNE: OnceLock<Tune> = OnceLock::new();
        *TUNE.get_or_init(|| std::env::var("LMKERN_CUDA_QUANT_TUNE").map(|s| Tune::parse(&s)).unwrap_or_default())
    }
}

/// The tuning variant that replaces the default kernel `kernel` for this call: the one asked for if
/// it fits, else (none asked for, nor `variant=0`) the first of `defaults` ([`DEFAULT_VARIANTS`])
/// that fits. Fitting: bf16, 4 bits, its token tile, its slice width, in place of the tiled kernel
/// (a tensor-core one, linear_mma_lp: of the tiled or the tensor-core kernel, where [`mma_fits`]);
/// a bulk-copy one on sm_90+ only, where [`bulk_fits`].
#[allow(clippy::too_many_arguments)]
fn variant_for(
    tune: &Tune, defaults: &[usize], kernel: LinearKernel, dtype: DType, l: &LinearArgs, x: Ptr, codes: Ptr, scales: Ptr, table: Ptr,
    sm90: bool,
) -> Option<Variant> {
    let fits = |v: &Variant| {
        let replaces = match v.body {
            Body::MmaLp | Body::MmaLpX => kernel != LinearKernel::Generic,
            Body::Tiled | Body::Bulk => kernel == LinearKernel::Tiled,
        };
        replaces
            && variant_fits(v, dtype, l, x, codes)
            && (v.body != Body::Bulk || (sm90 && bulk_fits(v, &l.q, codes, scales, table)))
    };
    match tune.variant {
        Some(v) => Some(v).filter(fits),
        None if tune.plain => None,
        None => defaults.iter().filter_map(|&k| TILE_VARIANTS.iter().find(|v| v.k == k)).copied().find(fits),
    }
}

fn variant_fits(v: &Variant, dtype: DType, l: &LinearArgs, x: Ptr, codes: Ptr) -> bool {
    if matches!(v.body, Body::MmaLp | Body::MmaLpX) {
        let tokens_fit = match v.nt {
            1 => l.tokens == 1 && l.q.n <= MMA_LP_X_MAX_N,
            8 => l.tokens <= 8,
            _ => l.tokens > 8,
        };
        return dtype == DType::BF16 && mma_fits(dtype, &l.q, x, codes) && tokens_fit;
    }
    dtype == DType::BF16
        && l.q.bits == 4
        && token_tile(l.tokens) == v.nt
        && l.q.n.is_multiple_of(v.cpl)
        && l.q.group.is_multiple_of(v.cpl)
        && v.shape.is_none_or(|shape| shape == (l.q.n, l.q.group))
        && x.is_multiple_of(16)
        && codes.is_multiple_of(16)
}

/// Output rows per block of the tensor-core linear (MMA_ROWS in cuda/quant.cu; its warp step,
/// MMA_CHUNK = 128 columns, is [`super::tensor_core_shape`]'s 128).
const MMA_ROWS: usize = 16;

/// Whether the tensor-core linear (`quant_linmma4_*`) applies: bf16 or f16 activations, 4-bit
/// codes, n and the group size multiples of 128 (a warp step is 128 columns of one group), x and
/// the codes 16-byte aligned (16-byte loads).
pub(crate) fn mma_fits(dtype: DType, q: &QuantArgs, x: Ptr, codes: Ptr) -> bool {
    super::tensor_core_shape(dtype, q.bits, q.n, q.group) && x.is_multiple_of(16) && codes.is_multiple_of(16)
}

/// The fewest tokens for which the tensor-core linear is the default where it fits: on the H200
/// (benches/results/2026-11-27-h200-9-quant-staged-mma, 4096², bf16 4-bit g128) it took 10.3 /
/// 10.5 / 11.1 / 12.4 µs at 1 / 2 / 4 / 8 tokens against the tiled kernel's 5.9 / 7.9 / 13.0 / 24.5, and
/// 11.0 against 12.5 at 3 (the tiled kernel's 4-token tile).
const MMA_MIN_TOKENS: usize = 3;

/// The linear kernels (cuda/quant.cu).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LinearKernel {
    /// `quant_linear_*`: any shape and alignment.
    Generic,
    /// `quant_lintile<bits>_*`: see [`tiled`].
    Tiled,
    /// `quant_linmma4_*`: see [`mma_fits`] and [`MMA_MIN_TOKENS`].
    Mma,
}

/// The kernel a linear call takes (`tune`: LMKERN_CUDA_QUANT_TUNE's switches).
fn linear_kernel(tune: &Tune, dtype: DType, q: &QuantArgs, tokens: usize, x: Ptr, codes: Ptr) -> LinearKernel {
    if tune.mma.unwrap_or(tokens >= MMA_MIN_TOKENS) && mma_fits(dtype, q, x, codes) {
        LinearKernel::Mma
    } else if tiled(q, tokens, x, codes) {
        LinearKernel::Tiled
    } else {
        LinearKernel::Generic
    }
}

/// The launch of `kernel`: one block per row tile.
pub(crate) fn plan_linear(dtype: DType, l: &LinearArgs, kernel: LinearKernel) -> Result<Plan> {
    let t = type_suffix(dtype)?;
    let (nt, bits) = (token_tile(l.tokens), l.q.bits);
    let (name, rows_per_block) = match kernel {
        LinearKernel::Generic => (format!("quant_linear_{t}_n{nt}"), BLOCK / 32),
        LinearKernel::Tiled => (format!("quant_lintile{bits}_{t}_n{nt}"), tile_shape(nt, bits).1),
        LinearKernel::Mma => (format!("quant_linmma4_{t}_n{}", if l.tokens <= 8 { 8 } else { 16 }), MMA_ROWS),
    };
    Ok(Plan { name, grid: clamp_grid(l.q.rows.div_ceil(rows_per_block)), block: (BLOCK as u32, 1), shared_mem: 0 })
}

/// Rows per block and columns per slice of the tiled dequantizer (DEQ_ROWS, DEQ_CPL in cuda/quant.cu).
const DEQ_ROWS: usize = 8;
const DEQ_CPL: usize = 16;

/// Whether the tiled dequantizer applies: whole slices of 16 columns in one group, `out` 16-byte
/// aligned (16-byte stores), the codes aligned to the slice's load width (as [`tiled`]).
pub(crate) fn deq_tiled(q: &QuantArgs, codes: Ptr, out: Ptr) -> bool {
    q.n.is_multiple_of(DEQ_CPL)
        && q.group.is_multiple_of(DEQ_CPL)
        && out.is_multiple_of(16)
        && codes.is_multiple_of(slice_load_width(DEQ_CPL, q.bits as usize))
}

/// 8-element packs: n a multiple of 8 and every given row buffer aligned to 8 elements.
fn vec8(dtype: DType, n: usize, ptrs: &[Ptr]) -> i32 {
    let align = 8 * dtype.size() as u64;
    (n.is_multiple_of(8) && ptrs.iter().all(|&p| p.is_multiple_of(align))) as i32
}

unsafe fn launch_with<P>(ordinal: usize, stream: u64, plan: &Plan, params: &mut P) -> Result<()> {
    cuda::launch_struct(ordinal, stream, &plan.name, plan.config(), params)
}

fn dims(q: &QuantArgs) -> (i64, i32, i32, i32, i32) {
    (q.rows as i64, q.n as i32, q.group as i32, q.bits as i32, q.row_bytes() as i32)
}

/// Quantize (`codes` given, `y` = 0) or fake quantize (`y` given, `codes` = 0).
///
/// # Safety
/// See [`super::quantize`] / [`super::fake_quantize`]: device pointers valid on `ordinal`; rows > 0, n > 0.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward(
    ordinal: usize, stream: u64, dtype: DType, q: &QuantArgs, x: Ptr, a: Ptr, codes: Ptr, y: Ptr, scales: Ptr,
) -> Result<()> {
    let plan = plan_rows("fwd", dtype, q.rows, q.n)?;
    let (rows, n, group, bits, row_bytes) = dims(q);
    let mut p = QuantParams {
        x,
        a,
        codes,
        y,
        scales,
        clip: q.clip,
        rows,
        n,
        group,
        bits,
        row_bytes,
        vec: vec8(dtype, q.n, &[x, y]),
        pad: 0,
    };
    launch_with(ordinal, stream, &plan, &mut p)
}

/// # Safety
/// See [`super::dequantize`]; rows > 0, n > 0.
#[allow(clippy::too_many_arguments)]
pub unsafe fn dequantize(
    ordinal: usize, stream: u64, dtype: DType, q: &QuantArgs, codes: Ptr, scales: Ptr, tables: Tables, out: Ptr,
) -> Result<()> {
    let plan = if deq_tiled(q, codes, out) {
        let t = type_suffix(dtype)?;
        Plan {
            name: format!("quant_deqtile{}_{t}", q.bits),
            grid: clamp_grid(q.rows.div_ceil(DEQ_ROWS)),
            block: (BLOCK as u32, 1),
            shared_mem: 0,
        }
    } else {
        plan_rows("deq", dtype, q.rows, q.n)?
    };
    let (rows, n, group, bits, row_bytes) = dims(q);
    // The kernel reads the codebook when `table` is set, else computes the table from `a`.
    let (a, table) = match tables {
        Tables::Exponents(a) => (a, 0),
        Tables::Codebooks(t) => (0, t),
    };
    let vec = vec8(dtype, q.n, &[out]);
    let mut p = DeqParams { codes, scales, a, table, out, rows, n, group, bits, row_bytes, vec, pad: 0 };
    launch_with(ordinal, stream, &plan, &mut p)
}

/// # Safety
/// See [`super::fake_quantize_backward`]; rows > 0 (n may be 0: then only da = 0 is written).
#[allow(clippy::too_many_arguments)]
pub unsafe fn fake_backward(
    ordinal: usize, stream: u64, dtype: DType, q: &QuantArgs, dy: Ptr, x: Ptr, scales: Ptr, a: Ptr, dx: Ptr, da: Ptr,
) -> Result<()> {
    let plan = plan_rows("fake_bwd", dtype, q.rows, q.n)?;
    let (rows, n, group, bits, _) = dims(q);
    let mut p = FakeBwdParams { dy, x, scales, a, dx, da, rows, n, group, bits, pad: 0 };
    launch_with(ordinal, stream, &plan, &mut p)
}

/// # Safety
/// See [`super::linear`]; tokens > 0, out > 0 (in may be 0: y = bias).
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear(
    ordinal: usize, stream: u64, dtype: DType, l: &LinearArgs, x: Ptr, codes: Ptr, scales: Ptr, table: Ptr, bias: Ptr, y: Ptr,
) -> Result<()> {
    let q = &l.q;
    if q.rows > i32::MAX as usize {
        return Err(Error::value(format!("codes: {} output rows exceed the 2^31-1 the CUDA kernels support", q.rows)));
    }
    let tune = Tune::get();
    let kernel = linear_kernel(&tune, dtype, q, l.tokens, x, codes);
    let mut plan = plan_linear(dtype, l, kernel)?;
    let tuned = if kernel != LinearKernel::Generic && (tune.variant.is_some() || !DEFAULT_VARIANTS.is_empty()) {
        variant_for(&tune, DEFAULT_VARIANTS, kernel, dtype, l, x, codes, scales, table, cuda::supports_pdl(ordinal)?)
    } else {
        None
    };
    if let Some(v) = tuned {
        plan.name = v.kernel_name();
        plan.shared_mem = v.shared_mem_for(q.n);
        plan.grid = clamp_grid(q.rows.div_ceil(v.rows));
        plan.block = (v.threads as u32, 1);
    }
    if let (LinearKernel::Tiled, Some(b)) = (kernel, tune.blocks_per_sm) {
        plan.grid = plan.grid.min(clamp_grid(b.saturating_mul(cuda::sm_count(ordinal)?)));
    }
    // Only the tiled and tensor-core kernels wait for the previous one (griddepcontrol.wait)
    // before they read.
    let pdl = match kernel {
        LinearKernel::Tiled => tune.pdl.unwrap_or_else(|| pdl_by_default(q, l.tokens)),
        LinearKernel::Mma => tune.pdl.unwrap_or_else(|| mma_pdl_by_default(q)),
        LinearKernel::Generic => false,
    } && cuda::supports_pdl(ordinal)?;
    let mut p = LinearParams {
        x,
        codes,
        scales,
        table,
        bias,
        y,
        tokens: l.tokens as i64,
        out_features: q.rows as i32,
        in_features: q.n as i32,
        group: q.group as i32,
        bits: q.bits as i32,
        row_bytes: q.row_bytes() as i32,
        flags: if pdl { LINEAR_PDL } else { 0 },
    };
    if pdl {
        cuda::launch_struct_pdl(ordinal, stream, &plan.name, plan.config(), &mut p)
    } else {
        launch_with(ordinal, stream, &plan, &mut p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kernel_names() -> Vec<String> {
        let mut v = Vec::new();
        for t in ["f32", "bf16", "f16"] {
            for k in ["fwd", "deq", "fake_bwd"] {
                v.push(format!("quant_{k}_{t}"));
            }
            for bits in [2, 3, 4, 8] {
                v.push(format!("quant_deqtile{bits}_{t}"));
            }
            for nt in [1, 2, 4, 8] {
                v.push(format!("quant_linear_{t}_n{nt}"));
                for bits in [2, 3, 4, 8] {
                    v.push(format!("quant_lintile{bits}_{t}_n{nt}"));
                }
            }
            if t != "f32" {
                v.push(format!("quant_linmma4_{t}_n8"));
                v.push(format!("quant_linmma4_{t}_n16"));
            }
        }
        v
    }

    #[test]
    fn row_plans_cover_every_shape() {
        let names = all_kernel_names();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for n in (1..=300).chain([1000, 2048, 2049, 4096, 65536, 1 << 20]) {
                for rows in [1usize, 2, 7, 8, 9, 1000, 3_000_000] {
                    for k in ["fwd", "deq", "fake_bwd"] {
                        let p = plan_rows(k, dtype, rows, n).unwrap();
                        assert!(names.contains(&p.name), "{p:?}");
                        let (tx, ry) = (p.block.0 as usize, p.block.1 as usize);
                        assert!(tx % 32 == 0 && (32..=256).contains(&tx) && tx * ry <= 256, "{p:?}");
                        assert!((1..=MAX_SLOTS).contains(&ry) && ry <= rows, "{p:?}");
                        assert!(p.grid as usize * ry >= rows, "{p:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn linear_plans() {
        let q = QuantArgs { bits: 4, rows: 4096, n: 4096, group: 128, clip: 1.0 };
        let l = LinearArgs { q, tokens: 1 };
        assert!(tiled(&q, 1, 256, 512));
        assert!(!tiled(&q, 1, 258, 512)); // x not 16-byte aligned
        assert!(!tiled(&q, 1, 256, 516)); // 4-bit, 16 columns: 8-byte code loads
        assert!(tiled(&q, 8, 256, 516)); // 4-bit, 8 columns: 4-byte code loads
        assert!(!tiled(&QuantArgs { group: 40, n: 4080, ..q }, 1, 256, 512));
        assert!(tiled(&QuantArgs { group: 40, n: 4080, ..q }, 8, 256, 512));
        assert!(tiled(&QuantArgs { bits: 3, ..q }, 1, 256, 514)); // 6 bytes: 2-byte loads
        assert!(!tiled(&QuantArgs { bits: 3, ..q }, 1, 256, 513));
        assert!(tiled(&QuantArgs { bits: 3, ..q }, 8, 256, 513)); // 3 bytes: byte loads
        assert!(!tiled(&QuantArgs { bits: 3, ..q }, 2, 256, 513));
        assert!(!tiled(&QuantArgs { bits: 8, ..q }, 1, 256, 520)); // 16 bytes: 16-byte loads
        use LinearKernel::{Generic, Tiled};
        let p = plan_linear(DType::BF16, &l, Tiled).unwrap();
        assert_eq!((p.name.as_str(), p.grid, p.block), ("quant_lintile4_bf16_n1", 256, (256, 1)));
        let p = plan_linear(DType::F32, &LinearArgs { q, tokens: 5 }, Tiled).unwrap();
        assert_eq!((p.name.as_str(), p.grid), ("quant_lintile4_f32_n8", 1024));
        let p = plan_linear(DType::BF16, &LinearArgs { q: QuantArgs { bits: 8, ..q }, tokens: 2 }, Tiled).unwrap();
        assert_eq!((p.name.as_str(), p.grid), ("quant_lintile8_bf16_n2", 512)); // 8 rows per block
        let p = plan_linear(DType::BF16, &l, Generic).unwrap();
        assert_eq!((p.name.as_str(), p.grid), ("quant_linear_bf16_n1", 512));
        let p = plan_linear(DType::F16, &LinearArgs { q, tokens: 9 }, LinearKernel::Mma).unwrap();
        assert_eq!((p.name.as_str(), p.grid, p.block), ("quant_linmma4_f16_n16", 256, (256, 1)));
        assert_eq!(plan_linear(DType::BF16, &l, LinearKernel::Mma).unwrap().name, "quant_linmma4_bf16_n8");
        let names = all_kernel_names();
        for bits in [2, 3, 4, 8] {
            for tokens in 0..40 {
                for kernel in [Generic, Tiled, LinearKernel::Mma] {
                    if kernel == LinearKernel::Mma && bits != 4 {
                        continue; // mma_fits: 4-bit codes only
                    }
                    let qt = QuantArgs { bits, ..q };
                    let p = plan_linear(DType::F16, &LinearArgs { q: qt, tokens }, kernel).unwrap();
                    assert!(names.contains(&p.name), "{p:?}");
                }
            }
        }
        assert_eq!(token_tile(3), 4);
        assert_eq!(token_tile(9), 8);
    }

    #[test]
    fn mma_fits_bf16_f16_4_bit_in_chunks_of_128() {
        let q = QuantArgs { bits: 4, rows: 4096, n: 4096, group: 128, clip: 1.0 };
        assert!(mma_fits(DType::BF16, &q, 256, 512) && mma_fits(DType::F16, &q, 256, 512));
        assert!(!mma_fits(DType::F32, &q, 256, 512));
        assert!(!mma_fits(DType::BF16, &QuantArgs { bits: 3, ..q }, 256, 512));
        assert!(!mma_fits(DType::BF16, &QuantArgs { group: 64, ..q }, 256, 512));
        assert!(!mma_fits(DType::BF16, &QuantArgs { n: 4160, group: 4160, ..q }, 256, 512));
        assert!(mma_fits(DType::BF16, &QuantArgs { group: 4096, ..q }, 256, 512));
        assert!(!mma_fits(DType::BF16, &q, 264, 512) && !mma_fits(DType::BF16, &q, 256, 520));
    }

    #[test]
    fn tensor_cores_by_default_from_3_tokens_where_they_fit() {
        use LinearKernel::{Generic, Mma, Tiled};
        let q = QuantArgs { bits: 4, rows: 4096, n: 4096, group: 128, clip: 1.0 };
        let none = Tune::default();
        let kernel = |tune: &Tune, dtype, q: &QuantArgs, tokens, x| linear_kernel(tune, dtype, q, tokens, x, 512);
        for dtype in [DType::BF16, DType::F16] {
            assert_eq!(kernel(&none, dtype, &q, 1, 256), Tiled);
            assert_eq!(kernel(&none, dtype, &q, 2, 256), Tiled);
            for tokens in [3, 4, 8, 16, 40] {
                assert_eq!(kernel(&none, dtype, &q, tokens, 256), Mma, "{tokens} tokens");
            }
        }
        assert_eq!(kernel(&none, DType::F32, &q, 8, 256), Tiled);
        assert_eq!(kernel(&none, DType::BF16, &QuantArgs { bits: 8, ..q }, 8, 256), Tiled);
        assert_eq!(kernel(&none, DType::BF16, &QuantArgs { group: 64, ..q }, 8, 256), Tiled);
        assert_eq!(kernel(&none, DType::BF16, &q, 8, 248), Generic); // x not 16-byte aligned
        let mma = |m| Tune { mma: Some(m), ..Tune::default() };
        assert_eq!(kernel(&mma(true), DType::BF16, &q, 1, 256), Mma);
        assert_eq!(kernel(&mma(false), DType::BF16, &q, 8, 256), Tiled);
    }

    #[test]
    fn deq_tiled_needs_alignment_and_whole_slices() {
        let q = QuantArgs { bits: 4, rows: 3, n: 4096, group: 128, clip: 1.0 };
        assert!(deq_tiled(&q, 512, 256));
        assert!(!deq_tiled(&q, 516, 256)); // 8-byte code loads
        assert!(!deq_tiled(&q, 512, 264)); // 16-byte stores
        assert!(!deq_tiled(&QuantArgs { n: 4088, group: 8, ..q }, 512, 256));
        assert!(deq_tiled(&QuantArgs { bits: 3, ..q }, 514, 256)); // 6 bytes: 2-byte loads
        assert!(!deq_tiled(&QuantArgs { bits: 8, ..q }, 520, 256)); // 16-byte loads
    }

    #[test]
    fn pdl_at_one_token_and_where_a_row_is_one_pass() {
        let q = QuantArgs { bits: 4, rows: 4096, n: 4096, group: 128, clip: 1.0 };
        assert!(pdl_by_default(&q, 1) && pdl_by_default(&q, 2)); // 256 slices of 16
        assert!(pdl_by_default(&QuantArgs { n: 14336, ..q }, 1)); // every pass at 1 token
        assert!(!pdl_by_default(&QuantArgs { n: 14336, ..q }, 2) && !pdl_by_default(&QuantArgs { n: 4112, ..q }, 2));
        assert!(!pdl_by_default(&q, 3)); // slices of 8: 512
        assert!(pdl_by_default(&QuantArgs { n: 2048, ..q }, 8));
        assert!(pdl_by_default(&QuantArgs { bits: 8, ..q }, 1));
        assert!(mma_pdl_by_default(&q) && mma_pdl_by_default(&QuantArgs { n: 2048, ..q }));
        assert!(!mma_pdl_by_default(&QuantArgs { n: 4224, ..q }) && !mma_pdl_by_default(&QuantArgs { n: 14336, ..q }));
    }

    #[test]
    fn variants_fit_their_token_tile_and_shape() {
        let q = QuantArgs { bits: 4, rows: 4096, n: 4096, group: 128, clip: 1.0 };
        let fits = |k: usize, q: QuantArgs, tokens: usize, dtype: DType| {
            let v = TILE_VARIANTS.iter().find(|v| v.k == k).unwrap();
            variant_fits(v, dtype, &LinearArgs { q, tokens }, 256, 512)
        };
        assert!(fits(24, q, 1, DType::BF16) && fits(24, QuantArgs { n: 14336, ..q }, 1, DType::BF16));
        assert!(!fits(24, q, 2, DType::BF16) && !fits(24, q, 1, DType::F16) && !fits(24, QuantArgs { bits: 8, ..q }, 1, DType::BF16));
        assert!(fits(40, q, 1, DType::BF16) && fits(41, q, 2, DType::BF16) && !fits(40, q, 2, DType::BF16));
        assert!(!fits(40, QuantArgs { n: 14336, ..q }, 1, DType::BF16)); // specialized for in_features 4096
        assert!(fits(42, QuantArgs { n: 14336, ..q }, 1, DType::BF16) && !fits(42, q, 1, DType::BF16));
        assert!(fits(45, q, 1, DType::BF16) && fits(46, q, 2, DType::BF16) && !fits(45, QuantArgs { n: 8192, ..q }, 1, DType::BF16));
        // 43, 44 and 47 take every shape the tiled kernel takes, groups of any multiple of 16 among them
        assert!(fits(43, QuantArgs { n: 14336, ..q }, 1, DType::BF16) && fits(44, QuantArgs { group: 96, n: 4224, ..q }, 2, DType::BF16));
        assert!(fits(47, q, 1, DType::BF16) && !fits(47, q, 2, DType::BF16) && !fits(43, q, 1, DType::F16));
        assert!(!fits(40, QuantArgs { group: 64, ..q }, 1, DType::BF16)); // and groups of 128
        let bulk = |k: usize, q: QuantArgs, ptrs: (Ptr, Ptr, Ptr)| {
            let v = TILE_VARIANTS.iter().find(|v| v.k == k).unwrap();
            v.body == Body::Bulk && bulk_fits(v, &q, ptrs.0, ptrs.1, ptrs.2)
        };
        let aligned = (512, 1024, 2048);
        assert!(bulk(48, q, aligned) && bulk(49, QuantArgs { n: 14336, ..q }, aligned) && bulk(50, QuantArgs { n: 0, ..q }, aligned));
        assert!(!bulk(43, q, aligned)); // not a bulk variant
        assert!(!bulk(48, QuantArgs { n: 11008, ..q }, aligned)); // 86 groups: rows of scales not 16 bytes
        assert!(!bulk(48, QuantArgs { n: 16896, ..q }, aligned)); // 132 groups: more than the tile holds
        assert!(!bulk(48, q, (520, 1024, 2048)) && !bulk(48, q, (512, 1032, 2048)) && !bulk(48, q, (512, 1024, 2056)));
        let v = TILE_VARIANTS[2];
        assert!(!variant_fits(&v, DType::BF16, &LinearArgs { q, tokens: 1 }, 264, 512)); // x not 16-byte aligned
        // linear_mma_lp: where the tensor-core kernel fits, bf16, 51/52/54 up to 8 tokens, 53 past 8
        for tokens in [1, 2, 3, 8] {
            assert!(fits(51, q, tokens, DType::BF16) && fits(52, q, tokens, DType::BF16) && fits(54, q, tokens, DType::BF16));
            assert!(!fits(53, q, tokens, DType::BF16));
        }
        assert!(fits(53, q, 9, DType::BF16) && fits(53, q, 32, DType::BF16) && !fits(51, q, 9, DType::BF16));
        assert!(fits(51, QuantArgs { n: 14336, group: 256, ..q }, 1, DType::BF16));
        assert!(!fits(51, q, 1, DType::F16) && !fits(51, QuantArgs { group: 64, ..q }, 1, DType::BF16));
        assert!(!fits(51, QuantArgs { bits: 8, ..q }, 1, DType::BF16) && !fits(51, QuantArgs { n: 4160, group: 4160, ..q }, 1, DType::BF16));
        let v = TILE_VARIANTS.iter().find(|v| v.k == 51).unwrap();
        assert!(!variant_fits(v, DType::BF16, &LinearArgs { q, tokens: 1 }, 264, 512)); // x not 16-byte aligned
        assert!(!variant_fits(v, DType::BF16, &LinearArgs { q, tokens: 1 }, 256, 520)); // codes not 16-byte aligned
        assert_eq!((v.kernel_name().as_str(), v.shared_mem_for(4096)), ("quant_linmma8_bf16_n8_v51", 32768));
        assert!(fits(55, q, 1, DType::BF16) && fits(56, q, 8, DType::BF16) && fits(57, q, 9, DType::BF16) && !fits(57, q, 8, DType::BF16));
        assert!(!fits(55, QuantArgs { group: 64, ..q }, 1, DType::BF16) && !fits(55, q, 1, DType::F16));
        let v = TILE_VARIANTS.iter().find(|v| v.k == 57).unwrap();
        assert_eq!((v.kernel_name().as_str(), v.rows, v.shared_mem_for(4096)), ("quant_linmma16_bf16_n16_v57", 16, 65536));
        // 58: x in shared memory, 1 token, rows of at most 16384 columns
        assert!(fits(58, q, 1, DType::BF16) && !fits(58, q, 2, DType::BF16) && fits(58, QuantArgs { n: 14336, ..q }, 1, DType::BF16));
        assert!(!fits(58, QuantArgs { n: 16512, ..q }, 1, DType::BF16));
        let v = TILE_VARIANTS.iter().find(|v| v.k == 58).unwrap();
        assert_eq!((v.kernel_name().as_str(), v.shared_mem_for(4096)), ("quant_linmma16_bf16_n1_v58", 65536 + 8192 + 1024));
        let v = TILE_VARIANTS.iter().find(|v| v.k == 59).unwrap();
        assert_eq!((v.kernel_name().as_str(), v.shared_mem_for(4096), v.threads), ("quant_linmma8_bf16_n1_v59", 32768 + 8192 + 1024, 128));
        assert!(fits(59, q, 1, DType::BF16) && !fits(59, q, 2, DType::BF16));
        assert_eq!(TILE_VARIANTS[0].kernel_name(), "quant_lintile4_bf16_n1_v24");
    }

    #[test]
    fn default_variants_apply_where_they_fit_unless_told_otherwise() {
        let q = QuantArgs { bits: 4, rows: 4096, n: 4096, group: 128, clip: 1.0 };
        let (one, two) = (LinearArgs { q, tokens: 1 }, LinearArgs { q, tokens: 2 });
        let pick = |tune: &str, defaults: &[usize], l: &LinearArgs, dtype: DType, sm90: bool| {
            let kernel = linear_kernel(&Tune::parse(tune), dtype, &l.q, l.tokens, 256, 512);
            variant_for(&Tune::parse(tune), defaults, kernel, dtype, l, 256, 512, 1024, 2048, sm90).map(|v| v.k)
        };
        assert_eq!(pick("", &[], &one, DType::BF16, true), None); // as today: none
        assert_eq!(pick("", &[48, 43], &one, DType::BF16, true), Some(48));
        assert_eq!(pick("", &[48, 43], &one, DType::BF16, false), Some(43)); // bulk copies need sm_90
        assert_eq!(pick("", &[48, 43, 44], &two, DType::BF16, true), Some(44)); // the 2-token one
        assert_eq!(pick("", &[48, 43], &two, DType::BF16, true), None);
        assert_eq!(pick("", &[48, 43], &one, DType::F16, true), None); // compiled for bf16 only
        assert_eq!(pick("variant=0", &[48, 43], &one, DType::BF16, true), None);
        assert_eq!(pick("variant=47", &[48, 43], &one, DType::BF16, true), Some(47));
        assert_eq!(pick("variant=41", &[48, 43], &one, DType::BF16, true), None); // asked for, does not fit
        let wide = LinearArgs { q: QuantArgs { n: 16896, ..q }, tokens: 1 }; // 132 groups: not for bulk copies
        assert_eq!(pick("", &[48, 43], &wide, DType::BF16, true), Some(43));
        // linear_mma_lp replaces the tiled kernel (1-2 tokens) and the tensor-core one (3-8; 53: past 8)
        let eight = LinearArgs { q, tokens: 8 };
        assert_eq!(pick("variant=51", &[], &one, DType::BF16, true), Some(51));
        assert_eq!(pick("variant=51", &[], &eight, DType::BF16, true), Some(51));
        assert_eq!(pick("variant=53", &[], &LinearArgs { q, tokens: 16 }, DType::BF16, true), Some(53));
        assert_eq!(pick("variant=43", &[], &eight, DType::BF16, true), None); // a tiled one: not in place of mma
        assert_eq!(pick("", &[51, 43], &one, DType::BF16, true), Some(51));
        assert_eq!(pick("", &[51, 43], &LinearArgs { q: QuantArgs { group: 64, ..q }, tokens: 1 }, DType::BF16, true), Some(43));
        assert_eq!(pick("variant=51", &[], &one, DType::F16, true), None);
    }

    #[test]
    fn tune_parses_switches() {
        assert_eq!(Tune::parse(""), Tune::default());
        let t = Tune::parse("variant=24, pdl=1");
        assert_eq!((t.variant, t.pdl, t.blocks_per_sm), (Some(tile_variant(24, 1, 16, 16, 128)), Some(true), None));
        assert_eq!(Tune::parse("variant=21").variant, None); // settled and removed
        assert_eq!(Tune::parse("variant=41").variant, Some(fixed_variant(41, 2, 4096, 128)));
        assert_eq!(Tune::parse("pdl=0").pdl, Some(false));
        assert_eq!(Tune::parse("variant=25,blocks_per_sm=1").variant.map(|v| (v.nt, v.threads)), Some((1, 128)));
        assert_eq!(Tune::parse("blocks_per_sm=1").blocks_per_sm, Some(1));
        assert_eq!(Tune::parse("blocks_per_sm=0").blocks_per_sm, None);
        assert_eq!((Tune::parse("mma=1,pdl=1").mma, Tune::parse("mma=0").mma, Tune::parse("mma=2").mma), (Some(true), Some(false), None));
        assert_eq!(Tune::parse("variant=99,staged=1,lin=async,junk"), Tune::default());
        assert_eq!((Tune::parse("variant=0").plain, Tune::parse("variant=0").variant), (true, None));
    }

    #[test]
    fn vec8_needs_alignment_and_divisibility() {
        assert_eq!(vec8(DType::BF16, 64, &[256, 512]), 1);
        assert_eq!(vec8(DType::BF16, 64, &[256, 520]), 0);
        assert_eq!(vec8(DType::F32, 64, &[256, 0]), 1);
        assert_eq!(vec8(DType::F32, 60, &[256]), 0);
    }

    #[test]
    fn float64_is_a_type_error() {
        assert_eq!(plan_rows("fwd", DType::F64, 1, 8).unwrap_err().kind, crate::error::ErrorKind::Type);
    }

    /// Without a driver (this build machine), CUDA calls are errors, never panics; float64 and the
    /// CPU-only ops are type errors before any launch.
    #[test]
    fn cuda_calls_without_a_gpu_are_errors() {
        use crate::error::ErrorKind;
        use crate::quant::{self, SearchArgs};
        use crate::tensor::Device;
        let dev = Device::Cuda { ordinal: 0, stream: 0 };
        let q = QuantArgs { bits: 4, rows: 4, n: 64, group: 32, clip: 1.0 };
        let l = LinearArgs { q, tokens: 2 };
        let (x, a, c, s, y) = (4096u64, 8192u64, 12288u64, 16384u64, 20480u64);
        // SAFETY: every call below is refused (dtype, op or device) before any of these fake
        // addresses is read or written.
        unsafe {
            let e = quant::quantize(dev, DType::F64, &q, x, a, c, s).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Type, "{e}");
            let e = quant::dequantize_codebooks(dev, DType::F64, &q, c, s, a, y).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Type, "{e}");
            let sa = SearchArgs { q, per_row: true, z_rows: 0, lo: 0.1, grid: 8, refine: 2 };
            assert_eq!(quant::search_exponent(dev, &sa, x, 0, y).unwrap_err().kind, ErrorKind::Type);
            if crate::cuda_status().is_ok() {
                return;
            }
            let errs = [
                quant::quantize(dev, DType::BF16, &q, x, a, c, s),
                quant::dequantize(dev, DType::F32, &q, c, s, a, y),
                quant::dequantize_codebooks(dev, DType::F16, &q, c, s, a, y),
                quant::fake_quantize(dev, DType::F16, &q, x, a, y, s),
                quant::fake_quantize_backward(dev, DType::F32, &q, x, x, s, a, y, a),
                quant::linear(dev, DType::BF16, &l, x, c, s, a, 0, y),
            ];
            for e in errs {
                assert_eq!(e.unwrap_err().kind, ErrorKind::Cuda);
            }
        }
    }

    #[test]
    fn kernels_named_by_plans_are_in_the_image() {
        use crate::cuda::image_has_symbol as has;
        if !has("quant_fwd_f32") {
            return; // no kernels, or a compressed image: nothing to look at
        }
        for name in all_kernel_names() {
            assert!(has(&name), "{name} missing from the CUDA image");
        }
        for v in TILE_VARIANTS {
            let name = v.kernel_name();
            assert!(has(&name), "tuning variant {name} missing from the CUDA image");
        }
    }
}
