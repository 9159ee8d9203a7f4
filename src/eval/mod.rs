//! Measuring what pruning did: perplexity, reasoning accuracy (generation),
//! multiple choice, two models' accuracy compared problem by problem
//! (paired), the overlap of prunings, and speed (prefill, throughput);
//! and the model's own answers kept as traces (`traces`).
pub mod answer;
pub mod gen;
pub mod iou;
pub mod mc;
pub mod paired;
pub mod ppl;
pub mod prefill;
pub mod throughput;
pub mod traces;
