//! Checkpoints.
//!
//! - [`ShardedVarBuilder`]: each rank's parameter slices, from Hugging Face safetensors files,
//!   a distributed checkpoint saved under any layout, or a deterministic initialisation, reading
//!   only the bytes of the rank's shard;
//! - [`save_checkpoint`] / [`export_hf`]: distributed, atomic saves and export back to HF format;
//! - [`gather_full`] / [`full_gradients`]: full tensors reassembled from every rank's parts.
//!
//! One file per concern, dependencies running one way:
//!
//! | file | what | uses |
//! |---|---|---|
//! | `shard` | [`Shard`] (which part a rank holds), [`Param`] | — |
//! | `region` | boxes of a tensor; assembling a slice from stored pieces | `shard` |
//! | `format` | the distributed format: `checkpoint.json`, atomic writes, [`read_metadata`] | `region` |
//! | `source` | stored tensors: HF safetensors files, distributed checkpoints | `format`, `region` |
//! | `init` | deterministic initialisation of any slice | `shard`, `crate::random` |
//! | `builder` | [`ShardedVarBuilder`] | `source`, `init`, `region`, `shard` |
//! | `save` | [`save_checkpoint`] | `format`, `shard` |
//! | `export` | [`export_hf`] | `format`, `source`, `region` |
//! | `gather` | [`gather_full`], [`full_gradients`] | `shard` |
mod builder;
mod export;
mod format;
mod gather;
mod init;
mod region;
mod save;
mod shard;
mod source;

pub use builder::ShardedVarBuilder;
pub use export::export_hf;
pub use format::{
    read_metadata, write_atomic, CheckpointMeta, Piece, TensorMeta, COMPLETE_FILE, FORMAT_VERSION,
    METADATA_FILE,
};
pub use gather::{full_gradients, gather_full};
pub use save::{save_checkpoint, SaveOptions, SaveStage, ShardedTensor};
pub use shard::{Param, Shard};
pub use source::hf_safetensors_files;
