//! Memory measured in the process (the counting allocator, each allocation attributed to the
//! rank thread that made it): ZeRO's savings show in what each rank holds, the unit-wise
//! backward holds less than the whole-graph one, and recomputation less again. One test in
//! this binary: the ranks' counters are per rank number, shared by anything running at once.
use candle_core::Result;
use candle_parallel::data_parallel::Recompute;
use candle_parallel::memory::{self, CountingAlloc};
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
fn measure(cfg: &MixtralConfig, probe: MemoryProbe) -> Result<TrainingMemory> {
    let m = measure_training_memory(cfg, probe)?.remove(0);
    eprintln!(
        "dp={} stage {} {}: load {:.2} MiB, step peak {:.2} MiB, persistent {:.2} MiB (Ψ = {})",
        probe.dp,
        probe.stage,
        probe.path,
        mib(m.load_peak),
        mib(m.step_peak),
        mib(m.persistent),
        m.psi
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
        stage: 0,
        path: BackwardPath::Units(Recompute::None),
        rows: 2,
        seq: 16,
        steps: 2,
        bucket_bytes: 1 << 20,
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
    Ok(())
}
