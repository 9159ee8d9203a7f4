//! Launch code for every kernel in kernels/*.cu, shared by both devices:
//! one file per .cu file, each wrapper only what its kernel needs. Every
//! launch goes through [`Launch`], which takes the kernel's parameters in
//! order — buffers with the element count the kernel touches through
//! them, scalars converted to the kernel's types — and launches only when
//! every check passed, so a bad shape is an error, never a wild access.
use half::{bf16, f16};

use super::buf::{DevBuf, Elem};
use super::device::{Args, Device, LaunchCfg};
use crate::{Error, Result};

mod adamw;
mod add;
mod attention;
mod attention_decode;
mod cast;
mod channel_stats;
mod compact;
mod cross_entropy;
mod embedding;
mod energy;
mod kl_div;
mod rmsnorm;
mod rope;
mod swiglu;

pub use adamw::{adamw, sum_squares, sum_squares_blocks};
pub use add::{add, add_bias, zero_rows};
pub use attention::{attention_bwd, attention_fwd};
pub use attention_decode::{attention_cached, decode_split, decode_split_window};
pub use cast::{cast, diff_f64};
pub use channel_stats::channel_stats;
pub use compact::{compact_cols, compact_cols_widen, compact_rows, Word};
pub use cross_entropy::{ce_grad, ce_stats};
pub use embedding::embedding;
pub use energy::{energy_bwd, energy_fwd};
pub use kl_div::{kl_grad, kl_stats, KlStats};
pub use rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
pub use rope::rope;
pub use swiglu::{swiglu_bwd, swiglu_fwd};

/// Kernels with an f32 and a bf16 variant.
pub trait Float: Elem {}
impl Float for f32 {}
impl Float for bf16 {}

/// Storage dtypes the casts convert between.
pub trait Stored: Elem {}
impl Stored for f32 {}
impl Stored for bf16 {}
impl Stored for f16 {}

fn bad<D: Device>(dev: &D, msg: String) -> Error {
    Error::Backend {
        backend: dev.backend_name(),
        msg,
    }
}

/// `v` as a kernel's `int`.
fn int<D: Device>(dev: &D, v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| bad(dev, format!("{what} = {v} does not fit in i32")))
}

/// One kernel launch, built in the order of the kernel's parameters.
/// A failed check is kept (the first one) and returned by `run` in place
/// of the launch.
struct Launch<'a, D: Device> {
    dev: &'a D,
    args: Args,
    err: Option<Error>,
    /// Index arrays uploaded for this launch alone (`indices`).
    temps: Vec<DevBuf<D, u32>>,
}

impl<'a, D: Device> Launch<'a, D> {
    fn new(dev: &'a D) -> Self {
        Launch {
            dev,
            args: Args::new(),
            err: None,
            temps: Vec::new(),
        }
    }

    /// Keeps the first failed check.
    fn check(mut self, r: Result<()>) -> Self {
        if let (None, Err(e)) = (&self.err, r) {
            self.err = Some(e);
        }
        self
    }

    /// A pointer parameter: buffer `b`, which must hold at least `need`
    /// elements, the extent the kernel touches through it.
    fn buf<T: Elem>(self, b: &DevBuf<D, T>, need: usize, what: &str) -> Self {
        let ok = if b.len() < need {
            Err(bad(
                self.dev,
                format!("{what}: {} elements, need {need}", b.len()),
            ))
        } else {
            Ok(())
        };
        let mut l = self.check(ok);
        l.args = l.args.ptr(b.addr(l.dev));
        l
    }

    /// A `const unsigned *` parameter: `idx` uploaded for this launch alone,
    /// every entry below `bound` (the rows the kernel indexes with it).
    fn indices(self, idx: &[u32], bound: usize, what: &str) -> Self {
        let ok = match idx.iter().find(|&&i| i as usize >= bound) {
            Some(i) => Err(bad(
                self.dev,
                format!("{what} {i} out of range (< {bound})"),
            )),
            None => Ok(()),
        };
        let mut l = self.check(ok);
        if l.err.is_some() || idx.is_empty() {
            // Never read: a failed check launches nothing, and no entry of an
            // empty array is in range.
            l.args = l.args.ptr(0);
            return l;
        }
        match DevBuf::upload(l.dev, idx) {
            Ok(b) => {
                l.args = l.args.ptr(b.addr(l.dev));
                l.temps.push(b);
                l
            }
            Err(e) => l.check(Err(e)),
        }
    }

    /// An `int` parameter, which `v` must fit.
    fn int(self, v: usize, what: &str) -> Self {
        let (v, ok) = match int(self.dev, v, what) {
            Ok(v) => (v, Ok(())),
            Err(e) => (0, Err(e)),
        };
        let mut l = self.check(ok);
        l.args = l.args.i32(v);
        l
    }

    /// A `long long` parameter (the element count of a grid-stride kernel).
    fn i64(mut self, v: usize) -> Self {
        self.args = self.args.i64(v as i64);
        self
    }

    fn f32(mut self, v: f32) -> Self {
        self.args = self.args.f32(v);
        self
    }

    /// The launch if every check passed so far, else the first failure:
    /// for wrappers that check several launches before running any.
    fn checked(self) -> Result<Self> {
        match self.err {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }

    /// Launches kernel `name` on `cfg` if every check passed.
    fn run(self, name: &str, cfg: LaunchCfg) -> Result<()> {
        self.run_if(true, name, cfg)
    }

    /// `run` when `work`; otherwise only the checks (kernels that take one
    /// block per row must not launch on zero rows: the grid is never empty).
    fn run_if(mut self, work: bool, name: &str, cfg: LaunchCfg) -> Result<()> {
        if let Some(e) = self.err {
            return Err(e);
        }
        if !work {
            return Ok(());
        }
        let mut params = self.args.params();
        // SAFETY: every wrapper passes the kernel's parameters in order, each
        // buffer checked (`buf`, `indices`) against the extent it touches.
        unsafe { self.dev.launch(name, cfg, &mut params) }?;
        if !self.temps.is_empty() {
            self.dev.synchronize()?; // the uploaded indices are freed on return
        }
        Ok(())
    }
}
