//! Distributed checkpoints: one safetensors file per rank with that rank's pieces, plus one
//! metadata file; saved atomically; loadable under any other layout; exportable to HF format.
//!
//! A checkpoint directory holds:
//!
//! ```text
//! rank-00000.safetensors ...   each rank's pieces (padding stripped), under the full names
//! checkpoint.json              format version, mesh, step, model config, and for every tensor
//!                              its full shape, dtype and which rank holds which rows
//! COMPLETE                     written last: a directory without it is an interrupted save
//! ```
//!
//! Every file is written under a temporary name, synced, then renamed, and the `COMPLETE`
//! marker comes last, so a crash at any point leaves earlier checkpoints untouched and this one
//! recognisably incomplete.

use super::var_builder::{Region, StoredPiece};
use super::{Shard, ShardedVarBuilder};
use crate::comm::Comm;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The metadata format this version writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The metadata file of a checkpoint directory.
pub const METADATA_FILE: &str = "checkpoint.json";
/// The marker written last by a completed save.
pub const COMPLETE_FILE: &str = "COMPLETE";

/// Which rows of a tensor one rank's file holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Piece {
    pub rank: usize,
    pub file: String,
    /// `None`: the whole tensor; otherwise `len` rows from `start` along `dim`.
    pub split: Option<(usize, usize, usize)>,
}

impl Piece {
    fn region(&self, dims: &[usize]) -> Region {
        match self.split {
            None => Region::whole(dims),
            Some((dim, start, len)) => Region::whole(dims).restrict(dim, start, len),
        }
    }
}

/// A tensor of the checkpoint: its full shape, its dtype and where its pieces are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorMeta {
    pub dims: Vec<usize>,
    pub dtype: String,
    pub pieces: Vec<Piece>,
}

impl TensorMeta {
    /// The stored dtype.
    pub fn dtype(&self) -> Result<DType> {
        self.dtype.to_lowercase().parse().map_err(|_| {
            candle_core::Error::msg(format!(
                "unknown dtype {} in checkpoint metadata",
                self.dtype
            ))
        })
    }

    /// Bytes of the full tensor.
    pub fn size_in_bytes(&self) -> Result<u64> {
        Ok((self.dims.iter().product::<usize>() * self.dtype()?.size_in_bytes()) as u64)
    }
}

/// The contents of `checkpoint.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub world_size: usize,
    /// The layout it was saved under, e.g. `ep=2,tp=2`.
    pub mesh: String,
    /// The training step.
    pub step: u64,
    /// The model's `config.json`.
    pub config: serde_json::Value,
    pub tensors: BTreeMap<String, TensorMeta>,
}

/// One rank's part of a named tensor, as saved.
#[derive(Clone, Debug)]
pub struct ShardedTensor {
    pub name: String,
    /// This rank's part (padding rows, if any, are dropped when saving).
    pub local: Tensor,
    pub full_dims: Vec<usize>,
    pub shard: Shard,
}

impl From<&super::Param> for ShardedTensor {
    fn from(p: &super::Param) -> Self {
        Self {
            name: p.name.clone(),
            local: p.var.as_tensor().detach(),
            full_dims: p.full_dims.clone(),
            shard: p.shard,
        }
    }
}

/// Points where a save can be stopped, to test that an interrupted save is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveStage {
    /// Each rank's file is written under its temporary name.
    RankFileWritten,
    /// Each rank's file is renamed into place.
    RankFileRenamed,
    /// The metadata file is in place, the completion marker is not.
    MetadataWritten,
}

/// What a save records besides the tensors.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    pub step: u64,
    /// The layout, for the metadata (e.g. `MeshShape::to_string()`).
    pub mesh: String,
    /// The model config (`config.json` contents).
    pub config: serde_json::Value,
    /// Testing hook: fail every rank at this stage, leaving the files as a crash would.
    pub interrupt_at: Option<SaveStage>,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::msg(format!("{what} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename (and fsync of the
/// directory so that the rename itself is durable).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("cannot rename into", path, e))?;
    sync_dir(path)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io_err("cannot create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| io_err("cannot write", path, e))?;
    f.sync_all().map_err(|e| io_err("cannot sync", path, e))
}

fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        // Directory fsync is best effort (not every filesystem supports it).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Saves every rank's `tensors` into the checkpoint directory `dir` (collective over `comm`,
/// the world). `dir` must not hold a completed checkpoint already: checkpoints are never
/// overwritten in place, so the previous one survives a crash.
pub fn save_checkpoint(
    dir: &Path,
    tensors: &[ShardedTensor],
    opts: &SaveOptions,
    comm: &Comm,
) -> Result<()> {
    let rank = comm.rank();
    if dir.join(COMPLETE_FILE).exists() {
        bail!(
            "{} already holds a completed checkpoint: save into a new directory (checkpoints are \
             never overwritten, so that a crash cannot lose the last good one)",
            dir.display()
        )
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    let file = format!("rank-{rank:05}.safetensors");
    let mut local = Vec::with_capacity(tensors.len());
    let mut pieces = Vec::with_capacity(tensors.len());
    for t in tensors {
        let split = match t.shard.slice(&t.full_dims, &t.name)? {
            None => None,
            Some(sl) => {
                let mut dims = t.full_dims.clone();
                dims[sl.dim] = sl.padded;
                if t.local.dims() != dims.as_slice() {
                    bail!(
                        "save: rank {rank} holds {} with shape {:?} but its shard {:?} of {:?} has {dims:?}",
                        t.name,
                        t.local.dims(),
                        t.shard,
                        t.full_dims
                    )
                }
                Some((sl.dim, sl.start, sl.len))
            }
        };
        let stored = match split {
            Some((dim, _, len)) => t.local.narrow(dim, 0, len)?.contiguous()?,
            None => t.local.contiguous()?,
        };
        pieces.push((
            t.name.clone(),
            t.full_dims.clone(),
            format!("{:?}", stored.dtype()),
            split,
        ));
        local.push((t.name.clone(), stored));
    }
    let bytes =
        safetensors::serialize(local.iter().map(|(n, t)| (n.as_str(), t)), None).map_err(|e| {
            candle_core::Error::msg(format!("cannot serialise rank {rank}'s tensors: {e}"))
        })?;
    let path = dir.join(&file);
    write_synced(&tmp_path(&path), &bytes)?;
    if opts.interrupt_at == Some(SaveStage::RankFileWritten) {
        bail!("save interrupted after writing rank {rank}'s temporary file (testing hook)")
    }
    std::fs::rename(tmp_path(&path), &path).map_err(|e| io_err("cannot rename into", &path, e))?;
    sync_dir(&path)?;
    if opts.interrupt_at == Some(SaveStage::RankFileRenamed) {
        bail!("save interrupted after renaming rank {rank}'s file (testing hook)")
    }

    // Everyone's pieces, for the metadata; this also waits until every file is in place.
    let mine = serde_json::to_vec(&pieces).map_err(candle_core::Error::wrap)?;
    let all = comm.all_gather_bytes(&mine)?;
    if rank == 0 {
        let mut tensors: BTreeMap<String, TensorMeta> = BTreeMap::new();
        for (r, bytes) in all.iter().enumerate() {
            type Entry = (String, Vec<usize>, String, Option<(usize, usize, usize)>);
            let entries: Vec<Entry> =
                serde_json::from_slice(bytes).map_err(candle_core::Error::wrap)?;
            for (name, dims, dtype, split) in entries {
                let meta = tensors.entry(name.clone()).or_insert_with(|| TensorMeta {
                    dims: dims.clone(),
                    dtype: dtype.clone(),
                    pieces: Vec::new(),
                });
                if meta.dims != dims || meta.dtype != dtype {
                    bail!(
                        "save: ranks disagree on tensor {name}: {:?} {} vs rank {r}'s {dims:?} {dtype}",
                        meta.dims,
                        meta.dtype
                    )
                }
                meta.pieces.push(Piece {
                    rank: r,
                    file: format!("rank-{r:05}.safetensors"),
                    split,
                });
            }
        }
        let meta = CheckpointMeta {
            format_version: FORMAT_VERSION,
            world_size: comm.size(),
            mesh: opts.mesh.clone(),
            step: opts.step,
            config: opts.config.clone(),
            tensors,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(candle_core::Error::wrap)?;
        write_atomic(&dir.join(METADATA_FILE), &json)?;
        if opts.interrupt_at == Some(SaveStage::MetadataWritten) {
            bail!("save interrupted after writing the metadata (testing hook)")
        }
        write_atomic(
            &dir.join(COMPLETE_FILE),
            format!("step {}\n", opts.step).as_bytes(),
        )?;
    } else if opts.interrupt_at == Some(SaveStage::MetadataWritten) {
        bail!("save interrupted after writing the metadata (testing hook)")
    }
    comm.barrier()?;
    tracing::info!(dir = %dir.display(), step = opts.step, "checkpoint saved");
    Ok(())
}

/// Reads and checks a checkpoint's metadata: the directory must hold a completed checkpoint of
/// a format version this library knows, with every rank file present.
pub fn read_metadata(dir: &Path) -> Result<CheckpointMeta> {
    let meta_path = dir.join(METADATA_FILE);
    if !dir.is_dir() {
        bail!("checkpoint directory {} does not exist", dir.display())
    }
    if !dir.join(COMPLETE_FILE).is_file() {
        bail!(
            "{} is an incomplete checkpoint (no {COMPLETE_FILE} marker: its save was interrupted); \
             load the previous checkpoint instead",
            dir.display()
        )
    }
    let text =
        std::fs::read_to_string(&meta_path).map_err(|e| io_err("cannot read", &meta_path, e))?;
    let version: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        candle_core::Error::msg(format!("{}: not valid JSON: {e}", meta_path.display()))
    })?;
    match version.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == FORMAT_VERSION as u64 => {}
        Some(v) => bail!(
            "{}: checkpoint format version {v} is not one this library reads (it reads {FORMAT_VERSION}); \
             use the candle-parallel version that wrote it",
            meta_path.display()
        ),
        None => bail!("{}: no format_version field", meta_path.display()),
    }
    let meta: CheckpointMeta = serde_json::from_value(version).map_err(|e| {
        candle_core::Error::msg(format!("{}: bad metadata: {e}", meta_path.display()))
    })?;
    for t in meta.tensors.values() {
        for p in &t.pieces {
            if !dir.join(&p.file).is_file() {
                bail!(
                    "{}: names {} which does not exist",
                    meta_path.display(),
                    p.file
                )
            }
        }
    }
    Ok(meta)
}

/// A distributed checkpoint opened for reading: its metadata and every rank file, mapped.
pub(crate) struct DistSource {
    pub meta: CheckpointMeta,
    pub dir: PathBuf,
    files: BTreeMap<String, MmapedSafetensors>,
}

impl DistSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta = read_metadata(dir)?;
        let mut files = BTreeMap::new();
        for t in meta.tensors.values() {
            for p in &t.pieces {
                if !files.contains_key(&p.file) {
                    let path = dir.join(&p.file);
                    // SAFETY: mapped read-only; checkpoint files are not modified once complete.
                    let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
                        candle_core::Error::msg(format!("cannot read {}: {e}", path.display()))
                    })?;
                    files.insert(p.file.clone(), st);
                }
            }
        }
        Ok(Self {
            meta,
            dir: dir.to_path_buf(),
            files,
        })
    }

    /// The regions of `name` and their bytes, straight from the mapped files.
    pub fn pieces(&self, name: &str, full: &[usize]) -> Result<(DType, Vec<StoredPiece<'_>>)> {
        let Some(t) = self.meta.tensors.get(name) else {
            bail!(
                "tensor {name} is missing from checkpoint {}",
                self.dir.display()
            )
        };
        if t.dims != full {
            bail!(
                "tensor {name} in checkpoint {} has shape {:?} but the model config expects {full:?}",
                self.dir.display(),
                t.dims
            )
        }
        let mut out = Vec::with_capacity(t.pieces.len());
        let mut dtype = None;
        for p in &t.pieces {
            let view = self.files[&p.file].get(name).map_err(|_| {
                candle_core::Error::msg(format!(
                    "tensor {name} is missing from {} although {METADATA_FILE} lists it",
                    self.dir.join(&p.file).display()
                ))
            })?;
            dtype = Some(DType::try_from(view.dtype())?);
            let region = p.region(&t.dims);
            if view.shape() != region.lens() {
                bail!(
                    "tensor {name} in {} has shape {:?} but {METADATA_FILE} says {:?}",
                    p.file,
                    view.shape(),
                    region.lens()
                )
            }
            out.push((region, view.data()));
        }
        match dtype {
            Some(d) => Ok((d, out)),
            None => bail!(
                "tensor {name} has no pieces in checkpoint {}",
                self.dir.display()
            ),
        }
    }
}

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
        let mut tensors: Vec<(&str, Tensor)> = Vec::with_capacity(group.len());
        for n in group {
            let dims = &meta.tensors[n.as_str()].dims;
            let (dtype, pieces) = source.pieces(n, dims)?;
            let reader = ShardedVarBuilder::for_export(dtype);
            tensors.push((n.as_str(), reader.assemble(n, dims, None, dtype, &pieces)?));
            weight_map.insert(n.to_string(), serde_json::Value::String(file_name(i)));
            total += size(n)?;
        }
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), None).map_err(|e| {
                candle_core::Error::msg(format!("cannot serialise {}: {e}", file_name(i)))
            })?;
        let path = out.join(file_name(i));
        write_atomic(&path, &bytes)?;
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
    }
    Ok(written)
}

impl ShardedVarBuilder {
    /// Parameters read from a distributed checkpoint saved under any layout: each rank reads
    /// only the byte ranges of the saved pieces that overlap its own shard.
    pub fn from_checkpoint(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::from_dist(DistSource::open(dir)?, dtype, device))
    }
}
