//! The transformer: configuration, weights, forward and backward passes,
//! written once over the `Backend` trait.
pub mod config;
