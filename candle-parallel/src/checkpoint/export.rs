//! Export of a distributed checkpoint back to the Hugging Face layout.

use super::format::{io_err, read_metadata, write_atomic};
use super::region::assemble;
use super::source::{DistSource, TensorSource};
use super::stream::SafetensorsWriter;
use candle_core::{bail, Device, Result, Tensor};
use std::path::{Path, PathBuf};

/// Writes the checkpoint's model tensors (not `optimizer.*`) as a Hugging Face checkpoint in
/// `out`: `model.safetensors`, or with `max_file_bytes`, files of at most that size
/// (`model-00001-of-0000N.safetensors`) and `model.safetensors.index.json`; plus `config.json`.
/// Tensors keep the dtype they were saved in; tokenizer files found in the checkpoint
/// directory are copied along. Returns the files written.
pub fn export_hf(
    checkpoint: &Path,
    out: &Path,
    max_file_bytes: Option<u64>,
) -> Result<Vec<PathBuf>> {
    let meta = read_metadata(checkpoint)?;
    let names: Vec<&String> = meta
        .tensors
        .keys()
        .filter(|n| !n.starts_with("optimizer."))
        .collect();
    if names.is_empty() {
        bail!(
            "checkpoint {} holds no model tensors to export",
            checkpoint.display()
        )
    }
    std::fs::create_dir_all(out).map_err(|e| io_err("cannot create", out, e))?;
    // Group the tensors into files of at most max_file_bytes (one tensor may exceed it alone).
    let size = |n: &str| meta.tensors[n].size_in_bytes();
    let mut groups: Vec<Vec<&String>> = vec![Vec::new()];
    let mut current = 0u64;
    for n in &names {
        let s = size(n)?;
        if let Some(max) = max_file_bytes {
            if current > 0 && current + s > max {
                groups.push(Vec::new());
                current = 0;
            }
        }
        groups.last_mut().expect("one group").push(n);
        current += s;
    }
    let count = groups.len();
    let file_name = |i: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        }
    };
    let source = DistSource::open(checkpoint)?;
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, group) in groups.iter().enumerate() {
        // Written tensor by tensor: one tensor's bytes in memory at a time.
        let entries = group
            .iter()
            .map(|n| {
                let t = &meta.tensors[n.as_str()];
                Ok((n.to_string(), t.dtype()?, t.dims.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let path = out.join(file_name(i));
        let mut writer = SafetensorsWriter::create(&path, entries)?;
        for n in group {
            let dims = &meta.tensors[n.as_str()].dims;
            let (dtype, pieces) = source.pieces(n, dims)?;
            let (bytes, dims, _) = assemble(n, dims, None, dtype, &pieces)?;
            let t = Tensor::from_raw_buffer(&bytes, dtype, &dims, &Device::Cpu)?;
            drop(bytes);
            writer.write(n, &t)?;
            weight_map.insert(n.to_string(), serde_json::Value::String(file_name(i)));
            total += size(n)?;
        }
        writer.finish()?;
        written.push(path);
    }
    if count > 1 {
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = out.join("model.safetensors.index.json");
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(&index).map_err(candle_core::Error::wrap)?,
        )?;
        written.push(path);
    }
    // Tokenizer files saved beside the checkpoint travel with the export.
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = checkpoint.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| io_err("cannot read", &src, e))?;
            let path = out.join(name);
            write_atomic(&path, &bytes)?;
            written.push(path);
        }
    }
    if !meta.config.is_null() {
        let path = out.join("config.json");
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(&meta.config).map_err(candle_core::Error::wrap)?,
        )?;
        written.push(path);
        // What transformers' `generate` reads by default, as `save_pretrained` writes it: the
        // special tokens of the config.
        let mut generation = serde_json::Map::new();
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = meta.config.get(key).filter(|v| !v.is_null()) {
                generation.insert(key.into(), v.clone());
            }
        }
        if !generation.is_empty() {
            let path = out.join("generation_config.json");
            let json = serde_json::Value::Object(generation);
            write_atomic(
                &path,
                &serde_json::to_vec_pretty(&json).map_err(candle_core::Error::wrap)?,
            )?;
            written.push(path);
        }
    }
    Ok(written)
}
