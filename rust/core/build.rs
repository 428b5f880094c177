//! Build script of lmkern-core: with the `cuda` feature, compiles every `cuda/*.cu` of the repository
//! into ONE fatbin (cubins for sm_80, sm_90 and, when this nvcc knows it, sm_100; plus PTX for
//! compute_90 when nvcc is 13.0.x, whose PTX ISA 9.0 the 13.0 drivers accept) that the crate embeds
//! with `include_bytes!` and loads at run time.
//!
//! nvcc is looked for in this order, first hit wins:
//!   1. `$LMKERN_NVCC` (path to nvcc);
//!   2. `$REPO/.toolchain/nvcc/nvidia/cu13/bin/nvcc` (what `.ci/install-nvcc.sh` installs);
//!   3. `nvcc` on `PATH`;
//!   4. `$CUDA_HOME/bin/nvcc`;
//!   5. the `nvidia.cu13` package of `$PYO3_PYTHON` (else `python3`): `<dir>/bin/nvcc` for the first
//!      dir of `nvidia.cu13.__path__` that has one
//!      (a pip build-isolation environment with `nvidia-cuda-nvcc` in its build requirements).
//!
//! `cuda/check.sh` uses the same order.
//!
//! Without nvcc (or when it fails) the build does not fail: it warns and embeds an empty image, and
//! `lmkern_core::cuda::status()` says why at run time. With `LMKERN_REQUIRE_CUDA=1` it fails instead.
//!
//! The image is also kept in `<target dir>/lmkern-kernels/` under a hash of everything that decides
//! it (nvcc's path, version and arguments, the `NVCC_*` environment, every byte of `cuda/*.cu[h]`):
//! `cargo test --features cuda` (dev profile) and `pip install .` (release) run the very same nvcc
//! command, minutes each, so the second build copies the first one's image.
//!
//! `LMKERN_NVCC_STRICT=1` makes the build CI's compile check of the kernels (`.ci/run` sets it for
//! `cargo test --features cuda`): nvcc must be release 13.0, every warning (device and host) is an
//! error, the kept compute_90 PTX must declare ISA version 9.0 (what the 13.0 drivers JIT), any
//! failure fails the build, and the image is compiled even when the cache has it (then stored, so
//! that the non-strict build after it takes it: the strict flags change no byte of the image and
//! are left out of the cache key). `cuda/check.sh` does the same check one .cu at a time.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build_support/kernel_cache.rs"]
mod kernel_cache;

const IMAGE: &str = "lmkern_kernels.fatbin";
/// The environment nvcc reads besides its arguments (part of the cache key).
const NVCC_ENV: [&str; 3] = ["NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"];

fn main() {
    for var in ["LMKERN_NVCC", "LMKERN_REQUIRE_CUDA", "LMKERN_NVCC_STRICT", "CUDA_HOME", "PYO3_PYTHON"]
        .into_iter()
        .chain(NVCC_ENV)
    {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let repo = manifest_dir.join("..").join("..");
    let repo = repo.canonicalize().unwrap_or(repo);
    let cuda_dir = repo.join("cuda");
    println!("cargo:rerun-if-changed={}", cuda_dir.display());

    let image = out_dir.join(IMAGE);
    let strict = env_is_1("LMKERN_NVCC_STRICT");
    match build(&repo, &cuda_dir, &out_dir, &image, strict) {
        Ok(summary) => {
            println!("cargo:rustc-env=LMKERN_CUDA_BUILD={summary}");
            println!("cargo:rustc-env=LMKERN_CUDA_MISSING=");
        }
        Err(reason) => {
            eprintln!("lmkern: CUDA kernels not built: {reason}");
            let required = if strict { "LMKERN_NVCC_STRICT" } else { "LMKERN_REQUIRE_CUDA" };
            if strict || env_is_1(required) {
                eprintln!("error: {required}=1 but the CUDA kernels could not be built: {reason}");
                std::process::exit(1);
            }
            println!("cargo:warning=lmkern: building without CUDA kernels: {}", one_line(&reason));
            if let Err(e) = fs::write(&image, []) {
                eprintln!("error: cannot write {}: {e}", image.display());
                std::process::exit(1);
            }
            println!("cargo:rustc-env=LMKERN_CUDA_BUILD=");
            println!("cargo:rustc-env=LMKERN_CUDA_MISSING={}", one_line(&reason));
        }
    }
}

fn env_is_1(var: &str) -> bool {
    env::var(var).is_ok_and(|v| v == "1")
}

fn one_line(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 600 {
        s.chars().take(600).collect::<String>() + " ..."
    } else {
        s
    }
}

/// Compile the kernels into `image`; Ok(a one-line summary) or Err(why not). `strict`: CI's compile
/// check (see the top of this file).
fn build(repo: &Path, cuda_dir: &Path, out_dir: &Path, image: &Path, strict: bool) -> Result<String, String> {
    let mut sources: Vec<PathBuf> = fs::read_dir(cuda_dir)
        .map_err(|e| format!("no CUDA sources at {}: {e}", cuda_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|x| x.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let units: Vec<&PathBuf> =
        sources.iter().filter(|p| p.extension().and_then(|x| x.to_str()) == Some("cu")).collect();
    if units.is_empty() {
        return Err(format!("no .cu files in {}", cuda_dir.display()));
    }

    let nvcc = find_nvcc(repo).ok_or_else(|| "nvcc not found at build time".to_string())?;
    let version_text = run(Command::new(&nvcc).arg("--version"))
        .map_err(|e| format!("nvcc at {} does not run: {e}", nvcc.display()))?;
    let (major, minor) = parse_release(&version_text).ok_or_else(|| {
        format!("cannot read the release of nvcc at {} from: {}", nvcc.display(), one_line(&version_text))
    })?;
    let ptx = (major, minor) == (13, 0);
    if strict && !ptx {
        return Err(format!(
            "LMKERN_NVCC_STRICT=1 wants nvcc 13.0, but {} is release {major}.{minor} \
             (install the pinned toolchain with .ci/install-nvcc.sh or set LMKERN_NVCC)",
            nvcc.display()
        ));
    }
    if !ptx {
        println!(
            "cargo:warning=lmkern: nvcc at {} is release {major}.{minor}, not 13.0: embedding cubins only (no PTX), \
             so GPUs other than sm_80/sm_90/sm_100 families will not run the kernels",
            nvcc.display()
        );
    }
    let codes = run(Command::new(&nvcc).arg("--list-gpu-code")).unwrap_or_default();
    let has = |sm: &str| codes.split_whitespace().any(|c| c == sm);

    let mut targets = vec!["arch=compute_80,code=sm_80".to_string()];
    targets.push(if ptx {
        "arch=compute_90,code=[sm_90,compute_90]".to_string()
    } else {
        "arch=compute_90,code=sm_90".to_string()
    });
    if has("sm_100") {
        targets.push("arch=compute_100,code=sm_100".to_string());
    }

    // One translation unit that includes every .cu, so that one fatbin holds every kernel.
    let unity = out_dir.join("lmkern_kernels.cu");
    let mut text = String::from("// Generated by rust/core/build.rs: every cuda/*.cu in one translation unit.\n");
    for u in &units {
        let abs = u.canonicalize().map_err(|e| format!("{}: {e}", u.display()))?;
        text.push_str(&format!("#include \"{}\"\n", abs.display()));
    }
    fs::write(&unity, &text).map_err(|e| format!("cannot write {}: {e}", unity.display()))?;

    let mut args: Vec<String> = vec!["-fatbin".into(), "-O3".into(), "-std=c++17".into()];
    if major >= 12 {
        args.extend(["--threads".into(), "0".into()]);
    }
    for t in &targets {
        args.extend(["-gencode".into(), t.clone()]);
    }
    // The pip layout keeps headers next to bin/; nvcc's profile finds them too, this is belt and braces.
    if let Some(root) = nvcc.parent().and_then(Path::parent) {
        let inc = root.join("include");
        if inc.join("cuda_bf16.h").is_file() {
            args.push(format!("-I{}", inc.display()));
        }
    }
    args.push(format!("-I{}", cuda_dir.display()));

    let nvcc_env: Vec<_> = NVCC_ENV.iter().map(|v| (*v, env::var_os(v))).collect();
    let key = kernel_cache::key(&nvcc, &version_text, &args, &nvcc_env, &text, &sources);
    let cached = cache_dir().map(|dir| dir.join(format!("{key:016x}.fatbin")));
    // Past the key: these arguments change no byte of the image.
    let keep_dir = out_dir.join("nvcc-keep");
    if strict {
        args.extend(["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"].map(String::from));
        // The intermediate files, for the PTX check below; a fresh folder, so a stale PTX cannot pass.
        let _ = fs::remove_dir_all(&keep_dir);
        fs::create_dir_all(&keep_dir).map_err(|e| format!("cannot create {}: {e}", keep_dir.display()))?;
        args.extend(["--keep".into(), "--keep-dir".into(), keep_dir.display().to_string()]);
    }
    if strict || !cached.as_ref().is_some_and(|c| kernel_cache::fetch(c, image)) {
        run(Command::new(&nvcc).args(&args).arg("-o").arg(image).arg(&unity)).map_err(|e| {
            let hint = if e.contains("Unsupported .version") {
                " (nvcc's NVVM/ptxas do not match: a newer nvidia-nvvm emits PTX this ptxas rejects; \
                 install the pinned 13.0 toolchain with .ci/install-nvcc.sh or set LMKERN_NVCC)"
            } else {
                ""
            };
            format!("nvcc at {} failed: {e}{hint}", nvcc.display())
        })?;
        if strict {
            check_ptx_version(&keep_dir.join("lmkern_kernels.compute_90.ptx"))?;
        }
        if let Some(c) = &cached {
            kernel_cache::store(image, c);
        }
    }

    let len = fs::metadata(image).map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return Err(format!("nvcc at {} wrote an empty image", nvcc.display()));
    }
    let targets_text: Vec<&str> = targets.iter().map(|t| t.split("code=").nth(1).unwrap_or(t)).collect();
    Ok(format!("nvcc {major}.{minor} ({}), {len} bytes, {}", nvcc.display(), targets_text.join(" ")))
}

/// The PTX nvcc kept for compute_90 must declare ISA version 9.0: a newer one (a newer nvidia-nvvm
/// beside nvcc 13.0) is PTX the GPU machines' 13.0 driver refuses to JIT.
fn check_ptx_version(ptx: &Path) -> Result<(), String> {
    let text = fs::read_to_string(ptx).map_err(|e| format!("nvcc kept no compute_90 PTX at {}: {e}", ptx.display()))?;
    let version = text.lines().find_map(|l| l.strip_prefix(".version ")).map(str::trim);
    match version {
        Some("9.0") => Ok(()),
        other => Err(format!(
            "{} declares PTX ISA {}, expected 9.0 (mismatched nvidia-nvvm? use .ci/install-nvcc.sh)",
            ptx.display(),
            other.unwrap_or("(none)")
        )),
    }
}

/// `<target dir>/lmkern-kernels`: `$CARGO_TARGET_DIR`, else the workspace's `target/`.
fn cache_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let target = match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env::var_os("CARGO_MANIFEST_DIR")?).join("..").join("..").join("target"),
    };
    Some(target.join("lmkern-kernels"))
}

fn find_nvcc(repo: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("LMKERN_NVCC").filter(|p| !p.is_empty()) {
        // An explicit choice is taken as is: if it is wrong, the build says so rather than
        // silently using another nvcc.
        return Some(PathBuf::from(p));
    }
    let local = repo.join(".toolchain/nvcc/nvidia/cu13/bin/nvcc");
    if local.is_file() {
        return Some(local);
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let c = dir.join("nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|p| !p.is_empty()) {
        let c = PathBuf::from(home).join("bin").join("nvcc");
        if c.is_file() {
            return Some(c);
        }
    }
    let python = env::var_os("PYO3_PYTHON").filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into());
    // nvidia.cu13 is a namespace package: several site-packages may each hold a part of it.
    let script = "import nvidia.cu13 as m; print('\\n'.join(m.__path__))";
    if let Ok(out) = run(Command::new(&python).args(["-c", script])) {
        for dir in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let c = PathBuf::from(dir).join("bin").join("nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    None
}

/// "Cuda compilation tools, release 13.0, V13.0.88" -> (13, 0).
fn parse_release(text: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find("release ")? + "release ".len()..];
    let ver: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut it = ver.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Run a command; Ok(stdout) on success, Err(status and stderr) otherwise.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let mut msg = format!("{}", out.status);
        let err = String::from_utf8_lossy(&out.stderr);
        let so = String::from_utf8_lossy(&out.stdout);
        for part in [err.trim(), so.trim()] {
            if !part.is_empty() {
                msg.push_str(": ");
                msg.push_str(part);
            }
        }
        Err(msg)
    }
}
