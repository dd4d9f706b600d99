//! Parallel-aware models for candle-parallel, reading Hugging Face checkpoints by their names.
//!
//! - [`llama`]: a Llama-style dense transformer with tensor parallelism;
//! - [`mixtral`]: a Mixtral-style sparse MoE transformer with expert and tensor parallelism.
pub mod llama;
pub mod mixtral;

pub use candle_parallel;
