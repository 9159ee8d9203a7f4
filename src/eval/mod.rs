//! Measuring what pruning did: perplexity (and, later, accuracy and speed).
pub mod answer;
pub mod gen;
pub mod mc;
pub mod ppl;
