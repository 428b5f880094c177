//! CUDA runtime for lmkern: driver loading, the primary context torch uses, the embedded kernel
//! image, and a launch helper on a caller-given raw stream.
//!
//! - The kernels of `cuda/*.cu` are compiled by `build.rs` into one fatbin embedded here; a build
//!   without nvcc embeds an empty image, and [`status`] says so.
//! - The driver library is loaded dynamically by cudarc. cudarc panics when `libcuda` is missing, so
//!   its presence is checked first ([`cudarc::driver::sys::is_culib_present`]), and every call into
//!   cudarc runs under `catch_unwind` as a second fence: callers get an [`Error`], never a panic.
//! - Per device ordinal, cached for the life of the process: the primary context
//!   (`CudaContext::new`, the context torch's runtime uses), the module loaded from the image in it,
//!   and the kernel functions looked up by name.
//! - [`launch`] never creates streams and never owns memory: it launches on the raw `CUstream` the
//!   caller passes (torch's current stream) with device pointers passed as plain `u64` arguments.
//!   It makes the device's primary context current for the launch and restores the thread's
//!   previous context afterwards, so the caller's notion of the current device is left alone.
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext};

use crate::error::{Error, Result};

#[repr(C, align(64))]
struct Aligned<B: ?Sized>(B);

/// The fatbin built from `cuda/*.cu` (empty when nvcc was not available at build time).
static IMAGE: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/lmkern_kernels.fatbin")));

/// What build.rs compiled (nvcc version and path, image size, targets); empty when nothing was.
const BUILD_INFO: &str = env!("LMKERN_CUDA_BUILD");
/// Why the image is empty; empty when it is not.
const MISSING: &str = env!("LMKERN_CUDA_MISSING");

/// Largest dynamic shared memory a launch may ask for without opting in per function.
pub const MAX_DEFAULT_SHARED_MEM: u32 = 48 * 1024;
/// Largest dynamic shared memory a launch may ask for at all: the most a block of any supported GPU
/// may opt in to (227 KB on sm_90; a device with less refuses the opt-in, an error naming the kernel).
pub const MAX_OPT_IN_SHARED_MEM: u32 = 227 * 1024;

/// Whether build.rs compiled the kernels into this build.
pub fn kernels_built() -> bool {
    !IMAGE.0.is_empty()
}

/// Whether the embedded fatbin names `symbol`: the uncompressed cubins hold each kernel's name as a
/// NUL-terminated ELF symbol string (false without kernels, and for every name in a compressed image).
#[cfg(test)]
pub(crate) fn image_has_symbol(symbol: &str) -> bool {
    let mut needle = symbol.as_bytes().to_vec();
    needle.push(0);
    IMAGE.0.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// One line about the embedded kernels: nvcc version, image size and targets, or why there are none.
pub fn build_info() -> String {
    if kernels_built() {
        BUILD_INFO.to_string()
    } else {
        format!("no CUDA kernels: {}", missing_reason())
    }
}

fn missing_reason() -> &'static str {
    if MISSING.is_empty() {
        "nvcc not found at build time"
    } else {
        MISSING
    }
}

/// Run `f`, turning a panic inside cudarc into an error naming `what`.
fn fenced<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Error::cuda(format!("{what}: the CUDA driver bindings failed: {msg}")))
        }
    }
}

/// Whether the driver library (libcuda) can be loaded; checked once.
fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen the library names and drops the handles.
    *PRESENT.get_or_init(|| catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false))
}

fn no_driver_message() -> String {
    "CUDA driver library (libcuda.so) not found: no NVIDIA driver is installed or it is not on the loader path"
        .to_string()
}

/// `Ok(())` when CUDA kernels can run here: the kernels were compiled in, the driver library loads,
/// and at least one device is visible. Otherwise a human-readable reason.
pub fn status() -> std::result::Result<(), String> {
    if !kernels_built() {
        return Err(format!("lmkern was built without CUDA kernels ({})", missing_reason()));
    }
    if !driver_present() {
        return Err(no_driver_message());
    }
    let count = fenced("cuDeviceGetCount", || {
        result::init().map_err(|e| Error::cuda(format!("the CUDA driver failed to initialize: {e}")))?;
        result::device::get_count().map_err(|e| Error::cuda(format!("cannot count CUDA devices: {e}")))
    })
    .map_err(|e| e.message)?;
    if count < 1 {
        return Err("no CUDA device is visible (check CUDA_VISIBLE_DEVICES)".to_string());
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Module(sys::CUmodule);
// SAFETY: a CUmodule handle may be used from any thread while its context is alive; ours live
// (cached, never unloaded) for the life of the process.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

#[derive(Clone, Copy)]
struct Function(sys::CUfunction);
// SAFETY: as for Module.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// A device with lmkern's kernels loaded in its primary context.
struct Device {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    module: Module,
    functions: Mutex<HashMap<String, Function>>,
    /// The dynamic shared memory each kernel has been let take above [`MAX_DEFAULT_SHARED_MEM`].
    shared_opt_in: Mutex<HashMap<String, u32>>,
}

/// Makes a context current on this thread and puts the previous one back on drop.
struct CurrentContext {
    previous: Option<sys::CUcontext>,
}

impl CurrentContext {
    fn bind(ctx: sys::CUcontext, what: &str) -> Result<Self> {
        let current = result::ctx::get_current()
            .map_err(|e| Error::cuda(format!("{what}: cannot read the current CUDA context: {e}")))?;
        if current == Some(ctx) {
            return Ok(CurrentContext { previous: None });
        }
        // SAFETY: ctx is a retained primary context, alive for the life of the process.
        unsafe { result::ctx::set_current(ctx) }
            .map_err(|e| Error::cuda(format!("{what}: cannot make the device's context current: {e}")))?;
        Ok(CurrentContext { previous: Some(current.unwrap_or(std::ptr::null_mut())) })
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        if let Some(prev) = self.previous {
            // SAFETY: prev was current on this thread a moment ago (or null: no context), which
            // the caller still owns. A failure here leaves our context current, which is harmless.
            let _ = catch_unwind(|| unsafe { result::ctx::set_current(prev) });
        }
    }
}

static DEVICES: Mutex<Vec<Option<Arc<Device>>>> = Mutex::new(Vec::new());

/// The device `ordinal`, initialized on first use: primary context retained, module loaded.
fn device(ordinal: usize) -> Result<Arc<Device>> {
    if !kernels_built() {
        return Err(Error::cuda(format!("lmkern was built without CUDA kernels ({})", missing_reason())));
    }
    if !driver_present() {
        return Err(Error::cuda(no_driver_message()));
    }
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(Some(d)) = devices.get(ordinal) {
        return Ok(d.clone());
    }
    let ctx = fenced("cuDevicePrimaryCtxRetain", || {
        let previous = result::ctx::get_current().ok().flatten();
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::cuda(format!("CUDA device {ordinal}: cannot retain its primary context: {e}")));
        // CudaContext::new made its context current; give the thread its previous one back.
        if let Some(prev) = previous {
            // SAFETY: prev was current on this thread just before.
            let _ = unsafe { result::ctx::set_current(prev) };
        }
        ctx
    })?;
    let module = fenced("cuModuleLoadData", || {
        let _bound = CurrentContext::bind(ctx.cu_ctx(), "cuModuleLoadData")?;
        // SAFETY: IMAGE is a complete fatbin produced by nvcc, 64-byte aligned, 'static.
        unsafe { result::module::load_data(IMAGE.0.as_ptr() as *const c_void) }.map_err(|e| {
            Error::cuda(format!(
                "CUDA device {ordinal}: cannot load lmkern's kernels ({BUILD_INFO}) into its context: {e}; \
                 a GPU older than sm_80, or a driver older than CUDA 13.0, cannot run them"
            ))
        })
    })?;
    let functions = Mutex::new(eager_functions(ctx.cu_ctx(), module));
    let d = Arc::new(Device { ordinal, ctx, module: Module(module), functions, shared_opt_in: Mutex::new(HashMap::new()) });
    if devices.len() <= ordinal {
        devices.resize(ordinal + 1, None);
    }
    devices[ordinal] = Some(d.clone());
    Ok(d)
}

/// Every kernel of the module, loaded now rather than at its first launch (with CUDA's lazy
/// loading a first launch would load it, which is best kept out of CUDA-graph captures). Best
/// effort: on any failure (an old driver without these calls) the map is left to fill lazily.
fn eager_functions(ctx: sys::CUcontext, module: sys::CUmodule) -> HashMap<String, Function> {
    let found = fenced("cuModuleEnumerateFunctions", || {
        let _bound = CurrentContext::bind(ctx, "cuModuleEnumerateFunctions")?;
        let fail = |e: sys::CUresult| Error::cuda(format!("{e:?}"));
        let mut count: std::ffi::c_uint = 0;
        // SAFETY: module is loaded; the out-pointers are valid for the counts given.
        unsafe { sys::cuModuleGetFunctionCount(&mut count, module) }.result().map_err(|e| fail(e.0))?;
        let mut funcs: Vec<sys::CUfunction> = vec![std::ptr::null_mut(); count as usize];
        unsafe { sys::cuModuleEnumerateFunctions(funcs.as_mut_ptr(), count, module) }
            .result()
            .map_err(|e| fail(e.0))?;
        let mut map = HashMap::new();
        for f in funcs {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            unsafe { sys::cuFuncGetName(&mut name, f) }.result().map_err(|e| fail(e.0))?;
            unsafe { sys::cuFuncLoad(f) }.result().map_err(|e| fail(e.0))?;
            if !name.is_null() {
                // SAFETY: the driver returns a NUL-terminated name owned by the module.
                let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned();
                map.insert(name, Function(f));
            }
        }
        Ok(map)
    });
    found.unwrap_or_default()
}

impl Device {
    fn function(&self, name: &str) -> Result<Function> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(name) {
            return Ok(*f);
        }
        let cname = CString::new(name).map_err(|_| Error::cuda(format!("{name:?}: not a kernel name")))?;
        // SAFETY: the module is loaded and never unloaded.
        let f = unsafe { result::module::get_function(self.module.0, cname) }.map_err(|e| {
            Error::cuda(format!(
                "{name}: kernel not found in lmkern's CUDA image on device {} ({BUILD_INFO}): {e}",
                self.ordinal
            ))
        })?;
        functions.insert(name.to_string(), Function(f));
        Ok(Function(f))
    }

    /// Lets kernel `name` (`f`) take `bytes` of dynamic shared memory where that is above the
    /// [`MAX_DEFAULT_SHARED_MEM`] every kernel may take: its
    /// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, set once to each larger size asked. The
    /// driver refuses more than the device's opt-in limit less the kernel's static shared memory:
    /// an error naming the kernel. The device's context must be current.
    fn allow_shared(&self, name: &str, f: Function, bytes: u32) -> Result<()> {
        if bytes <= MAX_DEFAULT_SHARED_MEM {
            return Ok(());
        }
        let mut allowed = self.shared_opt_in.lock().unwrap_or_else(|e| e.into_inner());
        if allowed.get(name).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        // SAFETY: f is a kernel of this device's loaded module (never unloaded); the caller made
        // the device's context current; bytes ≤ MAX_OPT_IN_SHARED_MEM fits a c_int.
        unsafe { sys::cuFuncSetAttribute(f.0, attr, bytes as std::ffi::c_int) }.result().map_err(|e| {
            Error::cuda(format!(
                "{name}: CUDA device {} refuses {bytes} bytes of dynamic shared memory for it: {e:?}",
                self.ordinal
            ))
        })?;
        allowed.insert(name.to_string(), bytes);
        Ok(())
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem: u32,
}

/// Launch kernel `name` of lmkern's image on device `ordinal`, on the raw stream `stream` (a
/// `CUstream` of that device's primary context; 0 is the legacy default stream).
///
/// # Safety
/// `params` holds one pointer per kernel parameter, each to a value of exactly that parameter's
/// type and size; every device address inside is valid on `ordinal` for what the kernel accesses
/// under `cfg`; `stream` is a live stream of the device's primary context.
pub unsafe fn launch(
    ordinal: usize,
    stream: u64,
    name: &str,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<()> {
    check_config(name, &cfg)?;
    let (g, b) = (cfg.grid, cfg.block);
    let dev = device(ordinal)?;
    fenced(name, || {
        let _bound = CurrentContext::bind(dev.ctx.cu_ctx(), name)?;
        let f = dev.function(name)?;
        dev.allow_shared(name, f, cfg.shared_mem)?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { result::launch_kernel(f.0, g, b, cfg.shared_mem, stream as usize as sys::CUstream, params) }.map_err(
            |e| {
                Error::cuda(format!(
                    "{name}: launch on CUDA device {ordinal} failed (grid {g:?}, block {b:?}, {} bytes shared): {e}",
                    cfg.shared_mem
                ))
            },
        )
    })
}

/// A launch configuration the driver would refuse, as an error naming the kernel (before the driver).
fn check_config(name: &str, cfg: &LaunchConfig) -> Result<()> {
    let (g, b) = (cfg.grid, cfg.block);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || b.0 == 0 || b.1 == 0 || b.2 == 0 || b.0 * b.1 * b.2 > 1024 {
        return Err(Error::cuda(format!("{name}: invalid launch configuration grid {g:?} block {b:?}")));
    }
    if cfg.shared_mem > MAX_OPT_IN_SHARED_MEM {
        return Err(Error::cuda(format!(
            "{name}: {} bytes of shared memory asked, at most {MAX_OPT_IN_SHARED_MEM}",
            cfg.shared_mem
        )));
    }
    Ok(())
}

/// As [`launch_struct`], with programmatic dependent launch (PDL) allowed: the kernel may start
/// while the previous kernel in the stream is still running, so it must call griddep_wait
/// (cuda/common.cuh) before it touches memory that kernel may use, and only prefetch into L2 before
/// that. Needs compute capability 9.0 ([`supports_pdl`]).
///
/// # Safety
/// As [`launch_struct`]; and the kernel keeps the rule above.
pub(crate) unsafe fn launch_struct_pdl<P>(ordinal: usize, stream: u64, name: &str, cfg: LaunchConfig, params: &mut P) -> Result<()> {
    check_config(name, &cfg)?;
    let (g, b) = (cfg.grid, cfg.block);
    let dev = device(ordinal)?;
    let mut args: [*mut c_void; 1] = [params as *mut P as *mut c_void];
    fenced(name, || {
        let _bound = CurrentContext::bind(dev.ctx.cu_ctx(), name)?;
        let f = dev.function(name)?;
        dev.allow_shared(name, f, cfg.shared_mem)?;
        // SAFETY: an all-zero CUlaunchAttribute is valid C data (id 0, value bytes 0); the id and
        // the union member for it are set next.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: g.0,
            gridDimY: g.1,
            gridDimZ: g.2,
            blockDimX: b.0,
            blockDimY: b.1,
            blockDimZ: b.2,
            sharedMemBytes: cfg.shared_mem,
            hStream: stream as usize as sys::CUstream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: `config` and `attr` outlive the call (the driver copies them); f is a kernel of
        // the loaded module; `args` holds one pointer to the kernel's single parameter struct, as
        // the caller promises it matches; the rest is the caller's contract.
        unsafe { sys::cuLaunchKernelEx(&config, f.0, args.as_mut_ptr(), std::ptr::null_mut()) }.result().map_err(|e| {
            Error::cuda(format!("{name}: launch (PDL) on CUDA device {ordinal} failed (grid {g:?}, block {b:?}): {e}"))
        })
    })
}

/// Whether device `ordinal` takes programmatic dependent launches (compute capability 9.0 or
/// later).
pub(crate) fn supports_pdl(ordinal: usize) -> Result<bool> {
    let major = device_attribute(ordinal, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "compute capability")?;
    Ok(major >= 9)
}

/// The number of multiprocessors of device `ordinal`.
pub(crate) fn sm_count(ordinal: usize) -> Result<usize> {
    let n = device_attribute(ordinal, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "multiprocessor count")?;
    Ok(n.max(1) as usize)
}

/// A device attribute (`what` names it in the error), cached per device and attribute: they do not
/// change while the process runs.
fn device_attribute(ordinal: usize, attr: sys::CUdevice_attribute, what: &str) -> Result<i32> {
    static CACHE: Mutex<Vec<(usize, u32, i32)>> = Mutex::new(Vec::new());
    let key = (ordinal, attr as u32);
    if let Some(&(_, _, v)) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(o, a, _)| (*o, *a) == key) {
        return Ok(v);
    }
    let v = device(ordinal)?
        .ctx
        .attribute(attr)
        .map_err(|e| Error::cuda(format!("CUDA device {ordinal}: cannot read its {what}: {e}")))?;
    CACHE.lock().unwrap_or_else(|e| e.into_inner()).push((key.0, key.1, v));
    Ok(v)
}

/// The kernel-name suffix of an element type (`<kernel>_f32`, `_bf16`, `_f16`); float64 has no
/// CUDA kernels (a type error, before any launch).
pub(crate) fn type_suffix(dtype: crate::tensor::DType) -> Result<&'static str> {
    use crate::tensor::DType;
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F64 => {
            Err(Error::dtype("x: float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA"))
        }
    }
}

/// A grid size for `blocks` blocks: at least 1 (empty launches are skipped before), at most the
/// 2^31 − 1 of grid.x (the kernels grid-stride over the rest).
pub(crate) fn clamp_grid(blocks: usize) -> u32 {
    blocks.clamp(1, i32::MAX as usize) as u32
}

/// [`launch`] of a kernel whose one parameter is the struct `params` (lmkern's kernels take their
/// arguments as one `__grid_constant__` struct).
///
/// # Safety
/// As [`launch`]: `P` is, field for field, the kernel's parameter struct.
pub(crate) unsafe fn launch_struct<P>(ordinal: usize, stream: u64, name: &str, cfg: LaunchConfig, params: &mut P) -> Result<()> {
    let mut args: [*mut c_void; 1] = [params as *mut P as *mut c_void];
    // SAFETY: forwarded from the caller's contract.
    unsafe { launch(ordinal, stream, name, cfg, &mut args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_an_error_or_ok_never_a_panic() {
        let s = status();
        if !kernels_built() {
            let msg = s.clone().unwrap_err();
            assert!(msg.starts_with("lmkern was built without CUDA kernels ("), "{msg}");
        }
        if !driver_present() {
            assert!(s.is_err());
        }
        // Calling twice gives the same answer (cached driver probe).
        assert_eq!(s.is_ok(), status().is_ok());
    }

    #[test]
    fn launch_without_driver_is_an_error() {
        if status().is_ok() {
            return; // a GPU machine: covered by the Python GPU tests
        }
        let cfg = LaunchConfig { grid: (1, 1, 1), block: (32, 1, 1), shared_mem: 0 };
        let r = unsafe { launch(0, 0, "norm_dw_reduce_f32", cfg, &mut []) };
        let e = r.unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Cuda);
    }

    #[test]
    fn bad_launch_configs_are_rejected_before_the_driver() {
        let cfg = LaunchConfig { grid: (0, 1, 1), block: (32, 1, 1), shared_mem: 0 };
        assert!(unsafe { launch(0, 0, "k", cfg, &mut []) }.is_err());
        let cfg = LaunchConfig { grid: (1, 1, 1), block: (64, 32, 1), shared_mem: 0 };
        assert!(unsafe { launch(0, 0, "k", cfg, &mut []) }.is_err());
        // More shared memory than any GPU lets a block opt in to: refused, naming the kernel.
        let cfg = LaunchConfig { grid: (1, 1, 1), block: (32, 1, 1), shared_mem: MAX_OPT_IN_SHARED_MEM + 1 };
        let e = check_config("k", &cfg).unwrap_err();
        assert!(e.to_string().contains("k: 232449 bytes of shared memory asked, at most 232448"), "{e}");
        let cfg = LaunchConfig { shared_mem: MAX_OPT_IN_SHARED_MEM, ..cfg };
        assert!(check_config("k", &cfg).is_ok());
    }

    #[test]
    fn image_is_aligned() {
        assert_eq!(IMAGE.0.as_ptr() as usize % 64, 0);
    }
}
