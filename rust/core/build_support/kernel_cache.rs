//! The cache of compiled kernel images, used by build.rs (and tested by tests/kernel_cache.rs):
//! `cargo test --features cuda` (dev profile) and `pip install .` (release) run the very same nvcc
//! command, minutes each, so the second build copies the image the first one kept.
use std::collections::hash_map::DefaultHasher;
use std::ffi::OsString;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// Images kept; older ones are deleted (each is about 12 MB).
pub const KEEP: usize = 4;

/// A hash of everything that decides the image: nvcc (path, `--version`), its arguments bar the
/// output path, the environment it reads (`nvcc_env`: name, value), the unity file and the name
/// and bytes of every source (the .cu files and the .cuh headers they include). A source that
/// cannot be read hashes its error: a miss, never a stale hit.
pub fn key(nvcc: &Path, version_text: &str, args: &[String], nvcc_env: &[(&str, Option<OsString>)], unity_text: &str, sources: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    ("lmkern-kernels v1", nvcc, version_text, args, nvcc_env, unity_text).hash(&mut h);
    for s in sources {
        (s, fs::read(s).map_err(|e| e.to_string())).hash(&mut h);
    }
    h.finish()
}

/// Copy the kept image `cached` to `image`; false where there is none (or it is empty, or the copy
/// failed).
pub fn fetch(cached: &Path, image: &Path) -> bool {
    fs::metadata(cached).is_ok_and(|m| m.len() > 0) && fs::copy(cached, image).is_ok()
}

/// Keep a copy of `image` as `cached` (through a temporary name, so that a concurrent build never
/// reads half a file), then delete all but the newest [`KEEP`] images of that folder. Failures
/// only cost a later build a compile.
pub fn store(image: &Path, cached: &Path) {
    let Some(dir) = cached.parent() else { return };
    if fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
    if fs::copy(image, &tmp).is_err() || fs::rename(&tmp, cached).is_err() {
        let _ = fs::remove_file(&tmp);
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("fatbin"))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    images.sort();
    let old = images.len().saturating_sub(KEEP);
    for (_, p) in images.into_iter().take(old) {
        let _ = fs::remove_file(p);
    }
}
