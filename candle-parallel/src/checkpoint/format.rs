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

use super::region::Region;
use candle_core::{bail, DType, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The metadata format this version writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this library reads (version 1 has no region pieces).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
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
    /// An n-dimensional box of the tensor, `(start, len)` per dim (version 2), instead of
    /// `split`: a ZeRO partition of a flattened parameter is a few such boxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Vec<(usize, usize)>>,
    /// The piece's name in the rank file when it is not the tensor's (a rank holding several
    /// pieces of one tensor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// CRC-32C of each block of the piece's bytes ([`CheckpointMeta::crc_block_bytes`] each);
    /// absent in checkpoints written before checksums, which load unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<Vec<u32>>,
}

impl Piece {
    pub(crate) fn region(&self, dims: &[usize]) -> Region {
        if let Some(r) = &self.region {
            return Region(r.clone());
        }
        match self.split {
            None => Region::whole(dims),
            Some((dim, start, len)) => Region::whole(dims).restrict(dim, start, len),
        }
    }

    /// The piece's name in its rank file.
    pub fn key<'a>(&'a self, tensor: &'a str) -> &'a str {
        self.key.as_deref().unwrap_or(tensor)
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
    /// Each rank file: which rank wrote it and its size in bytes (a truncated or swapped file is
    /// caught before it is read).
    #[serde(default)]
    pub files: BTreeMap<String, RankFile>,
    /// The block size of the pieces' checksums.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc_block_bytes: Option<usize>,
}

/// A rank file of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RankFile {
    pub rank: usize,
    pub bytes: u64,
}

pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> candle_core::Error {
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

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io_err("cannot create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| io_err("cannot write", path, e))?;
    f.sync_all().map_err(|e| io_err("cannot sync", path, e))
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        // Directory fsync is best effort (not every filesystem supports it).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads and checks a checkpoint's metadata: the directory must hold a completed checkpoint of
/// a format version this library knows, with every rank file present.
/// The bytes of the file at `path`; an error names the path.
///
/// ```
/// let e = candle_parallel::checkpoint::read_file("/no/such/dir/config.json".as_ref()).unwrap_err();
/// assert!(e.to_string().contains("/no/such/dir/config.json"));
/// ```
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", path.display())))
}

/// The text of the file at `path`; an error names the path.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", path.display())))
}

/// Writes `contents` to the file at `path` (not atomically: see [`write_atomic`]); an error
/// names the path.
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, contents)
        .map_err(|e| candle_core::Error::msg(format!("cannot write {}: {e}", path.display())))
}

/// Creates the directory `dir` and its parents; an error names the directory.
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        candle_core::Error::msg(format!(
            "cannot create the directory {}: {e}",
            dir.display()
        ))
    })
}

/// The entries of the directory `dir`; an error names the directory.
pub fn read_dir(dir: &Path) -> Result<std::fs::ReadDir> {
    std::fs::read_dir(dir).map_err(|e| {
        candle_core::Error::msg(format!("cannot read the directory {}: {e}", dir.display()))
    })
}

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
        Some(v) if (OLDEST_FORMAT_VERSION as u64..=FORMAT_VERSION as u64).contains(&v) => {}
        Some(v) => bail!(
            "{}: checkpoint format version {v} is not one this library reads (it reads {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); \
             use the candle-parallel version that wrote it",
            meta_path.display()
        ),
        None => bail!("{}: no format_version field", meta_path.display()),
    }
    let meta: CheckpointMeta = serde_json::from_value(version).map_err(|e| {
        candle_core::Error::msg(format!("{}: bad metadata: {e}", meta_path.display()))
    })?;
    for (name, t) in &meta.tensors {
        t.dtype().map_err(|e| {
            candle_core::Error::msg(format!("{}: tensor {name}: {e}", meta_path.display()))
        })?;
        for p in &t.pieces {
            if let Some(r) = &p.region {
                let fits = r.len() == t.dims.len()
                    && r.iter()
                        .zip(&t.dims)
                        .all(|(&(s, l), &d)| s.checked_add(l).is_some_and(|e| e <= d));
                if !fits || p.split.is_some() {
                    bail!(
                        "{}: tensor {name} of shape {:?}: the piece in {} claims the region {r:?}, which the tensor does not have: the metadata is corrupt",
                        meta_path.display(),
                        t.dims,
                        p.file
                    )
                }
            }
            if let Some((dim, start, len)) = p.split {
                if dim >= t.dims.len() || start + len > t.dims[dim] {
                    bail!(
                        "{}: tensor {name} of shape {:?}: the piece in {} claims rows \
                         {start}..{} of dim {dim}, which the tensor does not have: the metadata \
                         is corrupt",
                        meta_path.display(),
                        t.dims,
                        p.file,
                        start + len
                    )
                }
            }
            if !dir.join(&p.file).is_file() {
                bail!(
                    "{}: names {} which does not exist",
                    meta_path.display(),
                    p.file
                )
            }
        }
    }
    for (file, f) in &meta.files {
        let path = dir.join(file);
        let len = std::fs::metadata(&path)
            .map_err(|e| io_err("cannot read", &path, e))?
            .len();
        if len != f.bytes {
            bail!(
                "{} is {len} bytes but {METADATA_FILE} says rank {} wrote {} bytes: the file \
                 was truncated or replaced",
                path.display(),
                f.rank,
                f.bytes
            )
        }
    }
    Ok(meta)
}
