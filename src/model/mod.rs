//! The transformer: configuration, weights, forward and backward passes,
//! written once over the `Backend` trait.
pub mod backward;
pub mod config;
pub mod decode;
pub mod forward;
pub mod keep;
pub mod layer_major;
pub mod lora;
pub mod objective;
pub mod weights;

pub use config::ModelConfig;
pub use forward::Geometry;
pub use weights::Model;
