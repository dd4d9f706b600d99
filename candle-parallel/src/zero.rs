//! ZeRO (stages 0, 1 and 2): AdamW whose state is sharded over the data-parallel replicas, with
//! gradient synchronisation, global-norm clipping and mixed precision in the same step.
//!
//! The parameters of each synchronisation group (those summed over the same batch dimensions,
//! see [`crate::data_parallel::DataParallel`]) are packed into flat f32 buckets, padded to a
//! multiple of the group size N; rank r owns the r-th of N equal partitions of every bucket.
//!
//! | stage | gradients | optimizer state (AdamW moments; f32 master weights for 16-bit params) |
//! |---|---|---|
//! | 0 | all-reduced in place into full buckets kept between steps | full, on every replica |
//! | 1 | full buckets kept, reduce-scattered to this rank's partition | this rank's partition |
//! | 2 | reduce-scattered; only this rank's partition is kept | this rank's partition |
//!
//! At stages 1 and 2 each rank updates its partition and the parameters are all-gathered (in
//! their own dtype) after the step. The parameters themselves stay whole on every replica.
//! Candle's backward returns every gradient at once, so the full gradients exist while the
//! step reduces them at every stage; what differs is what the optimizer keeps
//! ([`ZeroOptimizer::memory`]).
//!
//! Parameters in bf16/f16 (mixed precision) get f32 master copies of their partition, which
//! the update reads and writes; the gradients are reduced in f32.
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
//!     let g: Vec<_> = params.iter().map(|p| grads.get(p.var.as_tensor()).cloned()).collect();
//!     let norm = opt.step(&g, Some(1.0))?;
//!     Ok((norm, opt.memory().optimizer_bytes))
//! })?;
//! // The same norm everywhere; each rank keeps half of the moments (2 × 4 × 4 / 2 / 2 × 4 B,
//! // plus the bias's).
//! assert!(out.iter().all(|(n, _)| *n == out[0].0));
//! assert_eq!(out[0].1, (16 + 4) / 2 / 2 * 2 * 4);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::checkpoint::{ParallelVarBuilder, Param, Placement, ShardedTensor};
use crate::comm::{Comm, ReduceOp};
use crate::data_parallel::{
    agree_layout, check_batch_dims, pack_into, plan_buckets, replicas, sync_groups, FlatBucket,
    DEFAULT_BUCKET_BYTES,
};
use crate::mesh::{DeviceMesh, MeshDim};
use crate::optim::{clip_factor, AdamWConfig};
use candle_core::{bail, DType, Result, Tensor};

/// ZeRO settings.
#[derive(Clone, Copy, Debug)]
pub struct ZeroConfig {
    /// 0 (plain data parallelism), 1 (optimizer state sharded) or 2 (gradients too).
    pub stage: u8,
    /// Bucket size in bytes of f32 (DDP's 25 MiB by default).
    pub bucket_bytes: usize,
    pub adamw: AdamWConfig,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        Self {
            stage: 0,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            adamw: AdamWConfig::default(),
        }
    }
}

/// Bytes one rank holds, by kind (see [`ZeroOptimizer::memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// The parameters (this rank's tp/ep slices, whole over dp).
    pub param_bytes: usize,
    /// Gradient storage the optimizer keeps: full f32 buckets (stages 0 and 1) or this rank's
    /// partition of them (stage 2).
    pub grad_bytes: usize,
    /// AdamW's two moments and, for 16-bit parameters, the f32 master weights: whole (stage 0)
    /// or this rank's partition (stages 1 and 2).
    pub optimizer_bytes: usize,
}

impl MemoryReport {
    pub fn total(&self) -> usize {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes
    }
}

/// One bucket and this rank's part of it.
struct Bucket {
    layout: FlatBucket,
    /// This rank's partition: elements `start..start + len` of the padded bucket.
    start: usize,
    len: usize,
    /// The full f32 gradient buffer (stages 0 and 1), reduced in place at stage 0.
    grad: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// f32 master weights of the partition (16-bit parameters only).
    master: Option<Tensor>,
}

struct Group {
    comm: Option<Comm>,
    buckets: Vec<Bucket>,
}

impl Group {
    fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, Comm::size)
    }
}

/// AdamW with ZeRO stage 0, 1 or 2 over the batch dimensions of a mesh. See the
/// [module docs](self).
pub struct ZeroOptimizer {
    params: Vec<Param>,
    cfg: ZeroConfig,
    groups: Vec<Group>,
    world: Comm,
    replicas: usize,
    holders: Vec<f64>,
    step: u64,
    /// The partition's gradient of the last step (stage 2 keeps only this).
    held_partition_bytes: usize,
}

impl ZeroOptimizer {
    /// An optimizer for `params` on `mesh`, whose `batch_dims` split every global batch (dp;
    /// with all-to-all expert dispatch also ep). Collective over the world: the replicas must
    /// hold the same parameters (an error on every rank names the first difference).
    pub fn new(
        params: Vec<Param>,
        mesh: &DeviceMesh,
        batch_dims: &[MeshDim],
        cfg: ZeroConfig,
    ) -> Result<Self> {
        if cfg.stage > 2 {
            bail!(
                "ZeRO stage {} is not available: use 0 (data parallel), 1 (optimizer state sharded) or 2 (gradients too)",
                cfg.stage
            )
        }
        let dims = check_batch_dims(batch_dims)?;
        let mut groups = Vec::new();
        for g in sync_groups(&params, mesh, &dims)? {
            let n = g.comm.as_ref().map_or(1, Comm::size);
            if let Some(c) = &g.comm {
                agree_layout(&params, &g.members, c)?;
            }
            let rank = g.comm.as_ref().map_or(0, Comm::rank);
            let sharded = cfg.stage >= 1;
            let device = mesh.world().device().clone();
            let mut buckets = Vec::new();
            for layout in plan_buckets(&params, &g.members, cfg.bucket_bytes, n) {
                let (start, len) = if sharded {
                    let part = layout.padded / n;
                    (rank * part, part)
                } else {
                    (0, layout.padded)
                };
                let zeros = || Tensor::zeros(len, DType::F32, &device);
                let wants_master = layout
                    .segments
                    .iter()
                    .any(|s| params[s.param].var.dtype() != DType::F32);
                let master = if wants_master {
                    Some(flat_params(&params, &layout, start, len)?)
                } else {
                    None
                };
                let grad = if cfg.stage <= 1 {
                    Some(Tensor::zeros(layout.padded, DType::F32, &device)?)
                } else {
                    None
                };
                buckets.push(Bucket {
                    layout,
                    start,
                    len,
                    grad,
                    exp_avg: zeros()?,
                    exp_avg_sq: zeros()?,
                    master,
                });
            }
            groups.push(Group {
                comm: g.comm,
                buckets,
            });
        }
        let holders = params.iter().map(|p| p.holders(mesh)).collect();
        Ok(Self {
            cfg,
            groups,
            world: mesh.world().clone(),
            replicas: replicas(mesh, &dims),
            holders,
            params,
            step: 0,
            held_partition_bytes: 0,
        })
    }

    /// The parameters it updates.
    pub fn params(&self) -> &[Param] {
        &self.params
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

    /// The ZeRO stage.
    pub fn stage(&self) -> u8 {
        self.cfg.stage
    }

    /// How many replicas a global batch is split over.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Bytes this rank holds for the parameters, the gradients the optimizer keeps, and the
    /// optimizer state, counted from the tensors themselves.
    pub fn memory(&self) -> MemoryReport {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut r = MemoryReport {
            param_bytes: self.params.iter().map(|p| bytes(p.var.as_tensor())).sum(),
            ..Default::default()
        };
        for b in self.groups.iter().flat_map(|g| &g.buckets) {
            r.grad_bytes += b.grad.as_ref().map_or(0, bytes);
            r.optimizer_bytes += bytes(&b.exp_avg) + bytes(&b.exp_avg_sq);
            r.optimizer_bytes += b.master.as_ref().map_or(0, bytes);
        }
        if self.cfg.stage == 2 {
            r.grad_bytes += self.held_partition_bytes;
        }
        r
    }

    /// One step from every rank's gradients of the mean loss over its own examples (in the
    /// order of [`ZeroOptimizer::params`]; `None` counts as zeros, as DDP's unused
    /// parameters): reduces them over the replicas (the gradient of the mean loss over the
    /// global batch), clips their global norm to `max_norm` (torch's `clip_grad_norm_`), and
    /// takes one AdamW step (torch's semantics). Returns the norm before clipping, the same on
    /// every rank.
    pub fn step(&mut self, grads: &[Option<Tensor>], max_norm: Option<f64>) -> Result<f64> {
        if grads.len() != self.params.len() {
            bail!(
                "ZeroOptimizer::step: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )
        }
        // 1. This rank's partition of every bucket's summed gradient, and the squared norm of
        //    the distinct elements it holds.
        let stage = self.cfg.stage;
        let mut parts: Vec<Vec<Tensor>> = Vec::with_capacity(self.groups.len());
        let mut sq = 0f64;
        let device = self.world.device().clone();
        for g in &self.groups {
            let n = g.size();
            let mut mine = Vec::with_capacity(g.buckets.len());
            for b in &g.buckets {
                let full = match &b.grad {
                    Some(buf) => buf.clone(),
                    None => Tensor::zeros(b.layout.padded, DType::F32, &device)?,
                };
                pack_into(&full, &b.layout, &self.params, grads)?;
                let part = match (&g.comm, stage) {
                    (None, _) => full,
                    (Some(c), 0) => {
                        c.all_reduce_in_place(&full, ReduceOp::Sum)?;
                        full
                    }
                    (Some(c), _) => c.reduce_scatter(&full, 0, ReduceOp::Sum)?,
                };
                // Each element of a partition is held by one rank of the group.
                let share = if stage >= 1 { n as f64 } else { 1.0 };
                for (s, lo, hi) in overlaps(&b.layout, b.start, b.len) {
                    let x = part.narrow(0, lo - b.start, hi - lo)?;
                    let v = x
                        .sqr()?
                        .sum_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                    sq += v * share / self.holders[s];
                }
                mine.push(part);
            }
            parts.push(mine);
        }
        // The gradients are sums over the replicas: the mean over the global batch is 1/R.
        let scale = 1.0 / self.replicas as f64;
        let sq = self
            .world
            .all_reduce(&Tensor::new(&[sq], &device)?, ReduceOp::Sum)?
            .to_vec1::<f64>()?[0];
        let norm = sq.sqrt() * scale;
        let factor = match max_norm {
            Some(m) => clip_factor(norm, m),
            None => 1.0,
        };
        self.held_partition_bytes = parts.iter().flatten().map(|t| t.elem_count() * 4).sum();

        // 2. AdamW on the partitions, then every replica gets the new parameters.
        self.step += 1;
        let c = self.cfg.adamw;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (g, gparts) in self.groups.iter_mut().zip(parts) {
            for (b, gp) in g.buckets.iter_mut().zip(gparts) {
                let grad = (gp * (scale * factor))?;
                let w = match &b.master {
                    Some(m) => m.clone(),
                    None => flat_params(&self.params, &b.layout, b.start, b.len)?,
                };
                let m = ((&b.exp_avg * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
                let v = ((&b.exp_avg_sq * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
                let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
                let w = ((w * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
                b.exp_avg = m;
                b.exp_avg_sq = v;
                if b.master.is_some() {
                    b.master = Some(w.clone());
                }
                write_params(&self.params, &b.layout, b.start, &w, g.comm.as_ref(), stage)?;
            }
        }
        Ok(norm)
    }

    /// The optimizer state as named sharded tensors under the names [`crate::optim::AdamW`]
    /// uses (`optimizer.exp_avg.NAME`, `optimizer.exp_avg_sq.NAME`, `optimizer.step`, and
    /// `optimizer.master.NAME` for 16-bit parameters), each with its parameter's shard: the
    /// partitions are gathered over the replicas first, so a checkpoint loads under any dp
    /// (and any tp/ep). Collective over the replicas.
    pub fn state(&self) -> Result<Vec<ShardedTensor>> {
        let mut out = Vec::new();
        for g in &self.groups {
            for b in &g.buckets {
                let mut kinds = vec![("exp_avg", &b.exp_avg), ("exp_avg_sq", &b.exp_avg_sq)];
                if let Some(m) = &b.master {
                    kinds.push(("master", m));
                }
                for (kind, part) in kinds {
                    let full = match (&g.comm, self.cfg.stage) {
                        (Some(c), 1..) => c.all_gather(part, 0)?,
                        _ => part.clone(),
                    };
                    for s in &b.layout.segments {
                        let p = &self.params[s.param];
                        out.push(ShardedTensor {
                            name: format!("optimizer.{kind}.{}", p.name),
                            local: full.narrow(0, s.offset, s.len)?.reshape(p.var.shape())?,
                            full_dims: p.full_dims.clone(),
                            placement: p.placement,
                        });
                    }
                }
            }
        }
        out.push(ShardedTensor {
            name: "optimizer.step".into(),
            local: Tensor::new(&[self.step as f64], self.world.device())?,
            full_dims: vec![1],
            placement: Placement::Replicated,
        });
        Ok(out)
    }

    /// Restores the state saved by [`ZeroOptimizer::state`] or [`crate::optim::AdamW::state`]
    /// (any layout, any dp, any stage): each rank reads its parameters' shards of the moments
    /// and keeps its partition. Master weights missing from the checkpoint are taken from the
    /// parameters.
    pub fn load_state(&mut self, vb: &ParallelVarBuilder) -> Result<()> {
        if !vb.contains("optimizer.step") {
            bail!("the checkpoint holds no optimizer state (optimizer.step is missing)")
        }
        let init = candle_nn::Init::Const(0.0);
        let device = self.world.device().clone();
        for g in &mut self.groups {
            for b in &mut g.buckets {
                let read = |kind: &str| -> Result<Tensor> {
                    let flat = Tensor::zeros(b.layout.padded, DType::F32, &device)?;
                    for s in &b.layout.segments {
                        let p = &self.params[s.param];
                        let name = format!("optimizer.{kind}.{}", p.name);
                        let t =
                            vb.get_untracked(p.full_dims.as_slice(), &name, p.placement, init)?;
                        flat.slice_set(&t.to_dtype(DType::F32)?.flatten_all()?, 0, s.offset)?;
                    }
                    flat.narrow(0, b.start, b.len)?.copy()
                };
                b.exp_avg = read("exp_avg")?;
                b.exp_avg_sq = read("exp_avg_sq")?;
                if b.master.is_some() {
                    let has = b.layout.segments.iter().all(|s| {
                        vb.contains(&format!("optimizer.master.{}", self.params[s.param].name))
                    });
                    b.master = Some(if has {
                        read("master")?
                    } else {
                        flat_params(&self.params, &b.layout, b.start, b.len)?
                    });
                }
            }
        }
        let step = vb.get_untracked(1, "optimizer.step", Placement::Replicated, init)?;
        self.step = step.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// The parts of `layout`'s segments inside elements `start..start + len`: (parameter,
/// first, end) in bucket coordinates.
fn overlaps(
    layout: &FlatBucket,
    start: usize,
    len: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let end = start + len;
    layout.segments.iter().filter_map(move |s| {
        let (lo, hi) = (s.offset.max(start), (s.offset + s.len).min(end));
        (lo < hi).then_some((s.param, lo, hi))
    })
}

/// Elements `start..start + len` of the bucket's parameters, flat, as f32 (zeros past the
/// last parameter).
fn flat_params(params: &[Param], layout: &FlatBucket, start: usize, len: usize) -> Result<Tensor> {
    let device = params[layout.segments[0].param].var.device();
    let out = Tensor::zeros(len, DType::F32, device)?;
    for (i, lo, hi) in overlaps(layout, start, len) {
        let s = layout
            .segments
            .iter()
            .find(|s| s.param == i)
            .expect("a segment");
        let piece = params[i]
            .var
            .as_tensor()
            .flatten_all()?
            .narrow(0, lo - s.offset, hi - lo)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        out.slice_set(&piece, 0, lo - start)?;
    }
    Ok(out)
}

/// Sets the parameters from the updated partition `w` (elements `start..` of the bucket): at
/// stages 1 and 2 every rank's partition is all-gathered first, in the parameters' dtype.
fn write_params(
    params: &[Param],
    layout: &FlatBucket,
    start: usize,
    w: &Tensor,
    comm: Option<&Comm>,
    stage: u8,
) -> Result<()> {
    let dtype = params[layout.segments[0].param].var.dtype();
    let uniform = layout
        .segments
        .iter()
        .all(|s| params[s.param].var.dtype() == dtype);
    let (full, offset) = match (comm, stage) {
        (Some(c), 1..) => {
            // Gathered in the parameters' dtype (half the bytes for bf16) when they share one.
            let part = if uniform {
                w.to_dtype(dtype)?
            } else {
                w.clone()
            };
            (c.all_gather(&part, 0)?, 0)
        }
        _ => (w.clone(), start),
    };
    for s in &layout.segments {
        let p = &params[s.param];
        let x = full
            .narrow(0, s.offset - offset, s.len)?
            .reshape(p.var.shape())?
            .to_dtype(p.var.dtype())?;
        p.var.set(&x)?;
    }
    Ok(())
}
