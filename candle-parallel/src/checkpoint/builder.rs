//! [`ParallelVarBuilder`]: what parallel layers build their parameters from. Like candle-nn's
//! `VarBuilder` (`vb.pp("model.layers.0")`), but every tensor comes with a [`Placement`]: which
//! part of the full (unsharded) tensor this rank holds.
//!
//! Two sources:
//! - **safetensors files** (Hugging Face checkpoints): memory-mapped; a rank copies only the
//!   byte ranges of its slice, never a whole sharded tensor;
//! - **deterministic initialisation**: every element of the full tensor is a pure function of
//!   (seed, tensor name, flat index), so a rank generates only its slice, and the slices at
//!   tp = 4 are exactly the slices of the tensor at tp = 1.
//!
//! With [`ParallelVarBuilder::trainable`], each tensor becomes a `Var` recorded under its full
//! name ([`ParallelVarBuilder::params`], sorted by name) for optimizers and gradient export.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::Init;
//! use candle_parallel::checkpoint::{Placement, ParallelVarBuilder};
//!
//! let full = ParallelVarBuilder::from_init(7, DType::F32, &Device::Cpu);
//! let part = ParallelVarBuilder::from_init(7, DType::F32, &Device::Cpu);
//! let init = Init::Uniform { lo: -1.0, up: 1.0 };
//! let w = full.pp("mlp").get((8, 4), "weight", Placement::Replicated, init)?;
//! let w1 = part.pp("mlp").get((8, 4), "weight", Placement::Split { dim: 0, rank: 1, parts: 2 }, init)?;
//! assert_eq!(w1.to_vec2::<f32>()?, w.narrow(0, 4, 4)?.to_vec2::<f32>()?);
//! # Ok::<(), candle_core::Error>(())
//! ```

use super::format::CheckpointMeta;
use super::init::init_slice;
use super::placement::{slice_of_full, Param, Placement};
use super::region::assemble;
use super::source::{
    hf_safetensors_files, DistSource, LayeredSource, SafeTensorsSource, TensorSource,
};
use crate::mesh::MeshDim;
use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::Init;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

enum Source {
    /// Deterministic initialisation ([`super::init`]).
    Init { seed: u64 },
    /// Safetensors files or a distributed checkpoint ([`super::source`]).
    Stored(Box<dyn TensorSource>),
    /// A candle-nn `VarBuilder` (a `VarMap`, a user's own backend): full tensors, sliced
    /// ([`ParallelVarBuilder::from_candle_nn`]).
    CandleNn(candle_nn::VarBuilder<'static>),
    /// This rank's slices, by full name, as they are (ZeRO 3 rebuilds a module from gathered
    /// parameters this way).
    Local(std::collections::HashMap<String, Tensor>),
}

/// A rule that a layer above storage (LoRA's) sets on a builder: which tensors are the
/// parameters to train (the others frozen), and which of those a checkpoint may lack
/// (initialised from a seed instead). Storage knows no layers; the layer says.
pub trait ParamPolicy: Send + Sync + 'static {
    /// Whether tensor `name` (a full name) is a parameter to train.
    fn trains(&self, name: &str) -> bool;
    /// The seed that initialises tensor `name` when it is trained and the checkpoint lacks
    /// it (`None`: the checkpoint must hold it).
    fn seed_if_missing(&self, name: &str) -> Option<u64>;
    /// The policy itself, for the layer that set it to read its configuration back.
    fn as_any(&self) -> &dyn std::any::Any;
}

struct Inner {
    source: Source,
    dtype: DType,
    device: Device,
    trainable: AtomicBool,
    params: Mutex<BTreeMap<String, Param>>,
    /// What a [`ParallelVarBuilder::shapes_only`] build recorded: the parameters it would
    /// have created.
    metas: Mutex<BTreeMap<String, ParamMeta>>,
    bytes_read: AtomicU64,
    /// A layer's rule on what is trained (LoRA's: only the adapters).
    policy: std::sync::OnceLock<Box<dyn ParamPolicy>>,
}

/// Builds a rank's parameter slices from a checkpoint or a deterministic initialisation.
/// Cheap to clone; clones share the recorded parameters. See the [module docs](self).
#[derive(Clone)]
pub struct ParallelVarBuilder {
    inner: Arc<Inner>,
    prefix: Vec<String>,
    local_to: Vec<MeshDim>,
    /// Nothing read or allocated: each tensor is a broadcast zero of its local shape, and a
    /// parameter is recorded as a [`ParamMeta`] (ZeRO 3 learns a module's parameters this
    /// way before reading only its partition of them).
    shapes_only: bool,
}

/// A parameter a [`ParallelVarBuilder::shapes_only`] build would have created: everything but
/// its values, and how to get them ([`ParallelVarBuilder::read_flat`]).
#[derive(Clone, Debug)]
pub(crate) struct ParamMeta {
    pub name: String,
    /// This rank's slice.
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub full_dims: Vec<usize>,
    pub placement: Placement,
    pub local_to: Vec<MeshDim>,
    pub init: Init,
}

impl ParallelVarBuilder {
    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                dtype,
                device: device.clone(),
                trainable: AtomicBool::new(false),
                params: Mutex::new(BTreeMap::new()),
                metas: Mutex::new(BTreeMap::new()),
                bytes_read: AtomicU64::new(0),
                policy: std::sync::OnceLock::new(),
            }),
            prefix: Vec::new(),
            local_to: Vec::new(),
            shapes_only: false,
        }
    }

    /// The metadata of the distributed checkpoint this builder reads, if it reads one.
    pub fn checkpoint_meta(&self) -> Option<&CheckpointMeta> {
        match &self.inner.source {
            Source::Stored(s) => s.checkpoint_meta(),
            Source::Init { .. } | Source::CandleNn(_) | Source::Local(_) => None,
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
        let paths = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        let source = SafeTensorsSource::open(paths)?;
        Ok(Self::new(Source::Stored(Box::new(source)), dtype, device))
    }

    /// Parameters read from safetensors files (as [`ParallelVarBuilder::from_safetensors`]),
    /// where a tensor absent under its own name may be stored under `alias(name)` (PEFT's
    /// `base_model.model.` names of LoRA adapters).
    pub fn from_safetensors_aliased<P: AsRef<Path>>(
        paths: &[P],
        dtype: DType,
        device: &Device,
        alias: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Result<Self> {
        let paths = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        let source = SafeTensorsSource::open(paths)?.with_alias(Box::new(alias));
        Ok(Self::new(Source::Stored(Box::new(source)), dtype, device))
    }

    /// Parameters of a Hugging Face model directory: `model.safetensors`, or the files named by
    /// `model.safetensors.index.json`.
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_safetensors(&hf_safetensors_files(dir)?, dtype, device)
    }

    /// From now on, every tensor this builder (or a clone) creates is a `Var`, recorded in
    /// [`ParallelVarBuilder::params`].
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
            local_to: self.local_to.clone(),
            shapes_only: self.shapes_only,
        }
    }

    /// A builder whose parameters ranks along mesh dimension `dim` hold separately (each its
    /// own), not as replicas: how a model declares its experts (`vb.local_to(MeshDim::Ep)`).
    /// Recorded in [`Param::local_to`], which gradient synchronisation, norm clipping and
    /// ZeRO read. A parameter created with a split [`Placement`] is local to `Tp` without
    /// saying so (tensor-parallel layers split over the tp group).
    pub fn local_to(&self, dim: MeshDim) -> Self {
        let mut s = self.clone();
        if !s.local_to.contains(&dim) {
            s.local_to.push(dim);
        }
        s
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
    /// This builder's prefix, the name of the module it builds (`model.layers.0.mlp`).
    pub fn path(&self) -> String {
        self.prefix.join(".")
    }

    /// From now on, `policy` decides which tensors this builder (or a clone) records as
    /// trainable parameters and which a checkpoint may lack (LoRA sets one:
    /// `lora::LoraBuilder::with_lora`). Set it before building the model; an error if one was
    /// set already or parameters were built before.
    pub fn with_policy(self, policy: Box<dyn ParamPolicy>) -> Result<Self> {
        let built = self
            .inner
            .params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        if built > 0 {
            bail!("with_policy: {built} parameters were built before it and would be trained whole; set the policy (e.g. with_lora) before building the model")
        }
        if self.inner.policy.set(policy).is_err() {
            bail!("with_policy: this builder has a policy already (e.g. a LoRA configuration)")
        }
        Ok(self)
    }

    /// The policy, if any ([`ParallelVarBuilder::with_policy`]).
    pub fn policy(&self) -> Option<&dyn ParamPolicy> {
        self.inner.policy.get().map(|p| p.as_ref())
    }

    pub fn full_name(&self, name: &str) -> String {
        let mut parts = self.prefix.clone();
        parts.push(name.to_string());
        parts.join(".")
    }

    /// Whether the checkpoint has a tensor `name` (always true for an initialisation).
    pub fn contains(&self, name: &str) -> bool {
        match &self.inner.source {
            Source::Init { .. } => true,
            Source::Stored(s) => s.contains(&self.full_name(name)),
            Source::CandleNn(vb) => vb.contains_tensor(&self.full_name(name)),
            Source::Local(m) => m.contains_key(&self.full_name(name)),
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

    /// Like [`ParallelVarBuilder::get`], but never recorded as a trainable parameter (for state
    /// such as optimizer moments).
    pub fn get_untracked<S: Into<Shape>>(
        &self,
        full: S,
        name: &str,
        shard: Placement,
        init: Init,
    ) -> Result<Tensor> {
        self.fetch(full.into(), name, shard, init, false, self.inner.dtype)
    }

    /// [`ParallelVarBuilder::get_untracked`] in `dtype` rather than the builder's (optimizer
    /// state in f32 under a bf16 model, a step count in f64).
    pub fn get_untracked_in<S: Into<Shape>>(
        &self,
        full: S,
        name: &str,
        shard: Placement,
        init: Init,
        dtype: DType,
    ) -> Result<Tensor> {
        self.fetch(full.into(), name, shard, init, false, dtype)
    }

    /// This rank's part of the tensor `name`, whose full shape is `full`: read from the
    /// checkpoint (which must hold exactly that shape) or initialised with `init`.
    pub fn get<S: Into<Shape>>(
        &self,
        full: S,
        name: &str,
        shard: Placement,
        init: Init,
    ) -> Result<Tensor> {
        let mut record = self.inner.trainable.load(Ordering::SeqCst);
        if let Some(p) = self.policy() {
            // E.g. LoRA: the base weights are frozen, only adapters are parameters.
            record &= p.trains(&self.full_name(name));
        }
        self.fetch(full.into(), name, shard, init, record, self.inner.dtype)
    }

    fn fetch(
        &self,
        full: Shape,
        name: &str,
        shard: Placement,
        init: Init,
        record: bool,
        dtype: DType,
    ) -> Result<Tensor> {
        let name = self.full_name(name);
        let slice = shard.slice(full.dims(), &name)?;
        if self.shapes_only {
            let dims = shard.local_dims(full.dims())?;
            if record {
                let mut metas = self.inner.metas.lock().unwrap_or_else(|e| e.into_inner());
                if metas.contains_key(&name) {
                    bail!("parameter {name} was created twice: each parameter name must be unique")
                }
                let local_to = self.local_to_of(shard);
                metas.insert(
                    name.clone(),
                    ParamMeta {
                        name,
                        dims: dims.clone(),
                        dtype,
                        full_dims: full.dims().to_vec(),
                        placement: shard,
                        local_to,
                        init,
                    },
                );
            }
            return Tensor::zeros((), dtype, &self.inner.device)?.broadcast_as(dims);
        }
        let missing_seed = match &self.inner.source {
            Source::Stored(s)
                if record && !s.contains(&name) && !name.starts_with("optimizer.") =>
            {
                self.policy().and_then(|p| p.seed_if_missing(&name))
            }
            _ => None,
        };
        let t = match &self.inner.source {
            Source::Init { seed } => init_slice(*seed, &name, full.dims(), slice.as_ref(), init)?
                .to_dtype(dtype)?
                .to_device(&self.inner.device)?,
            // A parameter the checkpoint does not have yet that the policy initialises (LoRA
            // adapters of a fresh fine-tuning run, from their names, so that every layout gets
            // the same). Only for parameters being trained (inference needs the saved ones;
            // an optimizer moment must come from the checkpoint).
            Source::Stored(_) if missing_seed.is_some() => init_slice(
                missing_seed.unwrap_or_default(),
                &name,
                full.dims(),
                slice.as_ref(),
                init,
            )?
            .to_dtype(dtype)?
            .to_device(&self.inner.device)?,
            Source::Stored(s) => {
                let (stored, pieces) = s.pieces(&name, full.dims())?;
                let (bytes, dims, read) =
                    assemble(&name, full.dims(), slice.as_ref(), stored, &pieces)?;
                self.inner
                    .bytes_read
                    .fetch_add(read as u64, Ordering::SeqCst);
                Tensor::from_raw_buffer(&bytes, stored, &dims, &self.inner.device)?
                    .to_dtype(dtype)?
            }
            Source::Local(m) => {
                let Some(t) = m.get(&name) else {
                    bail!("tensor {name} is not among the given local tensors")
                };
                let want = shard.local_dims(full.dims())?;
                if t.dims() != want.as_slice() {
                    bail!(
                        "tensor {name}: the local tensor has shape {:?}, but its shard {shard:?} of {:?} is {want:?}",
                        t.dims(),
                        full.dims()
                    )
                }
                t.to_dtype(dtype)?
            }
            Source::CandleNn(vb) => {
                let whole = vb.get_with_hints(full.clone(), &name, init)?;
                if whole.dims() != full.dims() {
                    bail!(
                        "tensor {name}: the candle-nn VarBuilder gives shape {:?} but the model expects {:?}",
                        whole.dims(),
                        full.dims()
                    )
                }
                slice_of_full(&whole, slice.as_ref())?
                    .to_dtype(dtype)?
                    .to_device(&self.inner.device)?
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
        let local_to = self.local_to_of(shard);
        params.insert(
            name.clone(),
            Param {
                name,
                var: var.clone(),
                full_dims: full.dims().to_vec(),
                placement: shard,
                local_to,
            },
        );
        Ok(var.as_tensor().clone())
    }

    /// The mesh dimensions a parameter placed as `shard` under this builder is local to: the
    /// builder's, and tp for a slice.
    fn local_to_of(&self, shard: Placement) -> Vec<MeshDim> {
        let mut local_to = self.local_to.clone();
        if shard != Placement::Replicated && !local_to.contains(&MeshDim::Tp) {
            local_to.push(MeshDim::Tp);
        }
        local_to.sort();
        local_to
    }

    /// The full shape of the stored tensor `name` (under this builder's prefix), where the
    /// source knows it without being told (not for an initialisation).
    pub fn stored_dims(&self, name: &str) -> Option<Vec<usize>> {
        let name = self.full_name(name);
        match &self.inner.source {
            Source::Init { .. } => None,
            Source::Stored(s) => s.dims(&name),
            Source::CandleNn(vb) => vb.get_unchecked(&name).ok().map(|t| t.dims().to_vec()),
            Source::Local(_) => None,
        }
    }

    /// The same source and prefix as `self`, over another source: what a module built under
    /// `self` is rebuilt from (ZeRO 3).
    pub(crate) fn with_prefix_of(mut self, other: &Self) -> Self {
        self.prefix = other.prefix.clone();
        self.local_to = other.local_to.clone();
        self
    }

    /// Whether the builder records its tensors as trainable parameters.
    pub(crate) fn is_trainable(&self) -> bool {
        self.inner.trainable.load(Ordering::SeqCst)
    }

    /// The recorded parameter `name` (a full name), if any.
    pub(crate) fn recorded(&self, name: &str) -> Option<Param> {
        let params = self.inner.params.lock().unwrap_or_else(|e| e.into_inner());
        params.get(name).cloned()
    }

    /// The same builder without its prefix (names are then full names).
    pub(crate) fn root(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            prefix: Vec::new(),
            local_to: Vec::new(),
            shapes_only: false,
        }
    }

    /// This builder, reading nothing: each tensor is a broadcast zero of its local shape
    /// (no memory), each parameter recorded as a [`ParamMeta`] for
    /// [`ParallelVarBuilder::take_new_metas`].
    pub(crate) fn shapes_only(&self) -> Self {
        Self {
            shapes_only: true,
            ..self.clone()
        }
    }

    /// The parameters recorded by shapes-only builds since the last call, in name order.
    pub(crate) fn take_new_metas(&self) -> Vec<ParamMeta> {
        let mut metas = self.inner.metas.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *metas).into_values().collect()
    }

    /// Elements `start..start + len` of parameter `meta`'s slice (this rank's tp/ep part),
    /// flattened row-major, in the builder's dtype: read from the source as
    /// [`ParallelVarBuilder::get`] would (checksums included), one parameter at a time, and
    /// only the range kept.
    pub(crate) fn read_flat(&self, meta: &ParamMeta, start: usize, len: usize) -> Result<Tensor> {
        // A trained parameter the checkpoint lacks is initialised as `get` would (the policy's
        // seed); anything else is read.
        let seed = match &self.inner.source {
            Source::Stored(s)
                if !s.contains(&meta.name) && !meta.name.starts_with("optimizer.") =>
            {
                self.policy()
                    .filter(|p| p.trains(&meta.name))
                    .and_then(|p| p.seed_if_missing(&meta.name))
            }
            _ => None,
        };
        // From a checkpoint, only the rows of the slice that hold the wanted elements.
        if let (None, Source::Stored(s), Some(&d0)) = (seed, &self.inner.source, meta.dims.first())
        {
            let row = meta.dims[1..].iter().product::<usize>().max(1);
            let r0 = start / row;
            if start + len > d0 * row {
                bail!(
                    "tensor {}: elements {start}..{} asked of its slice {:?}, which holds {}",
                    meta.name,
                    start + len,
                    meta.dims,
                    d0 * row
                )
            }
            let r1 = (start + len).div_ceil(row).max(r0);
            let slice = meta.placement.slice(&meta.full_dims, &meta.name)?;
            let (stored, pieces) = s.pieces(&meta.name, &meta.full_dims)?;
            let (bytes, dims, read) = super::region::assemble_rows(
                &meta.name,
                &meta.full_dims,
                slice.as_ref(),
                r0..r1,
                stored,
                &pieces,
            )?;
            self.inner
                .bytes_read
                .fetch_add(read as u64, Ordering::SeqCst);
            let rows = Tensor::from_raw_buffer(&bytes, stored, &dims, &self.inner.device)?
                .to_dtype(meta.dtype)?;
            let (a, b) = (r0 * row, r1 * row);
            if start + len > b || dims[1..] != meta.dims[1..] {
                bail!(
                    "tensor {}: rows {r0}..{r1} of its slice {:?} read as {dims:?}, which does not hold elements {start}..{}",
                    meta.name,
                    meta.dims,
                    start + len
                )
            }
            return rows.flatten_all()?.narrow(0, start - a, len)?.copy();
        }
        let whole = match seed {
            Some(seed) => {
                let slice = meta.placement.slice(&meta.full_dims, &meta.name)?;
                init_slice(seed, &meta.name, &meta.full_dims, slice.as_ref(), meta.init)?
                    .to_dtype(meta.dtype)?
                    .to_device(&self.inner.device)?
            }
            None => self.root().fetch(
                Shape::from(meta.full_dims.clone()),
                &meta.name,
                meta.placement,
                meta.init,
                false,
                meta.dtype,
            )?,
        };
        if whole.dims() != meta.dims.as_slice() || start + len > whole.elem_count() {
            bail!(
                "tensor {}: its slice is {:?}, expected {:?} (elements {start}..{} wanted)",
                meta.name,
                whole.dims(),
                meta.dims,
                start + len
            )
        }
        // A copy: the rest of the parameter is freed.
        whole.flatten_all()?.narrow(0, start, len)?.copy()
    }

    /// Parameters read from a candle-nn `VarBuilder` (over a `VarMap`, safetensors, or any
    /// candle-nn backend): each rank takes its slice of the full tensor the builder gives (a
    /// copy; the `VarMap`'s own variables are not shared). A tensor the backend lacks is
    /// created by it with the `Init` hint, as candle-nn would (a `VarMap` shared by all rank
    /// threads creates it once, so every rank slices the same values).
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_parallel::checkpoint::ParallelVarBuilder;
    /// use candle_parallel::{launch, tensor_parallel::column_parallel_linear};
    ///
    /// // A single-device model's weights, in a VarMap the user already has.
    /// let varmap = candle_nn::VarMap::new();
    /// let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let dense = candle_nn::linear(4, 6, vb.pp("fc"))?;
    /// let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?;
    /// let want = dense.forward(&x)?.to_vec2::<f32>()?;
    /// let outs = launch(2, |ctx| {
    ///     let vb = ParallelVarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ///     let fc = column_parallel_linear(4, 6, vb.pp("fc"), ctx.comm())?.with_gather_output(true);
    ///     fc.forward(&x)?.to_vec2::<f32>()
    /// })?;
    /// assert_eq!(outs[1], want);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn from_candle_nn(vb: candle_nn::VarBuilder<'static>) -> Self {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        Self::new(Source::CandleNn(vb), dtype, &device)
    }

    /// Parameters given as this rank's slices already (by full name): `get` checks each
    /// against the shape its placement implies and returns it as is.
    pub fn from_local_tensors(
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self::new(Source::Local(tensors), dtype, device)
    }

    /// [`ParallelVarBuilder::from_candle_nn`] over a `VarMap`.
    pub fn from_varmap(varmap: &candle_nn::VarMap, dtype: DType, device: &Device) -> Self {
        Self::from_candle_nn(candle_nn::VarBuilder::from_varmap(varmap, dtype, device))
    }

    /// Parameters read from a distributed checkpoint saved under any layout: each rank reads
    /// only the byte ranges of the saved pieces that overlap its own shard.
    pub fn from_checkpoint(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let source = DistSource::open(dir)?;
        Ok(Self::new(Source::Stored(Box::new(source)), dtype, device))
    }

    /// A distributed checkpoint that holds only some tensors (a LoRA run's adapters and
    /// optimizer state) over the Hugging Face model directory `base` that holds the rest.
    pub fn from_checkpoint_over_hf_dir(
        dir: &Path,
        base: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let top = DistSource::open(dir)?;
        let below = SafeTensorsSource::open(hf_safetensors_files(base)?)?;
        let source = LayeredSource(vec![Box::new(top), Box::new(below)]);
        Ok(Self::new(Source::Stored(Box::new(source)), dtype, device))
    }
}
