//! The `Device` abstraction under the CUDA backend: memory, kernel launches
//! by name with cuLaunchKernel's parameter array, and a cuBLAS-shaped matrix
//! product. Two implementations share every line of launch code above it:
//! `GpuDevice` (cudarc) and `EmuDevice` (host memory, host-built kernels).
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Result;

/// Storage type of the A and B operands of a matrix product: with `F32`
/// and `Bf16`, C is f32 and accumulation f32; with `F64` (the refit's
/// normal equations) A, B and C are f64 and so is the accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmType {
    F32,
    Bf16,
    F64,
}

impl GemmType {
    /// Bytes of one A or B element.
    pub fn size(self) -> usize {
        match self {
            GemmType::F32 => 4,
            GemmType::Bf16 => 2,
            GemmType::F64 => 8,
        }
    }
}

/// One `cublasGemmStridedBatchedEx` call, column-major as cuBLAS has it:
/// for each batch i, `C_i = alpha·op(A_i)·op(B_i) + beta·C_i` with `op(A_i)`
/// m×k, `op(B_i)` k×n, `C_i` m×n; `X_i = x + i·stride_x` (elements); with
/// `beta == 0` C is not read. `alpha` and `beta` are widened to f64 for
/// `GemmType::F64`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub beta: f32,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub ab: GemmType,
}

impl Gemm {
    /// cuBLAS's argument rules: leading dimensions at least the stored rows.
    pub fn check(&self) -> std::result::Result<(), String> {
        let rows_a = if self.trans_a { self.k } else { self.m };
        let rows_b = if self.trans_b { self.n } else { self.k };
        if self.lda < rows_a.max(1) || self.ldb < rows_b.max(1) || self.ldc < self.m.max(1) {
            return Err(format!("gemm: leading dimension too small: {self:?}"));
        }
        Ok(())
    }
}

/// Current and high-water bytes of a device's allocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    pub current: usize,
    pub high_water: usize,
}

/// Allocation accounting shared by a device and its live allocations.
#[derive(Debug, Default)]
pub struct Tracker {
    current: AtomicUsize,
    high_water: AtomicUsize,
}

impl Tracker {
    pub fn add(&self, bytes: usize) {
        let now = self.current.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.high_water.fetch_max(now, Ordering::SeqCst);
    }
    pub fn sub(&self, bytes: usize) {
        self.current.fetch_sub(bytes, Ordering::SeqCst);
    }
    pub fn stats(&self) -> MemStats {
        MemStats {
            current: self.current.load(Ordering::SeqCst),
            high_water: self.high_water.load(Ordering::SeqCst),
        }
    }
    pub fn reset_high_water(&self) {
        self.high_water
            .store(self.current.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shmem: u32,
}

impl LaunchCfg {
    /// 1-D launch: `blocks` blocks of `threads` threads.
    pub fn linear(blocks: usize, threads: u32) -> Self {
        LaunchCfg {
            grid: [blocks.max(1) as u32, 1, 1],
            block: [threads, 1, 1],
            shmem: 0,
        }
    }
    /// Grid-stride launch over `n` elements, block 256, at most 65535 blocks.
    pub fn elementwise(n: usize) -> Self {
        Self::linear(n.div_ceil(256).clamp(1, 65535), 256)
    }
}

/// Kernel arguments, each in an 8-byte slot as cuLaunchKernel reads them
/// (a 4-byte argument occupies the low half: little-endian).
#[derive(Default)]
pub struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ptr(mut self, p: u64) -> Self {
        self.slots.push(p);
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.slots.push(v as u32 as u64);
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.slots.push(v as u64);
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.slots.push(v.to_bits() as u64);
        self
    }
    /// cuLaunchKernel's `kernelParams`: one pointer per argument, valid while `self` lives.
    pub fn params(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect()
    }
}

/// A device that runs the kernels of kernels/*.cu.
pub trait Device: Send + Sync + Sized + 'static {
    /// One allocation; freed on drop.
    type Mem: Send + Sync;

    /// The backend name this device gives (`"cuda"`, `"cuda-emu"`).
    fn backend_name(&self) -> &'static str;
    /// Allocates `bytes` (contents unspecified).
    fn alloc(&self, bytes: usize) -> Result<Self::Mem>;
    /// Allocates `bytes` that `htod_async` will write: memory no work queued
    /// on the compute stream may still touch, since the upload stream is not
    /// ordered after it (on the GPU `alloc` may hand out memory freed in
    /// stream order whose last readers have not run yet). Default: `alloc`.
    fn alloc_for_upload(&self, bytes: usize) -> Result<Self::Mem> {
        self.alloc(bytes)
    }
    /// The device address of an allocation.
    fn ptr(&self, mem: &Self::Mem) -> u64;
    /// Copies host bytes to the start of `dst`.
    fn htod(&self, src: &[u8], dst: &Self::Mem) -> Result<()>;
    /// Has `fill` write `bytes` host bytes into a staging buffer (on the GPU
    /// a reused page-locked one, so the file's values go there without an
    /// intermediate copy), then copies them to the start of `dst` on the
    /// upload stream: the copy may still run when this returns, overlapping
    /// compute queued meanwhile, and `dst` may be used only after
    /// `upload_fence`. `dst` must come from `alloc_for_upload`. An error of
    /// `fill` is returned and nothing is copied. Default: `fill` into a
    /// vector, then `htod`.
    fn htod_async(
        &self,
        bytes: usize,
        dst: &Self::Mem,
        fill: &dyn Fn(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let mut host = vec![0u8; bytes];
        fill(&mut host)?;
        self.htod(&host, dst)
    }
    /// Waits until every `htod_async` issued so far has completed.
    fn upload_fence(&self) -> Result<()> {
        Ok(())
    }
    /// Copies the first `dst.len()` bytes of `src` to the host.
    fn dtoh(&self, src: &Self::Mem, dst: &mut [u8]) -> Result<()>;
    /// Sets the first `bytes` bytes of `mem` to zero.
    fn memzero(&self, mem: &Self::Mem, bytes: usize) -> Result<()>;
    /// Launches kernel `name` with cuLaunchKernel's parameter array.
    ///
    /// # Safety
    /// `params` must match the kernel's parameters in number and type, and
    /// every pointer among them must address enough device memory.
    unsafe fn launch(&self, name: &str, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()>;
    /// A cuBLAS-shaped matrix product.
    ///
    /// # Safety
    /// The operand addresses must be device memory holding the matrices `g` describes.
    unsafe fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;
    /// Allocation accounting.
    fn mem_stats(&self) -> MemStats;
    /// Bytes that could still be allocated (the activation-memory budget's `auto`).
    fn available_memory(&self) -> Result<u64>;
    /// Starts a new high-water measurement from the current bytes.
    fn reset_high_water(&self);
}
