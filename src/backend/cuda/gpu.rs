//! The real device, through cudarc's driver and cuBLAS bindings (loaded at
//! run time: `dynamic-loading`). Kernels come from the fatbin that build.rs
//! embedded; all work goes to the legacy default stream, so a download
//! (synchronous copy) sees every earlier launch.
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys};

use super::device::{Device, Gemm, GemmType, LaunchCfg, MemStats, Tracker};
use super::emu::kernel_names;
use super::FATBIN;
use crate::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        msg: msg.into(),
    }
}

fn drv_err(what: &str) -> impl FnOnce(drv::DriverError) -> Error + '_ {
    move |e| err(format!("{what}: {e:?}"))
}

/// One device allocation, freed on drop.
pub struct GpuMem {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: sys::CUcontext,
    tracker: Arc<Tracker>,
}

// SAFETY: a device address and the context it belongs to; the driver API is thread-safe.
unsafe impl Send for GpuMem {}
unsafe impl Sync for GpuMem {}

impl Drop for GpuMem {
    fn drop(&mut self) {
        // SAFETY: allocated by `GpuDevice::alloc` in this context. A failure
        // here (the context already torn down) leaves nothing to free.
        unsafe {
            let _ = drv::ctx::set_current(self.ctx);
            let _ = drv::free_sync(self.ptr);
        }
        self.tracker.sub(self.bytes);
    }
}

impl GpuMem {
    /// Errs unless a copy of `bytes` into this allocation fits.
    fn check_fits(&self, bytes: usize) -> Result<()> {
        if bytes > self.bytes {
            return Err(err(format!("copy of {bytes} bytes into {}", self.bytes)));
        }
        Ok(())
    }
}

/// Page-locked host memory: a DMA copy from it overlaps compute.
struct Pinned {
    ptr: *mut c_void,
    bytes: usize,
}

/// The upload stream (`htod_async`) and its page-locked staging buffers:
/// those read by copies in flight, and free ones, reused by later uploads
/// (a layer's tensors repeat the previous layer's sizes, and page-locking
/// fresh memory per upload costs more than the copy).
struct Uploads {
    /// Non-blocking stream, created on first use (null until then).
    stream: sys::CUstream,
    in_flight: Vec<Pinned>,
    free: Vec<Pinned>,
}

impl Uploads {
    /// A free staging buffer of at least `bytes` (the smallest that fits),
    /// or a new one.
    fn staging(&mut self, bytes: usize) -> Result<Pinned> {
        let best = (self.free.iter().enumerate())
            .filter(|(_, p)| p.bytes >= bytes)
            .min_by_key(|(_, p)| p.bytes)
            .map(|(i, _)| i);
        match best {
            Some(i) => Ok(self.free.swap_remove(i)),
            None => {
                // SAFETY: a plain page-locked allocation.
                let ptr = unsafe { drv::malloc_host(bytes.max(1), 0) }
                    .map_err(drv_err("cuMemHostAlloc"))?;
                Ok(Pinned { ptr, bytes })
            }
        }
    }

    /// Frees every staging buffer (no copy may be in flight).
    fn release_all(&mut self) {
        for p in self.in_flight.drain(..).chain(self.free.drain(..)) {
            // SAFETY: from cuMemHostAlloc; nothing reads it any more.
            let _ = unsafe { drv::free_host(p.ptr) };
        }
    }
}

/// The GPU: a primary context, the kernels module, a cuBLAS handle and the
/// upload stream of layer streaming.
pub struct GpuDevice {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    module: sys::CUmodule,
    functions: HashMap<&'static str, sys::CUfunction>,
    cublas: blas_sys::cublasHandle_t,
    tracker: Arc<Tracker>,
    name: String,
    uploads: Mutex<Uploads>,
}

// SAFETY: driver and cuBLAS handles are used with the context bound first;
// cuBLAS handles may be shared across host threads on one stream.
unsafe impl Send for GpuDevice {}
unsafe impl Sync for GpuDevice {}

impl GpuDevice {
    /// Opens GPU `ordinal`. Errs (never panics) when the binary has no
    /// kernels, no driver library is present, or no device answers.
    pub fn new(ordinal: usize) -> Result<Self> {
        let fatbin = FATBIN.ok_or_else(|| {
            err("built without kernels (no nvcc at build time; see .ci/install-nvcc.sh)")
        })?;
        // SAFETY: probing only loads the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(err("no CUDA driver library (libcuda.so) found"));
        }
        drv::init().map_err(drv_err("cuInit"))?;
        let dev = drv::device::get(ordinal as i32).map_err(drv_err("cuDeviceGet"))?;
        let name = drv::device::get_name(dev).map_err(drv_err("cuDeviceGetName"))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(drv_err("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: a retained primary context.
        unsafe { drv::ctx::set_current(ctx) }.map_err(drv_err("cuCtxSetCurrent"))?;
        // The image must be 8-byte aligned; include_bytes! promises nothing.
        let mut image = vec![0u64; fatbin.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut image)[..fatbin.len()].copy_from_slice(fatbin);
        // SAFETY: a fatbin produced by nvcc, aligned.
        let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(drv_err("cuModuleLoadData (driver older than CUDA 13.0?)"))?;
        let mut functions = HashMap::new();
        for n in kernel_names() {
            let c = CString::new(n).expect("kernel names have no NUL");
            // SAFETY: `module` is loaded.
            let f = unsafe { drv::module::get_function(module, c) }
                .map_err(drv_err(&format!("cuModuleGetFunction({n})")))?;
            functions.insert(n, f);
        }
        // SAFETY: probing only loads the library.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(err("no cuBLAS library (libcublas.so) found"));
        }
        let cublas = blas::create_handle().map_err(|e| err(format!("cublasCreate: {e:?}")))?;
        Ok(GpuDevice {
            dev,
            ctx,
            module,
            functions,
            cublas,
            tracker: Arc::new(Tracker::default()),
            name,
            uploads: Mutex::new(Uploads {
                stream: std::ptr::null_mut(),
                in_flight: Vec::new(),
                free: Vec::new(),
            }),
        })
    }

    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is the retained primary context.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(drv_err("cuCtxSetCurrent"))
    }
}

impl Drop for GpuDevice {
    /// Releases the cuBLAS handle, the module and this device's hold on the
    /// primary context. Drop buffers first: once the context's last holder
    /// lets go its memory is gone, and a later buffer drop frees nothing.
    /// Failures while tearing down are ignored.
    fn drop(&mut self) {
        // SAFETY: handles created in `new` and not used after this.
        unsafe {
            let _ = drv::ctx::set_current(self.ctx);
            let _ = drv::ctx::synchronize();
            let up = self.uploads.get_mut().unwrap_or_else(|e| e.into_inner());
            up.release_all();
            if !up.stream.is_null() {
                let _ = drv::stream::destroy(up.stream);
            }
            let _ = blas::destroy_handle(self.cublas);
            let _ = drv::module::unload(self.module);
            let _ = drv::primary_ctx::release(self.dev);
        }
    }
}

impl Device for GpuDevice {
    type Mem = GpuMem;

    fn backend_name(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, bytes: usize) -> Result<GpuMem> {
        self.bind()?;
        // SAFETY: context bound.
        let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }
            .map_err(drv_err(&format!("cuMemAlloc({bytes} bytes)")))?;
        self.tracker.add(bytes.max(1));
        Ok(GpuMem {
            ptr,
            bytes: bytes.max(1),
            ctx: self.ctx,
            tracker: self.tracker.clone(),
        })
    }

    fn ptr(&self, mem: &GpuMem) -> u64 {
        mem.ptr
    }

    fn htod(&self, src: &[u8], dst: &GpuMem) -> Result<()> {
        dst.check_fits(src.len())?;
        self.bind()?;
        // SAFETY: bounds checked above.
        unsafe { drv::memcpy_htod_sync(dst.ptr, src) }.map_err(drv_err("cuMemcpyHtoD"))
    }

    fn htod_async(&self, src: &[u8], dst: &GpuMem) -> Result<()> {
        dst.check_fits(src.len())?;
        self.bind()?;
        let mut up = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if up.stream.is_null() {
            // No implicit synchronisation with the legacy stream the kernels
            // run on: `upload_fence` is what orders the copies before use.
            up.stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
                .map_err(drv_err("cuStreamCreate"))?;
        }
        // A DMA copy overlaps compute only from page-locked memory: stage
        // `src` there (back in the free pool once `upload_fence` saw it land).
        let host = up.staging(src.len())?;
        // SAFETY: `host` holds at least src.len() bytes and no copy in
        // flight reads it; it is written in full before the copy is queued.
        let queued = unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), host.ptr as *mut u8, src.len());
            let pinned = std::slice::from_raw_parts(host.ptr as *const u8, src.len());
            drv::memcpy_htod_async(dst.ptr, pinned, up.stream)
        };
        up.in_flight.push(host);
        queued.map_err(drv_err("cuMemcpyHtoDAsync"))
    }

    fn upload_fence(&self) -> Result<()> {
        self.bind()?;
        let mut up = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if !up.stream.is_null() {
            // SAFETY: a stream created by `htod_async` in this context.
            unsafe { drv::stream::synchronize(up.stream) }
                .map_err(drv_err("cuStreamSynchronize"))?;
        }
        let landed = std::mem::take(&mut up.in_flight);
        up.free.extend(landed);
        Ok(())
    }

    fn dtoh(&self, src: &GpuMem, dst: &mut [u8]) -> Result<()> {
        if dst.len() > src.bytes {
            return Err(err(format!(
                "copy of {} bytes from {}",
                dst.len(),
                src.bytes
            )));
        }
        self.bind()?;
        // SAFETY: bounds checked above.
        unsafe { drv::memcpy_dtoh_sync(dst, src.ptr) }.map_err(drv_err("cuMemcpyDtoH"))
    }

    fn memzero(&self, mem: &GpuMem, bytes: usize) -> Result<()> {
        if bytes > mem.bytes {
            return Err(err(format!("memset of {bytes} bytes in {}", mem.bytes)));
        }
        self.bind()?;
        // SAFETY: bounds checked above.
        unsafe { drv::memset_d8_sync(mem.ptr, 0, bytes) }.map_err(drv_err("cuMemsetD8"))
    }

    unsafe fn launch(&self, name: &str, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()> {
        let f = *self
            .functions
            .get(name)
            .ok_or_else(|| err(format!("no kernel named {name}")))?;
        self.bind()?;
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        drv::launch_kernel(
            f,
            (gx, gy, gz),
            (bx, by, bz),
            cfg.shmem,
            std::ptr::null_mut(),
            params,
        )
        .map_err(drv_err(&format!("launch {name} {cfg:?}")))
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        g.check().map_err(err)?;
        self.bind()?;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ty = match g.ab {
            GemmType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
            GemmType::Bf16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
        };
        blas::gemm_strided_batched_ex(
            self.cublas,
            op(g.trans_a),
            op(g.trans_b),
            g.m as i32,
            g.n as i32,
            g.k as i32,
            &g.alpha as *const f32 as *const c_void,
            g.a as *const c_void,
            ty,
            g.lda as i32,
            g.stride_a as i64,
            g.b as *const c_void,
            ty,
            g.ldb as i32,
            g.stride_b as i64,
            &g.beta as *const f32 as *const c_void,
            g.c as *mut c_void,
            blas_sys::cudaDataType_t::CUDA_R_32F,
            g.ldc as i32,
            g.stride_c as i64,
            g.batch as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| err(format!("cublasGemmStridedBatchedEx {g:?}: {e:?}")))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        drv::ctx::synchronize().map_err(drv_err("cuCtxSynchronize"))
    }

    fn mem_stats(&self) -> MemStats {
        self.tracker.stats()
    }

    fn reset_high_water(&self) {
        self.tracker.reset_high_water()
    }
}
