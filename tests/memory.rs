//! Memory measured in the process (the counting allocator, each allocation attributed to the
//! rank thread that made it): ZeRO's savings show in what each rank holds, the unit-wise
//! backward holds less than the whole-graph one, and recomputation (selective, then full) less
//! again. One test in
//! this binary: the ranks' counters are per rank number, shared by anything running at once.
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_parallel::data_parallel::Recompute;
use candle_parallel::memory::{self, CountingAlloc};
use candle_parallel::pipeline::{run_pipedream, run_pipedream_recorded, StashableStage};
use candle_parallel::{Launcher, MeshShape};
use candle_parallel_models::activations::{mixtral_activations, ActivationLayout};
use candle_parallel_models::mixtral::MixtralConfig;
use candle_parallel_models::testing::{
    measure_training_memory, BackwardPath, MemoryProbe, TrainingMemory,
};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn config(hidden: usize, layers: usize, seq: usize) -> MixtralConfig {
    MixtralConfig {
        hidden_size: hidden,
        intermediate_size: 2 * hidden,
        vocab_size: 1024,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: seq,
        sliding_window: None,
        ..MixtralConfig::tiny()
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Rank 0's figures (every rank holds the same amounts here: no experts are split).
/// The model's count of its activations (`mixtral_activations`, one device) is within 10% of
/// what the allocator measured in the forward and over the step of run `m` (`probe`'s rows and
/// tokens, recomputation `recompute`).
fn assert_activations_predicted(
    what: &str,
    cfg: &MixtralConfig,
    probe: &MemoryProbe,
    recompute: Recompute,
    m: &TrainingMemory,
) -> Result<()> {
    let layout = ActivationLayout::one_rank(probe.rows, probe.seq, recompute);
    let est = mixtral_activations(cfg, cfg.num_hidden_layers, &layout)?;
    let forward = m.step_phases[0].1 - m.persistent;
    for (phase, predicted, measured) in [
        ("forward", est.forward, forward),
        ("step", est.peak, m.step_peak - m.persistent),
    ] {
        let (predicted, measured) = (predicted as f64, measured as f64);
        eprintln!(
            "{what}, recompute {recompute}: {phase} activations predicted {:.2} MiB, measured {:.2} MiB",
            predicted / (1 << 20) as f64,
            measured / (1 << 20) as f64
        );
        assert!(
            (predicted - measured).abs() < 0.1 * measured,
            "{what}, recompute {recompute}: predicted {predicted} {phase} activation bytes, measured {measured}"
        );
    }
    Ok(())
}

fn measure(cfg: &MixtralConfig, probe: MemoryProbe) -> Result<TrainingMemory> {
    let m = measure_training_memory(cfg, probe)?.remove(0);
    // The step's phases, each peak within the step's.
    let names: Vec<&str> = m.step_phases.iter().map(|p| p.0.as_str()).collect();
    let want: &[&str] = match probe.path {
        BackwardPath::Whole => &["forward+backward", "optimizer"],
        BackwardPath::Units(_) => &["forward", "backward", "optimizer"],
    };
    assert_eq!(names, want, "{:?}", probe.path);
    assert_eq!(m.step_phases.iter().map(|p| p.1).max(), Some(m.step_peak));
    eprintln!("phases: {:?}", m.step_phases);
    eprintln!(
        "dp={} stage {} {}: load {:.2} MiB, step peak {:.2} MiB, persistent {:.2} MiB, writing {:.2} MiB (Ψ = {}, largest tensor {:.2} MiB)",
        probe.dp,
        probe.stage,
        probe.path,
        mib(m.load_peak),
        mib(m.step_peak),
        mib(m.persistent),
        mib(m.save_peak),
        m.psi,
        mib(m.largest_tensor)
    );
    Ok(m)
}

#[test]
fn measured_memory_follows_zero_and_the_unit_wise_backward() -> Result<()> {
    assert!(memory::is_counting());
    // Parameters dominate: 2 M of them, 4 layers, 32 tokens per replica; 1 MiB buckets.
    let cfg = config(128, 4, 16);
    let probe = MemoryProbe {
        dp: 4,
        pp: 1,
        ep: 1,
        tp: 1,
        schedule: candle_parallel::pipeline::ScheduleKind::OneFOneB,
        micro_batches: 1,
        stage: 0,
        path: BackwardPath::Units(Recompute::None),
        rows: 2,
        seq: 16,
        steps: 2,
        bucket_bytes: 1 << 20,
        reshard_after_forward: true,
        prefetch: true,
        lora_rank: 0,
    };
    let mut peaks = Vec::new();
    for stage in 0..=3u8 {
        let m = measure(&cfg, MemoryProbe { stage, ..probe })?;
        let (psi, n) = (m.psi as f64, probe.dp as f64);
        // ZeRO's model states in f32 with AdamW: 4Ψ parameters, 4Ψ gradients, 8Ψ moments.
        let formula = match stage {
            0 => 16.0 * psi,
            1 => 8.0 * psi + 8.0 * psi / n,
            2 => 4.0 * psi + 12.0 * psi / n,
            _ => 16.0 * psi / n,
        };
        let off = (m.persistent as f64 - formula).abs() / formula;
        assert!(
            off < 0.05,
            "stage {stage}: {} bytes held between steps, the formula says {formula}",
            m.persistent
        );
        // Writing the model adds at most about one full tensor to what is held (rank 0
        // receives it and writes it; its holder gathered it) and the file's 1 MiB buffer; at
        // stage 3 also one layer gathered for its turn: never the model.
        let layer = match stage {
            3 => 2 * 4 * m.psi / cfg.num_hidden_layers,
            _ => 0,
        };
        assert!(
            m.save_peak <= m.persistent + 3 * m.largest_tensor + (2 << 20) + layer,
            "stage {stage}: {} bytes at most while writing, {} held, largest tensor {}",
            m.save_peak,
            m.persistent,
            m.largest_tensor
        );
        // Loading holds what persists, plus at most one parameter being read: at stage 3 each
        // rank reads only its partition, one parameter at a time.
        assert!(
            m.load_peak <= m.persistent + 2 * m.largest_tensor + (1 << 20),
            "stage {stage}: {} bytes at most while loading, {} held after",
            m.load_peak,
            m.persistent
        );
        // What the optimizer reports is what the process holds for it.
        let reported = m.reported.total() as f64;
        assert!(
            (reported - m.persistent as f64).abs() / formula < 0.05,
            "stage {stage}: reported {reported}, held {}",
            m.persistent
        );
        if stage < 3 {
            // The whole-graph backward holds every full gradient at once besides the buckets.
            let whole = measure(
                &cfg,
                MemoryProbe {
                    stage,
                    path: BackwardPath::Whole,
                    ..probe
                },
            )?;
            assert!(
                whole.step_peak as f64 - m.step_peak as f64 > 2.0 * psi,
                "stage {stage}: unit-wise peak {} not well below the whole backward's {}",
                m.step_peak,
                whole.step_peak
            );
        }
        peaks.push(m.step_peak);
    }
    for s in 1..4 {
        assert!(peaks[s] < peaks[s - 1], "peaks by stage: {peaks:?}");
    }
    // Stage 3 frees each layer's gathered parameters after its forward (the ops that consume
    // them look them up again in the backward): kept instead, the four layers' gathered
    // parameters are all held when the backward starts, where freed at most two are (the
    // layer computing and the one prefetched).
    let kept = measure(
        &cfg,
        MemoryProbe {
            stage: 3,
            reshard_after_forward: false,
            ..probe
        },
    )?;
    // Selective recomputation over released parameters holds no more than keeping every
    // activation does (the experts' down projections it recomputes take their weights from
    // the scope, not from the graph).
    let selective3 = measure(
        &cfg,
        MemoryProbe {
            stage: 3,
            path: BackwardPath::Units(Recompute::Selective),
            ..probe
        },
    )?;
    assert!(
        selective3.step_peak <= peaks[3],
        "stage 3: selective recomputation's peak {} above keeping every activation's {}",
        selective3.step_peak,
        peaks[3]
    );
    let unit = 4 * kept.psi / cfg.num_hidden_layers;
    assert!(
        kept.step_peak > peaks[3] + 3 * unit / 2,
        "stage 3: peak {} with the gathered parameters kept, {} freed after the forward ({unit} bytes per layer)",
        kept.step_peak,
        peaks[3]
    );
    // Activations dominate: full recomputation keeps one layer's at a time.
    let cfg = config(64, 4, 128);
    let act = MemoryProbe {
        dp: 1,
        rows: 2,
        seq: 128,
        ..probe
    };
    let none = measure(&cfg, act)?;
    let full = measure(
        &cfg,
        MemoryProbe {
            path: BackwardPath::Units(Recompute::Full),
            ..act
        },
    )?;
    assert!(
        (full.step_peak as f64) < 0.75 * none.step_peak as f64,
        "recompute full peak {} vs none {}",
        full.step_peak,
        none.step_peak
    );
    // Selective recomputation keeps every layer's activations but the attention's scores and
    // probabilities (four `[b, heads, s, s]` tensors per layer) and the experts' activations:
    // it saves at least three quarters of those.
    let selective = measure(
        &cfg,
        MemoryProbe {
            path: BackwardPath::Units(Recompute::Selective),
            ..act
        },
    )?;
    // The model's own count of its activations predicts what the allocator measures.
    for (m, recompute) in [
        (&none, Recompute::None),
        (&selective, Recompute::Selective),
        (&full, Recompute::Full),
    ] {
        assert_activations_predicted("mixtral", &cfg, &act, recompute, m)?;
    }
    // Qwen2-MoE's layout: a shared expert in every sparse layer and a dense layer among them.
    let qwen = MixtralConfig::from_json(serde_json::json!({
        "model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96,
        "vocab_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
        "mlp_only_layers": [1], "max_position_embeddings": 128,
    }))?;
    for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
        let probe = MemoryProbe {
            path: BackwardPath::Units(recompute),
            ..act
        };
        let m = measure(&qwen, probe)?;
        assert_activations_predicted("qwen2_moe", &qwen, &act, recompute, &m)?;
    }
    let scores = 4 * act.rows * cfg.num_attention_heads * act.seq * act.seq * 4;
    assert!(
        selective.step_peak + scores * cfg.num_hidden_layers * 3 / 4 <= none.step_peak
            && full.step_peak < selective.step_peak,
        "recompute selective peak {} vs none {} and full {} (scores {} bytes per layer)",
        selective.step_peak,
        none.step_peak,
        full.step_peak,
        scores
    );
    // Stage 3 keeps the layers' activations unless recomputation is asked for: its peaks
    // follow the recompute mode as stage 0's do.
    let sharded = |recompute| {
        measure(
            &cfg,
            MemoryProbe {
                stage: 3,
                path: BackwardPath::Units(recompute),
                ..act
            },
        )
    };
    let (none3, full3) = (sharded(Recompute::None)?, sharded(Recompute::Full)?);
    assert!(
        (full3.step_peak as f64) < 0.75 * none3.step_peak as f64
            && none3.step_peak + (1 << 20) > none.step_peak - none.persistent + none3.persistent,
        "stage 3: recompute full peak {} vs none {} (stage 0: {} of which {} held)",
        full3.step_peak,
        none3.step_peak,
        none.step_peak,
        none.persistent
    );
    pipeline_stages_hold_what_their_schedule_keeps(&cfg, act)?;
    pipedream_holds_what_is_in_flight()
}

/// Two pipeline stages of two layers, 1F1B over 4 micro-batches: the first stage holds two
/// micro-batches' activations at once, the last one (with the head); full recomputation keeps
/// each layer's input only, inside the stages too; the model's own count predicts each stage.
fn pipeline_stages_hold_what_their_schedule_keeps(
    cfg: &MixtralConfig,
    act: MemoryProbe,
) -> Result<()> {
    let (pp, micro_batches) = (2, 4);
    let probe = MemoryProbe {
        pp,
        micro_batches,
        rows: 4,
        ..act
    };
    let mut peaks = Vec::new();
    for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
        let ranks = measure_training_memory(
            cfg,
            MemoryProbe {
                path: BackwardPath::Units(recompute),
                ..probe
            },
        )?;
        for (stage, m) in ranks.iter().enumerate() {
            let layout =
                ActivationLayout::one_rank(probe.rows / micro_batches, probe.seq, recompute)
                    .one_f_one_b(stage, pp, micro_batches);
            let layers = cfg.num_hidden_layers / pp;
            let predicted = mixtral_activations(cfg, layers, &layout)?.peak as f64;
            let measured = (m.step_peak - m.persistent) as f64;
            eprintln!(
                "pp stage {stage}, recompute {recompute}: activations predicted {:.2} MiB, measured {:.2} MiB",
                predicted / (1 << 20) as f64,
                measured / (1 << 20) as f64
            );
            assert!(
                (predicted - measured).abs() < 0.15 * measured,
                "pp stage {stage}, recompute {recompute}: predicted {predicted} activation bytes, measured {measured}"
            );
        }
        peaks.push(ranks[0].step_peak);
    }
    assert!(
        peaks[2] < peaks[1] && peaks[1] < peaks[0],
        "first stage's peaks by recompute none, selective, full: {peaks:?}"
    );
    Ok(())
}

/// A stage of `tanh(x · W)` layers with large weights and small activations.
struct TanhStage(Vec<Var>);

impl StashableStage for TanhStage {
    fn params(&self) -> Vec<Var> {
        self.0.clone()
    }

    fn forward_with(&self, x: &Tensor, params: &[Tensor]) -> Result<Tensor> {
        params
            .iter()
            .try_fold(x.clone(), |y, w| y.matmul(w)?.tanh())
    }
}

/// PipeDream with weight stashing at pp = 2: the most any rank holds during a run is the same
/// for 4 and 16 micro-batches (the versions in flight), while recording every micro-batch's
/// versions grows with their number.
fn pipedream_holds_what_is_in_flight() -> Result<()> {
    const H: usize = 256;
    let peak = |m: usize, record: bool| -> Result<usize> {
        let out = Launcher::new(2).mesh(MeshShape::new().pp(2)).run(|ctx| {
            let rank = ctx.rank();
            let ws = (0..4)
                .map(|i| {
                    Var::from_tensor(
                        &(Tensor::eye(H, DType::F32, &Device::Cpu)? * (0.5 + 0.1 * i as f64))?,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let stage = TanhStage(ws.clone());
            let xs: Vec<Tensor> = (0..m)
                .map(|i| Tensor::full(0.01 * i as f32, (2, H), &Device::Cpu))
                .collect::<Result<_>>()?;
            let mut sgd = |_mb: usize, grads: &[Tensor]| -> Result<()> {
                for (v, g) in ws.iter().zip(grads) {
                    v.set(&(v.as_tensor() - (g * 0.1)?)?)?;
                }
                Ok(())
            };
            let loss = |_: usize, y: &Tensor| y.sqr()?.mean_all();
            let act = (&Shape::from((2, H)), DType::F32);
            ctx.comm().barrier()?;
            memory::reset_peak(rank)?;
            let base = memory::rank(rank)?.current;
            let run = if record {
                run_pipedream_recorded
            } else {
                run_pipedream
            };
            let out = run(ctx.comm(), &stage, &xs, act, &loss, true, &mut sgd)?;
            let held = memory::rank(rank)?.peak - base;
            drop(out);
            Ok(held)
        })?;
        Ok(out.into_iter().max().unwrap_or(0))
    };
    let (few, many) = (peak(4, false)?, peak(16, false)?);
    let stage_bytes = 4 * H * H * 4;
    eprintln!("PipeDream peak over the run: m=4 {few} B, m=16 {many} B (a stage's weights: {stage_bytes} B)");
    assert!(
        (many as f64) < few as f64 + 0.5 * stage_bytes as f64,
        "held {many} bytes at 16 micro-batches, {few} at 4"
    );
    let recorded = peak(16, true)?;
    assert!(
        recorded > many + 8 * stage_bytes,
        "recording 16 micro-batches' versions should hold more: {recorded} vs {many}"
    );
    Ok(())
}
