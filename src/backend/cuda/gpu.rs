//! The real device, through cudarc's driver and cuBLAS bindings (loaded at
//! run time: `dynamic-loading`). Kernels come from the fatbin that build.rs
//! embedded; all work goes to the legacy default stream (the NULL stream:
//! cudarc calls the driver's non-`_ptsz` entry points, and cuBLAS's handle
//! keeps its default stream), so a download (synchronous copy) sees every
//! earlier launch.
//!
//! Memory: `alloc` takes it from the device's default memory pool in stream
//! order on that same stream (`cuMemAllocAsync`, `cuMemFreeAsync`), with the
//! pool's release threshold at its maximum so freed memory stays cached and
//! a later allocation reuses it without synchronising the device (the
//! synchronous `cuMemAlloc`/`cuMemFree` pair cost most of a decode step).
//! A block freed that way may be handed out again while kernels queued
//! before the free still read it; that is safe for everything ordered on the
//! compute stream, which includes the synchronous copies and memsets, but not
//! for the upload stream of layer streaming. Its targets therefore come from
//! `alloc_for_upload`: plain `cuMemAlloc` memory, which no queued work can
//! still touch, freed by `cuMemFree` (which waits for the device).
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

/// The stream kernels, cuBLAS, copies and pool allocations are ordered on:
/// the legacy default stream.
const COMPUTE: sys::CUstream = std::ptr::null_mut();

/// The retained primary context (and the device's memory pool, when it has
/// one), shared by the device and every allocation: the context is released
/// only when the last of them goes, so a buffer that outlives its
/// `GpuDevice` is still freed in its own context.
struct Ctx {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    /// The default memory pool, or None where the device has no
    /// stream-ordered allocator (then every allocation is synchronous).
    pool: Option<sys::CUmemoryPool>,
}

// SAFETY: driver handles; the driver API is thread-safe.
unsafe impl Send for Ctx {}
unsafe impl Sync for Ctx {}

impl Ctx {
    fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is the retained primary context.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(drv_err("cuCtxSetCurrent"))
    }
}

impl Drop for Ctx {
    /// Waits for queued work (stream-ordered frees included) and releases
    /// the primary context. Failures while tearing down are ignored.
    fn drop(&mut self) {
        // SAFETY: retained in `GpuDevice::new`; no allocation or handle is
        // left (every holder of this `Ctx` is gone).
        unsafe {
            let _ = drv::ctx::set_current(self.ctx);
            let _ = drv::ctx::synchronize();
            let _ = drv::primary_ctx::release(self.dev);
        }
    }
}

/// The device's default memory pool, set to keep what is freed into it
/// (release threshold: all of it) instead of returning it to the driver at
/// every synchronisation; None if the device has no stream-ordered allocator.
fn default_pool(dev: sys::CUdevice) -> Result<Option<sys::CUmemoryPool>> {
    use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED as POOLS;
    // SAFETY: `dev` came from cuDeviceGet and its primary context is current.
    unsafe {
        if drv::device::get_attribute(dev, POOLS).map_err(drv_err("cuDeviceGetAttribute"))? == 0 {
            return Ok(None);
        }
        let pool =
            drv::device::get_default_mem_pool(dev).map_err(drv_err("cuDeviceGetDefaultMemPool"))?;
        let mut threshold = u64::MAX;
        drv::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
        .map_err(drv_err("cuMemPoolSetAttribute(release threshold)"))?;
        Ok(Some(pool))
    }
}

/// One device allocation, freed on drop: in stream order on the compute
/// stream when it came from the pool, synchronously otherwise.
pub struct GpuMem {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    pooled: bool,
    ctx: Arc<Ctx>,
    tracker: Arc<Tracker>,
}

// SAFETY: a device address and the context it belongs to; the driver API is thread-safe.
unsafe impl Send for GpuMem {}
unsafe impl Sync for GpuMem {}

impl Drop for GpuMem {
    fn drop(&mut self) {
        // SAFETY: allocated by `GpuDevice::alloc` (pooled: on `COMPUTE`) or
        // `alloc_for_upload` in this context, which `self.ctx` keeps alive.
        // A stream-ordered free lets later allocations on `COMPUTE` reuse the
        // block only after the work queued so far; a failure here leaves
        // nothing to free.
        unsafe {
            let _ = drv::ctx::set_current(self.ctx.ctx);
            let _ = if self.pooled {
                drv::free_async(self.ptr, COMPUTE)
            } else {
                drv::free_sync(self.ptr)
            };
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
    ctx: Arc<Ctx>,
    module: sys::CUmodule,
    functions: HashMap<&'static str, sys::CUfunction>,
    cublas: blas_sys::cublasHandle_t,
    tracker: Arc<Tracker>,
    name: String,
    uploads: Mutex<Uploads>,
    alloc_mode: AllocMode,
}

/// Where `GpuDevice::alloc` takes memory from: environment `RKU_CUDA_ALLOC`,
/// `pool` (the default) or `sync` (an escape hatch: the synchronous
/// `cuMemAlloc`/`cuMemFree` per buffer of earlier builds, e.g. for tools or
/// drivers that do not handle the stream-ordered allocator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AllocMode {
    Pool,
    Sync,
}

impl AllocMode {
    fn from_env() -> Result<Self> {
        match std::env::var("RKU_CUDA_ALLOC").as_deref() {
            Err(_) | Ok("pool") => Ok(Self::Pool),
            Ok("sync") => Ok(Self::Sync),
            Ok(other) => Err(err(format!(
                "RKU_CUDA_ALLOC={other:?}: expected pool or sync"
            ))),
        }
    }
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
        let alloc_mode = AllocMode::from_env()?;
        // SAFETY: probing only loads the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(err("no CUDA driver library (libcuda.so) found"));
        }
        drv::init().map_err(drv_err("cuInit"))?;
        let count = drv::device::get_count().map_err(drv_err("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(err(format!(
                "device {ordinal} does not exist: this machine has {count} CUDA device(s), 0..{count}"
            )));
        }
        let dev = drv::device::get(ordinal as i32).map_err(drv_err("cuDeviceGet"))?;
        let name = drv::device::get_name(dev).map_err(drv_err("cuDeviceGetName"))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(drv_err("cuDevicePrimaryCtxRetain"))?;
        // From here on dropping `ctx` releases the primary context again.
        let mut ctx = Ctx {
            dev,
            ctx,
            pool: None,
        };
        ctx.bind()?;
        ctx.pool = default_pool(dev)?;
        let ctx = Arc::new(ctx);
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
            alloc_mode,
        })
    }

    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind()
    }

    fn mem(&self, ptr: sys::CUdeviceptr, bytes: usize, pooled: bool) -> GpuMem {
        self.tracker.add(bytes);
        GpuMem {
            ptr,
            bytes,
            pooled,
            ctx: self.ctx.clone(),
            tracker: self.tracker.clone(),
        }
    }

    /// `bytes` from `cuMemAlloc`. If the device is out of memory, the pool's
    /// cached blocks may be what holds it: after the device is idle (every
    /// stream-ordered free done) they go back to the driver and it is tried
    /// once more.
    fn alloc_sync(&self, bytes: usize) -> Result<GpuMem> {
        self.bind()?;
        // SAFETY: context bound.
        let mut got = unsafe { drv::malloc_sync(bytes) };
        if let (Err(drv::DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)), Some(pool)) =
            (&got, self.ctx.pool)
        {
            // SAFETY: the context's own pool; trimming releases only blocks
            // no allocation holds, and nothing is queued any more.
            got = unsafe {
                drv::ctx::synchronize()
                    .and_then(|()| drv::mem_pool::trim_to(pool, 0))
                    .and_then(|()| drv::malloc_sync(bytes))
            };
        }
        let ptr = got.map_err(drv_err(&format!("cuMemAlloc({bytes} bytes)")))?;
        Ok(self.mem(ptr, bytes, false))
    }
}

impl Drop for GpuDevice {
    /// Releases the staging buffers, the upload stream, the cuBLAS handle
    /// and the module; the primary context goes with the last of this
    /// device and its buffers (`Ctx`). Failures while tearing down are
    /// ignored.
    fn drop(&mut self) {
        // SAFETY: handles created in `new` and not used after this.
        unsafe {
            let _ = self.ctx.bind();
            let _ = drv::ctx::synchronize();
            let up = self.uploads.get_mut().unwrap_or_else(|e| e.into_inner());
            up.release_all();
            if !up.stream.is_null() {
                let _ = drv::stream::destroy(up.stream);
            }
            let _ = blas::destroy_handle(self.cublas);
            let _ = drv::module::unload(self.module);
        }
    }
}

impl Device for GpuDevice {
    type Mem = GpuMem;

    fn backend_name(&self) -> &'static str {
        "cuda"
    }

    /// From the pool, in stream order on `COMPUTE` (no synchronisation),
    /// unless `AllocMode` says otherwise.
    fn alloc(&self, bytes: usize) -> Result<GpuMem> {
        let bytes = bytes.max(1);
        if self.alloc_mode == AllocMode::Sync || self.ctx.pool.is_none() {
            return self.alloc_sync(bytes);
        }
        self.bind()?;
        // SAFETY: context bound; every use of the memory (kernels, cuBLAS,
        // the synchronous copies and memsets) is ordered on `COMPUTE`, and
        // so is its free (`GpuMem::drop`).
        let ptr = unsafe { drv::malloc_async(COMPUTE, bytes) }
            .map_err(drv_err(&format!("cuMemAllocAsync({bytes} bytes)")))?;
        Ok(self.mem(ptr, bytes, true))
    }

    /// Synchronous `cuMemAlloc`: memory no queued work still reads, which
    /// the upload stream may write at once.
    fn alloc_for_upload(&self, bytes: usize) -> Result<GpuMem> {
        self.alloc_sync(bytes.max(1))
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

    fn htod_async(
        &self,
        bytes: usize,
        dst: &GpuMem,
        fill: &dyn Fn(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        dst.check_fits(bytes)?;
        if dst.pooled {
            // Queued kernels may still read this block (freed and reused in
            // stream order), and the upload stream is not ordered after them.
            return Err(err("htod_async into pool memory (use alloc_for_upload)"));
        }
        self.bind()?;
        let mut up = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if up.stream.is_null() {
            // No implicit synchronisation with the legacy stream the kernels
            // run on: `upload_fence` is what orders the copies before use.
            up.stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
                .map_err(drv_err("cuStreamCreate"))?;
        }
        // A DMA copy overlaps compute only from page-locked memory: `fill`
        // writes straight into a staging buffer (back in the free pool once
        // `upload_fence` saw it land, or at once if `fill` fails).
        let host = up.staging(bytes)?;
        // SAFETY: `host` holds at least `bytes` bytes and no copy in flight
        // reads it; `fill` writes it in full before the copy is queued.
        let pinned = unsafe { std::slice::from_raw_parts_mut(host.ptr as *mut u8, bytes) };
        if let Err(e) = fill(pinned) {
            up.free.push(host);
            return Err(e);
        }
        // SAFETY: as above; the buffer stays alive until `upload_fence`.
        let queued = unsafe { drv::memcpy_htod_async(dst.ptr, pinned, up.stream) };
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
        drv::launch_kernel(f, (gx, gy, gz), (bx, by, bz), cfg.shmem, COMPUTE, params)
            .map_err(drv_err(&format!("launch {name} {cfg:?}")))
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        g.check().map_err(err)?;
        self.bind()?;
        use blas_sys::cublasComputeType_t as Compute;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        use blas_sys::cudaDataType_t as T;
        // A and B storage, C storage, compute type; alpha and beta in C's type.
        let (ty, c_ty, compute) = match g.ab {
            GemmType::F32 => (T::CUDA_R_32F, T::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F),
            GemmType::Bf16 => (T::CUDA_R_16BF, T::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F),
            GemmType::F64 => (T::CUDA_R_64F, T::CUDA_R_64F, Compute::CUBLAS_COMPUTE_64F),
        };
        let (alpha64, beta64) = (g.alpha as f64, g.beta as f64);
        let (alpha, beta) = match g.ab {
            GemmType::F64 => (
                &alpha64 as *const f64 as *const c_void,
                &beta64 as *const f64 as *const c_void,
            ),
            _ => (
                &g.alpha as *const f32 as *const c_void,
                &g.beta as *const f32 as *const c_void,
            ),
        };
        blas::gemm_strided_batched_ex(
            self.cublas,
            op(g.trans_a),
            op(g.trans_b),
            g.m as i32,
            g.n as i32,
            g.k as i32,
            alpha,
            g.a as *const c_void,
            ty,
            g.lda as i32,
            g.stride_a as i64,
            g.b as *const c_void,
            ty,
            g.ldb as i32,
            g.stride_b as i64,
            beta,
            g.c as *mut c_void,
            c_ty,
            g.ldc as i32,
            g.stride_c as i64,
            g.batch as i32,
            compute,
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

    fn available_memory(&self) -> Result<u64> {
        self.bind()?;
        let (free, _total) = drv::mem_get_info().map_err(drv_err("cuMemGetInfo"))?;
        Ok(free as u64)
    }

    fn reset_high_water(&self) {
        self.tracker.reset_high_water()
    }
}
