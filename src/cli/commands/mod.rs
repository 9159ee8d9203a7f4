//! One file per command: each turns its arguments into library values,
//! calls the library and prints the result.
pub mod bench;
pub mod eval;
pub mod import;
pub mod iou;
pub mod plan;
pub mod progressive;
pub mod prune;
pub mod recover;
pub mod report;
pub mod score;
pub mod stats;
pub mod traces;
