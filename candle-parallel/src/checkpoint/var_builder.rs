//! [`ShardedVarBuilder`]: what parallel layers build their parameters from. Like candle-nn's
//! `VarBuilder` (`vb.pp("model.layers.0")`), but every tensor comes with a [`Shard`]: which
//! part of the full (unsharded) tensor this rank holds.
//!
//! Two sources:
//! - **safetensors files** (Hugging Face checkpoints): memory-mapped; a rank copies only the
//!   byte ranges of its slice, never a whole sharded tensor;
//! - **deterministic initialisation**: every element of the full tensor is a pure function of
//!   (seed, tensor name, flat index), so a rank generates only its slice, and the slices at
//!   tp = 4 are exactly the slices of the tensor at tp = 1.
//!
//! With [`ShardedVarBuilder::trainable`], each tensor becomes a `Var` recorded under its full
//! name ([`ShardedVarBuilder::params`], sorted by name) for optimizers and gradient export.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::Init;
//! use candle_parallel::checkpoint::{Shard, ShardedVarBuilder};
//!
//! let full = ShardedVarBuilder::from_init(7, DType::F32, &Device::Cpu);
//! let part = ShardedVarBuilder::from_init(7, DType::F32, &Device::Cpu);
//! let init = Init::Uniform { lo: -1.0, up: 1.0 };
//! let w = full.pp("mlp").get((8, 4), "weight", Shard::Replicated, init)?;
//! let w1 = part.pp("mlp").get((8, 4), "weight", Shard::Split { dim: 0, rank: 1, parts: 2 }, init)?;
//! assert_eq!(w1.to_vec2::<f32>()?, w.narrow(0, 4, 4)?.to_vec2::<f32>()?);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::Init;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which part of a full tensor a rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shard {
    /// The whole tensor.
    Replicated,
    /// Chunk `rank` of `parts` equal chunks along `dim` (the size must be divisible).
    Split {
        dim: usize,
        rank: usize,
        parts: usize,
    },
    /// Chunk `rank` of `parts` chunks of `ceil(size / parts)` along `dim`; the part past the
    /// end of the tensor is zero padding (a vocabulary not divisible by tp).
    SplitPadded {
        dim: usize,
        rank: usize,
        parts: usize,
    },
    /// Rows `start..start + len` along `dim` (e.g. a key/value head replicated over ranks).
    Range {
        dim: usize,
        start: usize,
        len: usize,
    },
}

/// Where a rank's slice lies: `len` elements from `start` along `dim` are real, then
/// `padded - len` zeros.
pub(crate) struct Slice {
    pub dim: usize,
    pub start: usize,
    pub len: usize,
    pub padded: usize,
}

impl Shard {
    /// The slice of a tensor of shape `full` that this shard describes (`None`: all of it).
    pub(crate) fn slice(&self, full: &[usize], name: &str) -> Result<Option<Slice>> {
        let (dim, start, len, padded) = match *self {
            Shard::Replicated => return Ok(None),
            Shard::Split { dim, rank, parts } => {
                let size = dim_size(full, dim, name)?;
                if parts == 0 || !size.is_multiple_of(parts) || rank >= parts {
                    bail!(
                        "tensor {name} of shape {full:?}: dim {dim} of size {size} cannot be split \
                         into {parts} equal parts (rank {rank}); choose a parallel size that divides {size}"
                    )
                }
                let chunk = size / parts;
                (dim, rank * chunk, chunk, chunk)
            }
            Shard::SplitPadded { dim, rank, parts } => {
                let size = dim_size(full, dim, name)?;
                if parts == 0 || rank >= parts {
                    bail!("tensor {name}: rank {rank} is not one of {parts} parts")
                }
                let chunk = size.div_ceil(parts);
                let start = (rank * chunk).min(size);
                (dim, start, chunk.min(size - start), chunk)
            }
            Shard::Range { dim, start, len } => {
                let size = dim_size(full, dim, name)?;
                if start + len > size {
                    bail!(
                        "tensor {name} of shape {full:?}: rows {start}..{} are past the end of dim \
                         {dim} (size {size})",
                        start + len
                    )
                }
                (dim, start, len, len)
            }
        };
        Ok(Some(Slice {
            dim,
            start,
            len,
            padded,
        }))
    }

    /// The shape this rank holds of a tensor of shape `full`.
    pub fn local_dims(&self, full: &[usize]) -> Result<Vec<usize>> {
        let mut dims = full.to_vec();
        if let Some(s) = self.slice(full, "(shape)")? {
            dims[s.dim] = s.padded;
        }
        Ok(dims)
    }
}

fn dim_size(full: &[usize], dim: usize, name: &str) -> Result<usize> {
    match full.get(dim) {
        Some(s) => Ok(*s),
        None => bail!("tensor {name} of shape {full:?} has no dim {dim} to shard"),
    }
}

/// A trainable parameter: this rank's slice of the tensor `name`.
#[derive(Clone, Debug)]
pub struct Param {
    /// The full name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// This rank's slice.
    pub var: Var,
    /// The full tensor's shape.
    pub full_dims: Vec<usize>,
    /// Which part this rank holds.
    pub shard: Shard,
}

enum Source {
    Init {
        seed: u64,
    },
    SafeTensors {
        files: MmapedSafetensors,
        paths: Vec<PathBuf>,
    },
    Distributed(Box<super::dist::DistSource>),
}

struct Inner {
    source: Source,
    dtype: DType,
    device: Device,
    trainable: AtomicBool,
    params: Mutex<BTreeMap<String, Param>>,
    bytes_read: AtomicU64,
}

/// Builds a rank's parameter slices from a checkpoint or a deterministic initialisation.
/// Cheap to clone; clones share the recorded parameters. See the [module docs](self).
#[derive(Clone)]
pub struct ShardedVarBuilder {
    inner: Arc<Inner>,
    prefix: Vec<String>,
}

impl ShardedVarBuilder {
    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                dtype,
                device: device.clone(),
                trainable: AtomicBool::new(false),
                params: Mutex::new(BTreeMap::new()),
                bytes_read: AtomicU64::new(0),
            }),
            prefix: Vec::new(),
        }
    }

    pub(crate) fn from_dist(src: super::dist::DistSource, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Distributed(Box::new(src)), dtype, device)
    }

    /// A builder that only assembles pieces (for export).
    pub(crate) fn for_export(dtype: DType) -> Self {
        Self::new(Source::Init { seed: 0 }, dtype, &Device::Cpu)
    }

    /// The metadata of the distributed checkpoint this builder reads, if it reads one.
    pub fn checkpoint_meta(&self) -> Option<&super::dist::CheckpointMeta> {
        match &self.inner.source {
            Source::Distributed(d) => Some(&d.meta),
            _ => None,
        }
    }

    /// Parameters initialised deterministically from `seed` (and each tensor's full name).
    pub fn from_init(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Init { seed }, dtype, device)
    }

    /// Parameters read from safetensors files, memory-mapped; tensors are converted to `dtype`.
    pub fn from_safetensors<P: AsRef<Path>>(
        paths: &[P],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
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
        Ok(Self::new(
            Source::SafeTensors { files, paths },
            dtype,
            device,
        ))
    }

    /// Parameters of a Hugging Face model directory: `model.safetensors`, or the files named by
    /// `model.safetensors.index.json`.
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_safetensors(&hf_safetensors_files(dir)?, dtype, device)
    }

    /// From now on, every tensor this builder (or a clone) creates is a `Var`, recorded in
    /// [`ShardedVarBuilder::params`].
    pub fn trainable(self) -> Self {
        self.inner.trainable.store(true, Ordering::SeqCst);
        self
    }

    /// A builder for the names under `prefix` (`vb.pp("model").pp("layers.0")`).
    pub fn pp<S: ToString>(&self, prefix: S) -> Self {
        let mut p = self.prefix.clone();
        p.push(prefix.to_string());
        Self {
            inner: self.inner.clone(),
            prefix: p,
        }
    }

    /// The dtype tensors are created in.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The full name of `name` under this builder's prefix.
    pub fn full_name(&self, name: &str) -> String {
        let mut parts = self.prefix.clone();
        parts.push(name.to_string());
        parts.join(".")
    }

    /// Whether the checkpoint has a tensor `name` (always true for an initialisation).
    pub fn contains(&self, name: &str) -> bool {
        match &self.inner.source {
            Source::Init { .. } => true,
            Source::SafeTensors { files, .. } => files.get(&self.full_name(name)).is_ok(),
            Source::Distributed(d) => d.meta.tensors.contains_key(&self.full_name(name)),
        }
    }

    /// Bytes copied out of checkpoint files so far (by this builder and its clones).
    pub fn bytes_read(&self) -> u64 {
        self.inner.bytes_read.load(Ordering::SeqCst)
    }

    /// The recorded trainable parameters, sorted by name.
    pub fn params(&self) -> Vec<Param> {
        self.inner
            .params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Like [`ShardedVarBuilder::get`], but never recorded as a trainable parameter (for state
    /// such as optimizer moments).
    pub fn get_untracked<S: Into<Shape>>(
        &self,
        full: S,
        name: &str,
        shard: Shard,
        init: Init,
    ) -> Result<Tensor> {
        self.fetch(full.into(), name, shard, init, false)
    }

    /// This rank's part of the tensor `name`, whose full shape is `full`: read from the
    /// checkpoint (which must hold exactly that shape) or initialised with `init`.
    pub fn get<S: Into<Shape>>(
        &self,
        full: S,
        name: &str,
        shard: Shard,
        init: Init,
    ) -> Result<Tensor> {
        let record = self.inner.trainable.load(Ordering::SeqCst);
        self.fetch(full.into(), name, shard, init, record)
    }

    fn fetch(
        &self,
        full: Shape,
        name: &str,
        shard: Shard,
        init: Init,
        record: bool,
    ) -> Result<Tensor> {
        let name = self.full_name(name);
        let slice = shard.slice(full.dims(), &name)?;
        let t = match &self.inner.source {
            Source::Init { seed } => init_slice(*seed, &name, full.dims(), slice.as_ref(), init)?
                .to_dtype(self.inner.dtype)?
                .to_device(&self.inner.device)?,
            Source::SafeTensors { files, paths } => {
                self.read_slice(files, paths, &name, full.dims(), slice.as_ref())?
            }
            Source::Distributed(d) => {
                let (dtype, pieces) = d.pieces(&name, full.dims())?;
                self.assemble(&name, full.dims(), slice.as_ref(), dtype, &pieces)?
            }
        };
        if !record {
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let mut params = self.inner.params.lock().unwrap_or_else(|e| e.into_inner());
        if params.contains_key(&name) {
            bail!("parameter {name} was created twice: each parameter name must be unique")
        }
        params.insert(
            name.clone(),
            Param {
                name,
                var: var.clone(),
                full_dims: full.dims().to_vec(),
                shard,
            },
        );
        Ok(var.as_tensor().clone())
    }

    fn read_slice(
        &self,
        files: &MmapedSafetensors,
        paths: &[PathBuf],
        name: &str,
        full: &[usize],
        slice: Option<&Slice>,
    ) -> Result<Tensor> {
        let view = files.get(name).map_err(|_| {
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
        let whole = Region::whole(full);
        self.assemble(name, full, slice, dtype, &[(whole, view.data())])
    }

    /// Builds this rank's part of tensor `name` (full shape `full`) from stored `pieces`, each
    /// a region of the full tensor and its row-major bytes, copying only the bytes inside the
    /// wanted region. Pieces with identical regions (replicas) are read once.
    pub(crate) fn assemble(
        &self,
        name: &str,
        full: &[usize],
        slice: Option<&Slice>,
        dtype: DType,
        pieces: &[StoredPiece<'_>],
    ) -> Result<Tensor> {
        let want = match slice {
            None => Region::whole(full),
            Some(s) => Region::whole(full).restrict(s.dim, s.start, s.len),
        };
        let mut out_dims = want.lens();
        if let Some(s) = slice {
            out_dims[s.dim] = s.padded;
        }
        let elem = dtype.size_in_bytes();
        let mut out = vec![0u8; out_dims.iter().product::<usize>() * elem];
        let (mut seen, mut covered, mut read): (Vec<&Region>, usize, usize) = (Vec::new(), 0, 0);
        for (region, data) in pieces {
            if seen.contains(&region) {
                continue;
            }
            seen.push(region);
            let Some(common) = want.intersect(region) else {
                continue;
            };
            let n = common.volume();
            if data.len() != region.volume() * elem {
                bail!(
                    "tensor {name}: a stored piece holds {} bytes but its region {:?} needs {}",
                    data.len(),
                    region.0,
                    region.volume() * elem
                )
            }
            copy_box(data, region, &common, &mut out, &want, &out_dims, elem);
            covered += n;
            read += n * elem;
        }
        if covered != want.volume() {
            bail!(
                "tensor {name}: the checkpoint covers {covered} of the {} elements of region {:?}",
                want.volume(),
                want.0
            )
        }
        self.inner
            .bytes_read
            .fetch_add(read as u64, Ordering::SeqCst);
        Tensor::from_raw_buffer(&out, dtype, &out_dims, &self.inner.device)?
            .to_dtype(self.inner.dtype)
    }
}

/// A stored piece of a tensor: the region of the full tensor it covers and its row-major bytes.
pub(crate) type StoredPiece<'a> = (Region, &'a [u8]);

/// A box in a tensor: `(start, len)` per dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Region(pub Vec<(usize, usize)>);

impl Region {
    pub fn whole(dims: &[usize]) -> Self {
        Self(dims.iter().map(|&d| (0, d)).collect())
    }

    pub fn restrict(mut self, dim: usize, start: usize, len: usize) -> Self {
        self.0[dim] = (start, len);
        self
    }

    pub fn lens(&self) -> Vec<usize> {
        self.0.iter().map(|r| r.1).collect()
    }

    pub fn volume(&self) -> usize {
        self.0.iter().map(|r| r.1).product()
    }

    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let mut r = Vec::with_capacity(self.0.len());
        for (&(a, al), &(b, bl)) in self.0.iter().zip(&other.0) {
            let (s, e) = (a.max(b), (a + al).min(b + bl));
            if s >= e {
                return None;
            }
            r.push((s, e - s));
        }
        Some(Region(r))
    }
}

/// Copies the elements of region `what` (global coordinates) from `src`, the row-major bytes of
/// region `src_region`, into `dst`, a buffer of dims `dst_dims` whose origin is at `dst_region`'s
/// start. Runs of contiguous elements are copied at once.
fn copy_box(
    src: &[u8],
    src_region: &Region,
    what: &Region,
    dst: &mut [u8],
    dst_region: &Region,
    dst_dims: &[usize],
    elem: usize,
) {
    let nd = what.0.len();
    let src_dims = src_region.lens();
    let lens = what.lens();
    // Merge trailing dims that are whole in source, destination and region into one run.
    let mut k = nd;
    while k > 0 && lens[k - 1] == src_dims[k - 1] && lens[k - 1] == dst_dims[k - 1] {
        k -= 1;
    }
    let tail: usize = lens[k..].iter().product::<usize>() * elem;
    let (run, outer_dims) = if k == 0 {
        (tail, 0)
    } else {
        (lens[k - 1] * tail, k - 1)
    };
    let strides = |dims: &[usize]| -> Vec<usize> {
        let mut s = vec![elem; nd];
        for i in (0..nd.saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1];
        }
        s
    };
    let (ss, ds) = (strides(&src_dims), strides(dst_dims));
    let mut idx = vec![0usize; outer_dims];
    loop {
        let (mut so, mut dofs) = (0, 0);
        for d in 0..nd {
            let i = if d < outer_dims { idx[d] } else { 0 };
            let g = what.0[d].0 + i; // global coordinate
            so += (g - src_region.0[d].0) * ss[d];
            dofs += (g - dst_region.0[d].0) * ds[d];
        }
        dst[dofs..dofs + run].copy_from_slice(&src[so..so + run]);
        // Next index over the outer dims, last fastest.
        let mut d = outer_dims;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < lens[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The safetensors files of a Hugging Face model directory.
pub fn hf_safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)?;
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

/// splitmix64: a fast, well-mixed 64-bit hash, used as a counter-based generator.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform sample in (0, 1) for element `i` of the tensor with key `key`.
pub(crate) fn uniform01(key: u64, i: u64) -> f64 {
    ((mix(key ^ mix(i)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal sample for element `i` (Box–Muller on two independent uniforms).
fn normal(key: u64, i: u64) -> f64 {
    let (u1, u2) = (uniform01(key, 2 * i), uniform01(key, 2 * i + 1));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The value of each element, as candle-nn's `Init` describes the distribution.
enum Dist {
    Const(f64),
    Normal { mean: f64, std: f64 },
    Uniform { lo: f64, up: f64 },
}

fn dist(init: Init, full: &[usize]) -> Dist {
    match init {
        Init::Const(v) => Dist::Const(v),
        Init::Randn { mean, stdev } => Dist::Normal { mean, std: stdev },
        Init::Uniform { lo, up } => Dist::Uniform { lo, up },
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let receptive: usize = full.iter().skip(2).product();
            let fan = match fan {
                FanInOut::FanIn => full.get(1).map_or(1, |d| d * receptive),
                FanInOut::FanOut => full.first().map_or(1, |d| d * receptive),
            };
            let gain = match non_linearity {
                NonLinearity::ReLU => 2f64.sqrt(),
                NonLinearity::Tanh => 5.0 / 3.0,
                NonLinearity::Linear | NonLinearity::Sigmoid => 1.0,
                NonLinearity::SELU => 0.75,
                NonLinearity::ExplicitGain(g) => g,
            };
            let std = gain / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => Dist::Normal { mean: 0.0, std },
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    Dist::Uniform { lo: -b, up: b }
                }
            }
        }
    }
}

/// This rank's slice of the deterministic initialisation of `name`: only its elements are
/// generated, each from its flat index in the full tensor.
fn init_slice(
    seed: u64,
    name: &str,
    full: &[usize],
    slice: Option<&Slice>,
    init: Init,
) -> Result<Tensor> {
    let key = name.bytes().fold(mix(seed), |h, b| mix(h ^ b as u64));
    let d = dist(init, full);
    let value = |i: usize| -> f32 {
        let i = i as u64;
        (match d {
            Dist::Const(v) => v,
            Dist::Normal { mean, std } => mean + std * normal(key, i),
            Dist::Uniform { lo, up } => lo + (up - lo) * uniform01(key, i),
        }) as f32
    };
    let (dims, values) = match slice {
        None => (
            full.to_vec(),
            (0..full.iter().product()).map(value).collect::<Vec<f32>>(),
        ),
        Some(s) => {
            let outer: usize = full[..s.dim].iter().product();
            let inner: usize = full[s.dim + 1..].iter().product();
            let mut v = Vec::with_capacity(outer * s.padded * inner);
            for o in 0..outer {
                let base = (o * full[s.dim] + s.start) * inner;
                v.extend((base..base + s.len * inner).map(value));
                v.extend(std::iter::repeat_n(0f32, (s.padded - s.len) * inner));
            }
            let mut dims = full.to_vec();
            dims[s.dim] = s.padded;
            (dims, v)
        }
    };
    Tensor::from_vec(values, dims, &Device::Cpu)
}

/// Reassembles the full tensor from every rank's `local` part (collective over `comm`, whose
/// ranks hold the parts that `shard` describes for each of them). Every rank gets the result.
/// Parts held by several ranks (replicated rows) are averaged, so they count once.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_parallel::checkpoint::{gather_full, Shard};
/// use candle_parallel::launch;
///
/// let full = launch(3, |ctx| {
///     let part = Tensor::full(ctx.rank() as f32, (2, 1), &Device::Cpu)?;
///     let shard = Shard::SplitPadded { dim: 1, rank: ctx.rank(), parts: 3 };
///     gather_full(&part, shard, &[2, 3], ctx.comm())
/// })?;
/// assert_eq!(full[0].to_vec2::<f32>()?, vec![vec![0.0, 1.0, 2.0]; 2]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gather_full(
    local: &Tensor,
    shard: Shard,
    full: &[usize],
    comm: &crate::comm::Comm,
) -> Result<Tensor> {
    use crate::comm::ReduceOp;
    let Some(s) = shard.slice(full, "(gather_full)")? else {
        // Replicated: every rank holds the whole tensor already; average any drift.
        return comm.all_reduce(&local.detach(), ReduceOp::Avg);
    };
    let real = local.detach().narrow(s.dim, 0, s.len)?;
    let after = full[s.dim] - s.start - s.len;
    let placed = real.pad_with_zeros(s.dim, s.start, after)?;
    let sum = comm.all_reduce(&placed, ReduceOp::Sum)?;
    // How many ranks hold each row along the shard dim.
    let mut ones = vec![0f32; full[s.dim]];
    ones[s.start..s.start + s.len]
        .iter_mut()
        .for_each(|v| *v = 1.0);
    let coverage = comm.all_reduce(
        &Tensor::new(ones.as_slice(), local.device())?,
        ReduceOp::Sum,
    )?;
    let mut shape = vec![1; full.len()];
    shape[s.dim] = full[s.dim];
    let coverage = coverage
        .maximum(1f32)?
        .reshape(shape)?
        .to_dtype(local.dtype())?;
    sum.broadcast_div(&coverage)
}

/// The gradient of every parameter at its full (unsharded) shape, by name, sorted by name
/// (collective over `comm`, the group the parameters are sharded over). A parameter without a
/// gradient gets zeros.
pub fn full_gradients(
    params: &[Param],
    grads: &candle_core::backprop::GradStore,
    comm: &crate::comm::Comm,
) -> Result<Vec<(String, Tensor)>> {
    params
        .iter()
        .map(|p| {
            let local = match grads.get(p.var.as_tensor()) {
                Some(g) => g.clone(),
                None => p.var.as_tensor().zeros_like()?,
            };
            Ok((
                p.name.clone(),
                gather_full(&local, p.shard, &p.full_dims, comm)?,
            ))
        })
        .collect()
}
