//! Checkpoints: building each rank's parameter slices from Hugging Face safetensors files (or a
//! deterministic initialisation), reading only the bytes of the rank's shard.
pub mod var_builder;

pub use var_builder::{
    full_gradients, gather_full, hf_safetensors_files, Param, Shard, ShardedVarBuilder,
};
