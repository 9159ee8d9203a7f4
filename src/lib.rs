//! rku-engine: reasoning-aware structural pruning of FFN channels.
//!
//! Data flows one way: `io` → `model` → `backend` → `prune`/`eval` → `io`.
pub mod backend;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod plan;
pub mod progress;
pub mod progressive;
pub mod prune;
pub mod quant;
pub mod recover;
pub mod report;

pub use error::{Error, Result};
