//! Helpers shared by the CPU kernels: slices rebuilt from caller addresses, non-temporal copies
//! for outputs too large to stay in cache, and the AVX2 dispatch.

/// Outputs at least this large (bytes) bypass the cache: a normal store first reads the line it
/// writes (read-for-ownership), a third pass over memory that a streaming store avoids.
pub const STREAM_BYTES: usize = 8 << 20;

/// Whether this CPU runs the AVX2+FMA versions of the kernels. Checked once.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rebuild a slice from a caller-given address.
///
/// # Safety
/// When `len > 0`, `ptr` is non-zero, aligned for `T`, and valid for reads of `len` elements while
/// the slice lives.
pub unsafe fn slice<'a, T>(ptr: u64, len: usize) -> &'a [T] {
    if len == 0 {
        return &[]; // torch may hand a null address for an empty tensor
    }
    std::slice::from_raw_parts(ptr as *const T, len)
}

/// Rows `[r0, r1)` of a row-major buffer of `n`-wide rows.
///
/// # Safety
/// As [`slice`], for the rows asked.
pub unsafe fn rows_of<'a, T>(ptr: u64, n: usize, r0: usize, r1: usize) -> &'a [T] {
    slice((ptr as *const T).wrapping_add(r0 * n) as u64, (r1 - r0) * n)
}

/// # Safety
/// As [`rows_of`], writable, and no other live reference covers these rows.
pub unsafe fn rows_of_mut<'a, T>(ptr: u64, n: usize, r0: usize, r1: usize) -> &'a mut [T] {
    let len = (r1 - r0) * n;
    if len == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut((ptr as *mut T).add(r0 * n), len)
}

/// Copy `src` into `dst` with non-temporal stores where the CPU has them (same length required).
pub fn stream_copy<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let bytes = std::mem::size_of_val(src);
        let (d, s) = (dst.as_mut_ptr() as *mut u8, src.as_ptr() as *const u8);
        // Head up to 16-byte alignment of dst and the tail are copied normally.
        let head = (d.align_offset(16)).min(bytes);
        let body = (bytes - head) / 16;
        // SAFETY: d and s are valid for `bytes` bytes (equal-length slices); the body range
        // [head, head + 16·body) lies inside, and d + head is 16-byte aligned as _mm_stream_si128 needs.
        unsafe {
            std::ptr::copy_nonoverlapping(s, d, head);
            for i in 0..body {
                let off = head + 16 * i;
                let v = _mm_loadu_si128(s.add(off) as *const __m128i);
                _mm_stream_si128(d.add(off) as *mut __m128i, v);
            }
            let done = head + 16 * body;
            std::ptr::copy_nonoverlapping(s.add(done), d.add(done), bytes - done);
            _mm_sfence();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Define `$name` calling the `#[inline(always)]` function `$body` with the same arguments, compiled
/// twice: with AVX2+FMA (used when the CPU has them) and for the baseline target.
macro_rules! multiversion {
    (fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),*) => $body:ident) => {
        fn $name<$t: $bound>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) {
                    $body::<$t>($($arg),*)
                }
                if $crate::cpu::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            $body::<$t>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_copy_copies_every_alignment_and_length() {
        let src: Vec<u16> = (0..300u16).collect();
        for start in 0..9 {
            for len in [0usize, 1, 7, 8, 9, 31, 100, 250] {
                let mut dst = vec![0u16; 300];
                stream_copy(&mut dst[start..start + len], &src[start..start + len]);
                assert_eq!(&dst[start..start + len], &src[start..start + len]);
                assert!(dst[..start].iter().all(|&v| v == 0) && dst[start + len..].iter().all(|&v| v == 0));
            }
        }
    }
}
