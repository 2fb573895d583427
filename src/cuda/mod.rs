//! The CUDA runtime, in tinygrad's four nouns: a device (context + one stream), a compiler
//! (NVRTC → CUBIN, cached on disk), an allocator (a byte arena that knows its peak) and
//! graphs (capture a decode step once, replay it per token).
//!
//! Why raw device pointers: a [`Plan`](crate::plan::Plan) is data, so the executor looks
//! buffers up by name at run time; passing `u64` device addresses to kernels keeps that
//! lookup trivial and lets a captured graph bake the addresses in. The arena owns every
//! allocation, so nothing is freed while a graph still points at it.
//!
//! Why a probe first: cudarc's dynamic loading panics if `libcuda` / `libnvrtc` are missing,
//! so [`Device::open`] checks for both and turns absence into [`Error::Unavailable`].

pub mod backend;
mod compile;
pub mod nccl;
pub mod ops;
mod packs;
mod weights;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, result, sys};

use crate::error::{Error, Result};

pub use backend::{CHUNK, CudaBackend};

fn cuda_err(e: DriverError) -> Error {
    Error::Cuda(e.to_string())
}

/// Whether the CUDA driver and NVRTC libraries can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: these only try to dlopen the libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() }
}

pub use crate::kernels::Arg;

/// One GPU: context, the stream every kernel runs on, the compiled kernels, the arena.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
    allocs: Vec<(CUdeviceptr, usize)>,
    in_use: usize,
    peak: usize,
    /// GPU name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Driver version, e.g. `13.0`.
    pub driver: String,
    /// Total device memory in bytes.
    pub total_mem: usize,
    /// Compute capability (major, minor).
    cc: (i32, i32),
    /// Whether built-in kernels are launched with programmatic dependent launch (see [`Device::pdl`]).
    pdl: bool,
    /// Prefill chunks use the tensor-core kernels (see [`Device::tensor_cores`]).
    tc: bool,
    /// The tensor-core kernels take quantized weights as integer codes (see [`Device::tc_codes`]).
    tc_codes: bool,
}

/// Kernels compiled at run time from a source of their own (foundry candidates, kernel-pack
/// entries), next to the built-in module.
pub struct Module {
    _module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
}

impl Device {
    /// Opens GPU 0, creates a dedicated stream and compiles (or loads from cache) the kernels.
    pub fn open() -> Result<Device> {
        if !available() {
            return Err(Error::Unavailable("CUDA driver (libcuda) or NVRTC (libnvrtc) not found".into()));
        }
        let ctx = CudaContext::new(0).map_err(|e| Error::Unavailable(format!("no usable CUDA device: {e}")))?;
        // Graph capture needs cudarc's per-allocation event tracking off (we own all memory).
        // SAFETY: we never use cudarc's multi-stream synchronisation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err)?;
        let (major, minor) = ctx.compute_capability().map_err(cuda_err)?;
        let src = ops::module_source();
        let cubin = compile::cubin(&src, major, minor)?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(cuda_err)?;
        let mut funcs = HashMap::new();
        for name in kernel_names(&src) {
            let f = module.load_function(&name).map_err(cuda_err)?;
            funcs.insert(name, f);
        }
        let mut v = 0i32;
        // SAFETY: plain out-parameter query.
        unsafe { sys::cuDriverGetVersion(&mut v) };
        Ok(Device {
            name: ctx.name().map_err(cuda_err)?,
            driver: format!("{}.{}", v / 1000, (v % 1000) / 10),
            total_mem: ctx.total_mem().map_err(cuda_err)?,
            ctx,
            stream,
            _module: module,
            funcs,
            allocs: Vec::new(),
            in_use: 0,
            peak: 0,
            cc: (major, minor),
            pdl: major >= 9 && std::env::var("ZMOE_PDL").is_ok_and(|v| v == "1"),
            tc: major >= 8 && std::env::var("ZMOE_TC").map_or(true, |v| v != "0"),
            tc_codes: std::env::var("ZMOE_TC_CODES").is_ok_and(|v| v == "1"),
        })
    }

    /// Whether built-in kernels are launched with programmatic dependent launch: on sm_90 and
    /// newer with `ZMOE_PDL=1` (off by default: it measured no decode gain on qwen3-30b-a3b
    /// and 2–3 % slower on glm-4.7-flash, bench/RESULTS.md 2026-12-07). Each kernel's blocks
    /// may then be scheduled while the previous kernel's last wave runs, and wait in
    /// `pdl_entry` (common.cuh) for its results; the arithmetic is the same either way.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// Whether long prompts ([`crate::backend::long_prompt`]) run their
    /// projections on tensor cores (`mma.sync`, sm_80 and newer) unless `ZMOE_TC=0`, which
    /// keeps every chunk on the row-per-token mat-vecs (the A/B baseline for benchmarks).
    pub fn tensor_cores(&self) -> bool {
        self.tc
    }

    /// Whether the prompt's tensor-core products (`ops::gemm`) take quantized weights as
    /// integer codes with scale and bias applied per group (`ZMOE_TC_CODES=1`, the A/B
    /// baseline) instead of dequantised as they are staged (affine to fp16, MXFP4 to bf16;
    /// the default, ≈ 13 % faster prompts). Both plans run the same prefill kernels, so
    /// `validate` is unaffected either way.
    pub fn tc_codes(&self) -> bool {
        self.tc_codes
    }

    /// Switches [`Device::tc_codes`] (tests check both variants on one device).
    pub fn set_tc_codes(&mut self, on: bool) {
        self.tc_codes = on;
    }

    /// The GPU architecture as NVRTC names it, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }

    /// Compiles `src` (or loads its cached CUBIN) into a module of its own and loads the
    /// kernels `names` from it. A compile failure is [`Error::Compile`] with the log.
    pub fn load_module(&self, src: &str, names: &[&str]) -> Result<Module> {
        let cubin = compile::cubin(src, self.cc.0, self.cc.1)?;
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(cuda_err)?;
        let mut funcs = HashMap::new();
        for &name in names {
            let f = module.load_function(name).map_err(|e| Error::Cuda(format!("kernel `{name}`: {e}")))?;
            funcs.insert(name.to_string(), f);
        }
        Ok(Module { _module: module, funcs })
    }

    /// Launches kernel `name` of `module` on the stream.
    pub fn launch_in(
        &self,
        module: &Module,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = module.funcs.get(name).ok_or_else(|| Error::Cuda(format!("no kernel `{name}` in the module")))?;
        self.launch_fn(f, name, grid, block, args)
    }

    /// Copies `bytes` from `src` to `dst` on the device (on the stream).
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller sized both buffers.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(cuda_err)
    }

    /// How many allocations the arena holds: a mark for [`Device::release_to`].
    pub fn mark(&self) -> usize {
        self.allocs.len()
    }

    /// Frees every allocation made after `mark` (scratch buffers of one measurement).
    pub fn release_to(&mut self, mark: usize) -> Result<()> {
        let n = self.allocs.len().saturating_sub(mark);
        self.free_last(n)
    }

    /// Allocates `bytes` (rounded up to 256) of device memory owned by the arena.
    pub fn alloc(&mut self, bytes: usize) -> Result<u64> {
        let bytes = bytes.max(1).next_multiple_of(256);
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        // SAFETY: plain allocation; freed in Drop.
        let p =
            unsafe { result::malloc_sync(bytes) }.map_err(|e| Error::Cuda(format!("allocating {bytes} bytes: {e}")))?;
        self.allocs.push((p, bytes));
        self.in_use += bytes;
        self.peak = self.peak.max(self.in_use);
        Ok(p)
    }

    /// Allocates and uploads a host slice, on the stream, and waits for it.
    ///
    /// Not the legacy synchronous copy: from pageable memory that one may return before its
    /// DMA lands, and it is not ordered with the non-blocking stream the kernels run on — a
    /// kernel (or a device copy such as the foundry's pristine inputs) could read the old
    /// bytes of a reused allocation. Seen as wrong residuals in foundry cases when several
    /// GPU test processes shared the device.
    pub fn upload<T: Copy>(&mut self, data: &[T]) -> Result<u64> {
        let p = self.alloc(std::mem::size_of_val(data))?;
        self.write(p, data)?;
        Ok(p)
    }

    /// Copies host data into an existing allocation on the stream (ordered with the kernels)
    /// and waits for it, so `data` may be dropped or reused when this returns.
    pub fn write<T: Copy>(&self, dst: u64, data: &[T]) -> Result<()> {
        // SAFETY: the caller sized dst; the stream orders this before later kernels.
        unsafe { result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }.map_err(cuda_err)?;
        self.sync()
    }

    /// Copies device data to the host (waits for the stream first).
    pub fn read<T: Copy>(&self, src: u64, out: &mut [T]) -> Result<()> {
        self.sync()?;
        // SAFETY: the caller sized src.
        unsafe { result::memcpy_dtoh_sync(out, src) }.map_err(cuda_err)
    }

    /// Fills `bytes` at `dst` with `value` (poisoning buffers in tests).
    pub fn fill(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: the caller sized dst.
        unsafe { result::memset_d8_async(dst, value, bytes, self.stream.cu_stream()) }.map_err(cuda_err)
    }

    /// Waits for all work on the stream.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }

    /// Launches kernel `name` on the stream.
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        let f = self.funcs.get(name).ok_or_else(|| Error::Cuda(format!("no kernel `{name}`")))?;
        self.launch_fn(f, name, grid, block, args)
    }

    /// Launches kernel `name` with one by-value struct parameter at `params` (see `ops`).
    fn launch_struct(&self, name: &str, grid: (u32, u32, u32), block: u32, params: *mut c_void) -> Result<()> {
        let f = self.funcs.get(name).ok_or_else(|| Error::Cuda(format!("no kernel `{name}`")))?;
        let mut p = [params];
        if !self.pdl {
            // SAFETY: `params` points at a live `#[repr(C)]` struct whose C twin is the kernel's
            // only parameter (declared from the same Rust definition, size asserted at compile).
            return unsafe {
                result::launch_kernel(f.cu_function(), grid, (block, 1, 1), 0, self.stream.cu_stream(), &mut p)
            }
            .map_err(|e| Error::Cuda(format!("launching {name}: {e}")));
        }
        // SAFETY: zeroed bytes are a valid value of this plain C union.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as above for `params`; `cfg` and `attr` outlive the call, and every built-in
        // kernel starts with pdl_entry, which waits for the previous kernel's results.
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), p.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| Error::Cuda(format!("launching {name}: {e}")))
    }

    fn launch_fn(&self, f: &CudaFunction, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        let mut vals: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut b = [0u8; 8];
                match *a {
                    Arg::Ptr(p) => b.copy_from_slice(&p.to_ne_bytes()),
                    Arg::I64(x) => b.copy_from_slice(&x.to_ne_bytes()),
                    Arg::I32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
                    Arg::F32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
                }
                b
            })
            .collect();
        let mut params: Vec<*mut c_void> = vals.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
        // SAFETY: argument count and types follow the kernel signatures in src/kernels.
        unsafe { result::launch_kernel(f.cu_function(), grid, (block, 1, 1), 0, self.stream.cu_stream(), &mut params) }
            .map_err(|e| Error::Cuda(format!("launching {name}: {e}")))
    }

    /// Starts capturing the stream's work into a graph.
    pub fn begin_capture(&self) -> Result<()> {
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(cuda_err)
    }

    /// Ends capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<cudarc::driver::CudaGraph> {
        self.stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(cuda_err)?
            .ok_or_else(|| Error::Cuda("graph capture produced no graph".into()))
    }

    /// Bytes currently allocated, and the peak since the device was opened.
    pub fn memory(&self) -> (usize, usize) {
        (self.in_use, self.peak)
    }

    /// A timing event (records a point on the stream; also inside a captured graph).
    pub fn event(&self) -> Result<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map(Event).map_err(cuda_err)
    }

    /// Records `e` on the stream.
    pub fn record(&self, e: &Event) -> Result<()> {
        // SAFETY: e is a live event; the stream belongs to this context.
        unsafe { result::event::record(e.0, self.stream.cu_stream()) }.map_err(cuda_err)
    }

    /// Records `e` as a node of the graph being captured (a plain record during capture
    /// only orders streams and times nothing).
    pub fn record_in_graph(&self, e: &Event) -> Result<()> {
        // SAFETY: e is a live event; the stream is capturing.
        unsafe {
            sys::cuEventRecordWithFlags(
                e.0,
                self.stream.cu_stream(),
                sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32,
            )
        }
        .result()
        .map_err(cuda_err)
    }

    /// Milliseconds between two recorded events (waits for the stream first).
    pub fn elapsed_ms(&self, from: &Event, to: &Event) -> Result<f32> {
        self.sync()?;
        // SAFETY: both events are live and recorded.
        unsafe { result::event::elapsed(from.0, to.0) }.map_err(cuda_err)
    }

    /// Measures device-to-device copy bandwidth (GB/s, bytes read + written) with events.
    pub fn copy_bandwidth(&mut self) -> Result<f64> {
        let n = 1usize << 30;
        let (a, b) = (self.alloc(n)?, self.alloc(n)?);
        self.fill(a, 1, n)?;
        let (e0, e1) = (self.event()?, self.event()?);
        let mut best = 0f64;
        for _ in 0..5 {
            self.record(&e0)?;
            // SAFETY: both buffers are n bytes.
            unsafe { result::memcpy_dtod_async(b, a, n, self.stream.cu_stream()) }.map_err(cuda_err)?;
            self.record(&e1)?;
            let ms = self.elapsed_ms(&e0, &e1)? as f64;
            best = best.max(2.0 * n as f64 / (ms * 1e-3) / 1e9);
        }
        self.free_last(2)?;
        Ok(best)
    }

    /// Frees the `n` most recent allocations (scratch buffers of a measurement).
    fn free_last(&mut self, n: usize) -> Result<()> {
        self.sync()?;
        for _ in 0..n {
            if let Some((p, bytes)) = self.allocs.pop() {
                // SAFETY: p came from malloc_sync and nothing references it any more.
                unsafe { result::free_sync(p) }.map_err(cuda_err)?;
                self.in_use -= bytes;
            }
        }
        Ok(())
    }
}

/// A CUDA event with timing, destroyed on drop.
pub struct Event(sys::CUevent);

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by Device::event and not used after this.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        for (p, _) in self.allocs.drain(..) {
            // SAFETY: every pointer came from malloc_sync.
            let _ = unsafe { result::free_sync(p) };
        }
    }
}

/// Names of the `extern "C" __global__` functions in the sources: written out, or stamped
/// by a `*_KERNEL(name, ...)` macro invocation at the start of a line (the macro's own
/// parameter, upper case, is not a kernel).
pub(crate) fn kernel_names(src: &str) -> Vec<String> {
    let written = src
        .split("extern \"C\" __global__ void ")
        .skip(1)
        // The name is the last word before `(`: attribute macros may precede it.
        .filter_map(|rest| rest.split('(').next()?.split_whitespace().last().map(str::to_string))
        .filter(|n| n.chars().any(|c| c.is_ascii_lowercase()));
    let stamped = src.lines().filter_map(|l| {
        let (mac, rest) = l.split_once('(')?;
        let ok = mac.ends_with("_KERNEL") && mac.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        ok.then(|| rest.split(',').next().unwrap_or("").trim().to_string())
    });
    written.chain(stamped).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_names_include_macro_stamped_ones() {
        let src = "#define K_KERNEL(NAME, MT) extern \"C\" __global__ void NAME(int a) {}\nK_KERNEL(foo1, 1)\n\
                   extern \"C\" __global__ void bar(int x) {}\nextern \"C\" __global__ void ATTRS baz(int x) {}\n";
        assert_eq!(super::kernel_names(src), vec!["bar".to_string(), "baz".to_string(), "foo1".to_string()]);
        let all = super::kernel_names(&super::ops::module_source());
        for k in ["matvec", "matvec1", "qkv_proj", "qkv_proj1", "moe_router", "sample_token"] {
            assert!(all.iter().any(|n| n == k), "{k} missing from {all:?}");
        }
    }
}
