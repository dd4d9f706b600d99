//! Checkpoints.
//!
//! - [`ShardedVarBuilder`]: each rank's parameter slices, from Hugging Face safetensors files,
//!   a distributed checkpoint saved under any layout, or a deterministic initialisation, reading
//!   only the bytes of the rank's shard;
//! - [`save_checkpoint`] / [`export_hf`]: distributed, atomic saves and export back to HF format.
pub mod dist;
pub mod var_builder;

pub use dist::{
    export_hf, read_metadata, save_checkpoint, write_atomic, CheckpointMeta, Piece, SaveOptions,
    SaveStage, ShardedTensor, TensorMeta, COMPLETE_FILE, FORMAT_VERSION, METADATA_FILE,
};
pub use var_builder::{
    full_gradients, gather_full, hf_safetensors_files, Param, Shard, ShardedVarBuilder,
};
