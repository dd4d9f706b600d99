//! AdamW over sharded parameters, with its state in checkpoints, and gradient clipping by the
//! global norm across ranks.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_parallel::checkpoint::ParallelVarBuilder;
//! use candle_parallel::optim::{AdamW, AdamWConfig};
//! use candle_parallel::tensor_parallel::column_parallel_linear;
//! use candle_parallel::launch;
//!
//! launch(2, |ctx| {
//!     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
//!     let fc = column_parallel_linear(4, 4, vb.pp("fc"), ctx.comm())?.with_gather_output(true);
//!     let mut opt = AdamW::new(vb.params(), AdamWConfig { lr: 1e-2, ..Default::default() })?;
//!     let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
//!     let loss = candle_core::Module::forward(&fc, &x)?.sqr()?.sum_all()?;
//!     opt.backward_step(&loss)?;
//!     Ok(())
//! })?;
//! # Ok::<(), candle_core::Error>(())
//! ```

pub(crate) mod fused;

use crate::checkpoint::{ParallelVarBuilder, Param, Placement, ShardedTensor};
use crate::comm::{Comm, ReduceOp};
use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};

/// AdamW hyper-parameters (PyTorch's defaults).
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW (decoupled weight decay) over this rank's parameter slices. The moments have the
/// parameters' shards, so they are saved and resharded with them.
pub struct AdamW {
    params: Vec<Param>,
    exp_avg: Vec<Var>,
    exp_avg_sq: Vec<Var>,
    step: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// An optimizer with zero moments for `params` (e.g. `vb.params()`).
    pub fn new(params: Vec<Param>, cfg: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Param| Var::zeros(p.var.shape(), DType::F32, p.var.device());
        Ok(Self {
            exp_avg: params.iter().map(zeros).collect::<Result<_>>()?,
            exp_avg_sq: params.iter().map(zeros).collect::<Result<_>>()?,
            params,
            step: 0,
            cfg,
        })
    }

    /// The parameters it updates, sorted by name.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// One update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let grads: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|p| grads.get(p.var.as_tensor()).cloned())
            .collect();
        self.step_with(&grads)
    }

    /// One update from gradients given in the order of [`AdamW::params`] (what a pipelined
    /// step returns); `None` leaves a parameter alone.
    pub fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "AdamW::step_with: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )
        }
        self.step += 1;
        let c = self.cfg;
        let (bc1, bc2) = (
            1.0 - c.beta1.powi(self.step as i32),
            1.0 - c.beta2.powi(self.step as i32),
        );
        for (((p, m), v), g) in self
            .params
            .iter()
            .zip(&self.exp_avg)
            .zip(&self.exp_avg_sq)
            .zip(grads)
        {
            let Some(g) = g else {
                continue;
            };
            // On the CPU in f32: the fused passes, in place.
            let g32 = g.to_dtype(DType::F32)?.contiguous()?;
            if fused::applies(&[p.var.as_tensor(), m.as_tensor(), v.as_tensor(), &g32]) {
                let step = fused::AdamWStep {
                    cfg: c,
                    bias1: bc1,
                    bias2: bc2,
                    grad_scale: 1.0,
                };
                let flat = |t: &Tensor| t.flatten_all();
                fused::adamw_in_slices(
                    &flat(m.as_tensor())?,
                    &flat(v.as_tensor())?,
                    &flat(p.var.as_tensor())?,
                    &flat(&g32)?,
                    &step,
                )?;
                continue;
            }
            let dtype = p.var.dtype();
            let g = g32;
            let w = p.var.as_tensor().to_dtype(DType::F32)?;
            let m_new = ((m.as_tensor() * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v_new = ((v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m_new / bc1)? / ((&v_new / bc2)?.sqrt()? + c.eps)?)?;
            let w_new = ((w * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
            m.set(&m_new)?;
            v.set(&v_new)?;
            p.var.set(&w_new.to_dtype(dtype)?)?;
        }
        Ok(())
    }

    /// `loss.backward()` ([`crate::ops::backward`]) then [`AdamW::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = crate::ops::backward(loss)?;
        self.step(&grads)
    }

    /// The optimizer state as named sharded tensors (`optimizer.exp_avg.NAME`,
    /// `optimizer.exp_avg_sq.NAME`, `optimizer.step`), for [`crate::checkpoint::save_checkpoint`].
    pub fn state(&self) -> Result<Vec<ShardedTensor>> {
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        for ((p, m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            for (kind, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                out.push(ShardedTensor {
                    name: format!("optimizer.{kind}.{}", p.name),
                    local: t.as_tensor().detach(),
                    full_dims: p.full_dims.clone(),
                    placement: p.placement,
                    region: None,
                });
            }
        }
        let device = self
            .params
            .first()
            .map_or(&candle_core::Device::Cpu, |p| p.var.device());
        out.push(step_entry(self.step, device)?);
        Ok(out)
    }

    /// Restores the state saved by [`AdamW::state`] from a checkpoint (any layout: each moment
    /// is read with its parameter's shard).
    pub fn load_state(&mut self, vb: &ParallelVarBuilder) -> Result<()> {
        let step = saved_step(vb)?;
        for ((p, m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            for (kind, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                t.set(&saved_state(vb, kind, &p.name, &p.full_dims, p.placement)?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The step count of the optimizer state in a checkpoint (an error if it holds none). Read as
/// f64 whatever the model's dtype, as it was written.
pub(crate) fn saved_step(vb: &ParallelVarBuilder) -> Result<u64> {
    if !vb.contains("optimizer.step") {
        bail!("the checkpoint holds no optimizer state (optimizer.step is missing)")
    }
    let init = candle_nn::Init::Const(0.0);
    let step = vb.get_untracked_in(1, "optimizer.step", Placement::Replicated, init, DType::F64)?;
    let step = step.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as u64;
    // The metadata's step names the checkpoint (and the step the run goes on from): it must
    // be the optimizer's.
    if let Some(meta) = vb.checkpoint_meta() {
        if meta.step != step {
            bail!(
                "the checkpoint's metadata ({}) says step {} but its optimizer state is at step {step}: the checkpoint was edited or is corrupt; use another checkpoint",
                crate::checkpoint::METADATA_FILE,
                meta.step
            )
        }
    }
    Ok(step)
}

/// This rank's shard (`placement` of `full_dims`) of the saved `optimizer.{kind}.{name}`, in
/// f32 whatever the model's dtype (zeros where the checkpoint lacks it).
pub(crate) fn saved_state(
    vb: &ParallelVarBuilder,
    kind: &str,
    name: &str,
    full_dims: &[usize],
    placement: Placement,
) -> Result<Tensor> {
    let init = candle_nn::Init::Const(0.0);
    let name = format!("optimizer.{kind}.{name}");
    vb.get_untracked_in(full_dims, &name, placement, init, DType::F32)?
        .to_dtype(DType::F32)
}

/// The `optimizer.step` entry of a checkpoint's optimizer state.
pub(crate) fn step_entry(step: u64, device: &candle_core::Device) -> Result<ShardedTensor> {
    Ok(ShardedTensor {
        name: "optimizer.step".into(),
        local: Tensor::new(&[step as f64], device)?,
        full_dims: vec![1],
        placement: Placement::Replicated,
        region: None,
    })
}

/// candle-nn's optimizer interface, so that our AdamW drops in where `candle_nn::AdamW` was.
/// `Optimizer::new(vars, cfg)` takes plain variables as replicated parameters named
/// `param.00000`, `param.00001`, ... (their state is saved under those names); build it from
/// [`crate::checkpoint::ParallelVarBuilder::params`] with [`AdamW::new`] to keep names and
/// shards.
impl candle_nn::Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .enumerate()
            .map(|(i, var)| Param::replicated(format!("param.{i:05}"), var))
            .collect();
        AdamW::new(params, cfg)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        AdamW::step(self, grads)
    }

    fn learning_rate(&self) -> f64 {
        AdamW::learning_rate(self)
    }

    fn set_learning_rate(&mut self, lr: f64) {
        AdamW::set_learning_rate(self, lr)
    }
}

/// The squared L2 norm of `params`' gradients over the ranks of `comm` (the group they are
/// sharded over); elements held by several ranks (replicated parameters, replicated KV heads)
/// count once. Collective; the same on every rank.
pub fn grad_norm_sq(params: &[Param], grads: &GradStore, comm: &Comm) -> Result<f64> {
    let grads: Vec<Option<Tensor>> = params
        .iter()
        .map(|p| grads.get(p.var.as_tensor()).cloned())
        .collect();
    grad_norm_sq_of(params, &grads, comm)
}

/// [`grad_norm_sq`] of gradients given in the order of `params` (what a pipelined step
/// returns).
pub fn grad_norm_sq_of(params: &[Param], grads: &[Option<Tensor>], comm: &Comm) -> Result<f64> {
    if grads.len() != params.len() {
        candle_core::bail!(
            "grad_norm_sq_of: {} gradients for {} parameters",
            grads.len(),
            params.len()
        )
    }
    let n = comm.size() as f64;
    let mut local = 0f64;
    for (p, g) in params.iter().zip(grads) {
        let Some(g) = g else {
            continue;
        };
        let sq = g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        // How many ranks hold each of this rank's elements.
        let holders = match p.placement {
            Placement::Replicated => n,
            Placement::Split { .. } | Placement::SplitPadded { .. } => 1.0,
            Placement::Range { dim, len, .. } => {
                (n * len as f64 / p.full_dims[dim] as f64).max(1.0)
            }
        };
        local += sq / holders;
    }
    let total = comm.all_reduce(&Tensor::new(&[local], comm.device())?, ReduceOp::Sum)?;
    Ok(total.to_vec1::<f64>()?[0])
}

/// Multiplies every gradient of `params` by `factor`.
pub fn scale_grads(params: &[Param], grads: &mut GradStore, factor: f64) -> Result<()> {
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let scaled = (g * factor)?;
            grads.insert(p.var.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// The factor that brings a gradient norm of `norm` down to at most `max_norm`.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales `grads` so that the global L2 norm of all parameters' gradients, across the ranks of
/// `comm` (the group the parameters are sharded over), is at most `max_norm`. Returns the norm
/// before clipping, the same on every rank.
pub fn clip_grad_norm(
    params: &[Param],
    grads: &mut GradStore,
    max_norm: f64,
    comm: &Comm,
) -> Result<f64> {
    let norm = grad_norm_sq(params, grads, comm)?.sqrt();
    scale_grads(params, grads, clip_factor(norm, max_norm))?;
    Ok(norm)
}
