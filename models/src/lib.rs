//! Parallel-aware models for candle-parallel.
//!
//! The Llama-style and Mixtral-style models (HF checkpoint names, any tensor / expert parallel
//! layout) land here once the tensor-parallel layers and sharded checkpoints exist. The crate is
//! part of the workspace from the start so that the layout users see does not change.
pub use candle_parallel;
