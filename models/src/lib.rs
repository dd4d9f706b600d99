//! Parallel-aware models for candle-parallel, reading Hugging Face checkpoints by their names.
//!
//! - [`llama`]: a Llama-style dense transformer with tensor parallelism.
pub mod llama;

pub use candle_parallel;
