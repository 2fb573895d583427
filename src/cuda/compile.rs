//! NVRTC → CUBIN, cached on disk.
//!
//! CUBIN, not PTX: the driver's PTX JIT costs ≈ 80 ms per module at every start. The cache
//! key hashes the source, the options, the target architecture and the NVRTC version, so a
//! new toolkit or an edited kernel recompiles and nothing stale is ever loaded.

use std::ffi::{CStr, CString, c_char};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use cudarc::nvrtc::sys;

use crate::error::{Error, Result};

fn cache_dir() -> PathBuf {
    crate::cache::cache_dir().join("kernels")
}

fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    // SAFETY: out-parameters.
    unsafe { sys::nvrtcVersion(&mut a, &mut b) };
    (a, b)
}

/// Compiles `src` for `sm_{major}{minor}`, or loads the cached CUBIN.
pub fn cubin(src: &str, major: i32, minor: i32) -> Result<Vec<u8>> {
    let opts =
        vec![format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++17".to_string(), "-default-device".into()];
    let mut h = std::hash::DefaultHasher::new();
    (src, &opts, nvrtc_version()).hash(&mut h);
    let path = cache_dir().join(format!("{:016x}.cubin", h.finish()));
    if let Ok(bin) = std::fs::read(&path) {
        return Ok(bin);
    }
    let bin = compile(src, &opts)?;
    // Best effort: a read-only cache folder only costs a recompile next time.
    // Written through a random temporary name, never through a link (crate::output).
    if std::fs::create_dir_all(path.parent().expect("has parent")).is_ok() {
        let _ = crate::output::write_new("kernel cache", &path, &bin, true);
    }
    Ok(bin)
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS { Ok(()) } else { Err(Error::Cuda(format!("NVRTC {what}: {r:?}"))) }
}

fn compile(src: &str, opts: &[String]) -> Result<Vec<u8>> {
    let csrc = CString::new(src).map_err(|_| Error::Cuda("kernel source contains NUL".into()))?;
    let name = CString::new("zmoe.cu").expect("static");
    let copts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).expect("no NUL")).collect();
    let popts: Vec<*const c_char> = copts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: standard NVRTC call sequence; every pointer outlives the calls.
    unsafe {
        check(
            sys::nvrtcCreateProgram(&mut prog, csrc.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()),
            "create",
        )?;
        let r = sys::nvrtcCompileProgram(prog, popts.len() as i32, popts.as_ptr());
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            let mut n = 0usize;
            sys::nvrtcGetProgramLogSize(prog, &mut n);
            let mut log = vec![0 as c_char; n.max(1)];
            sys::nvrtcGetProgramLog(prog, log.as_mut_ptr());
            let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
            sys::nvrtcDestroyProgram(&mut prog);
            return Err(Error::Compile { log });
        }
        let mut n = 0usize;
        check(sys::nvrtcGetCUBINSize(prog, &mut n), "cubin size")?;
        let mut bin = vec![0u8; n];
        check(sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut c_char), "get cubin")?;
        sys::nvrtcDestroyProgram(&mut prog);
        Ok(bin)
    }
}
