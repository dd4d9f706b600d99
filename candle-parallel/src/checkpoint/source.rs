//! Where stored tensors come from: Hugging Face safetensors files and distributed
//! checkpoints, both memory-mapped. A source hands out the stored pieces of a tensor (regions
//! of the full tensor and their bytes); [`super::region::assemble`] copies what a rank needs.

use super::checksum::{PieceCheck, BLOCK_BYTES};
use super::format::{read_metadata, CheckpointMeta, METADATA_FILE};
use super::region::{Region, StoredPiece};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Stored tensors a builder reads from.
pub(crate) trait TensorSource: Send + Sync {
    /// Whether the source holds tensor `name`.
    fn contains(&self, name: &str) -> bool;
    /// The stored dtype and pieces of `name`, whose full shape must be `full`.
    fn pieces(&self, name: &str, full: &[usize]) -> Result<(DType, Vec<StoredPiece<'_>>)>;
    /// The full shape of the stored tensor `name`, if the source holds it.
    fn dims(&self, name: &str) -> Option<Vec<usize>>;
    /// The distributed checkpoint's metadata, for sources that read one.
    fn checkpoint_meta(&self) -> Option<&CheckpointMeta> {
        None
    }
}

/// Several sources, the first holding a tensor giving it (a LoRA run's checkpoint of adapters
/// over its base model).
pub(crate) struct LayeredSource(pub Vec<Box<dyn TensorSource>>);

impl LayeredSource {
    fn first(&self, name: &str) -> Option<&dyn TensorSource> {
        self.0.iter().find(|s| s.contains(name)).map(|s| s.as_ref())
    }
}

impl TensorSource for LayeredSource {
    fn contains(&self, name: &str) -> bool {
        self.first(name).is_some()
    }

    fn pieces(&self, name: &str, full: &[usize]) -> Result<(DType, Vec<StoredPiece<'_>>)> {
        match self.first(name) {
            Some(s) => s.pieces(name, full),
            // The first source's error names where it looked.
            None => self.0[0].pieces(name, full),
        }
    }

    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.first(name).and_then(|s| s.dims(name))
    }

    fn checkpoint_meta(&self) -> Option<&CheckpointMeta> {
        self.0.iter().find_map(|s| s.checkpoint_meta())
    }
}

/// Another name a tensor may be stored under, or `None`.
pub(crate) type Alias = dyn Fn(&str) -> Option<String> + Send + Sync;

/// Safetensors files (a Hugging Face checkpoint): each tensor is one piece, the whole tensor.
pub(crate) struct SafeTensorsSource {
    files: MmapedSafetensors,
    paths: Vec<PathBuf>,
    /// Another name a tensor may be stored under (given by the layer that opens the files).
    alias: Option<Box<Alias>>,
}

impl SafeTensorsSource {
    pub fn open(paths: Vec<PathBuf>) -> Result<Self> {
        for p in &paths {
            if !p.is_file() {
                bail!("checkpoint file {} does not exist", p.display())
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors reader we rely on them
        // not being modified while mapped.
        let files = unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| {
            candle_core::Error::msg(format!("cannot read checkpoint {paths:?}: {e}"))
        })?;
        Ok(Self {
            files,
            paths,
            alias: None,
        })
    }

    /// Tensors absent under their own names may be stored under `alias(name)`.
    pub fn with_alias(mut self, alias: Box<Alias>) -> Self {
        self.alias = Some(alias);
        self
    }
}

impl SafeTensorsSource {
    /// The stored name of `name`: itself, or its alias where the files hold that instead.
    fn key(&self, name: &str) -> String {
        if self.files.get(name).is_err() {
            if let Some(other) = self.alias.as_ref().and_then(|a| a(name)) {
                if self.files.get(&other).is_ok() {
                    return other;
                }
            }
        }
        name.to_string()
    }
}

impl TensorSource for SafeTensorsSource {
    fn contains(&self, name: &str) -> bool {
        self.files.get(&self.key(name)).is_ok()
    }

    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.files
            .get(&self.key(name))
            .ok()
            .map(|v| v.shape().to_vec())
    }

    fn pieces(&self, name: &str, full: &[usize]) -> Result<(DType, Vec<StoredPiece<'_>>)> {
        let paths = &self.paths;
        let view = self.files.get(&self.key(name)).map_err(|_| {
            candle_core::Error::msg(format!(
                "tensor {name} is missing from checkpoint {paths:?}"
            ))
        })?;
        if view.shape() != full {
            bail!(
                "tensor {name} in checkpoint {paths:?} has shape {:?} but the model config expects {full:?}",
                view.shape()
            )
        }
        let dtype: DType = view.dtype().try_into()?;
        let piece = StoredPiece {
            region: Region::whole(full),
            data: view.data(),
            check: None,
        };
        Ok((dtype, vec![piece]))
    }
}

/// A distributed checkpoint opened for reading: its metadata and every rank file, mapped.
pub(crate) struct DistSource {
    pub meta: CheckpointMeta,
    pub dir: PathBuf,
    files: BTreeMap<String, MmapedSafetensors>,
    /// Each rank file's header metadata: where its pieces belong (checked against the
    /// metadata's pieces), and its step.
    headers: BTreeMap<String, std::collections::HashMap<String, String>>,
}

impl DistSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta = read_metadata(dir)?;
        if let Some(b) = meta.crc_block_bytes {
            if b != BLOCK_BYTES {
                bail!(
                    "{}: checksums over blocks of {b} bytes; this library checks blocks of \
                     {BLOCK_BYTES}: use the candle-parallel version that wrote it",
                    dir.join(METADATA_FILE).display()
                )
            }
        }
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
        let mut headers = BTreeMap::new();
        for file in files.keys() {
            let path = dir.join(file);
            let h = super::format::safetensors_header_metadata(&path)?;
            if let Some(step) = h.get(super::format::STEP_KEY) {
                if step != &meta.step.to_string() {
                    bail!(
                        "{}: says step {} but {} is of step {step}: {METADATA_FILE} was edited or the file belongs to another checkpoint",
                        dir.join(METADATA_FILE).display(),
                        meta.step,
                        path.display()
                    )
                }
            }
            if let Some(crc) = h.get(super::format::DESCRIPTION_KEY) {
                let said =
                    super::format::description_crc(meta.world_size, &meta.mesh, &meta.config);
                if crc != &said {
                    bail!(
                        "{}: its world size, mesh or model config is not what {} was saved with (checksum {said}, the file records {crc}): {METADATA_FILE} was edited or the file belongs to another checkpoint",
                        dir.join(METADATA_FILE).display(),
                        path.display()
                    )
                }
            }
            headers.insert(file.clone(), h);
        }
        Ok(Self {
            meta,
            dir: dir.to_path_buf(),
            files,
            headers,
        })
    }
}

/// Checks a distributed checkpoint without reading its tensor data: the metadata (see
/// [`read_metadata`]), every rank file present and a valid safetensors file as long as its
/// header says, and every piece there with the shape and dtype the metadata gives. Returns the
/// metadata.
///
/// ```no_run
/// let meta = candle_parallel::checkpoint::check_checkpoint(std::path::Path::new("ckpt/step-000300"))?;
/// println!("{} tensors", meta.tensors.len());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn check_checkpoint(dir: &Path) -> Result<CheckpointMeta> {
    let source = DistSource::open(dir)?;
    for (name, t) in &source.meta.tensors {
        source.pieces(name, &t.dims)?;
    }
    Ok(source.meta)
}

/// Reads a distributed checkpoint whole and checks every stored byte against its checksum
/// (after [`check_checkpoint`]'s checks). Returns the bytes checked and the pieces that have no
/// checksums (written before checksums existed).
///
/// ```no_run
/// use candle_parallel::checkpoint::verify_checkpoint;
/// let (bytes, unchecked) = verify_checkpoint(std::path::Path::new("ckpt/step-000300"))?;
/// println!("{bytes} bytes verified, {unchecked} pieces without checksums");
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn verify_checkpoint(dir: &Path) -> Result<(u64, usize)> {
    let source = DistSource::open(dir)?;
    let (mut bytes, mut unchecked) = (0u64, 0usize);
    for (name, t) in &source.meta.tensors {
        let (dtype, pieces) = source.pieces(name, &t.dims)?;
        // What every load checks, so that a checkpoint that verifies, loads: the pieces leave
        // no gap and agree where they overlap. Pieces that tile the tensor (pairwise disjoint,
        // their volumes adding up to its) pass without a copy; any other layout is assembled
        // whole, which compares the overlaps' values and names a gap.
        let mut regions: Vec<&super::region::Region> = Vec::new();
        for p in &pieces {
            if !regions.contains(&&p.region) {
                regions.push(&p.region);
            }
        }
        let disjoint = regions
            .iter()
            .enumerate()
            .all(|(i, a)| regions[i + 1..].iter().all(|b| a.intersect(b).is_none()));
        let volume: usize = regions.iter().map(|r| r.volume()).sum();
        if !disjoint || volume != t.dims.iter().product::<usize>() {
            drop(super::region::assemble(
                name, &t.dims, None, dtype, &pieces,
            )?);
        }
        for p in pieces {
            match &p.check {
                Some(c) => {
                    let mut done = vec![false; p.data.len().div_ceil(BLOCK_BYTES)];
                    c.verify(name, p.data, 0, p.data.len(), &mut done)?;
                    bytes += p.data.len() as u64;
                }
                None => unchecked += 1,
            }
        }
    }
    Ok((bytes, unchecked))
}

impl TensorSource for DistSource {
    fn contains(&self, name: &str) -> bool {
        self.meta.tensors.contains_key(name)
    }

    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.meta.tensors.get(name).map(|t| t.dims.clone())
    }

    /// The regions of `name` and their bytes, straight from the mapped files.
    fn pieces(&self, name: &str, full: &[usize]) -> Result<(DType, Vec<StoredPiece<'_>>)> {
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
        let dtype = t.dtype()?;
        if t.pieces.is_empty() {
            bail!(
                "tensor {name} has no pieces in checkpoint {}",
                self.dir.display()
            )
        }
        let mut out = Vec::with_capacity(t.pieces.len());
        for p in &t.pieces {
            let view = self.files[&p.file].get(p.key(name)).map_err(|_| {
                candle_core::Error::msg(format!(
                    "tensor {name} is missing from {} although {METADATA_FILE} lists it",
                    self.dir.join(&p.file).display()
                ))
            })?;
            let stored = DType::try_from(view.dtype())?;
            if stored != dtype {
                bail!(
                    "tensor {name} in {} is stored as {stored:?} but {METADATA_FILE} says {}: \
                     the checkpoint is corrupt",
                    self.dir.join(&p.file).display(),
                    t.dtype
                )
            }
            let region = p.region(&t.dims);
            // The rank file records where this piece belongs (checkpoints written before that
            // do not): the metadata must say the same.
            if let Some(stored) = self.headers[&p.file].get(&super::format::place_key(p.key(name)))
            {
                let said = super::format::place_of(name, &t.dims, &region);
                if stored != &said {
                    bail!(
                        "{}: {METADATA_FILE} places a piece stored as {} at {said}, but the rank file records it as {stored}: {METADATA_FILE} was edited or is corrupt",
                        self.dir.join(&p.file).display(),
                        p.key(name)
                    )
                }
            }
            if view.shape() != region.lens() {
                bail!(
                    "tensor {name} in {} has shape {:?} but {METADATA_FILE} says {:?}",
                    p.file,
                    view.shape(),
                    region.lens()
                )
            }
            let check = p.crc32c.as_deref().map(|crcs| PieceCheck {
                crcs,
                file: &p.file,
            });
            out.push(StoredPiece {
                region,
                data: view.data(),
                check,
            });
        }
        Ok((dtype, out))
    }

    fn checkpoint_meta(&self) -> Option<&CheckpointMeta> {
        Some(&self.meta)
    }
}

/// The safetensors files of a Hugging Face model directory.
pub fn hf_safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = super::read_text(&index)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            candle_core::Error::msg(format!("{}: not valid JSON: {e}", index.display()))
        })?;
        let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{}: no \"weight_map\" object", index.display())
        };
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            bail!(
                "{} names {} which does not exist",
                index.display(),
                missing.display()
            )
        }
        Ok(paths)
    } else if single.is_file() {
        Ok(vec![single])
    } else {
        bail!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    }
}
