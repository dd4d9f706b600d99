//! Saving a distributed checkpoint: each rank writes its pieces, rank 0 the metadata, all
//! atomically (see [`super::format`]).

use super::checksum::{block_crcs, BLOCK_BYTES};
use super::format::RankFile;
use super::format::{
    io_err, sync_dir, tmp_path, write_atomic, write_synced, CheckpointMeta, Piece, TensorMeta,
    COMPLETE_FILE, FORMAT_VERSION, METADATA_FILE,
};
use super::placement::{Param, Placement};
use crate::comm::Comm;
use candle_core::{bail, Result, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// One rank's part of a named tensor, as saved.
#[derive(Clone, Debug)]
pub struct ShardedTensor {
    pub name: String,
    /// This rank's part (padding rows, if any, are dropped when saving).
    pub local: Tensor,
    pub full_dims: Vec<usize>,
    pub placement: Placement,
    /// When set, `local` is exactly this box of the full tensor, `(start, len)` per dim, and
    /// `placement` is not used: how a ZeRO partition of a flattened parameter is saved (a rank
    /// may give several pieces of one tensor).
    pub region: Option<Vec<(usize, usize)>>,
}

impl From<&Param> for ShardedTensor {
    fn from(p: &Param) -> Self {
        Self {
            name: p.name.clone(),
            local: p.var.as_tensor().detach(),
            full_dims: p.full_dims.clone(),
            placement: p.placement,
            region: None,
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
    /// Files rank 0 writes into the checkpoint directory (name, contents), such as
    /// `tokenizer.json`, before the completion marker, so that a complete checkpoint has them.
    pub files: Vec<(String, Vec<u8>)>,
    /// Testing hook: fail every rank at this stage, leaving the files as a crash would.
    pub interrupt_at: Option<SaveStage>,
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
    for (name, _) in &opts.files {
        let plain = !name.is_empty()
            && !name.contains(['/', '\\'])
            && name != "."
            && name != ".."
            && name != METADATA_FILE
            && name != COMPLETE_FILE
            && !name.starts_with("rank-");
        if !plain {
            bail!(
                "save: extra file name {name:?} must be a plain file name other than \
                 {METADATA_FILE}, {COMPLETE_FILE} and rank-*"
            )
        }
    }
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
    for (i, t) in tensors.iter().enumerate() {
        if let Some(r) = &t.region {
            let lens: Vec<usize> = r.iter().map(|&(_, l)| l).collect();
            let fits = r.len() == t.full_dims.len()
                && r.iter()
                    .zip(&t.full_dims)
                    .all(|(&(s, l), &d)| s.checked_add(l).is_some_and(|e| e <= d));
            if !fits || t.local.dims() != lens.as_slice() {
                bail!(
                    "save: rank {rank} holds a piece of {} with shape {:?} for the region {r:?} of {:?}",
                    t.name,
                    t.local.dims(),
                    t.full_dims
                )
            }
            // Its own name in the rank file: a rank may hold several pieces of one tensor.
            let key = format!("{}@{i}", t.name);
            pieces.push(PieceEntry {
                name: t.name.clone(),
                dims: t.full_dims.clone(),
                dtype: format!("{:?}", t.local.dtype()),
                split: None,
                region: Some(r.clone()),
                key: Some(key.clone()),
            });
            local.push((key, t.local.contiguous()?));
            continue;
        }
        let split = match t.placement.slice(&t.full_dims, &t.name)? {
            None => None,
            Some(sl) => {
                let mut dims = t.full_dims.clone();
                dims[sl.dim] = sl.padded;
                if t.local.dims() != dims.as_slice() {
                    bail!(
                        "save: rank {rank} holds {} with shape {:?} but its shard {:?} of {:?} has {dims:?}",
                        t.name,
                        t.local.dims(),
                        t.placement,
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
        pieces.push(PieceEntry {
            name: t.name.clone(),
            dims: t.full_dims.clone(),
            dtype: format!("{:?}", stored.dtype()),
            split,
            region: None,
            key: None,
        });
        local.push((t.name.clone(), stored));
    }
    // Each piece's place (tensor, shape, region) and the step, in the rank file's own header:
    // the metadata must agree with them at load.
    let mut header: std::collections::HashMap<String, String> = pieces
        .iter()
        .map(|p| {
            let region = super::format::region_of(&p.dims, p.split, p.region.as_ref());
            (
                super::format::place_key(p.key.as_deref().unwrap_or(&p.name)),
                super::format::place_of(&p.name, &p.dims, &region),
            )
        })
        .collect();
    header.insert(super::format::STEP_KEY.to_string(), opts.step.to_string());
    header.insert(
        super::format::DESCRIPTION_KEY.to_string(),
        super::format::description_crc(comm.size(), &opts.mesh, &opts.config),
    );
    let bytes = safetensors::serialize(local.iter().map(|(n, t)| (n.as_str(), t)), Some(header))
        .map_err(|e| {
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

    // Everyone's pieces with their checksums and file size, for the metadata; this also waits
    // until every file is in place.
    let keys: Vec<&str> = pieces
        .iter()
        .map(|p| p.key.as_deref().unwrap_or(&p.name))
        .collect();
    let crcs = piece_crcs(&bytes, &keys)?;
    let entries: Vec<(PieceEntry, Vec<u32>)> = pieces.into_iter().zip(crcs).collect();
    let mine =
        serde_json::to_vec(&(bytes.len() as u64, entries)).map_err(candle_core::Error::wrap)?;
    let all = comm.all_gather_bytes(&mine)?;
    if rank == 0 {
        let mut tensors: BTreeMap<String, TensorMeta> = BTreeMap::new();
        let mut files = BTreeMap::new();
        for (r, bytes) in all.iter().enumerate() {
            let (file_bytes, entries): (u64, Vec<(PieceEntry, Vec<u32>)>) =
                serde_json::from_slice(bytes).map_err(candle_core::Error::wrap)?;
            files.insert(
                format!("rank-{r:05}.safetensors"),
                RankFile {
                    rank: r,
                    bytes: file_bytes,
                },
            );
            for (e, crc) in entries {
                let PieceEntry {
                    name,
                    dims,
                    dtype,
                    split,
                    region,
                    key,
                } = e;
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
                    region,
                    key,
                    crc32c: Some(crc),
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
            files,
            crc_block_bytes: Some(BLOCK_BYTES),
        };
        for (name, bytes) in &opts.files {
            write_atomic(&dir.join(name), bytes)?;
        }
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

/// What each rank tells rank 0 about a piece (with its block checksums).
#[derive(serde::Serialize, serde::Deserialize)]
struct PieceEntry {
    name: String,
    dims: Vec<usize>,
    dtype: String,
    split: Option<(usize, usize, usize)>,
    region: Option<Vec<(usize, usize)>>,
    /// Its name in the rank file, when not `name`.
    key: Option<String>,
}

/// The block checksums of each named tensor's data in `file`, the bytes of a safetensors file
/// (its header gives where each tensor's data lies).
fn piece_crcs(file: &[u8], names: &[&str]) -> Result<Vec<Vec<u32>>> {
    let bad = || candle_core::Error::msg("save: the serialised rank file has no valid header");
    let n = u64::from_le_bytes(
        file.get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(file.get(8..8 + n).ok_or_else(bad)?).map_err(|_| bad())?;
    let data = &file[8 + n..];
    names
        .iter()
        .map(|name| {
            let offsets = &header[*name]["data_offsets"];
            let (Some(b), Some(e)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
                bail!("save: tensor {name} is missing from the serialised rank file")
            };
            let bytes = data.get(b as usize..e as usize).ok_or_else(bad)?;
            Ok(block_crcs(bytes))
        })
        .collect()
}
