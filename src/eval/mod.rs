//! Measuring what pruning did: perplexity, reasoning accuracy (generation),
//! multiple choice and the overlap of prunings.
pub mod answer;
pub mod gen;
pub mod iou;
pub mod mc;
pub mod ppl;
pub mod prefill;
