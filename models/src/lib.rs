//! Parallel-aware models for candle-parallel, reading Hugging Face checkpoints by their names.
//!
//! - [`activations`]: the models' own count of their training activations, by recomputation
//!   mode and schedule;
//! - [`chat`]: chat conversations rendered by the model's template, and the tokens to learn;
//! - [`data`]: fine-tuning data files (JSONL, Parquet) streamed into padded or packed batches;
//! - [`llama`]: a Llama-style dense transformer with tensor parallelism;
//! - [`mixtral`]: a Mixtral-style sparse MoE transformer with expert and tensor parallelism
//!   (Mixtral, Qwen2-MoE, Qwen3-MoE);
//! - [`moe_config`]: their configuration, by `model_type`;
//! - [`packing`]: several examples per row, each with its own positions and attention;
//! - [`testing`]: deterministic inputs, error checks and random HF checkpoints for tests,
//!   examples and benchmarks;
//! - [`tokenizer`]: byte- and word-level tokenizers that need no download.
pub mod activations;
mod block;
pub mod chat;
pub mod data;
pub mod llama;
pub mod mixtral;
pub mod moe_config;
pub mod packing;
pub mod plan;
pub mod testing;
pub mod tokenizer;

pub use candle_parallel;

/// Reads `path` as the JSON of a `what` (e.g. "Llama config"), with errors naming the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> candle_core::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::msg(format!("{}: not a {what}: {e}", path.display())))
}
