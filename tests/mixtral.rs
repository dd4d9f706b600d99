//! The expert- and tensor-parallel Mixtral against candle-transformers' Mixtral on the same
//! random checkpoint; its gradients at ep=2 × tp=2 against ep=1 × tp=1; a few fine-tuning
//! steps lower the loss.
mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_parallel::checkpoint::{full_gradients, ParallelVarBuilder};
use candle_parallel::moe::Dispatch;
use candle_parallel::optim::{AdamW, AdamWConfig};
use candle_parallel::{MeshShape, ReduceOp};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
use candle_parallel_models::testing::{max_rel_err, write_random_mixtral};
use common::Launcher;
use std::path::{Path, PathBuf};

const TOKENS: [u32; 7] = [1, 17, 256, 3, 99, 200, 5];

fn checkpoint(name: &str, cfg: &MixtralConfig) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cp-mixtral-{name}-{}", std::process::id()));
    write_random_mixtral(&dir, cfg, 4)?;
    Ok(dir)
}

fn ids() -> Result<Tensor> {
    Tensor::new(&TOKENS, &Device::Cpu)?.unsqueeze(0)
}

/// candle-transformers' logits at every position, one token at a time through its cache.
fn reference_logits(dir: &Path) -> Result<Tensor> {
    use candle_transformers::models::mixtral as ct;
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .map_err(candle_core::Error::wrap)?;
    json["use_flash_attn"] = serde_json::json!(false);
    let cfg: ct::Config = serde_json::from_value(json).map_err(candle_core::Error::wrap)?;
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let mut model = ct::Model::new(&cfg, vb)?;
    let mut rows = Vec::new();
    for (pos, &t) in TOKENS.iter().enumerate() {
        rows.push(
            model
                .forward(&Tensor::new(&[[t]], &Device::Cpu)?, pos)?
                .squeeze(0)?
                .squeeze(0)?,
        );
    }
    Tensor::stack(&rows, 0)
}

#[test]
fn logits_equal_candle_transformers_mixtral() -> Result<()> {
    let cfg = MixtralConfig::tiny();
    let dir = checkpoint("logits", &cfg)?;
    let want = reference_logits(&dir)?;
    for (ep, tp, dispatch) in [
        (1, 1, Dispatch::AllToAll),
        (2, 2, Dispatch::AllToAll),
        (2, 2, Dispatch::AllReduce),
        (4, 1, Dispatch::AllToAll),
        (1, 4, Dispatch::AllReduce),
    ] {
        let outs = Launcher::new(ep * tp)
            .mesh(MeshShape::new().ep(ep).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?;
                let model = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), dispatch)?;
                let full = model.forward(&ids()?, 0, None)?.squeeze(0)?;
                let mut cache = model.new_cache();
                let mut rows = vec![model
                    .forward(&ids()?.narrow(1, 0, 4)?, 0, Some(&mut cache))?
                    .squeeze(0)?];
                for pos in 4..TOKENS.len() {
                    rows.push(
                        model
                            .forward(&ids()?.narrow(1, pos, 1)?, pos, Some(&mut cache))?
                            .squeeze(0)?,
                    );
                }
                Ok((full, Tensor::cat(&rows, 0)?, vb.bytes_read()))
            })?;
        for (r, (full, cached, _)) in outs.iter().enumerate() {
            let e = max_rel_err(full, &want)?;
            assert!(e <= 1e-5, "ep={ep} tp={tp} {dispatch:?} rank {r}: logits differ from candle-transformers by {e:e}");
            let e = max_rel_err(cached, &want)?;
            assert!(
                e <= 1e-5,
                "ep={ep} tp={tp} {dispatch:?} rank {r}: cached decoding differs by {e:e}"
            );
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Gradients of `loss = ce + coef · aux` at ep=2 × tp=2 equal ep=1 × tp=1. With all-to-all
/// dispatch the ep ranks are data-parallel for everything but the experts: each rank's loss is
/// scaled by 1/ep and the replicated parameters' gradients are summed over the ep group.
#[test]
fn gradients_at_ep2_tp2_equal_ep1_tp1() -> Result<()> {
    let cfg = MixtralConfig::tiny();
    let dir = checkpoint("grads", &cfg)?;
    let run = |ep: usize, tp: usize, dispatch: Dispatch| {
        Launcher::new(ep * tp)
            .mesh(MeshShape::new().ep(ep).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb =
                    ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
                let model = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), dispatch)?;
                let l = model.losses(&ids()?, true)?;
                let scale = if dispatch == Dispatch::AllToAll {
                    ep as f64
                } else {
                    1.0
                };
                let mut grads = (&l.loss / scale)?.backward()?;
                if dispatch == Dispatch::AllToAll {
                    Mixtral::sum_shared_grads(&vb.params(), &mut grads, mesh.ep())?;
                }
                let full = full_gradients(&vb.params(), &grads, mesh.tp())?;
                Ok((
                    l.ce_loss.to_scalar::<f32>()?,
                    l.aux_loss.to_scalar::<f32>()?,
                    full,
                ))
            })
    };
    let base = run(1, 1, Dispatch::AllToAll)?.remove(0);
    let base_grads: std::collections::BTreeMap<_, _> = base.2.into_iter().collect();
    assert!(base.1 > 0.0, "aux loss {}", base.1);
    for dispatch in [Dispatch::AllReduce, Dispatch::AllToAll] {
        for (r, (ce, aux, grads)) in run(2, 2, dispatch)?.into_iter().enumerate() {
            assert!(
                (ce - base.0).abs() <= 1e-5 * base.0,
                "{dispatch:?} rank {r}: ce {ce} vs {}",
                base.0
            );
            assert!(
                (aux - base.1).abs() <= 1e-5 * base.1,
                "{dispatch:?} rank {r}: aux {aux} vs {}",
                base.1
            );
            // This rank holds the non-expert parameters and its own two experts of four.
            assert_eq!(
                grads.len(),
                base_grads.len() - 2 * 3 * cfg.num_hidden_layers
            );
            for (name, g) in grads {
                let e = max_rel_err(&g, &base_grads[&name])?;
                assert!(
                    e <= 1e-4,
                    "{dispatch:?} rank {r}: gradient of {name} differs by {e:e}"
                );
            }
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn a_few_fine_tuning_steps_lower_the_loss() -> Result<()> {
    let cfg = MixtralConfig::tiny();
    let batch = Tensor::new(
        &[
            [1u32, 5, 9, 13, 17, 21, 25, 29],
            [2, 6, 10, 14, 18, 22, 26, 30],
        ],
        &Device::Cpu,
    )?;
    let losses = Launcher::new(4)
        .mesh(MeshShape::new().ep(2).tp(2))
        .run(|ctx| {
            let mesh = ctx.mesh()?;
            let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
            let model = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), Dispatch::AllToAll)?;
            let mut opt = AdamW::new(
                vb.params(),
                AdamWConfig {
                    lr: 3e-3,
                    ..Default::default()
                },
            )?;
            let mine = batch.narrow(0, mesh.ep().rank(), 1)?;
            let mut losses = Vec::new();
            for _ in 0..8 {
                let l = model.losses(&mine, true)?;
                let mut grads = (&l.loss / 2.0)?.backward()?;
                Mixtral::sum_shared_grads(&vb.params(), &mut grads, mesh.ep())?;
                opt.step(&grads)?;
                losses.push(
                    mesh.ep()
                        .all_reduce(&l.ce_loss, ReduceOp::Avg)?
                        .to_scalar::<f32>()?,
                );
            }
            Ok(losses)
        })?;
    let l = &losses[0];
    assert!(l[7] < 0.7 * l[0], "loss did not fall: {l:?}");
    assert!(
        losses.iter().all(|x| x == l),
        "every rank sees the same loss"
    );
    Ok(())
}

/// Pipeline stages with expert and tensor parallelism inside, for every schedule (zero-bubble
/// defers the experts' weight gradients too): each rank's gradients (full over tp) equal one
/// rank's, accumulated over the same micro-batches; HF's aux loss covers every layer.
#[test]
fn pipeline_stages_with_ep_and_tp_inside_equal_one_rank_for_every_schedule() -> Result<()> {
    use candle_parallel::checkpoint::full_gradients_of;
    use candle_parallel::pipeline::{run_step, split_batch, split_layers, Schedule};
    use candle_parallel_models::mixtral::MixtralStage;
    use std::collections::BTreeMap;
    let mut cfg = MixtralConfig::tiny();
    cfg.num_hidden_layers = 4;
    let dir = checkpoint("pipeline", &cfg)?;
    let m = 2;
    let batch = Tensor::new(&[TOKENS, [5, 99, 3, 256, 17, 1, 2]], &Device::Cpu)?;
    let mbs = split_batch(&batch, m)?;
    // One rank, the micro-batches one after the other, their losses averaged.
    let want: BTreeMap<String, Tensor> = candle_parallel::launch(1, |ctx| {
        let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
        let model = Mixtral::new(
            &cfg,
            vb.clone(),
            ctx.comm(),
            ctx.comm(),
            Dispatch::AllReduce,
        )?;
        let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
        for mb in &mbs {
            let g = (model.losses(mb, false)?.loss / m as f64)?.backward()?;
            for (name, t) in full_gradients(&vb.params(), &g, ctx.comm())? {
                let sum = match acc.remove(&name) {
                    Some(a) => (a + t)?,
                    None => t,
                };
                acc.insert(name, sum);
            }
        }
        Ok(acc)
    })?
    .remove(0);
    for name in ["gpipe", "1f1b", "interleaved", "zero-bubble"] {
        let (pp, ep, tp) = (2, 2, 2);
        let schedule = Schedule::by_name(name, pp, 2, m)?;
        let stages = split_layers(cfg.num_hidden_layers, schedule.stages())?;
        let outs = Launcher::new(pp * ep * tp)
            .mesh(MeshShape::new().pp(pp).ep(ep).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb =
                    ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
                let r = mesh.pp().rank();
                let models: Vec<Mixtral> = (0..schedule.chunks())
                    .map(|c| {
                        Mixtral::new_stage(
                            &cfg,
                            vb.clone(),
                            mesh.ep(),
                            mesh.tp(),
                            Dispatch::AllReduce,
                            stages[schedule.stage_of(r, c)].clone(),
                        )
                    })
                    .collect::<Result<_>>()?;
                let stage_modules: Vec<MixtralStage> = models
                    .iter()
                    .map(|model| MixtralStage {
                        model,
                        train: false,
                        chunk: 0,
                    })
                    .collect();
                let modules: Vec<&dyn candle_core::Module> = stage_modules
                    .iter()
                    .map(|s| s as &dyn candle_core::Module)
                    .collect();
                let last = models.iter().find(|m| m.is_last_stage());
                let params = vb.params();
                let vars: Vec<_> = params.iter().map(|p| p.var.clone()).collect();
                let (b, s) = mbs[0].dims2()?;
                let out = run_step(
                    mesh.pp(),
                    &schedule,
                    &modules,
                    &vars,
                    &mbs,
                    (
                        &candle_core::Shape::from(models[0].stage_activation_len(b, s)),
                        DType::F32,
                    ),
                    &|mb, y| {
                        Ok(last
                            .expect("the last stage")
                            .stage_losses(y, &mbs[mb])?
                            .0
                            .loss)
                    },
                )?;
                full_gradients_of(&params, &out.grads, mesh.tp())
            })?;
        for (rank, grads) in outs.iter().enumerate() {
            for (pname, g) in grads {
                let e = max_rel_err(g, &want[pname])?;
                assert!(e <= 1e-5, "{name} rank {rank}: {pname} differs by {e:e}");
            }
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// `generate` with a Mixtral-style checkpoint (KV cache, ep = 2 × tp = 2, greedy) produces
/// candle-transformers' Mixtral greedy continuation token for token.
#[test]
fn generation_equals_candle_transformers_greedy_output() -> Result<()> {
    use candle_transformers::models::mixtral as ct;
    let cfg = MixtralConfig::tiny();
    let dir = checkpoint("generate", &cfg)?;
    candle_parallel_models::tokenizer::byte_tokenizer()?
        .save(dir.join("tokenizer.json"), false)
        .map_err(candle_core::Error::msg)?;
    let ids_out = dir.join("ids.json");
    let o = std::process::Command::new(common::example_path("generate"))
        .args([
            "--ep",
            "2",
            "--tp",
            "2",
            "--max-tokens",
            "16",
            "--prompt",
            "Hello there",
        ])
        .arg("--model")
        .arg(&dir)
        .arg("--ids-out")
        .arg(&ids_out)
        .output()
        .expect("generate runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ids_out)?).map_err(candle_core::Error::wrap)?;
    let ids = |k: &str| -> Vec<u32> {
        got[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, generated) = (ids("prompt"), ids("generated"));
    assert!(!generated.is_empty());

    // candle-transformers: the prompt, then one token at a time through its cache, greedy,
    // stopping at the end-of-sequence id as generate does.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .map_err(candle_core::Error::wrap)?;
    json["use_flash_attn"] = serde_json::json!(false);
    let ct_cfg: ct::Config = serde_json::from_value(json).map_err(candle_core::Error::wrap)?;
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let mut model = ct::Model::new(&ct_cfg, vb)?;
    let mut want = Vec::new();
    let mut input = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut pos = 0;
    for _ in 0..16 {
        let logits = model.forward(&input, pos)?.squeeze(0)?.squeeze(0)?;
        pos += input.dim(1)?;
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        if Some(next) == cfg.eos_token_id {
            break;
        }
        want.push(next);
        input = Tensor::new(&[[next]], &Device::Cpu)?;
    }
    assert_eq!(generated, want);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Instruction tuning's loss, checked on a hand-made example: with the prompt's labels
/// [`IGNORE_INDEX`], the cross-entropy is the mean over the completion's tokens only, each
/// predicted from the position before it, computed here from the logits by hand; the same at
/// ep = 2 × tp = 2.
#[test]
fn the_loss_ignores_the_prompt_tokens() -> Result<()> {
    use candle_parallel_models::llama::IGNORE_INDEX;
    let cfg = MixtralConfig::tiny();
    let dir = checkpoint("masking", &cfg)?;
    // Prompt 1 17 99, completion 3 200 5: targets at positions 3, 4 and 5.
    let tokens = [1u32, 17, 99, 3, 200, 5];
    let labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 200, 5];
    for (ep, tp) in [(1, 1), (2, 2)] {
        let outs = Launcher::new(ep * tp)
            .mesh(MeshShape::new().ep(ep).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?;
                let model = Mixtral::new(&cfg, vb, mesh.ep(), mesh.tp(), Dispatch::AllReduce)?;
                let ids = Tensor::new(&tokens, &Device::Cpu)?.unsqueeze(0)?;
                let l = Tensor::new(&labels, &Device::Cpu)?.unsqueeze(0)?;
                let masked = model.losses_labeled(&ids, Some(&l), None, false)?.ce_loss;
                let full = model.losses(&ids, false)?.ce_loss;
                let logits = model.forward(&ids, 0, None)?.squeeze(0)?;
                Ok((masked.to_scalar::<f32>()?, full.to_scalar::<f32>()?, logits))
            })?;
        let (masked, full, logits) = &outs[0];
        let logp = candle_nn::ops::log_softmax(logits, 1)?;
        let by_hand = (2..5)
            .map(|p| -> Result<f32> {
                Ok(-logp
                    .get(p)?
                    .get(tokens[p + 1] as usize)?
                    .to_scalar::<f32>()?)
            })
            .sum::<Result<f32>>()?
            / 3.0;
        assert!(
            (masked - by_hand).abs() <= 1e-5 * by_hand.abs(),
            "ep={ep} tp={tp}: masked {masked} vs by hand {by_hand}"
        );
        assert!(
            (masked - full).abs() > 1e-3,
            "the prompt must change the unmasked loss"
        );
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// LoRA on every projection and expert (q, k, v, o, w1, w2, w3) with non-zero adapters: at
/// ep = 2 × tp = 2 (both dispatches) the loss and every adapter's gradient equal ep = tp = 1;
/// only adapters are parameters (the base is frozen).
#[test]
fn lora_gradients_at_ep2_tp2_equal_ep1_tp1() -> Result<()> {
    use candle_parallel::lora::{LoraBuilder, LoraConfig};
    use candle_parallel_models::testing::seeded;
    let cfg = MixtralConfig::tiny();
    let dir = checkpoint("lora", &cfg)?;
    // Adapters in the checkpoint, so that B is not zero (fresh adapters start at zero).
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let rank = 4;
    let mut seed = 100;
    let names: Vec<(String, usize, usize)> = tensors
        .iter()
        .filter(|(n, _)| {
            [
                "q_proj", "k_proj", "v_proj", "o_proj", ".w1.", ".w2.", ".w3.",
            ]
            .iter()
            .any(|t| n.contains(t))
        })
        .map(|(n, t)| {
            (
                n.trim_end_matches(".weight").to_string(),
                t.dim(1).unwrap(),
                t.dim(0).unwrap(),
            )
        })
        .collect();
    for (module, in_dim, out_dim) in names {
        seed += 2;
        tensors.insert(
            format!("{module}.lora_A.weight"),
            (seeded(&[rank, in_dim], seed, DType::F32)? * 0.3)?,
        );
        tensors.insert(
            format!("{module}.lora_B.weight"),
            (seeded(&[out_dim, rank], seed + 1, DType::F32)? * 0.3)?,
        );
    }
    candle_core::safetensors::save(&tensors, &path)?;
    let lora = LoraConfig {
        rank,
        alpha: 8.0,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
            .map(String::from)
            .to_vec(),
    };
    let run = |ep: usize, tp: usize, dispatch: Dispatch| {
        Launcher::new(ep * tp)
            .mesh(MeshShape::new().ep(ep).tp(tp))
            .run(|ctx| {
                let mesh = ctx.mesh()?;
                let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?
                    .trainable()
                    .with_lora(lora.clone())?;
                let model = Mixtral::new(&cfg, vb.clone(), mesh.ep(), mesh.tp(), dispatch)?;
                let params = vb.params();
                assert!(params
                    .iter()
                    .all(|p| candle_parallel::lora::is_adapter(&p.name)));
                let l = model.losses(&ids()?, true)?;
                let scale = if dispatch == Dispatch::AllToAll {
                    ep as f64
                } else {
                    1.0
                };
                let mut grads = (&l.loss / scale)?.backward()?;
                if dispatch == Dispatch::AllToAll {
                    Mixtral::sum_shared_grads(&params, &mut grads, mesh.ep())?;
                }
                let full = full_gradients(&params, &grads, mesh.tp())?;
                Ok((l.loss.to_scalar::<f32>()?, full))
            })
    };
    let base = run(1, 1, Dispatch::AllToAll)?.remove(0);
    let base_grads: std::collections::BTreeMap<_, _> = base.1.into_iter().collect();
    // 4 attention projections per layer and 3 weights per expert, two tensors each.
    assert_eq!(
        base_grads.len(),
        2 * cfg.num_hidden_layers * (4 + 3 * cfg.num_local_experts)
    );
    for dispatch in [Dispatch::AllReduce, Dispatch::AllToAll] {
        for (r, (loss, grads)) in run(2, 2, dispatch)?.into_iter().enumerate() {
            assert!(
                (loss - base.0).abs() <= 1e-5 * base.0,
                "{dispatch:?} rank {r}: loss {loss} vs {}",
                base.0
            );
            for (name, g) in grads {
                let want = &base_grads[&name];
                let e = max_rel_err(&g, want)?;
                assert!(
                    e <= 1e-4,
                    "{dispatch:?} rank {r}: gradient of {name} differs by {e:e}"
                );
            }
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Instruction tuning's loss is the mean over the completion tokens of the whole batch (HF's
/// `num_items_in_batch`): split into micro-batches with different numbers of completion tokens
/// (6, 1, 4 and 2 here), the step's loss and every gradient are the unsplit batch's.
#[test]
fn micro_batches_with_uneven_completions_give_the_whole_batch_gradient() -> Result<()> {
    use candle_parallel_models::llama::IGNORE_INDEX;
    use candle_parallel_models::mixtral::{counted_targets, Targets};
    let mut cfg = MixtralConfig::tiny();
    cfg.router_aux_loss_coef = 0.0; // the aux loss of a split batch differs by definition
    let dir = checkpoint("targets", &cfg)?;
    let (rows, len) = (4, 8);
    let ids: Vec<u32> = (0..rows * len).map(|i| (i * 37 % 250) as u32 + 3).collect();
    let prompts = [1, 6, 3, 5];
    let labels: Vec<i64> = (0..rows * len)
        .map(|i| {
            if i % len > prompts[i / len] {
                ids[i] as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    let run = |micro_batches: usize| {
        Launcher::new(1).run(|ctx| {
            let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?.trainable();
            let model = Mixtral::new(
                &cfg,
                vb.clone(),
                ctx.comm(),
                ctx.comm(),
                Dispatch::AllReduce,
            )?;
            let ids = Tensor::from_vec(ids.clone(), (rows, len), &Device::Cpu)?;
            let labels = Tensor::from_vec(labels.clone(), (rows, len), &Device::Cpu)?;
            let targets = Targets {
                labels: &labels,
                global_tokens: counted_targets(&labels)?,
                replicas: 1,
                attention_mask: None,
                position_ids: None,
            };
            let vars: Vec<_> = vb.params().iter().map(|p| p.var.clone()).collect();
            let g = model.batch_grads(&vars, &ids, Some(&targets), micro_batches, ctx.comm())?;
            Ok((g.ce_loss, g.grads))
        })
    };
    let (ce1, g1) = run(1)?.remove(0);
    for m in [2, 4] {
        let (ce, g) = run(m)?.remove(0);
        assert!(
            (ce - ce1).abs() <= 1e-5 * ce1,
            "{m} micro-batches: loss {ce} vs {ce1}"
        );
        for (a, b) in g.iter().zip(&g1) {
            if let (Some(a), Some(b)) = (a, b) {
                let e = max_rel_err(a, b)?;
                assert!(e <= 1e-4, "{m} micro-batches: a gradient differs by {e:e}");
            }
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// The Qwen MoE configs: read with their own keys and transformers' defaults for what they
/// leave out, written back with the same keys; what the model does not implement is refused
/// with a message that names the key.
#[test]
fn qwen_configs_read_write_and_refuse_clearly() -> Result<()> {
    use candle_parallel_models::mixtral::MoeFamily;
    use serde_json::json;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe_families");
    // Rope as transformers 5 writes it (rope_parameters only).
    let q3 = MixtralConfig::from_file(&path.join("qwen3_moe.json"))?;
    assert_eq!(q3.family()?, MoeFamily::Qwen3Moe);
    assert_eq!((q3.rope_theta, q3.num_local_experts), (1e6, 8));
    assert_eq!(q3.expert_intermediate_size(), 16);
    assert_eq!(q3.as_llama().head_dim(), 16);
    assert_eq!(
        (0..4).map(|l| q3.is_sparse_layer(l)).collect::<Vec<_>>(),
        [false, true, false, true]
    );
    assert!(q3.router_config()?.renormalize);
    let q2 = MixtralConfig::from_file(&path.join("qwen2_moe.json"))?;
    assert_eq!(q2.shared_expert_intermediate_size(), Some(24));
    assert!(!q2.is_sparse_layer(1) && q2.is_sparse_layer(2));
    assert_eq!(q2.attention_window(), None, "use_sliding_window is false");
    // Written back under the family's keys, everything else kept.
    let written = serde_json::to_value(&q2).unwrap();
    assert_eq!(written["num_experts"], 4);
    assert!(written.get("num_local_experts").is_none());
    assert_eq!(written["mlp_only_layers"], json!([1]));
    assert_eq!(MixtralConfig::from_json(written)?, q2);
    let mixtral = serde_json::to_value(MixtralConfig::tiny()).unwrap();
    assert!(mixtral.get("num_local_experts").is_some() && mixtral.get("num_experts").is_none());
    // A minimal Qwen3 config: the family's defaults, not Mixtral's.
    let minimal = json!({
        "model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 48,
        "vocab_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
    });
    let m = MixtralConfig::from_json(minimal.clone())?;
    assert_eq!(
        (m.rms_norm_eps, m.rope_theta, m.router_aux_loss_coef),
        (1e-6, 1e4, 1e-3)
    );
    assert!(
        !m.router_config()?.renormalize,
        "norm_topk_prob defaults to false"
    );
    // Qwen2-MoE's expert count and widths, as Qwen2MoeConfig's defaults.
    let q2 = MixtralConfig::from_json(json!({
        "model_type": "qwen2_moe", "hidden_size": 32, "intermediate_size": 48,
        "vocab_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }))?;
    assert_eq!((q2.num_local_experts, q2.num_experts_per_tok), (60, 4));
    assert_eq!(q2.expert_intermediate_size(), 1408);
    assert_eq!(q2.shared_expert_intermediate_size(), Some(5632));
    let refused = |patch: serde_json::Value, needle: &str| {
        let mut v = minimal.clone();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        let err = MixtralConfig::from_json(v).unwrap_err().to_string();
        assert!(err.contains(needle), "{patch}: {err}");
    };
    refused(
        json!({"model_type": "deepseek_v3"}),
        "mixtral, qwen2_moe or qwen3_moe",
    );
    refused(json!({"use_sliding_window": true}), "use_sliding_window");
    refused(json!({"attention_bias": true}), "attention_bias");
    refused(
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}),
        "rope_type \"yarn\"",
    );
    refused(json!({"decoder_sparse_step": 0}), "decoder_sparse_step");
    refused(json!({"mlp_only_layers": [0, 1]}), "no layer is sparse");
    refused(
        json!({"moe_intermediate_size": "big"}),
        "moe_intermediate_size",
    );
    Ok(())
}
