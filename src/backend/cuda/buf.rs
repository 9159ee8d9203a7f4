//! Typed device buffers: an allocation of a [`Device`] plus its element count.
use std::marker::PhantomData;

use half::{bf16, f16};

use super::device::Device;
use crate::{Error, Result};

/// Element types that live in device buffers; `NAME` is the dtype suffix of kernel names.
pub trait Elem: bytemuck::Pod + Send + Sync {
    const NAME: &'static str;
}
impl Elem for u16 {
    const NAME: &'static str = "u16";
}
impl Elem for f32 {
    const NAME: &'static str = "f32";
}
impl Elem for bf16 {
    const NAME: &'static str = "bf16";
}
impl Elem for f16 {
    const NAME: &'static str = "f16";
}
impl Elem for u32 {
    const NAME: &'static str = "u32";
}
impl Elem for f64 {
    const NAME: &'static str = "f64";
}
impl Elem for i32 {
    const NAME: &'static str = "i32";
}

/// `len` elements of `T` in device memory.
pub struct DevBuf<D: Device, T: Elem> {
    mem: D::Mem,
    len: usize,
    _t: PhantomData<T>,
}

impl<D: Device, T: Elem> DevBuf<D, T> {
    /// Uninitialised buffer of `len` elements.
    pub fn alloc(dev: &D, len: usize) -> Result<Self> {
        Ok(DevBuf {
            mem: dev.alloc(len * std::mem::size_of::<T>())?,
            len,
            _t: PhantomData,
        })
    }
    pub fn zeros(dev: &D, len: usize) -> Result<Self> {
        let b = Self::alloc(dev, len)?;
        dev.memzero(&b.mem, len * std::mem::size_of::<T>())?;
        Ok(b)
    }
    pub fn upload(dev: &D, data: &[T]) -> Result<Self> {
        let b = Self::alloc(dev, data.len())?;
        dev.htod(bytemuck::cast_slice(data), &b.mem)?;
        Ok(b)
    }
    /// `upload` through `Device::htod_async`: usable after `Device::upload_fence`.
    /// The memory comes from `Device::alloc_for_upload`, which the upload
    /// stream may write while compute is still queued.
    pub fn upload_async(dev: &D, data: &[T]) -> Result<Self> {
        let src: &[u8] = bytemuck::cast_slice(data);
        Self::upload_async_with(dev, data.len(), &|dst| {
            stage(dst, src);
            Ok(())
        })
    }
    /// `upload_async` of `len` elements that `fill` writes, as little-endian
    /// bytes, into the staging buffer.
    pub fn upload_async_with(
        dev: &D,
        len: usize,
        fill: &dyn Fn(&mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        let bytes = len * std::mem::size_of::<T>();
        let b = DevBuf {
            mem: dev.alloc_for_upload(bytes)?,
            len,
            _t: PhantomData,
        };
        dev.htod_async(bytes, &b.mem, fill)?;
        Ok(b)
    }
    /// `upload` of raw little-endian bytes, a whole number of elements.
    pub fn upload_bytes(dev: &D, bytes: &[u8]) -> Result<Self> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size) {
            return Err(Error::Backend {
                backend: dev.backend_name(),
                msg: format!("{} bytes are not whole {}-byte elements", bytes.len(), size),
            });
        }
        let b = Self::alloc(dev, bytes.len() / size)?;
        dev.htod(bytes, &b.mem)?;
        Ok(b)
    }
    /// `download` as raw little-endian bytes.
    pub fn download_bytes(&self, dev: &D) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.bytes()];
        dev.dtoh(&self.mem, &mut out)?;
        Ok(out)
    }
    pub fn download(&self, dev: &D) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        dev.dtoh(&self.mem, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
    /// Overwrites the buffer from the host (`data.len() == self.len()`).
    pub fn write(&self, dev: &D, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::Backend {
                backend: dev.backend_name(),
                msg: format!(
                    "write of {} elements into a buffer of {}",
                    data.len(),
                    self.len
                ),
            });
        }
        dev.htod(bytemuck::cast_slice(data), &self.mem)
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Device address of element 0.
    pub fn addr(&self, dev: &D) -> u64 {
        dev.ptr(&self.mem)
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

/// Bytes per parallel task of `stage`.
const STAGE_CHUNK: usize = 4 << 20;

/// Copies `src` into a staging buffer `dst`, in parallel chunks (a
/// streamed 7B-sized layer is ~0.5 GB). On the H100 machine's 16 cores a
/// streamed forward pass over 4 Qwen2.5-7B-shaped layers took 1.41–1.53 s
/// against 1.56–1.74 s with one thread copying: a part of the host time
/// per streamed layer, not most of it.
fn stage(dst: &mut [u8], src: &[u8]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(STAGE_CHUNK)
        .zip(src.par_chunks(STAGE_CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}
