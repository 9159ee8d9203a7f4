//! Measuring what pruning did: perplexity, reasoning accuracy (generation),
//! multiple choice, the overlap of prunings, and speed (prefill, throughput).
pub mod answer;
pub mod gen;
pub mod iou;
pub mod mc;
pub mod ppl;
pub mod prefill;
pub mod throughput;
