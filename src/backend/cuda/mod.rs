//! The CUDA backend: our kernels (kernels/*.cu) for every op but the large
//! matrix products, which go to cuBLAS; bf16 weights, f32 activations, f32
//! accumulation. It runs on a [`Device`]: [`GpuDevice`] (a real GPU through
//! cudarc) or [`EmuDevice`] (the same kernels built for the host, see
//! kernels/compat.cuh), with one launch code path for both.
pub mod backend;
pub mod buf;
pub mod device;
pub mod emu;
pub mod gpu;
pub mod kernels;

pub use backend::CudaBackend;
pub use buf::{DevBuf, Elem};
pub use device::{Args, Device, Gemm, GemmType, LaunchCfg, MemStats};
pub use emu::EmuDevice;
pub use gpu::GpuDevice;

include!(concat!(env!("OUT_DIR"), "/fatbin.rs"));

/// Whether this binary carries GPU kernels (nvcc was found at build time).
pub fn has_kernels() -> bool {
    FATBIN.is_some()
}
