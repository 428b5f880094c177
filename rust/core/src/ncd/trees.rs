//! Length-only Huffman coding of one deflate block, following zlib's trees.c step for step
//! (build_tree with its heap and depth tie-break, gen_bitlen with the overflow fix-up, scan_tree,
//! build_bl_tree, _tr_flush_block's stored / fixed / dynamic choice). Only bit counts are produced;
//! codes and output bytes never are (gen_codes, send_tree, compress_block are not needed: zlib's own
//! debug build checks that opt_len / static_len equal the bits those functions send).

pub(crate) const LITERALS: usize = 256;
pub(crate) const END_BLOCK: usize = 256;
pub(crate) const LENGTH_CODES: usize = 29;
pub(crate) const L_CODES: usize = LITERALS + 1 + LENGTH_CODES; // 286
pub(crate) const D_CODES: usize = 30;
const BL_CODES: usize = 19;
const HEAP_SIZE: usize = 2 * L_CODES + 1; // 573
const MAX_BITS: usize = 15;
const MAX_BL_BITS: usize = 7;
const REP_3_6: usize = 16;
const REPZ_3_10: usize = 17;
const REPZ_11_138: usize = 18;

const EXTRA_LBITS: [u8; LENGTH_CODES] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const EXTRA_DBITS: [u8; D_CODES] =
    [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
const EXTRA_BLBITS: [u8; BL_CODES] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7];
const BL_ORDER: [u8; BL_CODES] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

/// match length − 3 (0..=255) → length code (0..=28), as tr_static_init builds it: length 258 uses
/// code 285 (index 28), not 284 + 5 extra bits.
pub(crate) static LENGTH_CODE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut length = 0usize;
    let mut code = 0usize;
    while code < LENGTH_CODES - 1 {
        let mut n = 0;
        while n < (1 << EXTRA_LBITS[code]) {
            t[length] = code as u8;
            length += 1;
            n += 1;
        }
        code += 1;
    }
    t[length - 1] = code as u8;
    t
};

/// distance − 1 → distance code through zlib's 512-entry `_dist_code` (see [`d_code`]).
static DIST_CODE: [u8; 512] = {
    let mut t = [0u8; 512];
    let mut dist = 0usize;
    let mut code = 0usize;
    while code < 16 {
        let mut n = 0;
        while n < (1 << EXTRA_DBITS[code]) {
            t[dist] = code as u8;
            dist += 1;
            n += 1;
        }
        code += 1;
    }
    dist >>= 7;
    while code < D_CODES {
        let mut n = 0;
        while n < (1 << (EXTRA_DBITS[code] - 7)) {
            t[256 + dist] = code as u8;
            dist += 1;
            n += 1;
        }
        code += 1;
    }
    t
};

/// zlib's `d_code(dist)` for dist = distance − 1 (0..32767).
#[inline(always)]
pub(crate) fn d_code(dist: usize) -> usize {
    if dist < 256 {
        DIST_CODE[dist] as usize
    } else {
        DIST_CODE[256 + (dist >> 7)] as usize
    }
}

/// Bit lengths of the fixed literal/length code (static_ltree).
#[inline(always)]
fn static_llen(n: usize) -> u64 {
    match n {
        0..=143 => 8,
        144..=255 => 9,
        256..=279 => 7,
        _ => 8,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Lit,
    Dist,
    Bl,
}

impl Kind {
    fn elems(self) -> usize {
        match self {
            Kind::Lit => L_CODES,
            Kind::Dist => D_CODES,
            Kind::Bl => BL_CODES,
        }
    }
    fn max_length(self) -> u16 {
        if self == Kind::Bl {
            MAX_BL_BITS as u16
        } else {
            MAX_BITS as u16
        }
    }
    #[inline(always)]
    fn extra(self, n: usize) -> u64 {
        match self {
            Kind::Lit if n > LITERALS => EXTRA_LBITS[n - LITERALS - 1] as u64,
            Kind::Lit => 0,
            Kind::Dist => EXTRA_DBITS[n] as u64,
            Kind::Bl => EXTRA_BLBITS[n] as u64,
        }
    }
    /// The static tree's bit length of leaf n (None for the bit-length tree, which has no static code).
    #[inline(always)]
    fn static_len(self, n: usize) -> Option<u64> {
        match self {
            Kind::Lit => Some(static_llen(n)),
            Kind::Dist => Some(5),
            Kind::Bl => None,
        }
    }
}

/// One ct_data array of zlib, split into its fields (freq is never overwritten by codes here).
struct Tree {
    freq: [u32; HEAP_SIZE],
    dad: [u16; HEAP_SIZE],
    len: [u16; HEAP_SIZE],
}

impl Tree {
    fn new() -> Self {
        Tree { freq: [0; HEAP_SIZE], dad: [0; HEAP_SIZE], len: [0; HEAP_SIZE] }
    }
}

/// Scratch for flushing blocks: the three trees, the heap, depths, bl_count, opt_len, static_len.
pub(crate) struct Trees {
    l: Tree,
    d: Tree,
    bl: Tree,
    /// The live heap (indices 1..=heap_len): `(freq << 8 | depth) << 32 | node`, so zlib's
    /// `smaller(n, m)` (freq, then depth ≤ as tie-break) is one compare of the upper halves.
    heap: [u64; HEAP_SIZE],
    /// zlib keeps the removed nodes in the same array above heap_max; kept apart here.
    order: [u16; HEAP_SIZE],
    depth: [u8; HEAP_SIZE],
    bl_count: [u16; MAX_BITS + 1],
    heap_len: usize,
    heap_max: usize,
    opt_len: u64,
    static_len: u64,
}

/// How _tr_flush_block sends a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockType {
    Stored,
    Fixed,
    Dynamic,
}

impl Trees {
    pub(crate) fn new() -> Box<Self> {
        Box::new(Trees {
            l: Tree::new(),
            d: Tree::new(),
            bl: Tree::new(),
            heap: [0; HEAP_SIZE],
            order: [0; HEAP_SIZE],
            depth: [0; HEAP_SIZE],
            bl_count: [0; MAX_BITS + 1],
            heap_len: 0,
            heap_max: 0,
            opt_len: 0,
            static_len: 0,
        })
    }

    /// Bits that _tr_flush_block appends to a stream whose length so far is `bits`, for a block with
    /// these symbol frequencies (lfreq must count END_BLOCK once), `stored_len` input bytes, and
    /// `stored_ok` = whether the block's bytes are still in the window (zlib's `buf != NULL`).
    /// Returns the new total and the block type; `last` adds the final byte alignment.
    pub(crate) fn flush_block(
        &mut self,
        bits: u64,
        lfreq: &[u32; L_CODES],
        dfreq: &[u32; D_CODES],
        stored_len: u64,
        stored_ok: bool,
        last: bool,
    ) -> (u64, BlockType) {
        self.l.freq[..L_CODES].copy_from_slice(lfreq);
        self.d.freq[..D_CODES].copy_from_slice(dfreq);
        self.bl.freq[..BL_CODES].fill(0);
        self.opt_len = 0;
        self.static_len = 0;
        let l_max = self.build_tree(Kind::Lit);
        let d_max = self.build_tree(Kind::Dist);
        self.build_bl_tree(l_max, d_max);

        let mut opt_lenb = self.opt_len.wrapping_add(3 + 7) >> 3;
        let static_lenb = self.static_len.wrapping_add(3 + 7) >> 3;
        if static_lenb <= opt_lenb {
            opt_lenb = static_lenb;
        }
        let (mut bits, kind) = if stored_len + 4 <= opt_lenb && stored_ok {
            // 3 header bits, byte alignment, LEN and NLEN, the bytes.
            (align8(bits + 3) + 32 + 8 * stored_len, BlockType::Stored)
        } else if static_lenb == opt_lenb {
            (bits + 3 + self.static_len, BlockType::Fixed)
        } else {
            (bits + 3 + self.opt_len, BlockType::Dynamic)
        };
        if last {
            bits = align8(bits);
        }
        (bits, kind)
    }

    #[inline(always)]
    fn entry(freq: u32, depth: u8, node: usize) -> u64 {
        (((freq as u64) << 8 | depth as u64) << 32) | node as u64
    }

    /// zlib's pqdownheap on packed entries: with equal keys the right son is taken and v stays
    /// above, exactly as `smaller` (≤ on depth) decides.
    #[inline(always)]
    fn pqdownheap(heap: &mut [u64; HEAP_SIZE], heap_len: usize, mut k: usize) {
        let v = heap[k];
        let vk = v >> 32;
        let mut j = k << 1;
        while j <= heap_len {
            let mut hj = heap[j];
            if j < heap_len {
                // Branch-free choice of the smaller son (the right one on equal keys).
                let hj1 = heap[j + 1];
                let right = hj1 >> 32 <= hj >> 32;
                j += right as usize;
                hj = if right { hj1 } else { hj };
            }
            if vk <= hj >> 32 {
                break;
            }
            heap[k] = hj;
            k = j;
            j <<= 1;
        }
        heap[k] = v;
    }

    /// zlib's build_tree (without gen_codes); returns max_code.
    fn build_tree(&mut self, kind: Kind) -> usize {
        let elems = kind.elems();
        let mut max_code: isize = -1;
        let mut heap_len = 0usize;
        let mut heap_max = HEAP_SIZE;
        {
            let t = match kind {
                Kind::Lit => &mut self.l,
                Kind::Dist => &mut self.d,
                Kind::Bl => &mut self.bl,
            };
            for n in 0..elems {
                let f = t.freq[n];
                if f != 0 {
                    heap_len += 1;
                    self.heap[heap_len] = Self::entry(f, 0, n);
                    max_code = n as isize;
                    self.depth[n] = 0;
                } else {
                    t.len[n] = 0;
                }
            }
            // At least two codes of non-zero frequency (pkzip requirement).
            while heap_len < 2 {
                let node = if max_code < 2 {
                    max_code += 1;
                    max_code as usize
                } else {
                    0
                };
                heap_len += 1;
                self.heap[heap_len] = Self::entry(1, 0, node);
                t.freq[node] = 1;
                self.depth[node] = 0;
                self.opt_len = self.opt_len.wrapping_sub(1);
                if let Some(sl) = kind.static_len(node) {
                    self.static_len = self.static_len.wrapping_sub(sl);
                }
            }
            for n in (1..=heap_len / 2).rev() {
                Self::pqdownheap(&mut self.heap, heap_len, n);
            }
            let mut node = elems;
            loop {
                // pqremove
                let en = self.heap[1];
                self.heap[1] = self.heap[heap_len];
                heap_len -= 1;
                Self::pqdownheap(&mut self.heap, heap_len, 1);
                let em = self.heap[1];
                let (n, m) = ((en & 0xffff) as usize, (em & 0xffff) as usize);
                heap_max -= 1;
                self.order[heap_max] = n as u16;
                heap_max -= 1;
                self.order[heap_max] = m as u16;
                let dn = self.depth[n];
                let dm = self.depth[m];
                let d = (if dn >= dm { dn } else { dm }).wrapping_add(1);
                self.depth[node] = d;
                let f = ((en >> 40) + (em >> 40)) as u32;
                t.dad[n] = node as u16;
                t.dad[m] = node as u16;
                self.heap[1] = Self::entry(f, d, node);
                node += 1;
                Self::pqdownheap(&mut self.heap, heap_len, 1);
                if heap_len < 2 {
                    break;
                }
            }
            heap_max -= 1;
            self.order[heap_max] = (self.heap[1] & 0xffff) as u16;
        }
        self.heap_len = heap_len;
        self.heap_max = heap_max;
        let max_code = max_code as usize;
        self.gen_bitlen(kind, max_code);
        max_code
    }

    /// zlib's gen_bitlen: optimal lengths, capped at max_length with the overflow fix-up; adds the
    /// block's bits to opt_len (and static_len for trees with a static code).
    fn gen_bitlen(&mut self, kind: Kind, max_code: usize) {
        let max_length = kind.max_length();
        self.bl_count = [0; MAX_BITS + 1];
        let heap_max = self.heap_max;
        let mut overflow: i32 = 0;
        let mut opt_len = self.opt_len;
        let mut static_len = self.static_len;
        {
            let heap = &self.order;
            let bl_count = &mut self.bl_count;
            let t = match kind {
                Kind::Lit => &mut self.l,
                Kind::Dist => &mut self.d,
                Kind::Bl => &mut self.bl,
            };
            t.len[heap[heap_max] as usize] = 0; // root
            for &hn in &heap[heap_max + 1..HEAP_SIZE] {
                let n = hn as usize;
                let mut bits = t.len[t.dad[n] as usize] + 1;
                if bits > max_length {
                    bits = max_length;
                    overflow += 1;
                }
                t.len[n] = bits;
                if n > max_code {
                    continue; // not a leaf
                }
                bl_count[bits as usize] += 1;
                let xbits = kind.extra(n);
                let f = t.freq[n] as u64;
                opt_len = opt_len.wrapping_add(f * (bits as u64 + xbits));
                if let Some(sl) = kind.static_len(n) {
                    static_len = static_len.wrapping_add(f * (sl + xbits));
                }
            }
        }
        self.static_len = static_len;
        if overflow == 0 {
            self.opt_len = opt_len;
            return;
        }
        let ml = max_length as usize;
        loop {
            let mut bits = ml - 1;
            while self.bl_count[bits] == 0 {
                bits -= 1;
            }
            self.bl_count[bits] -= 1;
            self.bl_count[bits + 1] += 2;
            self.bl_count[ml] -= 1;
            overflow -= 2;
            if overflow <= 0 {
                break;
            }
        }
        let mut h = HEAP_SIZE;
        let heap = &self.order;
        let t = match kind {
            Kind::Lit => &mut self.l,
            Kind::Dist => &mut self.d,
            Kind::Bl => &mut self.bl,
        };
        for bits in (1..=ml).rev() {
            let mut n = self.bl_count[bits];
            while n != 0 {
                h -= 1;
                let m = heap[h] as usize;
                if m > max_code {
                    continue;
                }
                if t.len[m] as usize != bits {
                    let delta = (bits as u64).wrapping_sub(t.len[m] as u64);
                    opt_len = opt_len.wrapping_add(delta.wrapping_mul(t.freq[m] as u64));
                    t.len[m] = bits as u16;
                }
                n -= 1;
            }
        }
        self.opt_len = opt_len;
    }

    /// zlib's scan_tree: bit-length-code frequencies for sending `len[0..=max_code]`.
    fn scan_tree(len: &[u16; HEAP_SIZE], max_code: usize, bl_freq: &mut [u32; HEAP_SIZE]) {
        let mut prevlen: i32 = -1;
        let mut nextlen = len[0] as i32;
        let mut count = 0u32;
        let (mut max_count, mut min_count) = if nextlen == 0 { (138, 3) } else { (7, 4) };
        for n in 0..=max_code {
            let curlen = nextlen;
            // zlib writes a 0xffff guard at max_code + 1 before scanning.
            nextlen = if n + 1 == max_code + 1 { 0xffff } else { len[n + 1] as i32 };
            count += 1;
            if count < max_count && curlen == nextlen {
                continue;
            } else if count < min_count {
                bl_freq[curlen as usize] += count;
            } else if curlen != 0 {
                if curlen != prevlen {
                    bl_freq[curlen as usize] += 1;
                }
                bl_freq[REP_3_6] += 1;
            } else if count <= 10 {
                bl_freq[REPZ_3_10] += 1;
            } else {
                bl_freq[REPZ_11_138] += 1;
            }
            count = 0;
            prevlen = curlen;
            if nextlen == 0 {
                max_count = 138;
                min_count = 3;
            } else if curlen == nextlen {
                max_count = 6;
                min_count = 3;
            } else {
                max_count = 7;
                min_count = 4;
            }
        }
    }

    /// zlib's build_bl_tree: the tree for the code lengths, and its header bits, into opt_len.
    fn build_bl_tree(&mut self, l_max: usize, d_max: usize) {
        Self::scan_tree(&self.l.len, l_max, &mut self.bl.freq);
        Self::scan_tree(&self.d.len, d_max, &mut self.bl.freq);
        self.build_tree(Kind::Bl);
        let mut max_blindex = BL_CODES - 1;
        while max_blindex >= 3 {
            if self.bl.len[BL_ORDER[max_blindex] as usize] != 0 {
                break;
            }
            max_blindex -= 1;
        }
        self.opt_len = self.opt_len.wrapping_add(3 * (max_blindex as u64 + 1) + 5 + 5 + 4);
    }
}

#[inline(always)]
pub(crate) fn align8(bits: u64) -> u64 {
    (bits + 7) & !7
}
