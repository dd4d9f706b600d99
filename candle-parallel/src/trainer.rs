//! One training loop's bookkeeping for dp × pp × ep × tp: the learning-rate schedule (linear
//! warm-up, cosine decay), the ZeRO optimizer (gradient synchronisation over the replicas,
//! global-norm clipping, AdamW), a progress bar on rank 0, a rank-tagged log line per step,
//! and atomic checkpoints that a job resumes from under any layout.
//!
//! The model computes each step's gradients (its forward and backward, over micro-batches and
//! pipeline stages); [`Trainer::step`] does the rest.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_parallel::checkpoint::ParallelVarBuilder;
//! use candle_parallel::mesh::MeshDim;
//! use candle_parallel::tensor_parallel::column_parallel_linear;
//! use candle_parallel::trainer::{LrSchedule, Trainer, TrainerConfig};
//! use candle_parallel::{Launcher, MeshShape};
//!
//! let losses = Launcher::new(4).mesh(MeshShape::new().dp(2).tp(2)).run(|ctx| {
//!     let mesh = ctx.mesh()?;
//!     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
//!     let fc = column_parallel_linear(4, 4, vb.pp("fc"), mesh.tp())?.with_gather_output(true);
//!     let cfg = TrainerConfig { steps: 20, lr: LrSchedule::constant(0.05), ..Default::default() };
//!     let mut trainer = Trainer::new(vb.params(), &mesh, &[MeshDim::Dp], cfg)?;
//!     let x = Tensor::full(1f32 + mesh.dp().rank() as f32, (2, 4), &Device::Cpu)?;
//!     let mut losses = Vec::new();
//!     for _ in 0..20 {
//!         let loss = fc.forward(&x)?.sqr()?.mean_all()?;
//!         let store = loss.backward()?;
//!         let grads = trainer.grads_of(&store);
//!         let report = trainer.step(&grads, loss.to_scalar::<f32>()? as f64)?;
//!         losses.push(report.loss);
//!     }
//!     Ok(losses)
//! })?;
//! assert!(losses[0][19] < losses[0][0] / 2.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::checkpoint::{save_checkpoint, ParallelVarBuilder, Param, SaveOptions, ShardedTensor};
use crate::comm::ReduceOp;
use crate::data_parallel::{BatchGroups, GradSink};
use crate::mesh::{DeviceMesh, MeshDim};
use crate::optim::AdamWConfig;
use crate::zero::{MemoryReport, ShardedModule, ZeroConfig, ZeroOptimizer};
use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

/// The learning rate over the steps: linear warm-up from 0 to `peak` over `warmup_steps`,
/// then cosine decay to `min` at `total_steps` (HF's `get_cosine_schedule_with_warmup`, with
/// a floor: step `i` here is HF's step `i − 1`, so the first step of a warm-up runs at 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub min: f64,
    pub warmup_steps: usize,
    /// Steps over which the cosine decays; 0 keeps `peak` after the warm-up.
    pub total_steps: usize,
}

impl LrSchedule {
    /// `lr` at every step.
    pub fn constant(lr: f64) -> Self {
        Self {
            peak: lr,
            min: lr,
            warmup_steps: 0,
            total_steps: 0,
        }
    }

    /// Warm-up over `warmup_steps`, then cosine decay to `min` at `total_steps`.
    pub fn warmup_cosine(peak: f64, min: f64, warmup_steps: usize, total_steps: usize) -> Self {
        Self {
            peak,
            min,
            warmup_steps,
            total_steps,
        }
    }

    /// The learning rate of step `step` (1 for the first).
    ///
    /// ```
    /// use candle_parallel::trainer::LrSchedule;
    /// let s = LrSchedule::warmup_cosine(1.0, 0.1, 10, 110);
    /// assert_eq!(s.at(1), 0.0);
    /// assert_eq!(s.at(6), 0.5);
    /// assert_eq!(s.at(11), 1.0);
    /// assert!((s.at(61) - 0.55).abs() < 1e-12);
    /// assert!((s.at(111) - 0.1).abs() < 1e-12);
    /// assert_eq!(LrSchedule::constant(0.3).at(1), 0.3);
    /// ```
    pub fn at(&self, step: usize) -> f64 {
        let step = step.saturating_sub(1);
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        if self.total_steps <= self.warmup_steps {
            return self.peak;
        }
        let progress = ((step - self.warmup_steps) as f64
            / (self.total_steps - self.warmup_steps) as f64)
            .min(1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What a [`Trainer`] does besides the model's forward and backward.
#[derive(Clone, Copy, Debug)]
pub struct TrainerConfig {
    /// Steps the job runs (the progress bar's length).
    pub steps: usize,
    pub lr: LrSchedule,
    /// AdamW's other hyper-parameters (`lr` is set from the schedule every step).
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub clip: Option<f64>,
    /// ZeRO stage 0, 1 or 2.
    pub zero_stage: u8,
    /// Gradient bucket size in bytes.
    pub bucket_bytes: usize,
    /// The dtype gradients cross the replicas in ([`ZeroConfig::reduce_dtype`]).
    pub reduce_dtype: candle_core::DType,
    /// Reduce gradients while the backward runs ([`ZeroConfig::overlap_comm`]).
    pub overlap_comm: bool,
    /// Show a progress bar on rank 0.
    pub progress: bool,
    /// Log a step line at INFO every this many steps (every step at DEBUG); 0: about 20 lines
    /// a job.
    pub log_every: usize,
    /// Tokens a step trains on over all replicas, for the tokens/s reported (0: not shown).
    pub tokens_per_step: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            steps: 1,
            lr: LrSchedule::constant(1e-3),
            adamw: AdamWConfig::default(),
            clip: Some(1.0),
            zero_stage: 0,
            bucket_bytes: crate::data_parallel::DEFAULT_BUCKET_BYTES,
            reduce_dtype: candle_core::DType::F32,
            overlap_comm: true,
            progress: false,
            log_every: 0,
            tokens_per_step: 0,
        }
    }
}

/// One step's numbers, the same on every rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// 1 for the first step.
    pub step: usize,
    /// The loss given to [`Trainer::step`], averaged over the replicas.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// Tokens trained on per second since the previous step ended (0 without
    /// [`TrainerConfig::tokens_per_step`]).
    pub tokens_per_sec: f64,
}

/// The training loop's bookkeeping; see the [module docs](self).
pub struct Trainer {
    opt: ZeroOptimizer,
    cfg: TrainerConfig,
    mesh: DeviceMesh,
    /// The ranks a global batch is split over (`None`: this rank alone).
    replicas: Option<crate::comm::Comm>,
    bar: ProgressBar,
    /// When the previous step ended (or the trainer was made).
    last: std::time::Instant,
}

impl Trainer {
    /// A trainer for `params` (e.g. `vb.params()`) on `mesh`, whose `batch_dims` split each
    /// global batch (dp; with all-to-all expert dispatch also ep), at ZeRO stage 0, 1 or 2.
    /// Collective over the world.
    pub fn new(
        params: Vec<Param>,
        mesh: &DeviceMesh,
        batch_dims: &[MeshDim],
        cfg: TrainerConfig,
    ) -> Result<Self> {
        let batch = BatchGroups::new(mesh, batch_dims)?;
        let opt = ZeroOptimizer::with_groups(params, &batch, mesh, Self::zero_config(&cfg))?;
        Self::with_optimizer(opt, &batch, mesh, cfg)
    }

    /// A trainer at ZeRO stage 3: the `modules`' parameters are sharded over the replicas
    /// (built with the same `batch` groups), `params` are the model's other parameters.
    /// Collective over the world.
    pub fn sharded(
        modules: &[&ShardedModule],
        params: Vec<Param>,
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        cfg: TrainerConfig,
    ) -> Result<Self> {
        let opt =
            ZeroOptimizer::new_sharded(modules, params, batch, mesh, Self::zero_config(&cfg))?;
        Self::with_optimizer(opt, batch, mesh, cfg)
    }

    fn zero_config(cfg: &TrainerConfig) -> ZeroConfig {
        ZeroConfig {
            stage: cfg.zero_stage,
            bucket_bytes: cfg.bucket_bytes,
            reduce_dtype: cfg.reduce_dtype,
            overlap_comm: cfg.overlap_comm,
            adamw: AdamWConfig {
                lr: cfg.lr.at(1),
                ..cfg.adamw
            },
            ..ZeroConfig::default()
        }
    }

    fn with_optimizer(
        opt: ZeroOptimizer,
        batch: &BatchGroups,
        mesh: &DeviceMesh,
        cfg: TrainerConfig,
    ) -> Result<Self> {
        // The communicator over all the batch dimensions (the last subset: every bit set).
        let replicas = batch.subsets().last().and_then(|(_, c)| c.clone());
        let bar = if cfg.progress && mesh.rank() == 0 {
            ProgressBar::new(cfg.steps as u64).with_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                    .map_err(candle_core::Error::wrap)?,
            )
        } else {
            ProgressBar::hidden()
        };
        Ok(Self {
            opt,
            cfg,
            mesh: mesh.clone(),
            replicas,
            bar,
            last: std::time::Instant::now(),
        })
    }

    /// The optimizer (its parameters, state and memory).
    pub fn optimizer(&self) -> &ZeroOptimizer {
        &self.opt
    }

    /// The variables whose gradients [`Trainer::step`] takes, in order (the parameters, or at
    /// stage 3 also the sharded modules' partitions).
    pub fn vars(&self) -> &[candle_core::Var] {
        self.opt.vars()
    }

    /// Steps taken so far (restored by [`Trainer::resume`]).
    pub fn steps_done(&self) -> usize {
        self.opt.step_count() as usize
    }

    /// Bytes held per kind (see [`ZeroOptimizer::memory`]).
    pub fn memory(&self) -> MemoryReport {
        self.opt.memory()
    }

    /// The gradients of [`Trainer::vars`] in a backward pass's store, in their order.
    pub fn grads_of(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.opt.grads_of(store)
    }

    /// One optimizer step from this rank's gradients of its mean `loss` (unsynchronised; the
    /// replicas' gradients are reduced here): the schedule's learning rate, clipping, AdamW.
    /// Collective over the world.
    pub fn step(&mut self, grads: &[Option<Tensor>], loss: f64) -> Result<StepReport> {
        let lr = self.next_learning_rate();
        let grad_norm = self.opt.step(grads, self.cfg.clip)?;
        self.report(loss, grad_norm, lr)
    }

    /// [`Trainer::step`] from the gradients handed to the trainer as a
    /// [`crate::data_parallel::GradSink`] since the last step (a unit-wise backward: each
    /// unit's gradients packed and reduced as soon as they exist).
    pub fn step_accumulated(&mut self, loss: f64) -> Result<StepReport> {
        let lr = self.next_learning_rate();
        let grad_norm = self.opt.step_accumulated(self.cfg.clip)?;
        self.report(loss, grad_norm, lr)
    }

    fn next_learning_rate(&mut self) -> f64 {
        let lr = self.cfg.lr.at(self.steps_done() + 1);
        self.opt.set_learning_rate(lr);
        lr
    }

    fn report(&mut self, loss: f64, grad_norm: f64, lr: f64) -> Result<StepReport> {
        let step = self.steps_done();
        let loss = self.replica_mean(loss)?;
        let now = std::time::Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let tokens_per_sec = self.cfg.tokens_per_step as f64 / secs;
        let every = match self.cfg.log_every {
            0 => (self.cfg.steps / 20).max(1),
            n => n,
        };
        if step.is_multiple_of(every) || step == self.cfg.steps {
            tracing::info!(step, loss, grad_norm, lr, tokens_per_sec, "step");
        } else {
            tracing::debug!(step, loss, grad_norm, lr, tokens_per_sec, "step");
        }
        self.bar.set_position(step as u64);
        let speed = match self.cfg.tokens_per_step {
            0 => String::new(),
            _ => format!("  {tokens_per_sec:.0} tok/s"),
        };
        self.bar.set_message(format!(
            "loss {loss:.4}  grad norm {grad_norm:.3}  lr {lr:.2e}{speed}"
        ));
        Ok(StepReport {
            step,
            loss,
            grad_norm,
            lr,
            tokens_per_sec,
        })
    }

    /// The mean of `value` over the replicas (the batch dimensions).
    pub fn replica_mean(&self, value: f64) -> Result<f64> {
        let Some(comm) = &self.replicas else {
            return Ok(value);
        };
        let t = Tensor::new(&[value], comm.device())?;
        Ok(comm.all_reduce(&t, ReduceOp::Avg)?.to_vec1::<f64>()?[0])
    }

    /// Finishes the progress bar.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// Saves the parameters and the optimizer state into the checkpoint directory `dir`,
    /// atomically (see [`save_checkpoint`]): every rank writes its own pieces, ZeRO partitions
    /// as they are (nothing is gathered), replicated values from one of their holders.
    /// Collective over the world.
    pub fn save(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        self.save_with(dir, opts, &[])
    }

    /// [`Trainer::save`] with the model's buffers: tensors that are not trained by gradients
    /// but belong to the model (a router's selection bias), each replicated on the ranks of
    /// this rank's pipeline stage (written once, by its first dp, ep and tp rank) and read
    /// back, like the parameters, when the model is built from the checkpoint.
    pub fn save_with(
        &self,
        dir: &Path,
        opts: &SaveOptions,
        buffers: &[(String, Tensor)],
    ) -> Result<()> {
        let mut tensors = self.opt.param_pieces()?;
        tensors.extend(self.opt.state()?);
        let holder = [MeshDim::Dp, MeshDim::Ep, MeshDim::Tp]
            .iter()
            .all(|&d| self.mesh.coord(d) == 0);
        if holder {
            tensors.extend(buffers.iter().map(|(name, t)| ShardedTensor {
                name: name.clone(),
                local: t.clone(),
                full_dims: t.dims().to_vec(),
                placement: crate::checkpoint::Placement::Replicated,
                region: None,
            }));
        }
        let opts = SaveOptions {
            step: self.steps_done() as u64,
            mesh: if opts.mesh.is_empty() {
                self.mesh.shape().to_string()
            } else {
                opts.mesh.clone()
            },
            ..opts.clone()
        };
        save_checkpoint(dir, &tensors, &opts, self.mesh.world())
    }

    /// Restores the optimizer state (and the step count, so the schedule continues) from the
    /// checkpoint `vb` reads, saved under any layout. The parameters come from building the
    /// model from the same checkpoint.
    pub fn resume(&mut self, vb: &ParallelVarBuilder) -> Result<()> {
        self.opt.load_state(vb)?;
        if self.steps_done() > self.cfg.steps {
            bail!(
                "the checkpoint is at step {}, past the {} steps this job runs",
                self.steps_done(),
                self.cfg.steps
            )
        }
        self.bar.set_position(self.steps_done() as u64);
        Ok(())
    }
}

impl GradSink for Trainer {
    fn sink_vars(&self) -> Vec<candle_core::Var> {
        self.opt.sink_vars()
    }

    fn add_grad(&mut self, index: usize, grad: &Tensor) -> Result<()> {
        self.opt.add_grad(index, grad)
    }

    fn unit_done(&mut self, prefixes: &[&str]) -> Result<()> {
        self.opt.unit_done(prefixes)
    }

    fn end_micro_batch(&mut self) -> Result<()> {
        self.opt.end_micro_batch()
    }

    fn begin_backward(&mut self, last: bool) -> Result<()> {
        self.opt.begin_backward(last)
    }
}
