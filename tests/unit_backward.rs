//! The unit-wise backward (`Mixtral::train_grads`: each layer's backward on its own, its
//! gradients handed to a `GradSink` as soon as they exist) computes today's gradients bit for
//! bit — the whole-graph backward of `Mixtral::batch_grads` — at several layouts, with
//! micro-batches, labels, LoRA and bf16, with and without recomputation; and the optimizer fed
//! that way takes the same steps as from the whole gradients at every ZeRO stage.
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::data_parallel::{BatchGroups, GradCollector, GradSink, Recompute};
use candle_parallel::lora::{LoraBuilder, LoraConfig};
use candle_parallel::mesh::MeshDim;
use candle_parallel::moe::Dispatch;
use candle_parallel::ops;
use candle_parallel::optim::AdamWConfig;
use candle_parallel::pipeline::split_layers;
use candle_parallel::zero::{ZeroConfig, ZeroOptimizer};
use candle_parallel::MeshShape;
use candle_parallel_models::mixtral::{
    counted_targets, Mixtral, MixtralConfig, ShardedMixtral, Targets,
};
use common::Launcher;

fn config() -> MixtralConfig {
    let mut cfg = MixtralConfig::tiny();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.vocab_size = 61;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.num_hidden_layers = 3;
    cfg.sliding_window = None;
    cfg
}

/// `rows` rows of 9 token ids for one replica (`seed`: its coordinate).
fn ids(rows: usize, seed: u64) -> Result<Tensor> {
    let mut x = 1234567 + 7919 * seed;
    let v: Vec<u32> = (0..rows * 9)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 61) as u32
        })
        .collect();
    Tensor::from_vec(v, (rows, 9), &Device::Cpu)
}

/// Labels that leave out each row's first two positions (a prompt).
fn labels(ids: &Tensor) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let mut l = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    for r in l.iter_mut() {
        r[..2].fill(-100);
    }
    Tensor::new(l, &Device::Cpu)?.reshape((b, s))
}

fn bits(t: &Option<Tensor>) -> Option<Vec<u32>> {
    t.as_ref().map(|t| {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    })
}

#[derive(Clone, Copy, Debug)]
struct Case {
    dp: usize,
    pp: usize,
    ep: usize,
    tp: usize,
    micro_batches: usize,
    dtype: DType,
    labels: bool,
    lora: bool,
}

/// Every rank's (whole-backward gradients, unit-wise gradients, losses of each) as bits.
#[allow(clippy::type_complexity)]
fn both_ways(
    c: Case,
    recompute: Recompute,
) -> Result<Vec<(Vec<Option<Vec<u32>>>, Vec<Option<Vec<u32>>>, [f64; 2])>> {
    let cfg = config();
    Launcher::new(c.dp * c.pp * c.ep * c.tp)
        .mesh(MeshShape::new().dp(c.dp).pp(c.pp).ep(c.ep).tp(c.tp))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let mut vb = ParallelVarBuilder::from_init(5, c.dtype, &Device::Cpu).trainable();
            if c.lora {
                vb = vb.with_lora(LoraConfig {
                    rank: 4,
                    alpha: 8.0,
                    target_modules: ["q_proj", "v_proj", "w1", "w2"].map(String::from).to_vec(),
                })?;
            }
            let layers = split_layers(cfg.num_hidden_layers, c.pp)?[mesh.pp().rank()].clone();
            let model = Mixtral::new_stage(
                &cfg,
                vb.clone(),
                mesh.ep(),
                mesh.tp(),
                Dispatch::AllToAll,
                layers,
            )?;
            let vars: Vec<Var> = vb.params().into_iter().map(|p| p.var).collect();
            let seed = (mesh.dp().rank() * c.ep + mesh.ep().rank()) as u64;
            let ids = ids(2 * c.micro_batches, seed)?;
            let l = labels(&ids)?;
            let targets = Targets {
                labels: &l,
                // Each replica's rows count the same here.
                global_tokens: counted_targets(&l)? * c.dp * c.ep,
                replicas: c.dp * c.ep,
                attention_mask: None,
                position_ids: None,
            };
            let t = c.labels.then_some(&targets);
            let whole = model.batch_grads(&vars, &ids, t, c.micro_batches, mesh.pp())?;
            let mut sink = GradCollector::new(&vars);
            let unit =
                model.train_grads(&mut sink, &ids, t, c.micro_batches, mesh.pp(), recompute)?;
            let unit_grads = sink.take()?;
            assert_eq!(whole.loss, unit.loss);
            Ok((
                whole.grads.iter().map(bits).collect(),
                unit_grads.iter().map(bits).collect(),
                [whole.loss, unit.loss],
            ))
        })
}

#[test]
fn unit_wise_backward_gives_the_whole_backwards_gradients_bit_for_bit() -> Result<()> {
    let base = Case {
        dp: 1,
        pp: 1,
        ep: 1,
        tp: 1,
        micro_batches: 1,
        dtype: DType::F32,
        labels: false,
        lora: false,
    };
    let cases = [
        base,
        Case {
            ep: 2,
            tp: 2,
            ..base
        },
        Case {
            dp: 2,
            ep: 2,
            micro_batches: 2,
            labels: true,
            ..base
        },
        Case {
            tp: 2,
            dtype: DType::BF16,
            micro_batches: 2,
            ..base
        },
        Case {
            ep: 2,
            lora: true,
            labels: true,
            ..base
        },
        // Pipeline stages: each stage's backward unit-wise inside the 1F1B schedule.
        Case {
            pp: 2,
            micro_batches: 4,
            labels: true,
            ..base
        },
        Case {
            pp: 3,
            ep: 2,
            micro_batches: 2,
            ..base
        },
        Case {
            pp: 2,
            tp: 2,
            dtype: DType::BF16,
            micro_batches: 2,
            lora: true,
            ..base
        },
    ];
    for c in cases {
        for recompute in [Recompute::None, Recompute::Full, Recompute::Selective] {
            for (rank, (whole, unit, loss)) in both_ways(c, recompute)?.into_iter().enumerate() {
                assert_eq!(loss[0], loss[1], "{c:?} {recompute}: rank {rank} losses");
                assert!(
                    whole.iter().any(Option::is_some),
                    "{c:?}: no gradient at all"
                );
                for (i, (w, u)) in whole.iter().zip(&unit).enumerate() {
                    assert!(
                        w == u,
                        "{c:?} recompute {recompute}: rank {rank}, variable {i}: the unit-wise gradient differs"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Parameters after two steps, fed by `ZeroOptimizer::step` with whole gradients and by the
/// unit-wise backward into the optimizer as a sink; stage 3 with its sharded model.
fn two_steps(
    dp: usize,
    ep: usize,
    stage: u8,
    micro_batches: usize,
    unit_wise: bool,
    overlap: bool,
) -> Result<Vec<Vec<f32>>> {
    let cfg = config();
    Launcher::new(dp * ep)
        .mesh(MeshShape::new().dp(dp).ep(ep))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_init(9, DType::F32, &Device::Cpu).trainable();
            let dims = [MeshDim::Dp, MeshDim::Ep];
            let batch = BatchGroups::new(mesh, &dims)?;
            let zcfg = ZeroConfig {
                stage,
                bucket_bytes: 8192,
                adamw: AdamWConfig {
                    lr: 1e-2,
                    weight_decay: 0.01,
                    ..Default::default()
                },
                overlap_comm: overlap,
                ..Default::default()
            };
            let seed = (mesh.dp().rank() * ep + mesh.ep().rank()) as u64;
            let ids = ids(2 * micro_batches, seed)?;
            let mut out = Vec::new();
            if stage == 3 {
                let model =
                    ShardedMixtral::new(&cfg, vb.clone(), &batch, mesh, Dispatch::AllToAll)?;
                // FSDP2's prefetch goes with the overlap.
                model.set_prefetch(overlap);
                let mut opt =
                    ZeroOptimizer::new_sharded(&model.units(), vb.params(), &batch, mesh, zcfg)?;
                for _ in 0..2 {
                    if unit_wise {
                        model.train_grads(&mut opt, &ids, None, micro_batches)?;
                        out.push(opt.step_accumulated(Some(1.0))? as f32);
                    } else {
                        let vars = opt.vars().to_vec();
                        let g = model.batch_grads(&vars, &ids, None, micro_batches)?;
                        out.push(opt.step(&g.grads, Some(1.0))? as f32);
                    }
                }
                let mut all = vec![out];
                for u in model.units() {
                    all.push(u.shard().as_tensor().to_vec1::<f32>()?);
                }
                return Ok(all.concat());
            }
            let model = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), Dispatch::AllToAll)?;
            let mut opt = ZeroOptimizer::with_groups(vb.params(), &batch, mesh, zcfg)?;
            for _ in 0..2 {
                if unit_wise {
                    model.train_grads(
                        &mut opt,
                        &ids,
                        None,
                        micro_batches,
                        mesh.pp(),
                        Recompute::None,
                    )?;
                    out.push(opt.step_accumulated(Some(1.0))? as f32);
                } else {
                    let vars = opt.vars().to_vec();
                    let g = model.batch_grads(&vars, &ids, None, micro_batches, mesh.pp())?;
                    out.push(opt.step(&g.grads, Some(1.0))? as f32);
                }
            }
            let mut all = vec![out];
            for v in opt.vars() {
                all.push(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(all.concat())
        })
}

#[test]
fn optimizer_as_sink_steps_as_from_whole_gradients_at_every_stage() -> Result<()> {
    for stage in 0..=3u8 {
        for (dp, ep, m) in [(2, 1, 1), (2, 2, 1), (2, 1, 2)] {
            let whole = two_steps(dp, ep, stage, m, false, false)?;
            let unit = two_steps(dp, ep, stage, m, true, true)?;
            for (r, (w, u)) in whole.iter().zip(&unit).enumerate() {
                assert_eq!(w.len(), u.len());
                // Stage 2 reduce-scatters each micro-batch and sums the partitions
                // (DeepSpeed's order): the same to float rounding with several micro-batches.
                if stage == 2 && m > 1 {
                    let worst = w
                        .iter()
                        .zip(u)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        worst < 1e-5,
                        "stage {stage} dp={dp} ep={ep} m={m}: rank {r} differs by {worst}"
                    );
                } else {
                    assert!(
                        w == u,
                        "stage {stage} dp={dp} ep={ep} m={m}: rank {r}: norms {:?} vs {:?}",
                        &w[..2],
                        &u[..2]
                    );
                }
            }
        }
    }
    Ok(())
}

/// Reducing each bucket on the communication lane while the backward goes on
/// (`ZeroConfig::overlap_comm`), and at stage 3 gathering each layer's parameters while the
/// one before computes (`ShardedMixtral::set_prefetch`), takes the same steps, bit for bit, as
/// without, at every stage, with experts over ep and with micro-batches.
#[test]
fn overlapped_reduction_takes_the_same_steps_bit_for_bit() -> Result<()> {
    for stage in 0..=3u8 {
        for (dp, ep, m) in [(2, 1, 1), (2, 2, 1), (2, 1, 3)] {
            let after = two_steps(dp, ep, stage, m, true, false)?;
            let overlapped = two_steps(dp, ep, stage, m, true, true)?;
            assert!(
                after == overlapped,
                "stage {stage} dp={dp} ep={ep} m={m}: norms {:?} vs {:?}",
                after.iter().map(|r| &r[..2]).collect::<Vec<_>>(),
                overlapped.iter().map(|r| &r[..2]).collect::<Vec<_>>()
            );
        }
    }
    Ok(())
}

/// A bucket is reduced when its parameters are done; a gradient after that is refused, and
/// `step_accumulated` without gradients says what is missing.
#[test]
fn the_sink_refuses_late_gradients_and_empty_steps() -> Result<()> {
    let out = Launcher::new(2).mesh(MeshShape::new().dp(2)).run(|ctx| {
        let mesh = ctx.mesh()?;
        let w = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        let params = vec![candle_parallel::checkpoint::Param::replicated(
            "layer.w",
            w.clone(),
        )];
        let cfg = ZeroConfig {
            stage: 2,
            ..Default::default()
        };
        let mut opt = ZeroOptimizer::new(params, mesh, &[MeshDim::Dp], cfg)?;
        let empty = opt.step_accumulated(None).unwrap_err().to_string();
        let g = Tensor::new(&[1f32, 1.0, 1.0], &Device::Cpu)?;
        opt.add_grad(0, &g)?;
        opt.unit_done(&["layer."])?;
        let late = opt.add_grad(0, &g).unwrap_err().to_string();
        opt.end_micro_batch()?;
        let held = opt.memory().grad_bytes;
        opt.step_accumulated(None)?;
        // A refused step leaves nothing behind: with it in between, two steps give what two
        // steps of a fresh optimizer give (stage 2 holds packed gradients across calls).
        let bad = Tensor::new(&[1f32, 1.0], &Device::Cpu)?;
        let g2 = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?;
        let run = |refuse: bool| -> Result<(Vec<f32>, String)> {
            let w = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
            let params = vec![candle_parallel::checkpoint::Param::replicated(
                "layer.w",
                w.clone(),
            )];
            let mut opt = ZeroOptimizer::new(params, mesh, &[MeshDim::Dp], cfg)?;
            opt.step(&[Some(g.clone())], None)?;
            let mut msg = String::new();
            if refuse {
                // Packs g2 into the bucket, then fails on the wrong shape.
                opt.add_grad(0, &g2)?;
                msg = opt.add_grad(0, &bad).unwrap_err().to_string();
                opt.discard_grads();
            }
            opt.step(&[Some(g2.clone())], None)?;
            Ok((w.as_tensor().to_vec1::<f32>()?, msg))
        };
        let (clean, _) = run(false)?;
        let (after_refusal, shape) = run(true)?;
        Ok((
            empty,
            late,
            held,
            opt.memory().grad_bytes,
            (clean, after_refusal, shape),
        ))
    })?;
    let (empty, late, held, after, (clean, after_refusal, shape)) = &out[0];
    assert!(shape.contains("shape"), "{shape}");
    assert_eq!(clean, after_refusal);
    assert!(empty.contains("no gradients were handed over"), "{empty}");
    assert!(late.contains("layer.w") && late.contains("done"), "{late}");
    // The partition (4 padded elements / 2 ranks, f32) is held, and kept for the next step.
    assert_eq!((*held, *after), (8, 8));
    Ok(())
}

/// ZeRO 3's four ways to hold a layer between its forward and backward give the same
/// gradients bit for bit, at dp 2 × ep 2 and dp 2 × tp 2 with two micro-batches: gathered
/// parameters kept or freed after the forward (FSDP2's `reshard_after_forward`; freed ones
/// are released by the ops that consume them and gathered again for the backward), each with
/// the layer's activations kept or recomputed (`Recompute::Full`), and selective
/// recomputation over released parameters (the experts' down projection weights are
/// inputs of a recomputed function there).
#[test]
fn zero3_resharding_and_recompute_give_the_same_gradients() -> Result<()> {
    let cfg = config();
    let run = |shape: MeshShape, reshard: bool, recompute: Recompute| {
        Launcher::new(4).mesh(shape).run(|ctx| {
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_init(9, DType::F32, &Device::Cpu).trainable();
            let batch = BatchGroups::new(mesh, &[MeshDim::Dp, MeshDim::Ep])?;
            let model = ShardedMixtral::new(&cfg, vb.clone(), &batch, mesh, Dispatch::AllToAll)?;
            model.set_reshard_after_forward(reshard);
            model.set_recompute(recompute);
            let vars: Vec<Var> = model.units().iter().map(|u| u.shard().clone()).collect();
            let seed = (mesh.dp().rank() * 2 + mesh.ep().rank()) as u64;
            let mut sink = GradCollector::new(&vars);
            let l = ops::with_selective_recompute(recompute == Recompute::Selective, || {
                model.train_grads(&mut sink, &ids(4, seed)?, None, 2)
            })?;
            Ok((l.loss, sink.take()?.iter().map(bits).collect::<Vec<_>>()))
        })
    };
    for shape in [MeshShape::new().dp(2).ep(2), MeshShape::new().dp(2).tp(2)] {
        let kept = run(shape, false, Recompute::None)?;
        for (reshard, recompute) in [
            (true, Recompute::None),
            (true, Recompute::Full),
            (false, Recompute::Full),
            (true, Recompute::Selective),
        ] {
            let other = run(shape, reshard, recompute)?;
            for (r, (k, d)) in kept.iter().zip(&other).enumerate() {
                assert_eq!(k.0, d.0, "{shape:?} rank {r}: losses");
                assert!(k.1.iter().all(Option::is_some));
                assert!(
                    k.1 == d.1,
                    "{shape:?} rank {r}: the gradients differ with reshard {reshard}, recompute {recompute}"
                );
            }
        }
    }
    Ok(())
}

/// ZeRO 3 inside pipeline stages (`ShardedMixtral::new_stage`: FSDP2 with pipelining): two
/// steps, then the model written at full shape, equal the same run without stages (3 layers
/// over 2 stages: 2 and 1, so the stages hold different numbers of sharded layers).
#[test]
fn zero3_inside_pipeline_stages_trains_as_without_them() -> Result<()> {
    let cfg = config();
    let run = |dp: usize, pp: usize, ep: usize, micro_batches: usize, name: &str| {
        let file = std::env::temp_dir().join(format!(
            "cp-zero3-pp-{}-{name}.safetensors",
            std::process::id()
        ));
        let norms = Launcher::new(dp * pp * ep)
            .mesh(MeshShape::new().dp(dp).pp(pp).ep(ep))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb = ParallelVarBuilder::from_init(9, DType::F32, &Device::Cpu).trainable();
                let batch = BatchGroups::new(mesh, &[MeshDim::Dp, MeshDim::Ep])?;
                let layers = split_layers(cfg.num_hidden_layers, pp)?[mesh.pp().rank()].clone();
                let model = ShardedMixtral::new_stage(
                    &cfg,
                    vb.clone(),
                    &batch,
                    mesh,
                    Dispatch::AllToAll,
                    layers,
                )?;
                let zcfg = ZeroConfig {
                    stage: 3,
                    bucket_bytes: 8192,
                    ..Default::default()
                };
                let mut opt =
                    ZeroOptimizer::new_sharded(&model.units(), vb.params(), &batch, mesh, zcfg)?;
                let seed = (mesh.dp().rank() * ep + mesh.ep().rank()) as u64;
                let ids = ids(2 * micro_batches, seed)?;
                let mut norms = Vec::new();
                for _ in 0..2 {
                    let l = model.train_grads(&mut opt, &ids, None, micro_batches)?;
                    norms.push((l.loss, opt.step_accumulated(Some(1.0))?));
                }
                opt.write_model(&file, &[], None)?;
                Ok(norms)
            })?;
        let written = candle_core::safetensors::load(&file, &Device::Cpu)?;
        std::fs::remove_file(&file).unwrap();
        Ok::<_, candle_core::Error>((norms, written))
    };
    for (dp, ep, m) in [(2, 1, 2), (1, 2, 2)] {
        let (want_norms, want) = run(dp, 1, ep, m, "flat")?;
        let (norms, got) = run(dp, 2, ep, m, "staged")?;
        let what = format!("dp={dp} ep={ep} micro-batches={m}");
        // Every rank of every stage sees its replica's loss and the step's gradient norm
        // (ranks: dp, pp, ep with ep fastest).
        for (r, steps) in norms.iter().enumerate() {
            let replica = r / (2 * ep) * ep + r % ep;
            for (s, ((l, n), (wl, wn))) in steps.iter().zip(&want_norms[replica]).enumerate() {
                assert!(
                    (l - wl).abs() <= 1e-5 * wl.abs() && (n - wn).abs() <= 1e-5 * wn.abs(),
                    "{what}: rank {r}, step {s}: loss {l} / norm {n} against {wl} / {wn} without stages"
                );
            }
        }
        assert_eq!(got.len(), want.len(), "{what}: tensors written");
        for (name, w) in &want {
            let g = got
                .get(name)
                .unwrap_or_else(|| panic!("{what}: {name} not written"));
            let e = candle_parallel_models::testing::max_rel_err(g, w)?;
            assert!(e < 1e-5, "{what}: {name} differs by {e:e}");
        }
    }
    Ok(())
}

/// Sequences longer than `max_position_embeddings` are refused by the model itself, naming
/// the limit, on every training path: pipeline stages (unit-wise, and zero-bubble's
/// whole-stage backward) and ZeRO 3 (the examples refuse them earlier still); the rank that
/// finds it fails the job, so no peer waits.
#[test]
fn the_model_refuses_sequences_beyond_its_positions_on_every_path() -> Result<()> {
    let mut cfg = config();
    cfg.max_position_embeddings = 8;
    let ids = ids(2, 0)?; // 9 tokens a row
    for kind in ["1f1b", "zero-bubble"] {
        let e = Launcher::new(2)
            .mesh(MeshShape::new().pp(2))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb = ParallelVarBuilder::from_init(9, DType::F32, &Device::Cpu).trainable();
                let stages = split_layers(cfg.num_hidden_layers, 2)?;
                let mut model = Mixtral::new_stage(
                    &cfg,
                    vb.clone(),
                    mesh.ep(),
                    mesh.tp(),
                    Dispatch::AllToAll,
                    stages[mesh.pp().rank()].clone(),
                )?;
                model.set_schedule(kind.parse()?)?;
                let mut sink = GradCollector::new(&model_vars(&vb));
                model.train_grads(&mut sink, &ids, None, 2, mesh.pp(), Recompute::None)?;
                Ok(())
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exceed max_position_embeddings 8"),
            "{kind}: {e}"
        );
    }
    let e = Launcher::new(2)
        .mesh(MeshShape::new().dp(2))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_init(9, DType::F32, &Device::Cpu).trainable();
            let batch = BatchGroups::new(mesh, &[MeshDim::Dp])?;
            let model = ShardedMixtral::new(&cfg, vb.clone(), &batch, mesh, Dispatch::AllToAll)?;
            let mut sink = GradCollector::new(&model_vars(&vb));
            model.train_grads(&mut sink, &ids, None, 1)?;
            Ok(())
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("exceed max_position_embeddings 8"),
        "ZeRO 3: {e}"
    );
    Ok(())
}

fn model_vars(vb: &ParallelVarBuilder) -> Vec<Var> {
    vb.params().into_iter().map(|p| p.var).collect()
}
