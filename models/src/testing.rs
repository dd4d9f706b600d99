//! Helpers for tests, examples and benchmarks: deterministic inputs, a relative-error check,
//! and random models written in Hugging Face layout (no downloads).
//!
//! ```
//! use candle_core::DType;
//! use candle_parallel_models::testing::{max_rel_err, seeded};
//!
//! let a = seeded(&[2, 3], 7, DType::F32)?;
//! assert_eq!(max_rel_err(&a, &seeded(&[2, 3], 7, DType::F32)?)?, 0.0);
//! # Ok::<(), candle_core::Error>(())
//! ```
use crate::mixtral::{Mixtral, MixtralConfig, ShardedMixtral};
use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::data_parallel::{BatchGroups, Recompute};
use candle_parallel::memory;
use candle_parallel::mesh::MeshDim;
use candle_parallel::moe::Dispatch;
use candle_parallel::ops;
use candle_parallel::zero::{MemoryReport, ZeroConfig, ZeroOptimizer};
use candle_parallel::{Launcher, MeshShape};

/// A deterministic tensor of `dims` with values in [-1, 1), different for each `seed`
/// (a 64-bit LCG: the same on every platform and run, no RNG crate needed).
pub fn seeded(dims: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// max |a - b| / max(max |b|, tiny): the relative error of `a` against the reference `b`.
pub fn max_rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims())
    }
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-30);
    Ok(diff / scale)
}

/// Writes a random model in Hugging Face layout into `dir`: `config.json` (`cfg`) and
/// `model.safetensors` with the tensors `build` creates on one rank from the deterministic
/// initialisation of `seed`.
pub fn write_random_hf<C: serde::Serialize>(
    dir: &std::path::Path,
    cfg: &C,
    seed: u64,
    build: impl Fn(candle_parallel::checkpoint::ParallelVarBuilder, &candle_parallel::Comm) -> Result<()>
        + Sync,
) -> Result<()> {
    use candle_parallel::checkpoint::ParallelVarBuilder;
    candle_parallel::checkpoint::create_dir(dir)?;
    // Explicitly local: this helper also runs inside multi-process (NCCL) jobs.
    let params = candle_parallel::Launcher::new(1)
        .backend(candle_parallel::launch::BackendKind::Local)
        .run(|ctx| {
            let vb = ParallelVarBuilder::from_init(seed, DType::F32, &Device::Cpu).trainable();
            build(vb.clone(), ctx.comm())?;
            Ok(vb.params())
        })?;
    let tensors: std::collections::HashMap<String, Tensor> = params[0]
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let json = serde_json::to_string_pretty(cfg).map_err(candle_core::Error::wrap)?;
    candle_parallel::checkpoint::write_file(&dir.join("config.json"), json)?;
    Ok(())
}

/// A random Llama-style checkpoint (see [`write_random_hf`]).
pub fn write_random_llama(
    dir: &std::path::Path,
    cfg: &crate::llama::LlamaConfig,
    seed: u64,
) -> Result<()> {
    write_random_hf(dir, cfg, seed, |vb, comm| {
        crate::llama::Llama::new(cfg, vb, comm).map(|_| ())
    })
}

/// A random Mixtral-style checkpoint (see [`write_random_hf`]).
pub fn write_random_mixtral(
    dir: &std::path::Path,
    cfg: &crate::mixtral::MixtralConfig,
    seed: u64,
) -> Result<()> {
    use candle_parallel::moe::Dispatch;
    write_random_hf(dir, cfg, seed, |vb, comm| {
        crate::mixtral::Mixtral::new(cfg, vb, comm, comm, Dispatch::AllReduce).map(|_| ())
    })
}

/// Layers `range` of a deterministic MLP of `tanh(x Wᵢᵀ + bᵢ)` (`hidden` wide; layer `i`'s
/// weights depend on `seed` and `i` only, so any stage of it can be built anywhere): the model
/// of the pipeline examples, benchmark and tests. Its linear layers are
/// [`candle_parallel::ops::linear`], whose weight gradients zero-bubble schedules defer.
pub struct TanhMlp {
    pub layers: Vec<(candle_core::Var, candle_core::Var)>,
}

impl TanhMlp {
    pub fn new(range: std::ops::Range<usize>, hidden: usize, seed: u64) -> Result<Self> {
        let scale = 1.5 / (hidden as f64).sqrt();
        let layers = range
            .map(|i| {
                let s = seed.wrapping_add(2 * i as u64);
                let w = (seeded(&[hidden, hidden], s, DType::F32)? * scale)?;
                let b = (seeded(&[hidden], s + 1, DType::F32)? * 0.1)?;
                Ok((
                    candle_core::Var::from_tensor(&w)?,
                    candle_core::Var::from_tensor(&b)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Every weight and bias, in layer order.
    pub fn vars(&self) -> Vec<candle_core::Var> {
        self.layers
            .iter()
            .flat_map(|(w, b)| [w.clone(), b.clone()])
            .collect()
    }
}

impl candle_core::Module for TanhMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (w, b) in &self.layers {
            x = candle_parallel::ops::linear(&x, w.as_tensor())?
                .broadcast_add(b.as_tensor())?
                .tanh()?;
        }
        Ok(x)
    }
}

impl candle_parallel::pipeline::StashableStage for TanhMlp {
    fn params(&self) -> Vec<candle_core::Var> {
        self.vars()
    }

    fn forward_with(&self, x: &Tensor, params: &[Tensor]) -> Result<Tensor> {
        if params.len() != 2 * self.layers.len() {
            candle_core::bail!(
                "TanhMlp::forward_with: {} tensors for {} layers (a weight and a bias each)",
                params.len(),
                self.layers.len()
            )
        }
        let mut x = x.clone();
        for wb in params.chunks(2) {
            x = candle_parallel::ops::linear(&x, &wb[0])?
                .broadcast_add(&wb[1])?
                .tanh()?;
        }
        Ok(x)
    }
}

/// How a measured training step runs its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackwardPath {
    /// Candle's backward over the whole graph, every gradient returned at once
    /// ([`crate::mixtral::Mixtral::batch_grads`]), then [`ZeroOptimizer::step`].
    Whole,
    /// Unit by unit into the optimizer ([`crate::mixtral::Mixtral::train_grads`]), then
    /// [`ZeroOptimizer::step_accumulated`].
    Units(Recompute),
}

impl std::fmt::Display for BackwardPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Whole => f.write_str("whole graph"),
            Self::Units(r) => write!(f, "unit-wise, recompute {r}"),
        }
    }
}

/// What one rank held, measured by [`candle_parallel::memory::CountingAlloc`] (which the
/// program must install), over the last of a few training steps.
#[derive(Clone, Debug)]
pub struct TrainingMemory {
    /// Parameters of one replica (Ψ, the tp/ep slices of this rank, whole over dp).
    pub psi: usize,
    /// The most held while building the model and optimizer.
    pub load_peak: usize,
    /// The most held during the step (forward, backward, reduction, AdamW).
    pub step_peak: usize,
    /// The step's phases and the most held in each: `forward`, `backward` (from the first
    /// gradient on), `optimizer`; on the whole-graph path `forward+backward`, `optimizer`.
    pub step_phases: Vec<(String, usize)>,
    /// Held between steps.
    pub persistent: usize,
    /// The most held while the model was written to a file at full shape
    /// ([`ZeroOptimizer::write_model`]: rank 0 writes, one tensor at a time).
    pub save_peak: usize,
    /// The largest parameter at full shape, in bytes.
    pub largest_tensor: usize,
    /// What the optimizer says it holds after the step.
    pub reported: MemoryReport,
    /// On a GPU, the memory in use on it after the steps
    /// ([`candle_parallel::memory::device_used`]); `None` on the CPU.
    pub device_used: Option<usize>,
}

/// A training run to measure ([`measure_training_memory`]).
#[derive(Clone, Copy, Debug)]
pub struct MemoryProbe {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Pipeline stages (`schedule` over `micro_batches`). With several, the model is not
    /// written (`save_peak` is then what is held).
    pub pp: usize,
    /// Expert-parallel ranks (a batch dimension besides dp) and tensor-parallel ranks.
    pub ep: usize,
    pub tp: usize,
    /// The pipeline schedule with several stages (interleaved: two chunks per rank).
    pub schedule: candle_parallel::pipeline::ScheduleKind,
    /// Micro-batches per step (dividing `rows`).
    pub micro_batches: usize,
    /// ZeRO stage.
    pub stage: u8,
    pub path: BackwardPath,
    /// Sequences per replica.
    pub rows: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Steps run (the last one measured).
    pub steps: usize,
    /// The optimizer's bucket size.
    pub bucket_bytes: usize,
    /// Stage 3: free each layer's gathered parameters after its forward (FSDP2's
    /// `reshard_after_forward`, the default) or keep them until its backward.
    pub reshard_after_forward: bool,
    /// Stage 3: each layer's forward (backward) starts gathering the next (previous) layer's
    /// parameters (FSDP2's prefetch, [`ShardedMixtral::set_prefetch`]).
    pub prefetch: bool,
    /// LoRA adapters of this rank on the family's default targets (alpha 2r), the base
    /// frozen; 0: a full fine-tune. Refused with stage 3, as the trainer refuses it.
    pub lora_rank: usize,
}

/// Trains a Mixtral-style model of `cfg` (f32, deterministic initialisation, all-to-all
/// dispatch) as `probe` says and measures each rank's bytes ([`TrainingMemory`]). Stage 3
/// runs [`ShardedMixtral`] (its whole-graph backward recomputes each layer).
pub fn measure_training_memory(
    cfg: &MixtralConfig,
    probe: MemoryProbe,
) -> Result<Vec<TrainingMemory>> {
    let MemoryProbe {
        dp,
        pp,
        ep,
        tp,
        schedule,
        micro_batches,
        stage,
        path,
        rows,
        seq,
        steps,
        bucket_bytes,
        reshard_after_forward,
        prefetch,
        lora_rank,
    } = probe;
    if lora_rank > 0 && stage == 3 {
        candle_core::bail!(
            "measure_training_memory: LoRA with ZeRO 3 is refused by the trainer: use stage 0-2"
        )
    }
    let lora = (lora_rank > 0)
        .then(|| -> Result<candle_parallel::lora::LoraConfig> {
            Ok(candle_parallel::lora::LoraConfig {
                rank: lora_rank,
                alpha: 2.0 * lora_rank as f64,
                target_modules: cfg.family()?.lora_targets(),
            })
        })
        .transpose()?;
    if steps == 0 {
        candle_core::bail!("measure_training_memory: measure at least one step")
    }
    if !memory::is_counting() {
        candle_core::bail!("measure_training_memory: install candle_parallel::memory::CountingAlloc as the global allocator")
    }
    if micro_batches == 0 || !rows.is_multiple_of(micro_batches) {
        candle_core::bail!(
            "measure_training_memory: {micro_batches} micro-batches do not divide {rows} rows"
        )
    }
    let stages = candle_parallel::pipeline::split_layers(cfg.num_hidden_layers, pp)?;
    Launcher::new(dp * pp * ep * tp)
        .mesh(MeshShape::new().dp(dp).pp(pp).ep(ep).tp(tp))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let rank = mesh.rank();
            // The matmul library (gemm) keeps a 2 MiB buffer per thread from the first matmul
            // that thread runs itself (small ones; large ones run on its pool): allocated before
            // the baseline, it stays out of the model's figures.
            let w = Tensor::ones((4, 16, 16), DType::F32, ctx.device())?;
            drop(w.matmul(&w)?);
            let mut phases = memory::PhaseMeter::new(rank)?;
            phases.enter("load");
            let vb = ParallelVarBuilder::from_init(1, DType::F32, ctx.device()).trainable();
            let vb = match &lora {
                Some(l) => candle_parallel::lora::LoraBuilder::with_lora(vb, l.clone())?,
                None => vb,
            };
            let zero = ZeroConfig {
                stage,
                bucket_bytes,
                ..Default::default()
            };
            let dims = [MeshDim::Dp, MeshDim::Ep];
            let batch = BatchGroups::new(mesh, &dims)?;
            let (whole, sharded, mut opt) = if stage == 3 {
                let layers = stages[mesh.pp().rank()].clone();
                let mut m = ShardedMixtral::new_stage(
                    cfg,
                    vb.clone(),
                    &batch,
                    mesh,
                    Dispatch::AllToAll,
                    layers,
                )?;
                if pp > 1 {
                    m.set_schedule(schedule)?;
                }
                m.set_reshard_after_forward(reshard_after_forward);
                m.set_prefetch(prefetch);
                if let BackwardPath::Units(r) = path {
                    m.set_recompute(r);
                } else {
                    m.set_recompute(Recompute::Full);
                }
                let opt = ZeroOptimizer::new_sharded(&m.units(), vb.params(), &batch, mesh, zero)?;
                (None, Some(m), opt)
            } else {
                // Several chunks per rank with the interleaved schedule.
                let layers = candle_parallel::pipeline::rank_chunks(
                    cfg.num_hidden_layers,
                    pp,
                    schedule.default_chunks(),
                    mesh.pp().rank(),
                )?;
                let mut m = Mixtral::new_chunks(
                    cfg,
                    vb.clone(),
                    mesh.ep(),
                    mesh.tp(),
                    Dispatch::AllToAll,
                    &layers,
                )?;
                if pp > 1 {
                    m.set_schedule(schedule)?;
                }
                let opt = ZeroOptimizer::new(vb.params(), mesh, &dims, zero)?;
                (Some(m), None, opt)
            };
            drop(vb);
            let ids: Vec<Vec<u32>> = (0..rows)
                .map(|i| {
                    let row = (mesh.dp().rank() * ep + mesh.ep().rank()) * rows + i;
                    (0..seq)
                        .map(|j| ((row * 131 + j * 31) % cfg.vocab_size) as u32)
                        .collect()
                })
                .collect();
            let ids = Tensor::new(ids, ctx.device())?;
            let vars = opt.vars().to_vec();
            // Each step's phases: the forward, the backward from its first gradient on (a
            // whole-graph backward is one phase with its forward), the optimizer's step.
            for _ in 0..steps {
                ctx.comm().barrier()?;
                match (&whole, &sharded, path) {
                    (Some(m), _, BackwardPath::Units(r)) => {
                        phases.enter("forward");
                        let mut sink = memory::PhasedSink::new(&mut opt, &mut phases);
                        m.train_grads(&mut sink, &ids, None, micro_batches, mesh.pp(), r)?;
                        phases.enter("optimizer");
                        opt.step_accumulated(Some(1.0))?;
                    }
                    (Some(m), _, BackwardPath::Whole) => {
                        phases.enter("forward+backward");
                        let g = m.batch_grads(&vars, &ids, None, micro_batches, mesh.pp())?;
                        phases.enter("optimizer");
                        opt.step(&g.grads, Some(1.0))?;
                    }
                    (_, Some(m), BackwardPath::Units(r)) => {
                        phases.enter("forward");
                        let mut sink = memory::PhasedSink::new(&mut opt, &mut phases);
                        ops::with_selective_recompute(r == Recompute::Selective, || {
                            m.train_grads(&mut sink, &ids, None, micro_batches)
                        })?;
                        phases.enter("optimizer");
                        opt.step_accumulated(Some(1.0))?;
                    }
                    (_, Some(m), BackwardPath::Whole) => {
                        phases.enter("forward+backward");
                        let g = m.batch_grads(&vars, &ids, None, micro_batches)?;
                        phases.enter("optimizer");
                        opt.step(&g.grads, Some(1.0))?;
                    }
                    _ => unreachable!("one model"),
                }
            }
            drop((ids, vars));
            let device_used = memory::device_used(ctx.device())?;
            let file = std::env::temp_dir().join(format!(
                "cp-measure-{}-{stage}.safetensors",
                std::process::id()
            ));
            ctx.comm().barrier()?;
            phases.enter("write");
            if pp == 1 {
                opt.write_model(&file, &[], None)?;
            }
            let phases = phases.finish();
            // Relative to what the rank held before loading; the last step is the one measured:
            // its phases are those after the one that last starts a step.
            let base = phases[0].start_bytes;
            let write = &phases[phases.len() - 1];
            let starts = |p: &memory::PhaseMemory| p.name.starts_with("forward");
            let first = phases.iter().rposition(starts).unwrap_or(1);
            let step_phases: Vec<(String, usize)> = phases[first..phases.len() - 1]
                .iter()
                .map(|p| (p.name.clone(), p.peak_bytes - base))
                .collect();
            let step_peak = step_phases.iter().map(|p| p.1).max().unwrap_or(0);
            if rank == 0 && pp == 1 {
                std::fs::remove_file(&file)
                    .map_err(|e| candle_core::Error::msg(format!("{}: {e}", file.display())))?;
            }
            let named = opt.named_params()?;
            let psi = named.iter().map(|(t, _)| t.local.elem_count()).sum();
            let largest_tensor = named
                .iter()
                .map(|(t, _)| t.full_dims.iter().product::<usize>() * 4)
                .max()
                .unwrap_or(0);
            drop(named);
            Ok(TrainingMemory {
                psi,
                load_peak: phases[0].peak_bytes - base,
                step_peak,
                step_phases,
                persistent: write.start_bytes - base,
                save_peak: write.peak_bytes - base,
                largest_tensor,
                reported: opt.memory(),
                device_used,
            })
        })
}
