//! The tensor-parallel Llama against candle-transformers' Llama on the same random
//! checkpoint, and its gradients at tp 2 and 4 against tp 1.
mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::checkpoint::{full_gradients, ParallelVarBuilder};
use candle_parallel_models::llama::{Llama, LlamaConfig};
use candle_parallel_models::testing::{max_rel_err, write_random_llama};
use common::launch;
use std::path::{Path, PathBuf};

const TOKENS: [u32; 7] = [1, 17, 256, 3, 99, 200, 5];

fn checkpoint(name: &str, cfg: &LlamaConfig) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cp-llama-{name}-{}", std::process::id()));
    write_random_llama(&dir, cfg, 3)?;
    Ok(dir)
}

/// candle-transformers' logits at every position, fed one token at a time through its cache
/// (its forward returns the last position only).
fn reference_logits(dir: &Path) -> Result<Tensor> {
    use candle_transformers::models::llama as ct;
    let text = std::fs::read_to_string(dir.join("config.json"))?;
    let cfg: ct::LlamaConfig = serde_json::from_str(&text).map_err(candle_core::Error::wrap)?;
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let model = ct::Llama::load(vb, &cfg)?;
    let mut cache = ct::Cache::new(true, DType::F32, &cfg, &Device::Cpu)?;
    let mut rows = Vec::new();
    for (pos, &t) in TOKENS.iter().enumerate() {
        let input = Tensor::new(&[[t]], &Device::Cpu)?;
        rows.push(model.forward(&input, pos, &mut cache)?.squeeze(0)?);
    }
    Tensor::stack(&rows, 0)
}

fn ids() -> Result<Tensor> {
    Tensor::new(&TOKENS, &Device::Cpu)?.unsqueeze(0)
}

#[test]
fn logits_equal_candle_transformers_llama_at_every_tp() -> Result<()> {
    let cfg = LlamaConfig::tiny(); // 8 heads, 2 KV heads: tp 4 replicates KV heads
    let dir = checkpoint("logits", &cfg)?;
    let want = reference_logits(&dir)?;
    for tp in [1, 2, 4] {
        let outs = launch(tp, |ctx| {
            let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?;
            let model = Llama::new(&cfg, vb, ctx.comm())?;
            let full = model.forward(&ids()?, 0, None)?.squeeze(0)?;
            // Incremental decoding through the KV cache gives the same logits.
            let mut cache = model.new_cache();
            let mut rows = vec![model
                .forward(&ids()?.narrow(1, 0, 3)?, 0, Some(&mut cache))?
                .squeeze(0)?];
            for pos in 3..TOKENS.len() {
                rows.push(
                    model
                        .forward(&ids()?.narrow(1, pos, 1)?, pos, Some(&mut cache))?
                        .squeeze(0)?,
                );
            }
            Ok((full, Tensor::cat(&rows, 0)?))
        })?;
        for (r, (full, cached)) in outs.iter().enumerate() {
            let e = max_rel_err(full, &want)?;
            assert!(
                e <= 1e-5,
                "tp={tp} rank {r}: logits differ from candle-transformers by {e:e}"
            );
            let e = max_rel_err(cached, &want)?;
            assert!(
                e <= 1e-5,
                "tp={tp} rank {r}: cached decoding differs by {e:e}"
            );
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn gradients_at_tp_2_and_4_equal_tp_1() -> Result<()> {
    let cfg = LlamaConfig::tiny();
    let dir = checkpoint("grads", &cfg)?;
    let run = |tp: usize| {
        launch(tp, |ctx| {
            let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
            let model = Llama::new(&cfg, vb.clone(), ctx.comm())?;
            let loss = model.loss(&ids()?)?;
            let grads = loss.backward()?;
            Ok((
                loss.to_scalar::<f32>()?,
                full_gradients(&vb.params(), &grads, ctx.comm())?,
            ))
        })
    };
    let base = run(1)?.remove(0);
    assert_eq!(
        base.1.len(),
        2 + 9 * cfg.num_hidden_layers + 1,
        "every parameter has a gradient"
    );
    for tp in [2, 4] {
        for (r, (loss, grads)) in run(tp)?.into_iter().enumerate() {
            assert!(
                (loss - base.0).abs() <= 1e-5 * base.0.abs(),
                "tp={tp} rank {r}: loss {loss} vs {}",
                base.0
            );
            for ((name, g), (name1, g1)) in grads.iter().zip(&base.1) {
                assert_eq!(name, name1);
                let e = max_rel_err(g, g1)?;
                assert!(
                    e <= 1e-4,
                    "tp={tp} rank {r}: gradient of {name} differs by {e:e}"
                );
            }
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn configurations_that_cannot_be_split_fail_clearly() -> Result<()> {
    let mut cfg = LlamaConfig::tiny();
    cfg.num_attention_heads = 6; // hidden 64 does not divide by 6
    let e = launch(1, |ctx| {
        Llama::new(
            &cfg,
            ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu),
            ctx.comm(),
        )
        .map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("hidden_size 64 is not divisible by num_attention_heads 6"),
        "{e}"
    );
    let cfg = LlamaConfig::tiny();
    let e = launch(3, |ctx| {
        Llama::new(
            &cfg,
            ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu),
            ctx.comm(),
        )
        .map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("8 query heads cannot be split over tensor-parallel size 3"),
        "{e}"
    );
    // A checkpoint whose tensor shapes disagree with the config.
    let dir = checkpoint("mismatch", &cfg)?;
    let mut wider = cfg.clone();
    wider.intermediate_size = 256;
    let e = launch(2, |ctx| {
        Llama::new(
            &wider,
            ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?,
            ctx.comm(),
        )
        .map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[192, 64]")
            && e.contains("[256, 64]"),
        "{e}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// `Llama::batch_grads` on every pipeline schedule — GPipe, 1F1B, zero-bubble (its backwards
/// split into input- and weight-gradient steps) and interleaved (two chunks of layers per
/// rank) — with tensor parallelism inside the stages and as many or fewer micro-batches than
/// stages, gives the loss and every gradient of one device's plain backward over the whole
/// batch.
#[test]
fn every_schedule_gives_one_devices_gradients() -> Result<()> {
    use candle_parallel::checkpoint::full_gradients_of;
    use candle_parallel::pipeline::{rank_chunks, ScheduleKind};
    use candle_parallel::MeshShape;
    use std::collections::HashMap;

    let mut cfg = LlamaConfig::tiny();
    cfg.num_hidden_layers = 4;
    let dir = checkpoint("schedules", &cfg)?;
    let rows: Vec<Vec<u32>> = (0..4u32)
        .map(|r| (0..6).map(|i| (r * 37 + i * 11 + 1) % 256).collect())
        .collect();
    let batch = || Tensor::new(rows.clone(), &Device::Cpu);
    let (loss0, base) = launch(1, |ctx| {
        let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
        let loss = Llama::new(&cfg, vb.clone(), ctx.comm())?.loss(&batch()?)?;
        let grads = loss.backward()?;
        Ok((
            loss.to_scalar::<f32>()?,
            full_gradients(&vb.params(), &grads, ctx.comm())?,
        ))
    })?
    .remove(0);
    for (kind, pp, tp, micro_batches) in [
        (ScheduleKind::OneFOneB, 1, 1, 4),
        (ScheduleKind::GPipe, 2, 1, 4),
        (ScheduleKind::OneFOneB, 2, 2, 4),
        (ScheduleKind::ZeroBubble, 2, 1, 4),
        (ScheduleKind::ZeroBubble, 2, 2, 2),
        (ScheduleKind::Interleaved, 2, 1, 4),
        (ScheduleKind::Interleaved, 2, 2, 2),
    ] {
        let what = format!("{kind} pp={pp} tp={tp} m={micro_batches}");
        let out = common::Launcher::new(pp * tp)
            .mesh(MeshShape::new().pp(pp).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb =
                    ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
                let chunks = rank_chunks(
                    cfg.num_hidden_layers,
                    pp,
                    kind.default_chunks(),
                    mesh.pp().rank(),
                )?;
                let mut m = Llama::new_chunks(&cfg, vb.clone(), mesh.tp(), &chunks)?;
                m.set_schedule(kind)?;
                let params = vb.params();
                let vars: Vec<_> = params.iter().map(|p| p.var.clone()).collect();
                let (grads, loss) = m.batch_grads(&vars, &batch()?, micro_batches, mesh.pp())?;
                Ok((loss, full_gradients_of(&params, &grads, mesh.tp())?))
            })?;
        let mut got = HashMap::new();
        for (r, (loss, grads)) in out.into_iter().enumerate() {
            assert!(
                (loss - loss0 as f64).abs() <= 1e-5 * loss0.abs() as f64,
                "{what} rank {r}: loss {loss} vs {loss0}"
            );
            got.extend(grads);
        }
        assert_eq!(
            got.len(),
            base.len(),
            "{what}: every parameter has a gradient"
        );
        for (name, g) in &base {
            let e = max_rel_err(&got[name], g)?;
            assert!(e <= 1e-4, "{what}: gradient of {name} differs by {e:e}");
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// `llama train` (the trainer's AdamW steps with clipping) under dp × pp × tp, ZeRO 1-2 and
/// every schedule writes the parameters and losses one device writes; a schedule the model
/// cannot run is refused before any rank starts, saying what to change.
#[test]
fn llama_train_matches_one_device_at_every_layout() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cp-llama-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out_file = dir.join("out.safetensors");
    let run = |args: &[&str]| -> std::process::Output {
        // A run that wrote nothing must not read the previous run's file.
        let _ = std::fs::remove_file(&out_file);
        std::process::Command::new(common::example_path("llama"))
            .args(["train", "--layers", "4", "--micro-batches", "4"])
            .args(args)
            .arg("--out")
            .arg(&out_file)
            .output()
            .expect("runs the llama example")
    };
    let trained = |args: &[&str]| -> Result<std::collections::HashMap<String, Tensor>> {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        candle_core::safetensors::load(&out_file, &Device::Cpu)
    };
    let base = trained(&[])?;
    for args in [
        &["--pp", "2", "--schedule", "zero-bubble"][..],
        &["--pp", "2", "--schedule", "interleaved", "--tp", "2"],
        &[
            "--pp",
            "2",
            "--schedule",
            "gpipe",
            "--dp",
            "2",
            "--zero",
            "1",
        ],
        &["--dp", "2", "--tp", "2", "--zero", "2"],
    ] {
        let got = trained(args)?;
        assert_eq!(got.len(), base.len(), "{args:?}");
        for (name, want) in &base {
            let e = max_rel_err(&got[name], want)?;
            assert!(e <= 1e-4, "{args:?}: {name} differs by {e:e}");
        }
    }
    for (args, want) in [
        (
            &["--pp", "2", "--chunks", "2"][..],
            "--schedule interleaved",
        ),
        (
            &["--pp", "4", "--schedule", "interleaved"],
            "use fewer pipeline ranks (at most 2)",
        ),
        (&["--zero", "3"], "ZeRO 0, 1 or 2"),
        (&["--schedule", "interleaved"], "2 or more pipeline ranks"),
        (&["--rows", "0"], "--rows must be at least 1"),
        (&["--dp", "0"], "--dp must be at least 1"),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
