//! The emulated device: device memory is host memory, kernels are the
//! host build of kernels/*.cu (a block's CUDA threads run as fibers on the
//! launching thread; see kernels/compat.cuh) and matrix products are the `gemm` crate behind
//! cuBLAS's contract (column-major, op flags, leading dimensions, batch
//! strides, `beta == 0` does not read C).
use std::alloc::{alloc, dealloc, Layout};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use half::bf16;

use super::device::{Device, Gemm, GemmType, LaunchCfg, MemStats, Tracker};
use crate::{Error, Result};

type EmuLaunch = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, usize, *mut *mut c_void);
include!(concat!(env!("OUT_DIR"), "/emu_kernels.rs"));

/// Names of every kernel in kernels/*.cu (the same set the fatbin exports).
pub fn kernel_names() -> impl Iterator<Item = &'static str> {
    EMU_KERNELS.iter().map(|(n, _)| *n)
}

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda-emu",
        msg: msg.into(),
    }
}

/// One host allocation standing in for device memory; filled with 0xFF
/// bytes (NaN as f32, bf16 and f16) so that an element no kernel wrote shows.
pub struct EmuMem {
    ptr: NonNull<u8>,
    layout: Layout,
    tracker: Arc<Tracker>,
}

// SAFETY: the allocation is plain bytes owned by this value; kernels access it
// through raw device addresses, as they would on a GPU.
unsafe impl Send for EmuMem {}
unsafe impl Sync for EmuMem {}

impl Drop for EmuMem {
    fn drop(&mut self) {
        self.tracker.sub(self.layout.size());
        // SAFETY: allocated in `EmuDevice::alloc` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The emulated device.
pub struct EmuDevice {
    kernels: HashMap<&'static str, EmuLaunch>,
    tracker: Arc<Tracker>,
}

impl Default for EmuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuDevice {
    pub fn new() -> Self {
        EmuDevice {
            kernels: EMU_KERNELS.iter().copied().collect(),
            tracker: Arc::new(Tracker::default()),
        }
    }
}

/// Column-major operand `rows × cols` (as stored) with leading dimension
/// `ld` at `addr`, as f32: borrowed for f32, converted for bf16.
///
/// # Safety
/// `addr` must hold `ld·(cols−1) + rows` elements of type `ty`.
unsafe fn operand(addr: u64, ty: GemmType, rows: usize, cols: usize, ld: usize) -> Vec<f32> {
    let len = extent(rows, cols, ld);
    match ty {
        GemmType::Bf16 => std::slice::from_raw_parts(addr as *const bf16, len)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        // f64 operands are read in place by `EmuDevice::gemm`, never widened here.
        GemmType::F32 | GemmType::F64 => {
            std::slice::from_raw_parts(addr as *const f32, len).to_vec()
        }
    }
}

/// Elements spanned by a column-major `rows × cols` operand with leading
/// dimension `ld`.
fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        ld * (cols - 1) + rows
    }
}

/// The element types of the emulated products' C (f32, or f64 for `GemmType::F64`).
trait Acc: 'static + Copy + PartialEq {
    const ZERO: Self;
    fn times(self, other: Self) -> Self;
}
impl Acc for f32 {
    const ZERO: Self = 0.0;
    fn times(self, other: Self) -> Self {
        self * other
    }
}
impl Acc for f64 {
    const ZERO: Self = 0.0;
    fn times(self, other: Self) -> Self {
        self * other
    }
}

/// One batch entry of `g`: `C = alpha·op(A)·op(B) + beta·C` over
/// column-major `a`, `b` (each `extent` elements) and `c`, in `T`.
///
/// # Safety
/// `c` must hold `ldc·(n−1) + m` elements of `T`.
unsafe fn product<T: Acc>(g: &Gemm, a: &[T], b: &[T], c: *mut T, alpha: T, beta: T) {
    // op(X)(r, q) of a column-major X: (r + q·ld) untransposed, (q + r·ld) transposed.
    let (a_rs, a_cs) = if g.trans_a { (g.lda, 1) } else { (1, g.lda) };
    let (b_rs, b_cs) = if g.trans_b { (g.ldb, 1) } else { (1, g.ldb) };
    if g.k == 0 {
        // cuBLAS: C = beta·C (C not read when beta == 0).
        for q in 0..g.n {
            for r in 0..g.m {
                let p = c.add(r + q * g.ldc);
                *p = if beta == T::ZERO {
                    T::ZERO
                } else {
                    beta.times(*p)
                };
            }
        }
        return;
    }
    // gemm crate: dst = alpha_g·dst + beta_g·lhs·rhs.
    gemm::gemm(
        g.m,
        g.n,
        g.k,
        c,
        g.ldc as isize,
        1,
        beta != T::ZERO,
        a.as_ptr(),
        a_cs as isize,
        a_rs as isize,
        b.as_ptr(),
        b_cs as isize,
        b_rs as isize,
        beta,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(0),
    );
}

impl Device for EmuDevice {
    type Mem = EmuMem;

    fn backend_name(&self) -> &'static str {
        "cuda-emu"
    }

    fn alloc(&self, bytes: usize) -> Result<EmuMem> {
        let layout = Layout::from_size_align(bytes.max(1), 64).map_err(|e| err(e.to_string()))?;
        // SAFETY: non-zero size.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| err(format!("out of memory allocating {bytes} bytes")))?;
        // SAFETY: fresh allocation of layout.size() bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0xFF, layout.size()) };
        self.tracker.add(layout.size());
        Ok(EmuMem {
            ptr,
            layout,
            tracker: self.tracker.clone(),
        })
    }

    fn ptr(&self, mem: &EmuMem) -> u64 {
        mem.ptr.as_ptr() as u64
    }

    fn htod(&self, src: &[u8], dst: &EmuMem) -> Result<()> {
        if src.len() > dst.layout.size() {
            return Err(err(format!(
                "copy of {} bytes into {}",
                src.len(),
                dst.layout.size()
            )));
        }
        // SAFETY: bounds checked above; host and "device" memory do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr.as_ptr(), src.len()) };
        Ok(())
    }

    fn dtoh(&self, src: &EmuMem, dst: &mut [u8]) -> Result<()> {
        if dst.len() > src.layout.size() {
            return Err(err(format!(
                "copy of {} bytes from {}",
                dst.len(),
                src.layout.size()
            )));
        }
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn memzero(&self, mem: &EmuMem, bytes: usize) -> Result<()> {
        if bytes > mem.layout.size() {
            return Err(err(format!(
                "memset of {bytes} bytes in {}",
                mem.layout.size()
            )));
        }
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(mem.ptr.as_ptr(), 0, bytes) };
        Ok(())
    }

    unsafe fn launch(&self, name: &str, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()> {
        let f = self
            .kernels
            .get(name)
            .ok_or_else(|| err(format!("no kernel named {name}")))?;
        let threads = cfg.block.iter().product::<u32>();
        // The limits a GPU enforces (without opting in to more shared memory).
        if threads == 0
            || threads > 1024
            || cfg.grid.contains(&0)
            || cfg.grid[1] > 65535
            || cfg.grid[2] > 65535
            || cfg.shmem > 48 * 1024
        {
            return Err(err(format!("{name}: bad launch shape {cfg:?}")));
        }
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        f(
            gx,
            gy,
            gz,
            bx,
            by,
            bz,
            cfg.shmem as usize,
            params.as_mut_ptr(),
        );
        Ok(())
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        g.check().map_err(err)?;
        let (ra, ca) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (rb, cb) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        let esize = g.ab.size() as u64;
        for i in 0..g.batch {
            let a = g.a + (i * g.stride_a) as u64 * esize;
            let b = g.b + (i * g.stride_b) as u64 * esize;
            if g.ab == GemmType::F64 {
                let a = std::slice::from_raw_parts(a as *const f64, extent(ra, ca, g.lda));
                let b = std::slice::from_raw_parts(b as *const f64, extent(rb, cb, g.ldb));
                let c = (g.c as *mut f64).add(i * g.stride_c);
                product(g, a, b, c, g.alpha as f64, g.beta as f64);
            } else {
                let a = operand(a, g.ab, ra, ca, g.lda);
                let b = operand(b, g.ab, rb, cb, g.ldb);
                let c = (g.c as *mut f32).add(i * g.stride_c);
                product(g, &a, &b, c, g.alpha, g.beta);
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn mem_stats(&self) -> MemStats {
        self.tracker.stats()
    }

    fn available_memory(&self) -> Result<u64> {
        crate::backend::cpu::mem::host_available_memory() // device memory is host memory
    }

    fn reset_high_water(&self) {
        self.tracker.reset_high_water()
    }
}
