//! Recovery of a pruned model by LoRA distillation from the dense model
//! (`recover`, METHODS.md section 10).
pub mod step;
