//! Everything from calibration to the pruned model directory (METHODS.md
//! §2–7): the statistics pass, its file, the scores, the allocation, the
//! compaction and the export.
//!
//! - [`stats`]: the per-channel sums s1, s2, f2, k1, tk and their file.
//! - [`methods`]: one score per channel for each method.
//! - [`allocation`]: which channels each layer keeps at a sparsity.
//! - [`calibrate`]: the statistics pass over calibration windows.
//! - [`layer_major`]: the same pass a chunk of batches at a time, layer by layer.
//! - [`shard`]: which share of a calibration set one machine scores.
//! - [`compact`]: gathering kept channels out of the FFN weights.
//! - [`export`]: the pruned model directory (weights, config, pruning.json).
//! - [`job`]: a pruning request as typed values; where models are written.
//! - [`pipeline`]: score → allocate → compact → export, per sparsity.
pub mod allocation;
pub mod calibrate;
pub mod compact;
pub mod export;
pub mod job;
pub mod layer_major;
pub mod methods;
pub mod pipeline;
pub mod refit;
pub mod shard;
pub mod stats;
pub mod traces;

pub use allocation::{allocate, allocate_from, floors, Allocation};
pub use job::{ExportLayout, PruneJob, Sparsity};
pub use methods::{scores, ColumnNorms, Method};
pub use stats::{
    merge, EnergyAt, LayerStats, Norms, Objective, Objectives, ShardRecord, Stats, StatsMeta,
    TraceSource,
};
