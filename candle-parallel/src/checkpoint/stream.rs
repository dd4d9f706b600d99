//! Safetensors files written tensor by tensor: [`SafetensorsWriter`] knows every tensor's
//! name, dtype and shape up front (the header comes first in the format), then takes the
//! tensors one at a time, so writing a model holds one tensor's bytes, not the model's.
//! [`write_model`] gathers a sharded model into such a file on rank 0, one tensor at a time.

use super::format::{io_err, sync_dir, tmp_path};
use super::ShardedTensor;
use crate::mesh::{DeviceMesh, MeshDim};
use candle_core::{bail, DType, Result, Tensor};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One tensor of a file: name, dtype, shape.
pub type TensorEntry = (String, DType, Vec<usize>);

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I16 => "I16",
        DType::I32 => "I32",
        DType::I64 => "I64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        other => bail!("safetensors writer: dtype {other:?} is not written by this writer"),
    })
}

/// A safetensors file written atomically, tensor by tensor, in the order its entries were
/// given: the data goes to `NAME.tmp`, which is synced and renamed over `NAME` by
/// [`SafetensorsWriter::finish`] (dropped unfinished, the temporary file is removed).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_parallel::checkpoint::SafetensorsWriter;
///
/// let path = std::env::temp_dir().join(format!("cp-stream-doc-{}.safetensors", std::process::id()));
/// let a = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// let b = Tensor::new(&[[3u32]], &Device::Cpu)?;
/// let mut w = SafetensorsWriter::create(
///     &path,
///     vec![("a".into(), DType::F32, vec![2]), ("b".into(), DType::U32, vec![1, 1])],
/// )?;
/// w.write("a", &a)?;
/// w.write("b", &b)?;
/// w.finish()?;
/// let back = candle_core::safetensors::load(&path, &Device::Cpu)?;
/// assert_eq!(back["b"].to_vec2::<u32>()?, [[3]]);
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct SafetensorsWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    entries: Vec<TensorEntry>,
    next: usize,
    /// Renamed into place: nothing to clean up.
    done: bool,
}

impl SafetensorsWriter {
    /// Starts the file: writes the header for `entries` (in that order; names unique).
    pub fn create(path: &Path, entries: Vec<TensorEntry>) -> Result<Self> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, dtype, dims) in &entries {
            if name == "__metadata__" {
                bail!(
                    "safetensors writer {}: __metadata__ is reserved by the format, not a tensor name",
                    path.display()
                )
            }
            let len = dims
                .iter()
                .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
                .ok_or_else(|| {
                    candle_core::Error::msg(format!(
                        "safetensors writer {}: tensor {name} of shape {dims:?} is too large",
                        path.display()
                    ))
                })?;
            let entry = serde_json::json!({
                "dtype": dtype_name(*dtype)?,
                "shape": dims,
                "data_offsets": [offset, offset + len],
            });
            if header.insert(name.clone(), entry).is_some() {
                bail!(
                    "safetensors writer {}: tensor {name} is given twice",
                    path.display()
                )
            }
            offset += len;
        }
        let mut json = serde_json::to_vec(&header).map_err(candle_core::Error::wrap)?;
        // The data starts 8-aligned, as the reference writer pads it.
        json.resize(json.len().next_multiple_of(8), b' ');
        let tmp = tmp_path(path);
        let f = File::create(&tmp).map_err(|e| io_err("cannot create", &tmp, e))?;
        // From here on, dropping the writer unfinished removes the temporary file.
        let mut writer = Self {
            path: path.to_path_buf(),
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, f)),
            entries,
            next: 0,
            done: false,
        };
        let file = writer.file.as_mut().expect("just opened");
        file.write_all(&(json.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(&json))
            .map_err(|e| io_err("cannot write", &writer.tmp, e))?;
        Ok(writer)
    }

    /// Writes tensor `name`, the next one in the order of the entries, with the entry's dtype
    /// and shape.
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let Some((want, dtype, dims)) = self.entries.get(self.next) else {
            bail!(
                "safetensors writer {}: {name} is one tensor more than the {} announced",
                self.path.display(),
                self.entries.len()
            )
        };
        if want != name || t.dtype() != *dtype || t.dims() != dims.as_slice() {
            bail!(
                "safetensors writer {}: expected {want} ({dtype:?}, {dims:?}) next, got {name} ({:?}, {:?})",
                self.path.display(),
                t.dtype(),
                t.dims()
            )
        }
        let t = t.to_device(&candle_core::Device::Cpu)?;
        let bytes = safetensors::View::data(&t);
        let file = self.file.as_mut().expect("open until finish");
        file.write_all(&bytes)
            .map_err(|e| io_err("cannot write", &self.tmp, e))?;
        self.next += 1;
        Ok(())
    }

    /// Ends the file: checks every tensor was written, syncs it and renames it into place.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.entries.len() {
            bail!(
                "safetensors writer {}: {} of {} tensors written (the next is {})",
                self.path.display(),
                self.next,
                self.entries.len(),
                self.entries[self.next].0
            )
        }
        let file = self.file.take().expect("open until finish");
        let f = file
            .into_inner()
            .map_err(|e| io_err("cannot write", &self.tmp, e.into_error()))?;
        f.sync_all()
            .map_err(|e| io_err("cannot sync", &self.tmp, e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| io_err("cannot rename into", &self.path, e))?;
        self.done = true;
        sync_dir(&self.path)
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        // Unfinished (or failed before the rename): the partial file goes.
        if !self.done {
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Part of a model to write ([`write_model_parts`]): what it holds is described cheaply, and
/// its tensors are materialised only when its turn comes (a ZeRO 3 module gathers its
/// parameters then, and frees them after).
pub trait ModelPart {
    /// This rank's tensors: name, dtype, full shape, and the mesh dimensions each is local to.
    fn describe(&self) -> Vec<(String, DType, Vec<usize>, Vec<MeshDim>)>;
    /// This rank's parts of them (collective where the part must gather).
    fn materialise(&self) -> Result<Vec<(ShardedTensor, Vec<MeshDim>)>>;
}

impl ModelPart for Vec<(ShardedTensor, Vec<MeshDim>)> {
    fn describe(&self) -> Vec<(String, DType, Vec<usize>, Vec<MeshDim>)> {
        self.iter()
            .map(|(t, l)| {
                (
                    t.name.clone(),
                    t.local.dtype(),
                    t.full_dims.clone(),
                    l.clone(),
                )
            })
            .collect()
    }

    fn materialise(&self) -> Result<Vec<(ShardedTensor, Vec<MeshDim>)>> {
        Ok(self.clone())
    }
}

/// Writes one full-shape copy of every tensor of a model on a mesh into the safetensors file
/// `path` on world rank 0 (collective over the world), one tensor at a time: each tensor's tp
/// slices are gathered by its holders (tp rank 0 of dp rank 0, and of ep rank 0 unless the
/// tensor is local to ep, as experts are; pipeline stages each their own), sent to rank 0,
/// written, and freed, so no rank holds more than one full tensor. `extra` (rank 0's, e.g.
/// losses) goes first; `dtype` converts the model's floating-point tensors. A tensor several
/// stages hold (a tied weight) is written once. Same content as [`super::gather_model`],
/// without its copy of the whole model on every rank. Returns how many model tensors were
/// written.
pub fn write_model(
    tensors: &[(ShardedTensor, Vec<MeshDim>)],
    mesh: &DeviceMesh,
    path: &Path,
    extra: &[(String, Tensor)],
    dtype: Option<DType>,
) -> Result<usize> {
    // Tensor handles: cloning them copies no data.
    write_model_parts(&[&tensors.to_vec()], mesh, path, extra, dtype)
}

/// [`write_model`] over `parts`, written in their order (within a part, by name), each part
/// materialised only for its turn: at most one part's tensors exist at once (e.g. one ZeRO 3
/// layer gathered). Every rank must give the same number of parts.
pub fn write_model_parts(
    parts: &[&dyn ModelPart],
    mesh: &DeviceMesh,
    path: &Path,
    extra: &[(String, Tensor)],
    dtype: Option<DType>,
) -> Result<usize> {
    let world = mesh.world();
    let coords = [mesh.dp().rank(), mesh.pp().rank(), mesh.ep().rank()];
    // What this rank would send: part, name, dtype, full shape, and its (dp, pp, ep)
    // coordinates, which its tp peers share.
    type Entry = (usize, String, String, Vec<usize>, [usize; 3]);
    let convert = |d: DType| match dtype {
        Some(to) if d.is_float() => to,
        _ => d,
    };
    let mut mine: Vec<Entry> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        for (name, d, dims, local_to) in part.describe() {
            let sends = mesh.tp().rank() == 0
                && mesh.dp().rank() == 0
                && (local_to.contains(&MeshDim::Ep) || mesh.ep().rank() == 0);
            if sends {
                mine.push((i, name, convert(d).as_str().to_string(), dims, coords));
            }
        }
    }
    // Every rank must walk the same parts (each may start collectives).
    let bytes = serde_json::to_vec(&(parts.len(), &mine)).map_err(candle_core::Error::wrap)?;
    // Every tensor by part and name, the first sender of each.
    // (part, name) -> (sender, dtype, full shape, the sender's coordinates)
    type Planned = (usize, DType, Vec<usize>, [usize; 3]);
    let mut plan: BTreeMap<(usize, String), Planned> = BTreeMap::new();
    let mut first: std::collections::HashMap<String, (DType, Vec<usize>)> = Default::default();
    for (rank, b) in world.all_gather_bytes(&bytes)?.into_iter().enumerate() {
        let (count, list): (usize, Vec<Entry>) =
            serde_json::from_slice(&b).map_err(candle_core::Error::wrap)?;
        if count != parts.len() {
            bail!(
                "write_model: rank {rank} gives {count} parts, rank {} gives {}: every rank must give the model's parts alike",
                world.rank(),
                parts.len()
            )
        }
        for (part, name, d, dims, c) in list {
            let d: DType = d.parse().map_err(candle_core::Error::msg)?;
            if let Some((d0, dims0)) = first.get(&name) {
                // A tied weight held by two stages: the same tensor, written once.
                if (*d0, dims0) != (d, &dims) {
                    bail!("write_model: {name} is {d:?} {dims:?} on rank {rank}, {d0:?} {dims0:?} on an earlier rank")
                }
                continue;
            }
            first.insert(name.clone(), (d, dims.clone()));
            plan.insert((part, name), (rank, d, dims, c));
        }
    }
    let mut writer = match world.rank() {
        0 => {
            let mut entries: Vec<TensorEntry> = extra
                .iter()
                .map(|(n, t)| (n.clone(), t.dtype(), t.dims().to_vec()))
                .collect();
            entries.extend(
                plan.iter()
                    .map(|((_, n), (_, d, dims, _))| (n.clone(), *d, dims.clone())),
            );
            let mut w = SafetensorsWriter::create(path, entries)?;
            for (n, t) in extra {
                w.write(n, t)?;
            }
            Some(w)
        }
        _ => None,
    };
    for (i, part) in parts.iter().enumerate() {
        let tensors = part.materialise()?;
        let by_name: BTreeMap<&str, &ShardedTensor> =
            tensors.iter().map(|(t, _)| (t.name.as_str(), t)).collect();
        for ((_, name), (sender, d, dims, c)) in
            plan.range((i, String::new())..(i + 1, String::new()))
        {
            // The sender's tp group gathers the tensor; the sender passes it to rank 0.
            let full = match by_name.get(name.as_str()) {
                Some(t) if *c == coords => Some(
                    super::gather_full(&t.local, t.placement, &t.full_dims, mesh.tp())?
                        .to_dtype(*d)?,
                ),
                // The sender's tp peers hold what it holds: anything else would leave its
                // gather waiting.
                None if *c == coords => bail!(
                    "write_model: rank {} lacks {name} (part {i}), which rank {sender} of its tp group writes",
                    world.rank()
                ),
                _ => None,
            };
            match (world.rank(), full) {
                (0, Some(t)) if *sender == 0 => writer.as_mut().expect("rank 0").write(name, &t)?,
                (0, _) => {
                    let t = world.recv(*sender, dims.as_slice(), *d)?;
                    writer.as_mut().expect("rank 0").write(name, &t)?;
                }
                (r, Some(t)) if r == *sender => world.send(&t, 0)?,
                _ => {}
            }
        }
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    Ok(plan.len())
}
