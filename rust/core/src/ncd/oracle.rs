//! The test oracle: the stock zlib that libz-sys bundles (built from source, `static` feature), driven
//! exactly as CPython's `zlib.compress(data, level, wbits=-15)` drives it (the call inside
//! `gzip.compress`): raw deflate, memLevel 8, default strategy, all input at once with Z_FINISH, and
//! output space handed over in CPython's growing blocks (32 KiB, 64 KiB, 256 KiB, ...). The output
//! blocks matter only at level 0, whose stored-block sizes follow the free output space.
use crate::error::{Error, Result};
use libz_sys as z;
use std::ffi::{c_int, c_uint, c_void, CStr};

/// gzip header (10 bytes) + trailer (CRC-32 and size, 8 bytes) around the raw deflate stream.
pub const GZIP_OVERHEAD: i64 = 18;

/// CPython's `_BlocksOutputBuffer` block sizes (Include/internal/pycore_blocks_output_buffer.h);
/// the last one repeats.
pub(crate) const CPYTHON_OUT_BLOCKS: [u64; 17] = [
    32 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    8 << 20,
    16 << 20,
    16 << 20,
    32 << 20,
    32 << 20,
    32 << 20,
    32 << 20,
    64 << 20,
    64 << 20,
    128 << 20,
    128 << 20,
    256 << 20,
];

pub(crate) fn check_level(level: i32) -> Result<()> {
    if (0..=9).contains(&level) {
        Ok(())
    } else {
        Err(Error::value(format!("level: expected an integer in 0..=9, got {level}")))
    }
}

/// The version string of the bundled zlib (e.g. "1.3.2").
pub fn zlib_version() -> String {
    // SAFETY: zlibVersion returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(z::zlibVersion()) }.to_string_lossy().into_owned()
}

extern "C" {
    fn malloc(size: usize) -> *mut c_void;
    fn free(p: *mut c_void);
}

unsafe extern "C" fn zalloc(_opaque: z::voidpf, items: z::uInt, size: z::uInt) -> z::voidpf {
    // zlib checks the result for NULL; the product cannot overflow usize on 64-bit targets.
    malloc(items as usize * size as usize)
}

unsafe extern "C" fn zfree(_opaque: z::voidpf, address: z::voidpf) {
    free(address)
}

/// `len(gzip.compress(data, compresslevel=level))` as the bundled stock zlib computes it, under
/// CPython's calling pattern. Exact but slow (allocates and clears ~330 KB of zlib state per call).
pub fn zlib_gzip_size(data: &[u8], level: i32) -> Result<i64> {
    check_level(level)?;
    Ok(GZIP_OVERHEAD + raw_deflate_len(data, level)?)
}

fn raw_deflate_len(data: &[u8], level: i32) -> Result<i64> {
    if data.len() > u32::MAX as usize {
        // CPython would feed such input in UINT_MAX pieces with Z_NO_FLUSH; not needed here.
        return Err(Error::value(format!("data: expected at most {} bytes, got {}", u32::MAX, data.len())));
    }
    // SAFETY: a zeroed z_stream except for the two required allocator callbacks is what deflateInit2_
    // expects (next_in/next_out NULL, opaque NULL). Every pointer handed to zlib below (the input
    // slice, the output scratch buffer) outlives the stream, which is ended before returning; zlib
    // writes at most avail_out bytes to next_out.
    unsafe {
        let mut strm = z::z_stream {
            next_in: std::ptr::null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: std::ptr::null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: std::ptr::null_mut(),
            state: std::ptr::null_mut(),
            zalloc,
            zfree,
            opaque: std::ptr::null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        };
        let rc = z::deflateInit2_(
            &mut strm,
            level as c_int,
            z::Z_DEFLATED,
            -15,
            8,
            z::Z_DEFAULT_STRATEGY,
            z::zlibVersion(),
            std::mem::size_of::<z::z_stream>() as c_int,
        );
        if rc != z::Z_OK {
            return Err(Error::value(format!("zlib deflateInit2 failed with code {rc}")));
        }
        strm.next_in = data.as_ptr() as *mut u8;
        strm.avail_in = data.len() as c_uint;
        // Output is counted, not kept: one scratch block reused, handed over in CPython's sizes.
        let mut scratch: Vec<u8> = Vec::new();
        let mut total: u64 = 0;
        let mut block = 0usize;
        let rc = loop {
            let size = CPYTHON_OUT_BLOCKS[block.min(CPYTHON_OUT_BLOCKS.len() - 1)] as usize;
            block += 1;
            if scratch.len() < size {
                scratch.resize(size, 0);
            }
            strm.next_out = scratch.as_mut_ptr();
            strm.avail_out = size as c_uint;
            // CPython: one deflate(Z_FINISH) per output block, a new block while avail_out == 0.
            let rc = z::deflate(&mut strm, z::Z_FINISH);
            total += (size - strm.avail_out as usize) as u64;
            if strm.avail_out != 0 || (rc != z::Z_OK && rc != z::Z_BUF_ERROR) {
                break rc;
            }
        };
        z::deflateEnd(&mut strm);
        if rc != z::Z_STREAM_END {
            return Err(Error::value(format!("zlib deflate failed with code {rc}")));
        }
        Ok(total as i64)
    }
}
