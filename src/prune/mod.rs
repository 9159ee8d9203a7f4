//! Statistics, scores and allocation (METHODS.md §4–6): from the sufficient
//! statistics of a calibration pass to each layer's kept FFN channels.
//!
//! - [`stats`]: the per-channel sums s1, s2, f2, k1, tk and their file.
//! - [`methods`]: one score per channel for each method.
//! - [`allocation`]: which channels each layer keeps at a sparsity.
//! - [`calibrate`]: the statistics pass over calibration windows.
//! - [`compact`]: gathering kept channels out of the FFN weights.
//! - [`pipeline`]: score → allocate → compact → export, per sparsity.
pub mod allocation;
pub mod calibrate;
pub mod compact;
pub mod methods;
pub mod pipeline;
pub mod stats;

pub use allocation::{allocate, floors, Allocation};
pub use methods::{scores, ColumnNorms, Method};
pub use stats::{merge, EnergyAt, LayerStats, Objective, Objectives, Stats, StatsMeta};
