//! ZeRO stages 0 to 3: AdamW whose state (and, at stage 3, parameters) is sharded over the
//! data-parallel replicas, with gradient synchronisation, global-norm clipping and mixed
//! precision in the same step.
//!
//! The parameters of each synchronisation group (those summed over the same batch dimensions,
//! see [`crate::data_parallel::BatchGroups`]) are packed into flat f32 buckets, padded to a
//! multiple of the group size N; rank r owns the r-th of N equal partitions of every bucket.
//!
//! | stage | gradients | optimizer state (AdamW moments; f32 master weights for 16-bit params) | parameters |
//! |---|---|---|---|
//! | 0 | all-reduced in place into full buckets kept between steps | full, on every replica | whole |
//! | 1 | full buckets kept, reduce-scattered to this rank's partition | this rank's partition | whole |
//! | 2 | reduce-scattered (per bucket, as the backward completes it); only this rank's partition is kept | this rank's partition | whole |
//! | 3 | reduce-scattered in the backward pass, module by module | this rank's partition | this rank's partition ([`ShardedModule`]) |
//!
//! At stages 1 and 2 each rank updates its partition and the parameters are all-gathered (in
//! their own dtype) after the step. At stage 3 the parameters stay partitioned: a
//! [`ShardedModule`] gathers its parameters just before its forward and again in the backward
//! pass, and frees them after each (or keeps them until the backward:
//! [`ShardedModule::set_reshard_after_forward`]).
//!
//! The optimizer is also a [`GradSink`]: a model whose backward runs one unit (layer) at a
//! time hands it each unit's gradients as they exist, and they are packed into the buckets
//! (and at stage 2 reduce-scattered as soon as a bucket's units are done) while the next unit
//! runs backward, so the full gradients of the whole model never exist at once; then
//! [`ZeroOptimizer::step_accumulated`]. [`ZeroOptimizer::step`] takes whole gradients (one
//! micro-batch through the same path). What each rank holds between steps is the table's
//! ([`ZeroOptimizer::memory`], measured by `bench_data_parallel` with
//! [`crate::memory::CountingAlloc`]).
//!
//! Parameters in bf16/f16 (mixed precision) get f32 master copies of their partition, which
//! the update reads and writes; the gradients are reduced in f32. At stage 3 the f32 partition
//! is both: the module gathers it in its compute dtype.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_parallel::checkpoint::ParallelVarBuilder;
//! use candle_parallel::mesh::MeshDim;
//! use candle_parallel::optim::AdamWConfig;
//! use candle_parallel::tensor_parallel::column_parallel_linear;
//! use candle_parallel::zero::{ZeroConfig, ZeroOptimizer};
//! use candle_parallel::{Launcher, MeshShape};
//!
//! let out = Launcher::new(4).mesh(MeshShape::new().dp(2).tp(2)).run(|ctx| {
//!     let mesh = ctx.mesh()?;
//!     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
//!     let fc = column_parallel_linear(4, 4, vb.pp("fc"), mesh.tp())?.with_gather_output(true);
//!     let params = vb.params();
//!     let cfg = ZeroConfig { stage: 2, adamw: AdamWConfig { lr: 1e-2, ..Default::default() }, ..Default::default() };
//!     let mut opt = ZeroOptimizer::new(params.clone(), &mesh, &[MeshDim::Dp], cfg)?;
//!     let x = Tensor::full(1f32 + mesh.dp().rank() as f32, (2, 4), &Device::Cpu)?;
//!     let grads = fc.forward(&x)?.sqr()?.mean_all()?.backward()?;
//!     let norm = opt.step(&opt.grads_of(&grads), Some(1.0))?;
//!     Ok((norm, opt.memory().optimizer_bytes))
//! })?;
//! // The same norm everywhere; each rank keeps half of the moments (2 × 4 × 4 / 2 / 2 × 4 B,
//! // plus the bias's).
//! assert!(out.iter().all(|(n, _)| *n == out[0].0));
//! assert_eq!(out[0].1, (16 + 4) / 2 / 2 * 2 * 4);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod sharded;

pub use sharded::ShardedModule;

use crate::checkpoint::{ParallelVarBuilder, Param, Placement, ShardedTensor};
use crate::comm::{Comm, ReduceOp, Work};
use crate::data_parallel::{plan_buckets, BatchGroups, GradSink, DEFAULT_BUCKET_BYTES};
use crate::mesh::{DeviceMesh, MeshDim};
use crate::optim::{clip_factor, fused, saved_state, saved_step, step_entry, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};

/// Elements per slice of the AdamW update (4 MiB of f32).
const ADAMW_CHUNK: usize = fused::SLICE;

/// ZeRO settings.
#[derive(Clone, Copy, Debug)]
pub struct ZeroConfig {
    /// 0 (plain data parallelism), 1 (optimizer state sharded), 2 (gradients too) or 3
    /// (parameters too: [`ZeroOptimizer::new_sharded`]).
    pub stage: u8,
    /// Bucket size in bytes of f32 (DDP's 25 MiB by default).
    pub bucket_bytes: usize,
    pub adamw: AdamWConfig,
    /// On the CPU, the step's element-wise work as fused passes in place (AdamW, the gradient
    /// norm; whole f32 parameters that need no gathering, as at stage 0, are updated where
    /// they live). `false` runs candle's composite ops, as on GPUs: the same numbers to float
    /// rounding, several times slower on the CPU (kept for comparison: `bench_data_parallel`
    /// times both).
    pub fused: bool,
    /// The dtype gradients cross the replicas in (FSDP2's `reduce_dtype`): f32 (the default),
    /// or bf16 / f16 for half the bytes. Packing, accumulation over micro-batches, the norm and
    /// the step stay f32 either way.
    pub reduce_dtype: DType,
    /// Reduce each gradient bucket over the replicas on the group's communication lane as soon
    /// as its unit's backward is over, while the next unit's backward runs (DeepSpeed's
    /// `overlap_comm`, Megatron's `overlap_grad_reduce`): at stage 2 in every micro-batch, at
    /// stages 0 and 1 in the step's last (gradients handed over as a [`GradSink`] whose
    /// caller announces it). The same numbers as without: the same operations, earlier.
    /// Default `true`.
    pub overlap_comm: bool,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        Self {
            stage: 0,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            adamw: AdamWConfig::default(),
            fused: true,
            reduce_dtype: DType::F32,
            overlap_comm: true,
        }
    }
}

/// `x` (f32) reduce-scattered along dim 0 over `c`, crossing in `dtype`; f32 again.
pub(crate) fn reduce_scatter_in(c: &Comm, x: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F32 {
        return c.reduce_scatter(x, 0, ReduceOp::Sum);
    }
    c.reduce_scatter(&x.to_dtype(dtype)?, 0, ReduceOp::Sum)?
        .to_dtype(DType::F32)
}

/// `x` (f32) all-reduced over `c`, crossing in `dtype`: in place for f32, else a new f32
/// tensor.
fn all_reduce_in(c: &Comm, x: Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F32 {
        c.all_reduce_in_place(&x, ReduceOp::Sum)?;
        return Ok(x);
    }
    c.all_reduce(&x.to_dtype(dtype)?, ReduceOp::Sum)?
        .to_dtype(DType::F32)
}

/// Bytes one rank holds, by kind (see [`ZeroOptimizer::memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// The parameters: this rank's tp/ep slices, whole over dp (stages 0–2) or this rank's
    /// partition of them (stage 3).
    pub param_bytes: usize,
    /// Gradient storage the optimizer keeps: full f32 buckets (stages 0 and 1) or this rank's
    /// partition of them (stages 2 and 3).
    pub grad_bytes: usize,
    /// AdamW's two moments and, for 16-bit parameters, the f32 master weights: whole (stage 0)
    /// or this rank's partition (stages 1 to 3).
    pub optimizer_bytes: usize,
}

impl MemoryReport {
    pub fn total(&self) -> usize {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes
    }
}

/// A parameter as the optimizer sees it (whole or inside a sharded module).
#[derive(Clone, Debug)]
pub(crate) struct Info {
    pub name: String,
    /// This rank's slice (over tp/ep).
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub full_dims: Vec<usize>,
    pub placement: Placement,
    pub local_to: Vec<MeshDim>,
    /// How many ranks of the mesh hold each element ([`Param::holders`]).
    pub holders: f64,
}

impl Info {
    /// A parameter a module would create, not yet read (ZeRO 3's partitioned load).
    pub(crate) fn of_meta(p: &crate::checkpoint::ParamMeta, mesh: &DeviceMesh) -> Self {
        Self {
            name: p.name.clone(),
            dims: p.dims.clone(),
            dtype: p.dtype,
            full_dims: p.full_dims.clone(),
            placement: p.placement,
            local_to: p.local_to.clone(),
            holders: crate::checkpoint::holders(&p.local_to, p.placement, &p.full_dims, mesh),
        }
    }

    pub(crate) fn of(p: &Param, mesh: &DeviceMesh) -> Self {
        Self {
            name: p.name.clone(),
            dims: p.var.dims().to_vec(),
            dtype: p.var.dtype(),
            full_dims: p.full_dims.clone(),
            placement: p.placement,
            local_to: p.local_to.clone(),
            holders: p.holders(mesh),
        }
    }
}

/// Where one parameter lies in a flat bucket.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    /// Index into the optimizer's (or module's) infos.
    pub info: usize,
    pub offset: usize,
    pub len: usize,
}

/// Where a bucket's parameters live.
enum Home {
    /// Whole parameters (stages 0–2): gradients are packed into this full buffer (kept at
    /// stages 0 and 1).
    Whole { grad: Option<Tensor> },
    /// A sharded module's partition (stage 3): elements `offset..offset + len` of shard
    /// variable `var`; its gradient arrives reduced.
    Shard { var: usize, offset: usize },
}

/// One bucket and this rank's part of it.
struct Bucket {
    segs: Vec<Seg>,
    padded: usize,
    /// This rank's partition: elements `start..start + len` of the padded bucket.
    start: usize,
    len: usize,
    /// The batch dimensions its gradients are summed over (and, partitioned, split over).
    dims: Vec<MeshDim>,
    comm: Option<Comm>,
    home: Home,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// f32 master weights of the partition (16-bit parameters only).
    master: Option<Tensor>,
}

/// AdamW with ZeRO over the batch dimensions of a mesh. See the [module docs](self).
pub struct ZeroOptimizer {
    infos: Vec<Info>,
    /// What the step's gradients are for, in order: the whole parameters, then the sharded
    /// modules' shards.
    vars: Vec<Var>,
    /// `vars` index of each info's whole parameter (`None` inside a sharded module).
    whole: Vec<Option<usize>>,
    modules: Vec<ShardedModule>,
    buckets: Vec<Bucket>,
    cfg: ZeroConfig,
    world: Comm,
    mesh: DeviceMesh,
    replicas: usize,
    step: u64,
    /// The gradients of the step being accumulated, per bucket.
    acc: Vec<BucketGrad>,
    /// Per variable (of `vars`), the buckets and segment positions its gradient goes to.
    routes: Vec<Vec<(usize, usize)>>,
    /// Micro-batches ended since the last step.
    micro_batches: usize,
    /// The current micro-batch is the step's last ([`GradSink::begin_backward`]).
    last_backward: bool,
    /// Stage 2 with `overlap_comm`: the buckets whose reduce-scatter runs on the lane, oldest
    /// first. At most [`MAX_REDUCTIONS_IN_FLIGHT`]: a backward that outruns the lane waits for
    /// the oldest instead of piling up full buckets (DeepSpeed bounds them the same way).
    in_flight: std::collections::VecDeque<usize>,
}

/// How many buckets' reductions may run on the lane while the backward goes on.
const MAX_REDUCTIONS_IN_FLIGHT: usize = 2;

/// A bucket's gradient while a step's backward passes run (see [`GradSink`]).
#[derive(Default)]
struct BucketGrad {
    /// Stage 2: the full bucket of the current micro-batch, from its first gradient until it
    /// is reduce-scattered (stages 0 and 1 pack into the bucket's kept buffer instead).
    full: Option<Tensor>,
    /// Per segment: holds a gradient (this step's at stages 0–1, this micro-batch's at 2).
    written: Vec<bool>,
    /// Per segment: its unit is done in this micro-batch.
    done: Vec<bool>,
    /// Stage 2: reduce-scattered in this micro-batch already.
    reduced: bool,
    /// Stages 2 and 3: this rank's partition of the gradient, summed over the micro-batches
    /// in place; allocated once and kept between steps (DeepSpeed's partitioned gradients).
    part: Option<Tensor>,
    /// Whether `part` holds this step's gradient yet.
    part_written: bool,
    /// A reduction started on the lane and not yet taken: at stage 2 this micro-batch's
    /// partition (to add into `part`), at stages 0 and 1 the step's reduced gradient.
    pending: Option<Work<Tensor>>,
    /// Stages 0 and 1: the micro-batch count the started reduction divided by.
    pending_m: usize,
}

impl BucketGrad {
    /// Adds `g` into the partition (the first gradient of a step is written).
    fn add_to_part(&mut self, g: &Tensor) -> Result<()> {
        let part = self
            .part
            .as_ref()
            .expect("a partition buffer at stages 2 and 3");
        write_or_add(part, g, 0, !self.part_written)?;
        self.part_written = true;
        Ok(())
    }
}

/// A kept bucket's gradient (stages 0 and 1) as the step reduces it: the mean over `m`
/// micro-batches, with zeros for the parameters that got no gradient this step.
fn kept_bucket_mean(buf: &Tensor, segs: &[Seg], written: &[bool], m: usize) -> Result<Tensor> {
    for (s, w) in segs.iter().zip(written) {
        if !w {
            let zeros = Tensor::zeros(s.len, DType::F32, buf.device())?;
            buf.slice_set(&zeros, 0, s.offset)?;
        }
    }
    match m {
        0 | 1 => Ok(buf.clone()),
        m => buf / m as f64,
    }
}

/// Writes `src` into `dst` at element `at` (`first`), or adds it to what is there.
fn write_or_add(dst: &Tensor, src: &Tensor, at: usize, first: bool) -> Result<()> {
    let src = src.contiguous()?;
    if first {
        dst.slice_set(&src, 0, at)
    } else {
        let sum = (dst.narrow(0, at, src.elem_count())? + src)?;
        dst.slice_set(&sum, 0, at)
    }
}

impl ZeroOptimizer {
    /// An optimizer (stages 0–2) for `params` on `mesh`, whose `batch_dims` split every global
    /// batch (dp; with all-to-all expert dispatch also ep). Collective over the world: the
    /// replicas must hold the same parameters (an error on every rank names the first
    /// difference).
    pub fn new(
        params: Vec<Param>,
        mesh: &DeviceMesh,
        batch_dims: &[MeshDim],
        cfg: ZeroConfig,
    ) -> Result<Self> {
        if cfg.stage > 2 {
            bail!(
                "ZeRO stage {}: use 0 (data parallel), 1 (optimizer state sharded) or 2 (gradients too) here; stage 3 shards the parameters too, which the model must be built for: wrap its layers in zero::ShardedModule and use ZeroOptimizer::new_sharded",
                cfg.stage
            )
        }
        Self::with_groups(params, &BatchGroups::new(mesh, batch_dims)?, mesh, cfg)
    }

    /// [`ZeroOptimizer::new`] with batch groups made already (their communicators reused).
    pub fn with_groups(
        params: Vec<Param>,
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        cfg: ZeroConfig,
    ) -> Result<Self> {
        if cfg.stage > 2 {
            bail!(
                "ZeRO stage {}: stage 3 shards the parameters too, which the model must be built for: wrap its layers in zero::ShardedModule and use ZeroOptimizer::new_sharded",
                cfg.stage
            )
        }
        Self::build(params, &[], batch, mesh, cfg)
    }

    /// An optimizer at stage 3: the `modules`' parameters are sharded (built with the same
    /// `batch` groups); `params`, the model's other parameters, are handled as at stage 2.
    /// Collective over the world.
    pub fn new_sharded(
        modules: &[&ShardedModule],
        params: Vec<Param>,
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        cfg: ZeroConfig,
    ) -> Result<Self> {
        if cfg.stage != 3 {
            bail!(
                "ZeroOptimizer::new_sharded is stage 3 (sharded parameters); got stage {}",
                cfg.stage
            )
        }
        for m in modules {
            m.set_reduce_dtype(cfg.reduce_dtype);
        }
        Self::build(params, modules, batch, mesh, cfg)
    }

    fn build(
        params: Vec<Param>,
        modules: &[&ShardedModule],
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        cfg: ZeroConfig,
    ) -> Result<Self> {
        if !matches!(cfg.reduce_dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!(
                "ZeroOptimizer: reduce_dtype {:?}: gradients cross the replicas in f32, bf16 or f16",
                cfg.reduce_dtype
            )
        }
        let device = mesh.world().device().clone();
        let zeros = |len: usize| Tensor::zeros(len, DType::F32, &device);
        // One variable under two names would be updated twice (in place, twice as far).
        let mut seen = std::collections::HashMap::new();
        for p in &params {
            if let Some(first) = seen.insert(p.var.as_tensor().id(), &p.name) {
                bail!(
                    "ZeroOptimizer: {first} and {} are the same variable; give each parameter once \
                     (tie weights by using one name)",
                    p.name
                )
            }
        }
        let mut infos: Vec<Info> = params.iter().map(|p| Info::of(p, mesh)).collect();
        let mut vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();
        let mut whole: Vec<Option<usize>> = (0..params.len()).map(Some).collect();
        let mut buckets = Vec::new();
        for g in batch.groups_of(&params)? {
            let (dims, comm, n, rank) = (&g.dims, &g.comm, g.size, g.rank);
            for layout in plan_buckets(&params, &g.members, cfg.bucket_bytes, n) {
                let segs: Vec<Seg> = layout
                    .segments
                    .iter()
                    .map(|s| Seg {
                        info: s.param,
                        offset: s.offset,
                        len: s.len,
                    })
                    .collect();
                let (start, len) = match cfg.stage {
                    0 => (0, layout.padded),
                    _ => (rank * layout.padded / n, layout.padded / n),
                };
                let master = match segs.iter().any(|s| infos[s.info].dtype != DType::F32) {
                    true => Some(flat_of_vars(&vars, &whole, &segs, start, len)?),
                    false => None,
                };
                let grad = match cfg.stage {
                    0 | 1 => Some(zeros(layout.padded)?),
                    _ => None,
                };
                buckets.push(Bucket {
                    segs,
                    padded: layout.padded,
                    start,
                    len,
                    dims: dims.clone(),
                    comm: comm.clone(),
                    home: Home::Whole { grad },
                    exp_avg: zeros(len)?,
                    exp_avg_sq: zeros(len)?,
                    master,
                });
            }
        }
        for m in modules {
            let var = vars.len();
            vars.push(m.shard().clone());
            let first = infos.len();
            infos.extend(m.infos().iter().cloned());
            whole.extend(m.infos().iter().map(|_| None));
            for g in m.groups() {
                let segs = g
                    .segs
                    .iter()
                    .map(|s| Seg {
                        info: first + s.info,
                        ..*s
                    })
                    .collect();
                // The shard is f32 whatever the module computes in: it is the master copy.
                let master = None;
                buckets.push(Bucket {
                    segs,
                    padded: g.padded,
                    start: g.rank * g.part,
                    len: g.part,
                    dims: g.dims.clone(),
                    comm: g.comm.clone(),
                    home: Home::Shard {
                        var,
                        offset: g.var_offset,
                    },
                    exp_avg: zeros(g.part)?,
                    exp_avg_sq: zeros(g.part)?,
                    master,
                });
            }
        }
        Self {
            infos,
            vars,
            whole,
            modules: modules.iter().map(|m| (*m).clone()).collect(),
            buckets,
            cfg,
            world: mesh.world().clone(),
            mesh: mesh.clone(),
            replicas: batch.replicas(),
            step: 0,
            acc: Vec::new(),
            routes: Vec::new(),
            micro_batches: 0,
            last_backward: false,
            in_flight: std::collections::VecDeque::new(),
        }
        .with_routes()
    }

    /// The accumulation state: where each variable's gradient goes.
    fn with_routes(mut self) -> Result<Self> {
        self.routes = vec![Vec::new(); self.vars.len()];
        for (bi, b) in self.buckets.iter().enumerate() {
            match b.home {
                Home::Whole { .. } => {
                    for (si, seg) in b.segs.iter().enumerate() {
                        let v = self.whole[seg.info].expect("a whole parameter");
                        self.routes[v].push((bi, si));
                    }
                }
                Home::Shard { var, .. } => self.routes[var].push((bi, 0)),
            }
        }
        let device = self.world.device().clone();
        self.acc = self
            .buckets
            .iter()
            .map(|b| {
                let partitioned = !matches!(b.home, Home::Whole { grad: Some(_) });
                Ok(BucketGrad {
                    written: vec![false; b.segs.len()],
                    done: vec![false; b.segs.len()],
                    part: match partitioned {
                        true => Some(Tensor::zeros(b.len, DType::F32, &device)?),
                        false => None,
                    },
                    ..Default::default()
                })
            })
            .collect::<Result<_>>()?;
        Ok(self)
    }

    /// The variables the step's gradients are for, in order: the whole parameters, then the
    /// sharded modules' shards.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The gradients of [`ZeroOptimizer::vars`] in a backward pass's store, in their order.
    pub fn grads_of(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect()
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn learning_rate(&self) -> f64 {
        self.cfg.adamw.lr
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.adamw.lr = lr;
    }

    /// Turns [`ZeroConfig::overlap_comm`] on or off from the next micro-batch on (between
    /// steps: the numbers are the same either way). Every rank must do the same.
    pub fn set_overlap_comm(&mut self, overlap: bool) {
        self.cfg.overlap_comm = overlap;
    }

    /// The ZeRO stage.
    pub fn stage(&self) -> u8 {
        self.cfg.stage
    }

    /// How many replicas a global batch is split over.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Bytes this rank holds for the parameters, the gradients the optimizer holds (the kept
    /// full buckets at stages 0 and 1, the kept partitions at stages 2 and 3, and any full
    /// bucket being reduced at stage 2 while a backward runs), and the optimizer state,
    /// counted from the tensors themselves.
    pub fn memory(&self) -> MemoryReport {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut r = MemoryReport {
            param_bytes: self.vars.iter().map(|v| bytes(v.as_tensor())).sum(),
            ..Default::default()
        };
        for (b, a) in self.buckets.iter().zip(&self.acc) {
            if let Home::Whole { grad: Some(g) } = &b.home {
                r.grad_bytes += bytes(g);
            }
            r.grad_bytes += a.full.as_ref().map_or(0, bytes) + a.part.as_ref().map_or(0, bytes);
            r.optimizer_bytes += bytes(&b.exp_avg) + bytes(&b.exp_avg_sq);
            r.optimizer_bytes += b.master.as_ref().map_or(0, bytes);
        }
        r
    }

    /// One step from every rank's gradients of the mean loss over its own examples (in the
    /// order of [`ZeroOptimizer::vars`]; `None` counts as zeros, as DDP's unused parameters):
    /// reduces them over the replicas (the gradient of the mean loss over the global batch),
    /// clips their global norm to `max_norm` (torch's `clip_grad_norm_`), and takes one AdamW
    /// step (torch's semantics). Returns the norm before clipping, the same on every rank.
    ///
    /// The same as handing the gradients to the optimizer as a [`GradSink`] (one micro-batch)
    /// and calling [`ZeroOptimizer::step_accumulated`].
    pub fn step(&mut self, grads: &[Option<Tensor>], max_norm: Option<f64>) -> Result<f64> {
        if grads.len() != self.vars.len() {
            bail!(
                "ZeroOptimizer::step: {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )
        }
        if self.micro_batches > 0 {
            bail!(
                "ZeroOptimizer::step: {} micro-batches of gradients were handed over already; \
                 finish with step_accumulated",
                self.micro_batches
            )
        }
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                if let Err(e) = self.add_grad(i, g) {
                    // Nothing of a refused step stays behind for the next one.
                    self.discard_grads();
                    return Err(e);
                }
            }
        }
        self.end_micro_batch()?;
        self.step_accumulated(max_norm)
    }

    /// Forgets the gradients handed over since the last step (e.g. after an error in a
    /// backward pass): the next step starts from none. Local (no collective).
    pub fn discard_grads(&mut self) {
        for module in &self.modules {
            module.discard_prefetched();
        }
        for a in &mut self.acc {
            if let Some(w) = a.pending.take() {
                // The peers run it too; its result (or error) no longer matters.
                let _ = w.wait();
            }
            a.full = None;
            a.written.iter_mut().for_each(|w| *w = false);
            a.done.iter_mut().for_each(|d| *d = false);
            a.reduced = false;
            a.part_written = false;
        }
        self.micro_batches = 0;
        self.last_backward = false;
        self.in_flight.clear();
    }

    /// Packs one gradient of variable `v` into its buckets' accumulators.
    fn pack(&mut self, v: usize, g: &Tensor) -> Result<()> {
        let var = &self.vars[v];
        if g.dims() != var.dims() {
            let name = self.name_of_var(var);
            bail!(
                "ZeroOptimizer: the gradient of {name} has shape {:?}, the parameter (this rank's part) {:?}",
                g.dims(),
                var.dims()
            )
        }
        let device = self.world.device().clone();
        let flat = g.flatten_all()?.to_dtype(DType::F32)?;
        for &(bi, si) in &self.routes[v] {
            let (b, a) = (&self.buckets[bi], &mut self.acc[bi]);
            match &b.home {
                Home::Shard { offset, .. } => a.add_to_part(&flat.narrow(0, *offset, b.len)?)?,
                Home::Whole { grad } => {
                    let s = b.segs[si];
                    if a.pending.is_some() && grad.is_some() {
                        bail!(
                            "ZeroOptimizer: a gradient of {} after the step's last micro-batch reduced its bucket (begin_backward(last = true) was announced too early: hand one step's micro-batches over in one call, or set ZeroConfig::overlap_comm to false)",
                            self.infos[s.info].name
                        )
                    }
                    if a.done[si] {
                        bail!(
                            "ZeroOptimizer: a gradient of {} after its unit was declared done in this micro-batch",
                            self.infos[s.info].name
                        )
                    }
                    let buf = match grad {
                        Some(buf) => buf.clone(),
                        None => match &a.full {
                            Some(f) => f.clone(),
                            None => {
                                let f = Tensor::zeros(b.padded, DType::F32, &device)?;
                                a.full = Some(f.clone());
                                f
                            }
                        },
                    };
                    write_or_add(&buf, &flat, s.offset, !a.written[si])?;
                    a.written[si] = true;
                }
            }
        }
        Ok(())
    }

    /// Stage 2: starts reduce-scattering bucket `bi`'s gradient of this micro-batch (zeros
    /// where nothing came), on the lane with `overlap_comm`, and frees the full bucket; the
    /// partition is added in by [`Self::settle`].
    fn reduce_bucket(&mut self, bi: usize) -> Result<()> {
        if self.acc[bi].reduced || !matches!(self.buckets[bi].home, Home::Whole { grad: None }) {
            return Ok(());
        }
        // The previous micro-batch's partition first: sums in micro-batch order.
        self.settle(bi)?;
        let (b, a) = (&self.buckets[bi], &mut self.acc[bi]);
        let full = match a.full.take() {
            Some(f) => f,
            None => Tensor::zeros(b.padded, DType::F32, self.world.device())?,
        };
        a.pending = Some(match &b.comm {
            Some(c) => {
                let dtype = self.cfg.reduce_dtype;
                let reduce = move |c: &Comm| reduce_scatter_in(c, &full, dtype);
                match self.cfg.overlap_comm {
                    true => c.start("gradient reduce-scatter", reduce),
                    false => Work::done(reduce(c)),
                }
            }
            None => Work::done(Ok(full)),
        });
        a.reduced = true;
        a.written.iter_mut().for_each(|w| *w = false);
        if self.cfg.overlap_comm {
            self.in_flight.push_back(bi);
            while self.in_flight.len() > MAX_REDUCTIONS_IN_FLIGHT {
                let oldest = self.in_flight.pop_front().expect("not empty");
                self.settle(oldest)?;
            }
        }
        Ok(())
    }

    /// Stage 2: waits for bucket `bi`'s started reduce-scatter, if any, and adds its result into
    /// the partition.
    fn settle(&mut self, bi: usize) -> Result<()> {
        if !matches!(self.buckets[bi].home, Home::Whole { grad: None }) {
            return Ok(());
        }
        self.in_flight.retain(|&b| b != bi);
        let a = &mut self.acc[bi];
        let Some(work) = a.pending.take() else {
            return Ok(());
        };
        let part = work.wait()?;
        if a.part_written {
            a.add_to_part(&part)?;
        } else {
            // A fresh tensor of the partition's size: it becomes the partition (no copy).
            a.part = Some(part);
            a.part_written = true;
        }
        Ok(())
    }

    /// Stages 0 and 1, in the step's last micro-batch: starts reducing bucket `bi` (its
    /// parameters all done) on the lane: the mean over the `m` micro-batches, all-reduced
    /// (stage 0) or reduce-scattered (stage 1), what the step would do with it.
    fn start_final_reduce(&mut self, bi: usize, m: usize) -> Result<()> {
        let (b, a) = (&self.buckets[bi], &mut self.acc[bi]);
        let (Home::Whole { grad: Some(buf) }, Some(c)) = (&b.home, &b.comm) else {
            return Ok(());
        };
        if a.pending.is_some() {
            return Ok(());
        }
        let full = kept_bucket_mean(buf, &b.segs, &a.written, m)?;
        let (dtype, stage) = (self.cfg.reduce_dtype, self.cfg.stage);
        a.pending_m = m;
        a.pending = Some(c.start("gradient reduction", move |c| match stage {
            0 => all_reduce_in(c, full, dtype),
            _ => reduce_scatter_in(c, &full, dtype),
        }));
        Ok(())
    }

    /// One step from the gradients handed over as a [`GradSink`] since the last step (their
    /// mean over the micro-batches): reduction over the replicas where it is not done yet,
    /// clipping to `max_norm` and AdamW, as [`ZeroOptimizer::step`]. Returns the norm before
    /// clipping.
    pub fn step_accumulated(&mut self, max_norm: Option<f64>) -> Result<f64> {
        let out = self.step_accumulated_inner(max_norm);
        if out.is_err() {
            // Nothing of a failed step may leak into the next (reductions still running,
            // partitions half summed).
            self.discard_grads();
        }
        out
    }

    fn step_accumulated_inner(&mut self, max_norm: Option<f64>) -> Result<f64> {
        if self.micro_batches == 0 {
            bail!("ZeroOptimizer::step_accumulated: no gradients were handed over (end_micro_batch was never called since the last step)")
        }
        let m = std::mem::take(&mut self.micro_batches);
        // A gather started ahead and not used would hold parameters about to change.
        for module in &self.modules {
            module.discard_prefetched();
        }
        // 1. This rank's partition of every bucket's summed gradient, and the squared norm of
        //    the distinct elements it holds.
        let stage = self.cfg.stage;
        let device = self.world.device().clone();
        let mut parts: Vec<Tensor> = Vec::with_capacity(self.buckets.len());
        // Summed on the device, read once: every bucket's reduction is enqueued as soon as it
        // is packed, with no host wait in between (NCCL runs them back to back).
        let mut sq = Tensor::zeros((), DType::F64, &device)?;
        // On the CPU, summed on the host in one pass (no squared copy of each parameter).
        let mut sq_host = 0f64;
        let mean = |t: Tensor| if m > 1 { t / m as f64 } else { Ok(t) };
        for bi in 0..self.buckets.len() {
            self.settle(bi)?;
        }
        for (b, a) in self.buckets.iter().zip(&mut self.acc) {
            let n = b.comm.as_ref().map_or(1, Comm::size);
            let part = match &b.home {
                // Reduced on the lane during the last micro-batch's backward.
                Home::Whole { grad: Some(_) } if a.pending.is_some() => {
                    let part = a.pending.take().expect("checked").wait()?;
                    if a.pending_m != m {
                        bail!(
                            "ZeroOptimizer: the step's last micro-batch was announced (begin_backward(last = true)) after {} micro-batches, but the step has {m}: hand one step's micro-batches over in one call (Mixtral::train_grads announces its last), or set ZeroConfig::overlap_comm to false",
                            a.pending_m
                        )
                    }
                    part
                }
                Home::Whole { grad: Some(buf) } => {
                    let full = kept_bucket_mean(buf, &b.segs, &a.written, m)?;
                    match (&b.comm, stage) {
                        (None, _) => full,
                        (Some(c), 0) => all_reduce_in(c, full, self.cfg.reduce_dtype)?,
                        (Some(c), _) => reduce_scatter_in(c, &full, self.cfg.reduce_dtype)?,
                    }
                }
                Home::Whole { grad: None } | Home::Shard { .. } => {
                    let p = a
                        .part
                        .clone()
                        .expect("a partition buffer at stages 2 and 3");
                    match std::mem::take(&mut a.part_written) {
                        true => mean(p)?,
                        false => Tensor::zeros(b.len, DType::F32, &device)?,
                    }
                }
            };
            a.written.iter_mut().for_each(|w| *w = false);
            // Each element of a partition is held by one rank of the group.
            let share = if stage >= 1 { n as f64 } else { 1.0 };
            for (s, lo, hi) in overlaps(&b.segs, b.start, b.len) {
                let x = part.narrow(0, lo - b.start, hi - lo)?;
                let weight = share / self.infos[s.info].holders;
                let on_host = if self.cfg.fused {
                    fused::sum_of_squares(&x)?
                } else {
                    None
                };
                match on_host {
                    Some(v) => sq_host += v * weight,
                    None => {
                        let v = x.sqr()?.sum_all()?.to_dtype(DType::F64)?;
                        sq = (sq + (v * weight)?)?;
                    }
                }
            }
            parts.push(part);
        }
        // The gradients are sums over the replicas: the mean over the global batch is 1/R.
        let scale = 1.0 / self.replicas as f64;
        let sq = self
            .world
            .all_reduce(&(sq + sq_host)?.reshape(1)?, ReduceOp::Sum)?
            .to_vec1::<f64>()?[0];
        let norm = sq.sqrt() * scale;
        let factor = max_norm.map_or(1.0, |m| clip_factor(norm, m));

        // 2. AdamW on the partitions, then the parameters.
        self.step += 1;
        let c = self.cfg.adamw;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let fused_step = fused::AdamWStep {
            cfg: c,
            bias1: bc1,
            bias2: bc2,
            grad_scale: scale * factor,
        };
        // A bucket's gathered parameters are written while the next bucket's AdamW runs: its
        // all-gather goes on the replicas' lane (with `overlap_comm`), the same values.
        let mut gathering: Option<(usize, Work<Tensor>, usize)> = None;
        for (bi, (b, gp)) in self.buckets.iter().zip(parts).enumerate() {
            // The updated whole parameters' partition, to be written back (gathered first at
            // stages 1 and 2); a shard is updated where it is.
            let whole_out = match self.fused_update(b, &gp, &fused_step)? {
                Some(out) => out,
                None => self.composite_update(b, &gp, scale * factor, &device)?,
            };
            if let Some(w) = whole_out {
                let started = self.gather_whole(b, w);
                if let Some((prev, work, offset)) = gathering.replace((bi, started.0, started.1)) {
                    self.write_gathered(prev, &work.wait()?, offset)?;
                }
            }
        }
        if let Some((prev, work, offset)) = gathering {
            self.write_gathered(prev, &work.wait()?, offset)?;
        }
        Ok(norm)
    }

    /// Starts gathering bucket `b`'s updated whole parameters from the partitions `w` (at
    /// stages 1 and 2, over the replicas; at stage 0 `w` is the bucket itself): the work and
    /// where the gathered tensor starts in the bucket.
    fn gather_whole(&self, b: &Bucket, w: Tensor) -> (Work<Tensor>, usize) {
        let dtype = self.infos[b.segs[0].info].dtype;
        let uniform = b.segs.iter().all(|s| self.infos[s.info].dtype == dtype);
        match (&b.comm, self.cfg.stage) {
            (Some(c), 1..) => {
                let gather = move |c: &Comm| {
                    let part = if uniform { w.to_dtype(dtype)? } else { w };
                    c.all_gather(&part, 0)
                };
                let work = match self.cfg.overlap_comm {
                    true => c.start("parameter all-gather", gather),
                    false => Work::done(gather(c)),
                };
                (work, 0)
            }
            _ => (Work::done(Ok(w)), b.start),
        }
    }

    /// Writes bucket `bi`'s gathered whole parameters (`full`, from element `offset` of the
    /// bucket) into their variables.
    fn write_gathered(&self, bi: usize, full: &Tensor, offset: usize) -> Result<()> {
        for s in &self.buckets[bi].segs {
            let info = &self.infos[s.info];
            let x = full
                .narrow(0, s.offset - offset, s.len)?
                .reshape(info.dims.as_slice())?
                .to_dtype(info.dtype)?;
            self.vars[self.whole[s.info].expect("a whole parameter")].set(&x)?;
        }
        Ok(())
    }

    /// AdamW on bucket `b`'s partition with the CPU's fused passes, in place where the
    /// weights are: the parameters themselves (whole f32 parameters needing no gathering), the
    /// master copy, the shard, or a copy of the whole parameters' partition. `None` where they
    /// do not apply (off the CPU, `fused: false`); else the whole parameters' new partition to
    /// write back, if there is one.
    fn fused_update(
        &self,
        b: &Bucket,
        gp: &Tensor,
        step: &fused::AdamWStep,
    ) -> Result<Option<Option<Tensor>>> {
        if !self.cfg.fused || !fused::applies(&[gp, &b.exp_avg, &b.exp_avg_sq]) {
            return Ok(None);
        }
        // Whole f32 parameters that need no gathering (stage 0, or a group of one) are
        // updated in place, parameter by parameter: no copy out and back.
        let gathered = self.cfg.stage > 0 && b.comm.as_ref().map_or(1, Comm::size) > 1;
        if let (None, Home::Whole { .. }, false) = (&b.master, &b.home, gathered) {
            let mut views = Vec::new();
            for (s, lo, hi) in overlaps(&b.segs, b.start, b.len) {
                let var = self.vars[self.whole[s.info].expect("a whole parameter")].as_tensor();
                if !fused::applies(&[var]) {
                    views.clear();
                    break;
                }
                let view = var.flatten_all()?.narrow(0, lo - s.offset, hi - lo)?;
                views.push((view, lo - b.start));
            }
            if !views.is_empty() {
                for (w, at) in &views {
                    let part = |t: &Tensor| t.narrow(0, *at, w.elem_count());
                    fused::adamw_in_slices(
                        &part(&b.exp_avg)?,
                        &part(&b.exp_avg_sq)?,
                        w,
                        &part(gp)?,
                        step,
                    )?;
                }
                return Ok(Some(None));
            }
        }
        // Otherwise the master copy, the shard (f32: it is its own master), or a copy of the
        // whole parameters' partition (then written back).
        let w = self.partition_weights(b)?;
        if !fused::applies(&[&w]) {
            return Ok(None);
        }
        fused::adamw_in_slices(&b.exp_avg, &b.exp_avg_sq, &w, gp, step)?;
        Ok(Some(matches!(b.home, Home::Whole { .. }).then_some(w)))
    }

    /// The weights bucket `b`'s update reads: the master copy, this rank's partition of the
    /// shard variable, or a fresh f32 copy of the whole parameters' partition.
    fn partition_weights(&self, b: &Bucket) -> Result<Tensor> {
        match (&b.master, &b.home) {
            (Some(m), _) => Ok(m.clone()),
            (None, Home::Whole { .. }) => {
                flat_of_vars(&self.vars, &self.whole, &b.segs, b.start, b.len)
            }
            (None, Home::Shard { var, offset }) => {
                self.vars[*var].as_tensor().narrow(0, *offset, b.len)
            }
        }
    }

    /// AdamW on bucket `b`'s partition with candle's composite ops (any device); returns the
    /// whole parameters' new partition (`None` for a shard, updated where it is).
    fn composite_update(
        &self,
        b: &Bucket,
        gp: &Tensor,
        grad_scale: f64,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        let c = self.cfg.adamw;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let w_in = self.partition_weights(b)?;
        // Whole parameters are written from the new partition (gathered first at stages
        // 1 and 2); a shard is updated where it is.
        let w_out = match &b.home {
            Home::Whole { .. } => Some(Tensor::zeros(b.len, DType::F32, device)?),
            Home::Shard { .. } => None,
        };
        // In slices of at most ADAMW_CHUNK elements, written in place: the temporaries stay
        // small enough for the allocator to reuse (a fresh buffer of a whole bucket would
        // page-fault in on every operation).
        for c0 in (0..b.len).step_by(ADAMW_CHUNK) {
            let n = ADAMW_CHUNK.min(b.len - c0);
            let g = (gp.narrow(0, c0, n)? * grad_scale)?;
            let m = ((b.exp_avg.narrow(0, c0, n)? * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((b.exp_avg_sq.narrow(0, c0, n)? * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let w = w_in.narrow(0, c0, n)?.to_dtype(DType::F32)?;
            let w = ((w * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
            b.exp_avg.slice_set(&m, 0, c0)?;
            b.exp_avg_sq.slice_set(&v, 0, c0)?;
            if let Some(master) = &b.master {
                master.slice_set(&w, 0, c0)?;
            }
            match (&b.home, &w_out) {
                (Home::Shard { var, offset }, _) => {
                    let shard = self.vars[*var].as_tensor();
                    shard.slice_set(&w.to_dtype(shard.dtype())?, 0, offset + c0)?;
                }
                (Home::Whole { .. }, Some(out)) => out.slice_set(&w, 0, c0)?,
                (Home::Whole { .. }, None) => unreachable!("allocated above"),
            }
        }
        Ok(w_out)
    }

    fn name_of_var(&self, v: &Var) -> String {
        let i = self
            .vars
            .iter()
            .position(|x| x.as_tensor().id() == v.as_tensor().id());
        match i.and_then(|i| self.whole.iter().position(|w| *w == Some(i))) {
            Some(info) => self.infos[info].name.clone(),
            None => "a sharded module's shard".to_string(),
        }
    }

    /// The parameters as named sharded tensors (this rank's tp/ep slices, whole over the
    /// replicas: a sharded module's are gathered), each with the mesh dimensions it is local
    /// to. Collective over the replicas at stage 3.
    pub fn named_params(&self) -> Result<Vec<(ShardedTensor, Vec<MeshDim>)>> {
        let mut out = Vec::with_capacity(self.infos.len());
        for (i, info) in self.infos.iter().enumerate() {
            if let Some(v) = self.whole[i] {
                out.push((
                    ShardedTensor {
                        name: info.name.clone(),
                        local: self.vars[v].as_tensor().detach(),
                        full_dims: info.full_dims.clone(),
                        placement: info.placement,
                        region: None,
                    },
                    info.local_to.clone(),
                ));
            }
        }
        for m in &self.modules {
            for (info, t) in m.infos().iter().zip(m.gathered()?) {
                out.push((
                    ShardedTensor {
                        name: info.name.clone(),
                        local: t,
                        full_dims: info.full_dims.clone(),
                        placement: info.placement,
                        region: None,
                    },
                    info.local_to.clone(),
                ));
            }
        }
        Ok(out)
    }

    /// Writes the model's parameters at full shape into the safetensors file `path` on world
    /// rank 0, one tensor at a time ([`crate::checkpoint::write_model_parts`]): the whole
    /// parameters, then each sharded module's, gathered only for its turn (one layer at a
    /// time at stage 3). `extra` (rank 0's) goes first. Collective over the world; returns
    /// how many parameters were written.
    pub fn write_model(
        &self,
        path: &std::path::Path,
        extra: &[(String, Tensor)],
        dtype: Option<DType>,
    ) -> Result<usize> {
        self.write_model_with(path, extra, &[], dtype)
    }

    /// [`ZeroOptimizer::write_model`] with the model's buffers (tensors not trained by
    /// gradients, such as a router's selection bias) beside the parameters, each replicated
    /// on the ranks of this rank's pipeline stage, under its name. Collective over the world.
    pub fn write_model_with(
        &self,
        path: &std::path::Path,
        extra: &[(String, Tensor)],
        buffers: &[(String, Tensor)],
        dtype: Option<DType>,
    ) -> Result<usize> {
        let buffers = buffers.iter().map(|(name, t)| {
            let t = ShardedTensor {
                name: name.clone(),
                local: t.clone(),
                full_dims: t.dims().to_vec(),
                placement: crate::checkpoint::Placement::Replicated,
                region: None,
            };
            (t, Vec::new())
        });
        let whole: Vec<(ShardedTensor, Vec<MeshDim>)> = self
            .infos
            .iter()
            .enumerate()
            .filter_map(|(i, info)| {
                let v = self.whole[i]?;
                let t = ShardedTensor {
                    name: info.name.clone(),
                    local: self.vars[v].as_tensor().detach(),
                    full_dims: info.full_dims.clone(),
                    placement: info.placement,
                    region: None,
                };
                Some((t, info.local_to.clone()))
            })
            .chain(buffers)
            .collect();
        let mut parts: Vec<&dyn crate::checkpoint::ModelPart> = vec![&whole];
        parts.extend(
            self.modules
                .iter()
                .map(|m| m as &dyn crate::checkpoint::ModelPart),
        );
        // Every rank walks the same number of parts: pipeline stages may hold different
        // numbers of sharded modules (layers), so the shorter lists end with empty parts.
        let counts = self
            .mesh
            .world()
            .all_gather_bytes(&(self.modules.len() as u64).to_le_bytes())?;
        let most = counts
            .iter()
            .filter_map(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize))
            .max()
            .unwrap_or(0);
        let empty: Vec<(ShardedTensor, Vec<MeshDim>)> = Vec::new();
        while parts.len() < 1 + most {
            parts.push(&empty);
        }
        crate::checkpoint::write_model_parts(&parts, &self.mesh, path, extra, dtype)
    }

    /// Whether this rank writes the pieces of `info` that a bucket over `dims` holds: one rank
    /// of those holding the same values (coordinate 0 along every dimension the values are
    /// replicated over; a partitioned bucket's ranks along `dims` hold different values).
    fn writes(&self, info: &Info, dims: &[MeshDim], partitioned: bool) -> bool {
        // Key/value heads replicated over tp (a `Range` slice) are held by runs of consecutive
        // tp ranks: the first of each run writes.
        if let Placement::Range { dim, len, .. } = info.placement {
            let copies = self.mesh.size(MeshDim::Tp) * len / info.full_dims[dim].max(1);
            if copies > 1 && !self.mesh.coord(MeshDim::Tp).is_multiple_of(copies) {
                return false;
            }
        }
        MeshDim::ALL.into_iter().all(|d| {
            d == MeshDim::Pp
                || info.local_to.contains(&d)
                || (partitioned && dims.contains(&d))
                || self.mesh.coord(d) == 0
        })
    }

    /// Whether a bucket holds 16-bit parameters: its f32 values (master or stage-3 shard) are
    /// then saved as `optimizer.master.NAME` too.
    fn sixteen_bit(&self, b: &Bucket) -> bool {
        b.segs
            .iter()
            .any(|s| self.infos[s.info].dtype != DType::F32)
    }

    /// Whether a bucket's values differ along its batch dimensions (ZeRO partitions).
    fn partitioned(&self, b: &Bucket) -> bool {
        self.cfg.stage >= 1 || matches!(b.home, Home::Shard { .. })
    }

    /// This rank's pieces of `part` (a bucket's partition, flat) named `prefix + NAME`: every
    /// parameter's share of it as boxes of the full tensor (padding rows left out).
    fn partition_pieces(
        &self,
        b: &Bucket,
        part: &Tensor,
        prefix: &str,
    ) -> Result<Vec<ShardedTensor>> {
        let mut out = Vec::new();
        for (s, lo, hi) in overlaps(&b.segs, b.start, b.len) {
            let info = &self.infos[s.info];
            if !self.writes(info, &b.dims, true) {
                continue;
            }
            let slice = info.placement.slice(&info.full_dims, &info.name)?;
            let mut boxes = Vec::new();
            flat_boxes(
                &info.dims,
                lo - s.offset,
                hi - s.offset,
                &mut Vec::new(),
                0,
                &mut boxes,
            );
            for (region, flat) in boxes {
                let lens: Vec<usize> = region.iter().map(|&(_, l)| l).collect();
                let n: usize = lens.iter().product();
                let mut data = part
                    .narrow(0, s.offset + flat - b.start, n)?
                    .reshape(lens.as_slice())?;
                let mut region = region;
                if let Some(sl) = &slice {
                    // Local rows along the split dim are full rows `sl.start..`; rows past
                    // `sl.len` are padding and not saved.
                    let (bs, bl) = region[sl.dim];
                    let end = (bs + bl).min(sl.len);
                    if end <= bs {
                        continue;
                    }
                    data = data.narrow(sl.dim, 0, end - bs)?;
                    region[sl.dim] = (sl.start + bs, end - bs);
                }
                out.push(ShardedTensor {
                    name: format!("{prefix}{}", info.name),
                    local: data.contiguous()?,
                    full_dims: info.full_dims.clone(),
                    placement: info.placement,
                    region: Some(region),
                });
            }
        }
        Ok(out)
    }

    /// The parameters for a checkpoint, as the pieces this rank writes: whole parameters from
    /// one of the ranks holding each, a sharded module's from every rank's partition (nothing
    /// gathered). With [`ZeroOptimizer::state`], what [`crate::trainer::Trainer::save`] saves.
    pub fn param_pieces(&self) -> Result<Vec<ShardedTensor>> {
        let mut out = Vec::new();
        for (i, info) in self.infos.iter().enumerate() {
            if let Some(v) = self.whole[i] {
                if self.writes(info, &[], false) {
                    out.push(ShardedTensor {
                        name: info.name.clone(),
                        local: self.vars[v].as_tensor().detach(),
                        full_dims: info.full_dims.clone(),
                        placement: info.placement,
                        region: None,
                    });
                }
            }
        }
        for b in &self.buckets {
            if let Home::Shard { var, offset } = &b.home {
                // In the parameters' own dtype, as whole parameters are saved (the f32 values
                // go with the optimizer state as master weights).
                let dtype = self.infos[b.segs[0].info].dtype;
                let part = self.vars[*var]
                    .as_tensor()
                    .narrow(0, *offset, b.len)?
                    .to_dtype(dtype)?;
                out.extend(self.partition_pieces(b, &part, "")?);
            }
        }
        Ok(out)
    }

    /// The optimizer state as the pieces this rank writes, under the names
    /// [`crate::optim::AdamW`] uses (`optimizer.exp_avg.NAME`, `optimizer.exp_avg_sq.NAME`,
    /// `optimizer.step`, and `optimizer.master.NAME` for 16-bit parameters): at stage 0 each
    /// parameter's moments whole, from one of the replicas; from stage 1 every rank's
    /// partition as boxes of the full tensors (nothing gathered, each element written once).
    /// Loads under any dp, stage, tp and ep ([`ZeroOptimizer::load_state`]).
    pub fn state(&self) -> Result<Vec<ShardedTensor>> {
        let mut out = Vec::new();
        for b in &self.buckets {
            let shard;
            let mut kinds = vec![("exp_avg", &b.exp_avg), ("exp_avg_sq", &b.exp_avg_sq)];
            if let Some(m) = &b.master {
                kinds.push(("master", m));
            }
            if let (Home::Shard { var, offset }, true) = (&b.home, self.sixteen_bit(b)) {
                // A 16-bit module's f32 shard is its master copy.
                shard = self.vars[*var].as_tensor().narrow(0, *offset, b.len)?;
                kinds.push(("master", &shard));
            }
            for (kind, part) in kinds {
                // Copies: the moments change in place at the next step.
                let prefix = format!("optimizer.{kind}.");
                if self.partitioned(b) {
                    out.extend(self.partition_pieces(b, &part.copy()?, &prefix)?);
                    continue;
                }
                for s in &b.segs {
                    let info = &self.infos[s.info];
                    if self.writes(info, &b.dims, false) {
                        out.push(ShardedTensor {
                            name: format!("{prefix}{}", info.name),
                            local: part
                                .narrow(0, s.offset, s.len)?
                                .reshape(info.dims.as_slice())?
                                .copy()?,
                            full_dims: info.full_dims.clone(),
                            placement: info.placement,
                            region: None,
                        });
                    }
                }
            }
        }
        if self.mesh.rank() == 0 {
            out.push(step_entry(self.step, self.world.device())?);
        }
        Ok(out)
    }

    /// Restores the state saved by [`ZeroOptimizer::state`] or [`crate::optim::AdamW::state`]
    /// (any layout, any dp, any stage): each rank reads its parameters' shards of the moments
    /// and keeps its partition. Master weights missing from the checkpoint are taken from the
    /// parameters.
    pub fn load_state(&mut self, vb: &ParallelVarBuilder) -> Result<()> {
        // A gather started ahead would serve the parameters from before the load.
        for module in &self.modules {
            module.discard_prefetched();
        }
        let step = saved_step(vb)?;
        let device = self.world.device().clone();
        for b in &mut self.buckets {
            let read = |kind: &str| -> Result<Tensor> {
                let flat = Tensor::zeros(b.padded, DType::F32, &device)?;
                for s in &b.segs {
                    let info = &self.infos[s.info];
                    let t = saved_state(vb, kind, &info.name, &info.full_dims, info.placement)?;
                    flat.slice_set(&t.flatten_all()?, 0, s.offset)?;
                }
                flat.narrow(0, b.start, b.len)?.copy()
            };
            b.exp_avg = read("exp_avg")?;
            b.exp_avg_sq = read("exp_avg_sq")?;
            let has_master = b
                .segs
                .iter()
                .all(|s| vb.contains(&format!("optimizer.master.{}", self.infos[s.info].name)));
            if let (Home::Shard { var, offset }, true) = (&b.home, has_master) {
                // A 16-bit module's f32 values: the saved master copy, not the rounded
                // parameters the module was built from.
                let any16 = b
                    .segs
                    .iter()
                    .any(|s| self.infos[s.info].dtype != DType::F32);
                if any16 {
                    self.vars[*var]
                        .as_tensor()
                        .slice_set(&read("master")?, 0, *offset)?;
                }
            }
            if b.master.is_some() {
                b.master = Some(if has_master {
                    read("master")?
                } else {
                    match &b.home {
                        Home::Whole { .. } => {
                            flat_of_vars(&self.vars, &self.whole, &b.segs, b.start, b.len)?
                        }
                        Home::Shard { var, offset } => self.vars[*var]
                            .as_tensor()
                            .narrow(0, *offset, b.len)?
                            .to_dtype(DType::F32)?
                            .copy()?,
                    }
                });
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The optimizer takes a unit-wise backward's gradients as they come: at stages 0 and 1 they
/// are packed into the kept full buckets (summed over the micro-batches, reduced at the step);
/// at stage 2 a bucket is reduce-scattered as soon as every parameter in it is done (its
/// unit's backward over) and only this rank's partition is kept, summed over the
/// micro-batches (DeepSpeed's order: the sum over micro-batches of the sums over replicas, the
/// same to float rounding as the other way round); at stage 3 the sharded modules' gradients
/// arrive reduced and are summed into the partitions. Then
/// [`ZeroOptimizer::step_accumulated`].
impl GradSink for ZeroOptimizer {
    fn sink_vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    fn add_grad(&mut self, index: usize, grad: &Tensor) -> Result<()> {
        if index >= self.vars.len() {
            bail!(
                "ZeroOptimizer: a gradient for variable {index}, of {}",
                self.vars.len()
            )
        }
        self.pack(index, grad)
    }

    fn unit_done(&mut self, prefixes: &[&str]) -> Result<()> {
        for bi in 0..self.buckets.len() {
            let b = &self.buckets[bi];
            if !matches!(b.home, Home::Whole { .. }) {
                continue;
            }
            let a = &mut self.acc[bi];
            for (s, d) in b.segs.iter().zip(a.done.iter_mut()) {
                let name = &self.infos[s.info].name;
                *d |= prefixes.iter().any(|p| name.starts_with(p));
            }
            if a.done.iter().all(|d| *d) {
                self.reduce_bucket(bi)?;
                if self.last_backward && self.cfg.overlap_comm && self.cfg.stage <= 1 {
                    self.start_final_reduce(bi, self.micro_batches + 1)?;
                }
            }
        }
        Ok(())
    }

    fn end_micro_batch(&mut self) -> Result<()> {
        for bi in 0..self.buckets.len() {
            self.reduce_bucket(bi)?;
            let a = &mut self.acc[bi];
            a.done.iter_mut().for_each(|d| *d = false);
            a.reduced = false;
        }
        self.micro_batches += 1;
        self.last_backward = false;
        Ok(())
    }

    fn begin_backward(&mut self, last: bool) -> Result<()> {
        self.last_backward = last;
        Ok(())
    }
}

/// The parts of `segs` inside elements `start..start + len`: (segment, first, end) in bucket
/// coordinates.
pub(crate) fn overlaps(
    segs: &[Seg],
    start: usize,
    len: usize,
) -> impl Iterator<Item = (&Seg, usize, usize)> + '_ {
    let end = start + len;
    segs.iter().filter_map(move |s| {
        let (lo, hi) = (s.offset.max(start), (s.offset + s.len).min(end));
        (lo < hi).then_some((s, lo, hi))
    })
}

/// The flat range `a..b` of a row-major tensor of shape `dims` as boxes, each a contiguous
/// flat run: `(start, len)` per dim and the flat index of its first element. At most two per
/// dim plus one.
fn flat_boxes(
    dims: &[usize],
    a: usize,
    b: usize,
    prefix: &mut Vec<(usize, usize)>,
    base: usize,
    out: &mut Vec<(Vec<(usize, usize)>, usize)>,
) {
    if a >= b {
        return;
    }
    let Some((&_, rest)) = dims.split_first() else {
        out.push((prefix.clone(), base));
        return;
    };
    let inner: usize = rest.iter().product();
    let (r0, o0, r1, o1) = (a / inner, a % inner, b / inner, b % inner);
    // Part of one row: the boxes of `from..to` inside it, under this row's index.
    let row =
        |r: usize, from: usize, to: usize, prefix: &mut Vec<(usize, usize)>, out: &mut Vec<_>| {
            prefix.push((r, 1));
            flat_boxes(rest, from, to, prefix, base + r * inner, out);
            prefix.pop();
        };
    if r0 == r1 {
        row(r0, o0, o1, prefix, out);
        return;
    }
    let mut first = r0;
    if o0 > 0 {
        row(r0, o0, inner, prefix, out);
        first += 1;
    }
    if r1 > first {
        let mut region = prefix.clone();
        region.push((first, r1 - first));
        region.extend(rest.iter().map(|&d| (0, d)));
        out.push((region, base + first * inner));
    }
    if o1 > 0 {
        row(r1, 0, o1, prefix, out);
    }
}

/// Elements `start..start + len` of a bucket of whole parameters, flat, as f32 (zeros past
/// the last parameter).
fn flat_of_vars(
    vars: &[Var],
    whole: &[Option<usize>],
    segs: &[Seg],
    start: usize,
    len: usize,
) -> Result<Tensor> {
    let var = |s: &Seg| &vars[whole[s.info].expect("a whole parameter")];
    let out = Tensor::zeros(len, DType::F32, var(&segs[0]).device())?;
    for (s, lo, hi) in overlaps(segs, start, len) {
        let piece = var(s)
            .as_tensor()
            .flatten_all()?
            .narrow(0, lo - s.offset, hi - lo)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        out.slice_set(&piece, 0, lo - start)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::flat_boxes;

    /// Every flat range of several shapes becomes boxes that are contiguous runs, in order,
    /// covering exactly the range.
    #[test]
    fn flat_ranges_become_contiguous_boxes() {
        for dims in [vec![7], vec![3, 5], vec![2, 3, 4], vec![4, 1, 3, 2]] {
            let total: usize = dims.iter().product();
            for a in 0..=total {
                for b in a..=total {
                    let mut boxes = Vec::new();
                    flat_boxes(&dims, a, b, &mut Vec::new(), 0, &mut boxes);
                    assert!(boxes.len() <= 2 * dims.len() + 1, "{dims:?} {a}..{b}");
                    let mut next = a;
                    for (region, flat) in boxes {
                        assert_eq!(flat, next, "{dims:?} {a}..{b}: {region:?}");
                        // The box's elements in row-major order are flat..flat + volume.
                        let lens: Vec<usize> = region.iter().map(|r| r.1).collect();
                        let volume: usize = lens.iter().product();
                        for k in 0..volume {
                            let (mut rem, mut idx) = (k, 0);
                            for (d, &(s, l)) in region.iter().enumerate().rev() {
                                let stride: usize = dims[d + 1..].iter().product();
                                idx += (s + rem % l) * stride;
                                rem /= l;
                            }
                            assert_eq!(idx, flat + k, "{dims:?} {a}..{b}: {region:?}");
                        }
                        next = flat + volume;
                    }
                    assert_eq!(next, b, "{dims:?} {a}..{b}");
                }
            }
        }
    }
}
