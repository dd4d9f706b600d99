//! Checkpoints.
//!
//! - [`ParallelVarBuilder`]: each rank's parameter slices, from Hugging Face safetensors files,
//!   a distributed checkpoint saved under any layout, or a deterministic initialisation, reading
//!   only the bytes of the rank's shard;
//! - [`save_checkpoint`] / [`export_hf`]: distributed, atomic saves and export back to HF format;
//! - [`gather_full`] / [`full_gradients`]: full tensors reassembled from every rank's parts;
//! - [`write_model`] / [`SafetensorsWriter`]: a model written as one safetensors file, tensor by
//!   tensor (the writer holds one tensor's bytes at a time).
//!
//! One file per concern, dependencies running one way:
//!
//! | file | what | uses |
//! |---|---|---|
//! | `placement` | [`Placement`] (which part a rank holds), [`Param`] | `crate::comm` |
//! | `checksum` | CRC-32C of stored pieces, block by block | — |
//! | `region` | boxes of a tensor; assembling a slice from stored pieces (exact coverage, checksums verified) | `placement`, `checksum` |
//! | `format` | the distributed format: `checkpoint.json`, atomic writes, [`read_metadata`] | `region` |
//! | `source` | stored tensors: HF safetensors files, distributed checkpoints | `format`, `region` |
//! | `init` | deterministic initialisation of any slice | `placement`, `crate::random` |
//! | `builder` | [`ParallelVarBuilder`] (also over a candle-nn `VarBuilder` / `VarMap`) | `source`, `init`, `region`, `placement` |
//! | `interop` | [`ParallelVarBuilder::to_candle_nn`]: candle-nn layers load from a builder | `builder`, `placement` |
//! | `save` | [`save_checkpoint`] | `format`, `placement`, `checksum` |
//! | `export` | [`export_hf`] | `format`, `source`, `region` |
//! | `gather` | [`gather_full`], [`full_gradients`], [`full_gradients_of`] | `placement` |
//! | `stream` | [`SafetensorsWriter`] (a file written tensor by tensor), [`write_model`] | `format`, `gather` |
mod builder;
mod checksum;
mod export;
mod format;
mod gather;
mod init;
mod interop;
mod placement;
mod region;
mod save;
mod source;
mod stream;

pub(crate) use builder::ParamMeta;
pub use builder::{ParallelVarBuilder, ParamPolicy};
pub use export::export_hf;
pub(crate) use format::safetensors_header;
pub use format::{
    create_dir, read_dir, read_file, read_metadata, read_text, write_atomic, write_file,
    CheckpointMeta, Piece, RankFile, TensorMeta, COMPLETE_FILE, FORMAT_VERSION, METADATA_FILE,
};
pub use gather::{full_gradients, full_gradients_of, gather_full, gather_model, merge_on_all};
pub(crate) use placement::holders;
pub use placement::{Param, Placement};
pub use save::{save_checkpoint, SaveOptions, SaveStage, ShardedTensor};
pub use source::{check_checkpoint, hf_safetensors_files, verify_checkpoint};
pub use stream::{write_model, write_model_parts, ModelPart, SafetensorsWriter, TensorEntry};
