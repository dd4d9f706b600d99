//! The planner's predictions against what the process holds: per-rank peaks of training steps
//! measured by the counting allocator at many layouts, and what is known of Mixtral 8×7B.
//! One memory test in this binary: the ranks' counters are per rank number.
use candle_core::Result;
use candle_parallel::memory::CountingAlloc;
use candle_parallel_models::mixtral::MixtralConfig;
use candle_parallel_models::plan::{
    enumerate, plan_layout, Cluster, DeviceSpec, Layout, ModelShape, Workload,
};
use candle_parallel_models::testing::{measure_training_memory, BackwardPath, MemoryProbe};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The predicted peak bytes per rank are within 10% of the measured ones (the most any rank
/// of the layout held during a step, model states included) at every kind of layout: dp 2 and
/// 4 at every ZeRO stage and recompute mode; ep 2 at every stage; tp 2 alone, beside dp and
/// beside ep, at every recompute mode and stage; two pipeline stages over 4 micro-batches with
/// 1F1B, GPipe, zero-bubble and interleaved (two chunks per rank; with ep or tp inside too;
/// interleaved with no more micro-batches than ranks is over-predicted, allowed 15%); and
/// LoRA fine-tunes (rank 8 on the family's targets) at every recompute mode, ZeRO 1 and 2,
/// ep × tp and two stages.
#[test]
fn predicted_memory_matches_the_measured_peaks() -> Result<()> {
    let cfg = MixtralConfig {
        hidden_size: 128,
        intermediate_size: 256,
        vocab_size: 1024,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        sliding_window: None,
        ..MixtralConfig::tiny()
    };
    let model = ModelShape::of_mixtral(&cfg);
    let (rows, seq) = (4, 64);
    // (layout, LoRA rank or 0)
    let mut cases: Vec<(String, usize)> = Vec::new();
    let modes = ["none", "selective", "full"];
    for dp in [2, 4] {
        for stage in 0..=3 {
            for r in modes {
                cases.push((format!("dp={dp},zero={stage},recompute={r}"), 0));
            }
        }
    }
    for stage in 0..=3 {
        cases.push((format!("ep=2,zero={stage}"), 0));
        cases.push((format!("dp=2,tp=2,zero={stage}"), 0));
        cases.push((format!("ep=2,tp=2,zero={stage}"), 0));
    }
    for r in modes {
        cases.push((format!("tp=2,recompute={r}"), 0));
    }
    for r in ["selective", "full"] {
        cases.push((format!("ep=2,tp=2,recompute={r}"), 0));
    }
    for r in ["none", "full"] {
        cases.push((format!("pp=2,mb=4,recompute={r}"), 0));
    }
    cases.push(("pp=2,mb=4,schedule=gpipe".into(), 0));
    for l in [
        "pp=2,mb=4,schedule=zero-bubble",
        "pp=2,mb=2,schedule=zero-bubble",
        "pp=2,mb=4,schedule=zero-bubble,recompute=selective",
        "pp=2,ep=2,mb=4,schedule=zero-bubble",
        "pp=2,tp=2,mb=4,schedule=zero-bubble",
        "pp=2,tp=2,mb=4",
        "pp=2,ep=2,mb=4",
        "pp=2,mb=4,schedule=interleaved",
        "pp=2,mb=2,schedule=interleaved",
        "pp=2,mb=4,schedule=interleaved,recompute=selective",
        "pp=2,ep=2,mb=4,schedule=interleaved",
        "pp=2,tp=2,mb=4,schedule=interleaved",
    ] {
        cases.push((l.into(), 0));
    }
    for r in modes {
        cases.push((format!("dp=2,recompute={r}"), 8));
    }
    for l in [
        "dp=2,zero=1",
        "dp=2,zero=2",
        "tp=2",
        "ep=2,tp=2",
        "pp=2,mb=4",
        "pp=2,mb=4,schedule=interleaved",
    ] {
        cases.push((l.into(), 8));
    }
    let mut worst: f64 = 0.0;
    for (text, lora_rank) in &cases {
        let layout = Layout::parse(text)?;
        let probe = MemoryProbe {
            dp: layout.dp,
            pp: layout.pp,
            ep: layout.ep,
            tp: layout.tp,
            schedule: layout.schedule,
            micro_batches: layout.micro_batches,
            stage: layout.zero,
            path: BackwardPath::Units(layout.recompute),
            rows,
            seq,
            steps: 2,
            bucket_bytes: candle_parallel::data_parallel::DEFAULT_BUCKET_BYTES,
            reshard_after_forward: true,
            prefetch: true,
            lora_rank: *lora_rank,
        };
        let ranks = measure_training_memory(&cfg, probe)?;
        let measured = ranks.iter().map(|m| m.step_peak).max().unwrap_or(0) as f64;
        let world = layout.world();
        let cluster = Cluster::new(
            DeviceSpec::cpu(1e10, 1e12, 1e10, 1e-6, 1e10, 1e10),
            world,
            world,
        )?;
        let work = Workload {
            global_batch: rows * layout.dp * layout.ep,
            seq,
            dtype_bytes: 4,
            lora_rank: (*lora_rank > 0).then_some(*lora_rank),
        };
        let predicted = plan_layout(&model, &work, &cluster, &layout)?
            .memory
            .peak_bytes_per_rank;
        let off = (predicted - measured) / measured;
        eprintln!(
            "{layout}, LoRA rank {lora_rank}: predicted {:.2} MiB, measured {:.2} MiB ({:+.1}%)",
            predicted / 1048576.0,
            measured / 1048576.0,
            100.0 * off
        );
        // Interleaving with no more micro-batches than ranks (every chunk's forwards before
        // any backward) is over-predicted, by 11% at pp 2, m 2: the one case allowed 15%
        // above (never below: a plan that fits must fit).
        let over_allowed = if layout.chunks > 1 && layout.micro_batches <= layout.pp {
            0.15
        } else {
            0.10
        };
        if over_allowed == 0.10 {
            worst = worst.max(off.abs());
        }
        assert!(
            off > -0.10 && off < over_allowed,
            "{layout}, LoRA rank {lora_rank}: predicted {predicted} bytes per rank, measured {measured}"
        );
    }
    eprintln!(
        "{} layouts, worst {:.1}% (interleaved with m ≤ p aside)",
        cases.len(),
        100.0 * worst
    );
    Ok(())
}

/// Mixtral 8×7B on 8 × 80 GB: a full bf16 fine-tune does not fit at any layout (plain ZeRO 3
/// needs 18 bytes per parameter over 8 ranks, 105 GB), LoRA does; on 64 GPUs the plan reaches
/// about the MFU Megatron publishes for its recipe (tp 1 × ep 8 × pp 4: 468 TFLOP/s per H100,
/// 47%).
#[test]
fn mixtral_8x7b_plans_agree_with_what_is_known() -> Result<()> {
    let model = ModelShape::from_config_str(
        r#"{"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
            "vocab_size": 32000, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2}"#,
    )?;
    assert!(
        (model.params() as f64 / 1e9 - 46.7).abs() < 0.1,
        "{}",
        model.params()
    );
    assert!(
        (model.active_params() as f64 / 1e9 - 12.9).abs() < 0.3,
        "{}",
        model.active_params()
    );
    let eight = Cluster::new(DeviceSpec::h100(), 8, 8)?;
    let full = Workload {
        global_batch: 8,
        seq: 4096,
        dtype_bytes: 2,
        lora_rank: None,
    };
    let zero3 = plan_layout(
        &model,
        &full,
        &eight,
        &Layout::parse("dp=8,zero=3,recompute=full")?,
    )?;
    let states = zero3.memory.parameters + zero3.memory.gradients + zero3.memory.optimizer;
    assert!(
        (states / (18.0 * model.params() as f64 / 8.0) - 1.0).abs() < 0.01,
        "{states}"
    );
    assert!(!zero3.fits, "{zero3:?}");
    let (plans, _) = enumerate(&model, &full, &eight);
    assert!(
        plans.iter().all(|p| !p.fits),
        "a full fine-tune fits: {:?}",
        plans[0]
    );
    let lora = Workload {
        lora_rank: Some(16),
        ..full
    };
    let (plans, _) = enumerate(&model, &lora, &eight);
    assert!(plans[0].fits, "no LoRA layout fits: {:?}", plans[0]);
    let megatron = plan_layout(
        &model,
        &Workload {
            global_batch: 256,
            ..full
        },
        &Cluster::new(DeviceSpec::h100(), 64, 8)?,
        &Layout::parse("dp=2,pp=4,ep=8,zero=1,recompute=selective,micro-batches=16")?,
    )?;
    assert!(megatron.fits, "{megatron:?}");
    assert!((0.35..0.6).contains(&megatron.mfu), "{megatron:?}");
    // Megatron's own schedule, interleaving 4 chunks per rank: a quarter of the bubble, more
    // activations (the warm-up's extra chunk-forwards, the whole backward's f32 copy).
    let text =
        "dp=2,pp=4,ep=8,zero=1,recompute=selective,micro-batches=16,schedule=interleaved,chunks=4";
    let layout = Layout::parse(text)?;
    assert_eq!(Layout::parse(&layout.to_string())?, layout, "{layout}");
    assert!(layout.flags().contains("--chunks 4"), "{}", layout.flags());
    let interleaved = plan_layout(
        &model,
        &Workload {
            global_batch: 256,
            ..full
        },
        &Cluster::new(DeviceSpec::h100(), 64, 8)?,
        &layout,
    )?;
    assert!(
        (interleaved.time.bubble - megatron.time.bubble / 4.0).abs() < 1e-9,
        "{interleaved:?}"
    );
    assert!(interleaved.mfu > megatron.mfu, "{interleaved:?}");
    assert!(
        interleaved.memory.activations > megatron.memory.activations,
        "{interleaved:?}"
    );
    for (text, want) in [
        ("dp=4,pp=2,schedule=interleaved,chunks=1", "--chunks 2"),
        ("dp=4,pp=2,chunks=2", "--schedule interleaved"),
        (
            "dp=2,pp=4,schedule=interleaved,chunks=16",
            "more stages than the",
        ),
        (
            "dp=4,pp=2,schedule=interleaved,zero=3",
            "refused by the trainer",
        ),
    ] {
        let err = plan_layout(&model, &full, &eight, &Layout::parse(text)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
    assert!(Layout::parse("pp=2,schedule=interleaved,chunks=0").is_err());
    Ok(())
}

/// `config.json` alone gives the parameter counts published for each family: Mixtral 8×22B
/// (141 B, 39 B active), Qwen3-30B-A3B (30.5 B, 3.3 B active; 128 experts, top-8, its own
/// `head_dim`), Qwen2-57B-A14B (57 B, 14 B active; a shared expert), Llama 3 8B (8.0 B, dense).
#[test]
fn config_json_alone_gives_each_familys_size() -> Result<()> {
    let cases = [
        (
            r#"{"model_type": "mixtral", "hidden_size": 6144, "intermediate_size": 16384,
                "vocab_size": 32768, "num_hidden_layers": 56, "num_attention_heads": 48,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2}"#,
            141.0,
            39.0,
        ),
        (
            r#"{"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                "moe_intermediate_size": 768, "vocab_size": 151936, "num_hidden_layers": 48,
                "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "tie_word_embeddings": false}"#,
            30.5,
            3.3,
        ),
        (
            r#"{"model_type": "qwen2_moe", "hidden_size": 3584, "intermediate_size": 18944,
                "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480,
                "vocab_size": 151936, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 8}"#,
            57.4,
            14.2,
        ),
        (
            r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                "vocab_size": 128256, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8}"#,
            8.03,
            7.5,
        ),
    ];
    for (json, total, active) in cases {
        let m = ModelShape::from_config_str(json)?;
        let (t, a) = (m.params() as f64 / 1e9, m.active_params() as f64 / 1e9);
        assert!(
            (t / total - 1.0).abs() < 0.03,
            "{}: {t} B parameters, published {total}",
            m.family
        );
        // (Published active counts include the embedding, which no matmul runs.)
        assert!(
            (a / active - 1.0).abs() < 0.1,
            "{}: {a} B active, published {active}",
            m.family
        );
    }
    let err = ModelShape::from_config_str(r#"{"model_type": "mixtral", "hidden_size": 64}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_hidden_layers"), "{err}");
    Ok(())
}

/// `--device cpu` measures this machine in a few seconds: positive matmul, elementwise and
/// collective rates; and on CPU ranks sharing the cores the plan charges what the cores do
/// besides matmuls: ZeRO 3's gathers and copies, each micro-batch's weight gradients, full
/// recomputation's second forward.
#[test]
fn a_calibrated_cpu_charges_the_work_besides_matmuls() -> Result<()> {
    let t = std::time::Instant::now();
    let cpu = candle_parallel_models::plan::calibrate_cpu(2)?;
    assert!(
        t.elapsed().as_secs_f64() < 30.0,
        "calibration took {:?}",
        t.elapsed()
    );
    for (what, v) in [
        ("matmul rate", cpu.peak_flops_32),
        ("memory bandwidth", cpu.memory_bw),
        ("all-reduce rate", cpu.collective_bw),
    ] {
        assert!(v.is_finite() && v > 0.0, "{what}: {v}");
    }
    let model = ModelShape::from_config_str(
        r#"{"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 768,
            "vocab_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2}"#,
    )?;
    let cluster = Cluster::new(cpu, 2, 2)?;
    let work = Workload {
        global_batch: 8,
        seq: 128,
        dtype_bytes: 4,
        lora_rank: None,
    };
    let step = |l: &str| -> Result<f64> {
        Ok(plan_layout(&model, &work, &cluster, &Layout::parse(l)?)?
            .time
            .step)
    };
    assert!(step("dp=2,zero=3")? > step("dp=2,zero=2")?);
    assert!(step("dp=2,mb=4")? > step("dp=2")?);
    assert!(step("dp=2,recompute=full")? > step("dp=2")?);
    Ok(())
}
