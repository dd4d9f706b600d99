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
        region_of(dims, self.split, self.region.as_ref())
    }

    /// The piece's name in its rank file.
    pub fn key<'a>(&'a self, tensor: &'a str) -> &'a str {
        self.key.as_deref().unwrap_or(tensor)
    }
}

/// The region of a tensor of `dims` that a piece with `split` or `region` holds.
pub(crate) fn region_of(
    dims: &[usize],
    split: Option<(usize, usize, usize)>,
    region: Option<&Vec<(usize, usize)>>,
) -> Region {
    if let Some(r) = region {
        return Region(r.clone());
    }
    match split {
        None => Region::whole(dims),
        Some((dim, start, len)) => Region::whole(dims).restrict(dim, start, len),
    }
}

/// The key, in a rank file's safetensors header metadata, of where its piece `key` belongs.
pub(crate) fn place_key(key: &str) -> String {
    format!("candle-parallel.place.{key}")
}

/// Where a piece belongs, as its rank file's header records it: the tensor's name, full shape
/// and the piece's region. The metadata must say the same: a rewrite of `checkpoint.json`
/// alone cannot move a piece.
pub(crate) fn place_of(name: &str, dims: &[usize], region: &Region) -> String {
    format!("{name} {dims:?} {:?}", region.0)
}

/// The key of the step a rank file records.
pub(crate) const STEP_KEY: &str = "candle-parallel.step";

/// The key of the checksum of the checkpoint's description (world size, mesh, config) that
/// a rank file records.
pub(crate) const DESCRIPTION_KEY: &str = "candle-parallel.description-crc32c";

/// The CRC-32C of a checkpoint's world size, mesh and model config (serialised canonically:
/// the config's keys sorted), as rank files record it.
pub(crate) fn description_crc(world_size: usize, mesh: &str, config: &serde_json::Value) -> String {
    let text = serde_json::json!([world_size, mesh, config]).to_string();
    format!("{:08x}", super::checksum::crc32c(text.as_bytes()))
}

/// The header metadata (`__metadata__`) of the safetensors file at `path`, read from its header
/// alone (empty where it has none).
pub(crate) fn safetensors_header_metadata(
    path: &Path,
) -> Result<std::collections::HashMap<String, String>> {
    let header = safetensors_header(path)?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// The JSON header of the safetensors file at `path`, read alone (not the data).
pub(crate) fn safetensors_header(
    path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let named =
        |e: std::io::Error| candle_core::Error::msg(format!("cannot read {}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(named)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(named)?;
    let len = u64::from_le_bytes(len);
    let size = f.metadata().map_err(named)?.len();
    if len > size.saturating_sub(8) || len > 100 << 20 {
        bail!(
            "{}: a safetensors header of {len} bytes in a file of {size}: the file is corrupt",
            path.display()
        )
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(named)?;
    serde_json::from_slice(&header).map_err(|e| {
        candle_core::Error::msg(format!("{}: its header is not JSON: {e}", path.display()))
    })
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
