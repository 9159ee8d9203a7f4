//! Launches of kernels/swiglu.cu.
use super::{Float, Launch};
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::backend::GluAct;
use crate::Result;

/// swiglu.cu `swiglu_fwd_<T>`: `h = act(a) ⊙ b` over `a.len()` elements.
pub fn swiglu_fwd<D: Device, T: Float>(
    dev: &D,
    act: GluAct,
    a: &DevBuf<D, T>,
    b: &DevBuf<D, T>,
    h: &DevBuf<D, T>,
) -> Result<()> {
    let n = a.len();
    Launch::new(dev)
        .buf(a, n, "swiglu a")
        .buf(b, n, "swiglu b")
        .buf(h, n, "swiglu h")
        .i64(n)
        .int(act as usize, "act")
        .run(
            &format!("swiglu_fwd_{}", T::NAME),
            LaunchCfg::elementwise(n),
        )
}

/// swiglu.cu `swiglu_bwd_<T>`: `(da, db)` from `dh` over `dh.len()`
/// elements: `da = dh·b·act'(a)`, `db = dh·act(a)`.
pub fn swiglu_bwd<D: Device, T: Float>(
    dev: &D,
    act: GluAct,
    dh: &DevBuf<D, T>,
    a: &DevBuf<D, T>,
    b: &DevBuf<D, T>,
    da: &DevBuf<D, T>,
    db: &DevBuf<D, T>,
) -> Result<()> {
    let n = dh.len();
    Launch::new(dev)
        .buf(dh, n, "dh")
        .buf(a, n, "a")
        .buf(b, n, "b")
        .buf(da, n, "da")
        .buf(db, n, "db")
        .i64(n)
        .int(act as usize, "act")
        .run(
            &format!("swiglu_bwd_{}", T::NAME),
            LaunchCfg::elementwise(n),
        )
}
