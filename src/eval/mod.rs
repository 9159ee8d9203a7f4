//! Measuring what pruning did: perplexity (and, later, accuracy and speed).
pub mod iou;
pub mod ppl;
