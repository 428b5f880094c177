//! Helpers shared by the kernel tests (tests/norm_cpu.rs, tests/quant_cpu.rs): a seedable value
//! generator and the addresses the core's pointer-based API takes.
#![allow(dead_code)]

/// A small deterministic generator (xorshift) so the tests need no extra crates: values in [-1, 1).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    pub fn vec(&mut self, len: usize) -> Vec<f64> {
        (0..len).map(|_| self.next()).collect()
    }
}

/// The address of an input buffer.
pub fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// Outputs are written through their address: take it from a unique borrow.
pub fn out<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}
