//! build.rs's cache of compiled kernel images (build_support/kernel_cache.rs): the key follows every
//! input that decides the image; fetch gives back what store kept; store keeps the newest few.
#[path = "../build_support/kernel_cache.rs"]
mod kernel_cache;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lmkern-kernel-cache-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

struct Inputs {
    nvcc: PathBuf,
    version: String,
    args: Vec<String>,
    env: Vec<(&'static str, Option<OsString>)>,
    unity: String,
    sources: Vec<PathBuf>,
}

impl Inputs {
    fn key(&self) -> u64 {
        kernel_cache::key(&self.nvcc, &self.version, &self.args, &self.env, &self.unity, &self.sources)
    }
}

#[test]
fn key_follows_every_input() {
    let dir = scratch("key");
    let (cu, cuh) = (dir.join("norm.cu"), dir.join("common.cuh"));
    fs::write(&cu, "#include \"common.cuh\"\n__global__ void k() {}\n").unwrap();
    fs::write(&cuh, "#pragma once\n").unwrap();
    let base = || Inputs {
        nvcc: "/opt/nvcc/bin/nvcc".into(),
        version: "Cuda compilation tools, release 13.0, V13.0.88".into(),
        args: vec!["-fatbin".into(), "-gencode".into(), "arch=compute_90,code=sm_90".into()],
        env: vec![("NVCC_APPEND_FLAGS", None)],
        unity: "#include \"norm.cu\"\n".into(),
        sources: vec![cu.clone(), cuh.clone()],
    };
    let k0 = base().key();
    assert_eq!(base().key(), k0, "the same inputs must give the same key");

    let mut changed: Vec<(&str, u64)> = Vec::new();
    changed.push(("nvcc path", Inputs { nvcc: "/usr/local/cuda/bin/nvcc".into(), ..base() }.key()));
    changed.push(("nvcc version", Inputs { version: "Cuda compilation tools, release 13.0, V13.0.96".into(), ..base() }.key()));
    let mut args = base().args;
    args.push("-lineinfo".into());
    changed.push(("an argument", Inputs { args, ..base() }.key()));
    changed.push(("NVCC_APPEND_FLAGS", Inputs { env: vec![("NVCC_APPEND_FLAGS", Some("-G".into()))], ..base() }.key()));
    changed.push(("the unity file", Inputs { unity: "#include \"quant.cu\"\n".into(), ..base() }.key()));
    changed.push(("a source's name", Inputs { sources: vec![cu.clone(), dir.join("other.cuh")], ..base() }.key()));
    fs::write(&cuh, "#pragma once\n#define X 1\n").unwrap();
    changed.push(("a header's bytes", base().key()));
    fs::write(&cuh, "#pragma once\n").unwrap();
    assert_eq!(base().key(), k0, "restoring the header must give the first key back");
    fs::remove_file(&cuh).unwrap();
    changed.push(("a missing source", base().key()));
    for (what, k) in &changed {
        assert_ne!(*k, k0, "changing {what} must change the key");
    }
    fs::remove_dir_all(&dir).unwrap();
}

fn set_age(path: &Path, hours_ago: u64) {
    let t = SystemTime::now() - Duration::from_secs(3600 * hours_ago);
    fs::File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
}

#[test]
fn store_fetch_and_keep_the_newest() {
    let dir = scratch("store");
    let cache = dir.join("cache");
    // Five older images, 10..6 hours old, and a file that is not an image.
    fs::create_dir_all(&cache).unwrap();
    for (i, age) in (6..=10).rev().enumerate() {
        let p = cache.join(format!("old{i}.fatbin"));
        fs::write(&p, format!("old image {i}")).unwrap();
        set_age(&p, age);
    }
    fs::write(cache.join("notes.txt"), "kept").unwrap();

    let image = dir.join("built.fatbin");
    fs::write(&image, b"\x50\xed\x55\xba fresh image").unwrap();
    let cached = cache.join("0123456789abcdef.fatbin");
    kernel_cache::store(&image, &cached);

    let mut left: Vec<String> = fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    // The new image and the three newest old ones (old2..old4: 8, 7, 6 hours); no temporary file.
    assert_eq!(left, ["0123456789abcdef.fatbin", "notes.txt", "old2.fatbin", "old3.fatbin", "old4.fatbin"]);
    assert_eq!(kernel_cache::KEEP, 4);

    let out = dir.join("out.fatbin");
    assert!(kernel_cache::fetch(&cached, &out));
    assert_eq!(fs::read(&out).unwrap(), fs::read(&image).unwrap());
    assert!(!kernel_cache::fetch(&cache.join("ffffffffffffffff.fatbin"), &dir.join("none.fatbin")), "no image: a miss");
    fs::write(cache.join("empty.fatbin"), b"").unwrap();
    assert!(!kernel_cache::fetch(&cache.join("empty.fatbin"), &dir.join("none.fatbin")), "an empty image: a miss");
    assert!(!dir.join("none.fatbin").exists());

    // A folder that cannot be made (a file is in the way): nothing kept, nothing touched, no panic.
    fs::write(dir.join("file"), "x").unwrap();
    kernel_cache::store(&image, &dir.join("file").join("sub").join("k.fatbin"));
    assert_eq!(fs::read(dir.join("file")).unwrap(), b"x");
    fs::remove_dir_all(&dir).unwrap();
}
