//! `mixtral train` under every layout: dp × pp × ep × tp with ZeRO stages 0–2 and
//! micro-batches computes what one device computes, and what Hugging Face transformers with
//! PyTorch's AdamW computes (`scripts/mixtral_train_reference.py` wrote the fixture).
mod common;

use candle_core::{Result, Tensor};
use candle_parallel_models::mixtral::MixtralConfig;
use candle_parallel_models::testing::write_random_mixtral;
use common::example_path;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const STEPS: usize = 3;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cp-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The small model of the fixture.
fn config() -> MixtralConfig {
    let mut cfg = MixtralConfig::tiny();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.vocab_size = 64;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.max_position_embeddings = 64;
    cfg.sliding_window = None;
    cfg
}

/// 8 rows of 9 tokens.
fn batch_json() -> String {
    let mut x: u64 = 12345;
    let rows: Vec<Vec<u64>> = (0..8)
        .map(|_| {
            (0..9)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) % 64
                })
                .collect()
        })
        .collect();
    serde_json::json!({ "batch": rows }).to_string()
}

/// The batch of [`batch_json`] as instruction data: row r keeps 9 − r mod 4 tokens and is
/// padded with 0 (`attention_mask` 0 there), and the labels leave out each row's first two
/// tokens (a "prompt") and the padding (-100).
fn padded_batch_json() -> String {
    let v: serde_json::Value = serde_json::from_str(&batch_json()).unwrap();
    let mut rows: Vec<Vec<i64>> = serde_json::from_value(v["batch"].clone()).unwrap();
    let (mut mask, mut labels) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter_mut().enumerate() {
        let n = 9 - i % 4;
        r[n..].fill(0);
        mask.push((0..9).map(|j| u8::from(j < n)).collect::<Vec<_>>());
        labels.push(
            (0..9)
                .map(|j| if (2..n).contains(&j) { r[j] } else { -100 })
                .collect::<Vec<_>>(),
        );
    }
    serde_json::json!({ "batch": rows, "labels": labels, "attention_mask": mask }).to_string()
}

/// [`padded_batch_json`]'s examples packed two per row of 18 (rows 0+1, 2+3, ...: every
/// replica of dp × ep = 4 and every micro-batch holds the same examples as there), with
/// `position_ids` from 0 in each and the rest padding; labels as there.
fn packed_batch_json() -> String {
    let v: serde_json::Value = serde_json::from_str(&padded_batch_json()).unwrap();
    let rows: Vec<Vec<i64>> = serde_json::from_value(v["batch"].clone()).unwrap();
    let labels: Vec<Vec<i64>> = serde_json::from_value(v["labels"].clone()).unwrap();
    let (mut ids, mut lab, mut mask, mut pos) = (vec![], vec![], vec![], vec![]);
    for pair in (0..8).collect::<Vec<_>>().chunks(2) {
        let (mut i, mut l, mut m, mut p) = (vec![], vec![], vec![], vec![]);
        for &r in pair {
            let n = 9 - r % 4;
            i.extend_from_slice(&rows[r][..n]);
            l.extend_from_slice(&labels[r][..n]);
            m.extend(std::iter::repeat_n(1u8, n));
            p.extend(0..n as u32);
        }
        let pad = 18 - i.len();
        i.extend(std::iter::repeat_n(0, pad));
        l.extend(std::iter::repeat_n(-100, pad));
        m.extend(std::iter::repeat_n(0u8, pad));
        p.extend(0..pad as u32);
        ids.push(i);
        lab.push(l);
        mask.push(m);
        pos.push(p);
    }
    serde_json::json!({ "batch": ids, "labels": lab, "attention_mask": mask, "position_ids": pos })
        .to_string()
}

/// A model directory and a batch file.
fn setup(name: &str) -> (PathBuf, PathBuf) {
    let dir = tmp(name);
    write_random_mixtral(&dir.join("model"), &config(), 21).unwrap();
    std::fs::write(dir.join("batch.json"), batch_json()).unwrap();
    (dir.join("model"), dir.join("batch.json"))
}

fn train(model: &Path, batch: &Path, out: &Path, extra: &[&str]) -> HashMap<String, Tensor> {
    train_env(model, batch, out, extra, &[])
}

/// [`train`] with environment variables set.
fn train_env(
    model: &Path,
    batch: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> HashMap<String, Tensor> {
    train_with("mixtral", model, batch, out, extra, env)
}

/// [`train_env`] with the example `example` (`mixtral`, or `moe`: the same program).
fn train_with(
    example: &str,
    model: &Path,
    batch: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> HashMap<String, Tensor> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        &model.to_string_lossy(),
        "--batch",
        &batch.to_string_lossy(),
        "--steps",
        &STEPS.to_string(),
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.01",
        "--clip",
        "1.0",
        "--out",
        &out.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    // A run that wrote nothing must not read an earlier run's file.
    let _ = std::fs::remove_file(out);
    let o = Command::new(example_path(example))
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("the example runs");
    assert!(
        o.status.success(),
        "{example} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    candle_core::safetensors::load(out, &candle_core::Device::Cpu).unwrap()
}

/// `mixtral train` for one step with `extra`, which must fail: its stderr.
fn refused(model: &Path, batch: &Path, dir: &Path, extra: &[&str]) -> String {
    let mut args: Vec<String> = [
        "train",
        "--model",
        &model.to_string_lossy(),
        "--batch",
        &batch.to_string_lossy(),
        "--steps",
        "1",
        "--out",
        &dir.join("refused.safetensors").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(example_path("mixtral"))
        .args(&args)
        .output()
        .expect("mixtral runs");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{extra:?} should fail: {err}");
    err
}

fn scalar(t: &HashMap<String, Tensor>, name: &str) -> f64 {
    t[name]
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Losses and norms agree to `tol` relative; every parameter's update (after − before)
/// agrees to 1e-3 relative, in L2 norm (Adam turns float-order noise in near-zero gradients
/// into visible differences of single elements, so bit-equality is not the bar).
fn assert_same_run(
    what: &str,
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    before: &HashMap<String, Tensor>,
    tol: f64,
) -> Result<()> {
    for i in 0..STEPS {
        for k in ["loss", "grad_norm"] {
            let name = format!("{k}.{i}");
            let (a, b) = (scalar(got, &name), scalar(want, &name));
            assert!(
                (a - b).abs() <= tol * b.abs().max(1e-6),
                "{what}: {name} {a} vs {b}"
            );
        }
    }
    let mut params = 0;
    for (name, w0) in before {
        let w0 = w0.to_dtype(candle_core::DType::F32)?;
        let (a, b) = (
            got.get(name)
                .unwrap_or_else(|| panic!("{what}: {name} is missing")),
            &want[name],
        );
        assert_eq!(a.dims(), b.dims(), "{what}: {name}");
        let (ua, ub) = ((a - &w0)?, (b - &w0)?);
        let norm = |t: &Tensor| -> Result<f64> {
            Ok(t.sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?
                .sqrt())
        };
        let (diff, scale) = (norm(&(ua - &ub)?)?, norm(&ub)?);
        assert!(
            diff <= 1e-3 * scale.max(1e-12),
            "{what}: {name}: the update differs by {diff:e} in L2 norm (the update's norm {scale:e})"
        );
        params += 1;
    }
    assert_eq!(params, got.len() - 2 * STEPS, "{what}: parameter count");
    Ok(())
}

fn initial(model: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

/// One device, with the load-balancing loss, against transformers + torch.optim.AdamW.
#[test]
fn one_device_matches_transformers_and_torch_adamw() -> Result<()> {
    let (model, batch) = setup("reference");
    let dir = model.parent().unwrap().to_path_buf();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mixtral_train_reference.safetensors");
    let want = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu)?;
    let got = train(&model, &batch, &dir.join("out.safetensors"), &[]);
    assert_same_run("dp=1 vs transformers", &got, &want, &initial(&model), 1e-5)?;
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// Instruction data with padding, against transformers (`labels` with -100, `attention_mask`
/// with 0 on the padding: HF leaves padding out of the load-balancing loss; the fixture fails
/// if it counts, as it did before). Layouts that keep the batch whole (pipeline stages, tp,
/// ZeRO 3) compute the same with the aux loss; those that split it (dp, micro-batches: the
/// loss is the mean over the global batch's counted labels) without it.
#[test]
fn padded_instruction_batch_matches_transformers_and_every_layout() -> Result<()> {
    let (model, _) = setup("padded");
    let dir = model.parent().unwrap().to_path_buf();
    let batch = dir.join("padded.json");
    std::fs::write(&batch, padded_batch_json()).unwrap();
    let before = initial(&model);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mixtral_train_padded_reference.safetensors");
    let want = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu)?;
    let one = train(&model, &batch, &dir.join("one.safetensors"), &[]);
    assert_same_run("padded, dp=1 vs transformers", &one, &want, &before, 1e-5)?;
    for args in [
        &["--pp", "2"][..],
        &["--tp", "2", "--pp", "2"],
        &["--zero", "3"],
        &["--zero", "3", "--pp", "2"],
    ] {
        let got = train(&model, &batch, &dir.join("layout.safetensors"), args);
        assert_same_run(&format!("padded, {args:?}"), &got, &one, &before, 1e-5)?;
    }
    // The whole batch's aux loss (--aux-scope global, the default) at dp = 2 × ep = 2, padding
    // left out: the fixture's run.
    let split = train(
        &model,
        &batch,
        &dir.join("split.safetensors"),
        &["--dp", "2", "--ep", "2"],
    );
    assert_same_run(
        "padded, dp=2 × ep=2, global aux",
        &split,
        &one,
        &before,
        1e-5,
    )?;
    // Two replicas each with its own aux loss (--aux-scope local) and two micro-batches split
    // the batch alike (rows 0-3 and 4-7), each with its rows' mask, so their aux losses agree.
    let dp2 = train(
        &model,
        &batch,
        &dir.join("dp2.safetensors"),
        &["--dp", "2", "--aux-scope", "local"],
    );
    let mb2 = train(
        &model,
        &batch,
        &dir.join("mb2.safetensors"),
        &["--micro-batches", "2", "--pp", "2", "--zero", "1"],
    );
    assert_same_run("padded, dp=2 vs micro-batches=2", &mb2, &dp2, &before, 1e-5)?;
    let aux0 = ["--aux-coef", "0"];
    let base = train(&model, &batch, &dir.join("base.safetensors"), &aux0);
    for args in [
        &["--dp", "2"][..],
        &["--dp", "2", "--micro-batches", "2", "--pp", "2"],
        &["--ep", "2", "--tp", "2", "--zero", "3"],
    ] {
        let args = [args, &aux0[..]].concat();
        let got = train(&model, &batch, &dir.join("layout.safetensors"), &args);
        assert_same_run(&format!("padded, {args:?}"), &got, &base, &before, 1e-5)?;
    }
    // The same examples packed two a row (`position_ids`): the same run, against the
    // transformers fixture too, at several layouts.
    let packed = dir.join("packed.json");
    std::fs::write(&packed, packed_batch_json()).unwrap();
    for args in [
        &[][..],
        &["--dp", "2", "--ep", "2"],
        &["--tp", "2", "--pp", "2"],
        &["--zero", "3", "--dp", "2"],
    ] {
        let got = train(&model, &packed, &dir.join("packed.safetensors"), args);
        assert_same_run(&format!("packed, {args:?}"), &got, &want, &before, 1e-5)?;
    }
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// Without the aux loss (whose value over a split batch differs by definition), every layout
/// and ZeRO stage computes what one device computes.
#[test]
fn every_layout_and_zero_stage_matches_one_device() -> Result<()> {
    let (model, batch) = setup("layouts");
    let dir = model.parent().unwrap().to_path_buf();
    let before = initial(&model);
    let aux0 = ["--aux-coef", "0"];
    let base = train(&model, &batch, &dir.join("base.safetensors"), &aux0);
    // (dp, tp, ep, pp, zero, micro-batches)
    let layouts = [
        (2, 1, 1, 1, 0, 1),
        (4, 1, 1, 1, 1, 1),
        (4, 1, 1, 1, 2, 1),
        (2, 1, 1, 1, 1, 2),
        (2, 2, 1, 1, 2, 1),
        (1, 1, 2, 1, 1, 1),
        (2, 1, 2, 1, 2, 1),
        (2, 2, 2, 1, 1, 1),
        (2, 1, 1, 2, 2, 2),
        (1, 2, 2, 2, 0, 2),
        (1, 1, 1, 1, 3, 1),
        (2, 1, 1, 1, 3, 1),
        (4, 1, 1, 1, 3, 2),
        (2, 2, 2, 1, 3, 1),
        // ZeRO 3 inside pipeline stages.
        (2, 1, 1, 2, 3, 2),
        (1, 2, 2, 2, 3, 2),
    ];
    for (dp, tp, ep, pp, zero, mb) in layouts {
        let what = format!("dp={dp} tp={tp} ep={ep} pp={pp} zero={zero} micro-batches={mb}");
        let s: Vec<String> = [dp, tp, ep, pp, zero, mb]
            .iter()
            .map(|v| v.to_string())
            .collect();
        let mut args = vec![
            "--dp",
            &s[0],
            "--tp",
            &s[1],
            "--ep",
            &s[2],
            "--pp",
            &s[3],
            "--zero",
            &s[4],
            "--micro-batches",
            &s[5],
        ];
        args.extend(aux0);
        let got = train(&model, &batch, &dir.join("layout.safetensors"), &args);
        assert_same_run(&what, &got, &base, &before, 1e-5)?;
    }
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// A job checkpointed after step 2 at dp = 4 with ZeRO 2 (its optimizer state saved as every
/// rank's partition) resumes: under the same layout its step 3 is the uninterrupted run's bit
/// for bit; at dp = 2 with ZeRO 1 or 3, and at dp = 1, it computes the same step 3
/// (float-order noise aside). A ZeRO 3 job's checkpoint resumes at dp = 4 with ZeRO 0.
#[test]
fn a_checkpointed_job_resumes_under_another_dp_and_zero_stage() -> Result<()> {
    let (model, batch) = setup("resume");
    let dir = model.parent().unwrap().to_path_buf();
    let ckpt = dir.join("ckpt");
    let c = ckpt.to_string_lossy().to_string();
    let aux0 = ["--aux-coef", "0"];
    let mut args = vec![
        "--dp",
        "4",
        "--zero",
        "2",
        "--checkpoint-dir",
        &c,
        "--checkpoint-every",
        "2",
    ];
    args.extend(aux0);
    let full = train(&model, &batch, &dir.join("full.safetensors"), &args);
    assert!(ckpt.join("step-000002").is_dir() && ckpt.join("step-000003").is_dir());
    // ZeRO 2 saves every rank's partition of the optimizer state as it is: boxes of the full
    // tensors, each element written exactly once, checksums intact.
    let meta = candle_parallel::checkpoint::read_metadata(&ckpt.join("step-000002"))?;
    let mut boxes = 0;
    for (name, t) in meta
        .tensors
        .iter()
        .filter(|(n, _)| n.starts_with("optimizer.exp_avg"))
    {
        let stored: usize = t
            .pieces
            .iter()
            .map(|p| {
                let mut lens = t.dims.clone();
                if let Some((dim, _, len)) = p.split {
                    lens[dim] = len;
                }
                if let Some(r) = &p.region {
                    boxes += 1;
                    lens = r.iter().map(|&(_, l)| l).collect();
                }
                lens.iter().product::<usize>()
            })
            .sum();
        assert_eq!(stored, t.dims.iter().product::<usize>(), "{name}");
    }
    assert!(boxes > 0);
    candle_parallel::checkpoint::verify_checkpoint(&ckpt.join("step-000002"))?;
    let from = ckpt.join("step-000002").to_string_lossy().to_string();
    let step3 = |got: &HashMap<String, Tensor>, what: &str, exact: bool| -> Result<()> {
        assert!(
            !got.contains_key("loss.0") && !got.contains_key("loss.1"),
            "{what}"
        );
        for name in ["loss.2", "grad_norm.2"] {
            let (a, b) = (scalar(got, name), scalar(&full, name));
            let ok = if exact {
                a == b
            } else {
                (a - b).abs() <= 1e-5 * b.abs()
            };
            assert!(ok, "{what}: {name} {a} vs {b}");
        }
        for (name, t) in &full {
            if name.starts_with("loss.") || name.starts_with("grad_norm.") {
                continue;
            }
            let d = (&got[name] - t)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            // Parameters move by about lr = 1e-3 a step.
            let tol = if exact { 0.0 } else { 1e-6 };
            assert!(d <= tol, "{what}: {name} differs by {d:e}");
        }
        Ok(())
    };
    for (dp, zero, exact) in [
        ("4", "2", true),
        ("2", "1", false),
        ("1", "0", false),
        ("2", "3", false),
    ] {
        let mut args = vec!["--dp", dp, "--zero", zero, "--resume", &from];
        args.extend(aux0);
        let got = train(
            &model,
            &batch,
            &dir.join(format!("resumed-{dp}.safetensors")),
            &args,
        );
        step3(&got, &format!("resumed at dp={dp} zero={zero}"), exact)?;
    }
    // A ZeRO 3 job's checkpoint (its parameters saved as every rank's partition, nothing
    // gathered) resumes at dp = 4 with ZeRO 0.
    let ckpt3 = dir.join("ckpt3");
    let c3 = ckpt3.to_string_lossy().to_string();
    let mut args = vec![
        "--dp",
        "2",
        "--ep",
        "2",
        "--zero",
        "3",
        "--checkpoint-dir",
        &c3,
        "--checkpoint-every",
        "2",
    ];
    args.extend(aux0);
    let full3 = train(&model, &batch, &dir.join("full3.safetensors"), &args);
    let from3 = ckpt3.join("step-000002").to_string_lossy().to_string();
    let mut args = vec!["--dp", "4", "--zero", "0", "--resume", &from3];
    args.extend(aux0);
    let got = train(&model, &batch, &dir.join("resumed3.safetensors"), &args);
    for (name, t) in &full3 {
        if name.starts_with("loss.0")
            || name.starts_with("loss.1")
            || name.starts_with("grad_norm.0")
            || name.starts_with("grad_norm.1")
        {
            continue;
        }
        let d = (&got[name] - t)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d <= 1e-5, "resumed from ZeRO 3: {name} differs by {d:e}");
    }
    // A checkpoint whose metadata names another step than its rank files (and its optimizer
    // state) is refused.
    let edited = ckpt.join("step-000002");
    let meta_file = edited.join(candle_parallel::checkpoint::METADATA_FILE);
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_file).unwrap()).unwrap();
    meta["step"] = serde_json::json!(3);
    std::fs::write(&meta_file, meta.to_string()).unwrap();
    let o = Command::new(example_path("mixtral"))
        .args([
            "train",
            "--model",
            &model.to_string_lossy(),
            "--batch",
            &batch.to_string_lossy(),
            "--steps",
            "3",
            "--resume",
            &from,
            "--out",
            &dir.join("edited.safetensors").to_string_lossy(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("says step 3") && err.contains("of step 2"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// Bad input: a clear error (status 1) before any rank starts a step.
#[test]
fn bad_training_input_is_a_clear_error() {
    let (model, batch) = setup("bad");
    let dir = model.parent().unwrap().to_path_buf();
    let run = |batch: &Path, extra: &[&str]| {
        let mut args = vec![
            "train".to_string(),
            "--model".into(),
            model.to_string_lossy().into(),
            "--batch".into(),
            batch.to_string_lossy().into(),
            "--out".into(),
            dir.join("o.safetensors").to_string_lossy().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = Command::new(example_path("mixtral"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run(&batch, &["--dp", "3"]);
    assert!(
        e.contains("8 rows does not split over dp × ep = 3 replicas"),
        "{e}"
    );
    // Rows longer than max_position_embeddings (64 here) are refused naming the limit on every
    // path (one device, pipeline stages, ZeRO 3), before any rank starts.
    let long = dir.join("long.json");
    let row: Vec<u32> = (0..70).map(|i| i % 60).collect();
    std::fs::write(
        &long,
        serde_json::json!({ "batch": [row.clone(), row] }).to_string(),
    )
    .unwrap();
    for extra in [
        &[][..],
        &["--pp", "2"],
        &["--zero", "3"],
        &["--zero", "3", "--pp", "2"],
    ] {
        let e = run(&long, extra);
        assert!(
            e.contains("rows of 70 tokens exceed the model's max_position_embeddings of 64")
                && !e.contains("rank"),
            "{extra:?}: {e}"
        );
    }
    let e = run(&batch, &["--dp", "2", "--ep", "2", "--micro-batches", "4"]);
    assert!(e.contains("multiple of 16"), "{e}");
    let e = run(&batch, &["--zero", "4"]);
    assert!(e.contains("the ZeRO stages are 0, 1, 2 and 3"), "{e}");
    let ragged = dir.join("ragged.json");
    std::fs::write(&ragged, r#"{"batch": [[1, 2, 3], [4, 5]]}"#).unwrap();
    let e = run(&ragged, &[]);
    assert!(e.contains("row 0 has 3 tokens, row 1 has 2"), "{e}");
    let oov = dir.join("oov.json");
    std::fs::write(&oov, r#"{"batch": [[1, 2, 3], [4, 64, 6]]}"#).unwrap();
    let e = run(&oov, &[]);
    assert!(
        e.contains("row 1, position 1: token id 64 is out of the vocabulary (size 64)"),
        "{e}"
    );
    let left = dir.join("left.json");
    std::fs::write(
        &left,
        r#"{"batch": [[1, 2, 3], [4, 5, 6]], "attention_mask": [[1, 1, 1], [0, 1, 1]]}"#,
    )
    .unwrap();
    let e = run(&left, &[]);
    assert!(
        e.contains("attention_mask row 1 is [0, 1, 1]") && e.contains("padding at the end"),
        "{e}"
    );
    let short = dir.join("short.json");
    std::fs::write(
        &short,
        r#"{"batch": [[1, 2, 3], [4, 5, 6]], "labels": [[1, 2, 3], [4, 5]]}"#,
    )
    .unwrap();
    let e = run(&short, &[]);
    assert!(
        e.contains("\"labels\" must have the batch's shape, 2 rows of 3"),
        "{e}"
    );
    let label = dir.join("label.json");
    std::fs::write(
        &label,
        r#"{"batch": [[1, 2, 3], [4, 5, 6]], "labels": [[1, 2, 3], [4, -1, 6]]}"#,
    )
    .unwrap();
    let e = run(&label, &[]);
    assert!(e.contains("labels row 1, position 1: -1 is neither"), "{e}");
    let counted = dir.join("counted.json");
    std::fs::write(
        &counted,
        r#"{"batch": [[1, 2, 0, 0], [4, 5, 6, 7]], "attention_mask": [[1, 1, 0, 0], [1, 1, 1, 1]],
            "labels": [[1, 2, 0, 0], [4, 5, 6, 7]]}"#,
    )
    .unwrap();
    let e = run(&counted, &[]);
    assert!(
        e.contains("labels row 0, position 3: 0 would be predicted from padding"),
        "{e}"
    );
    // Without labels, the ids with the padding ignored.
    let unlabelled = dir.join("unlabelled.json");
    std::fs::write(
        &unlabelled,
        r#"{"batch": [[1, 2, 0, 0], [4, 5, 6, 7]], "attention_mask": [[1, 1, 0, 0], [1, 1, 1, 1]]}"#,
    )
    .unwrap();
    train(&model, &unlabelled, &dir.join("o.safetensors"), &[]);
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"rows": [[1, 2]]}"#).unwrap();
    let e = run(&bad, &[]);
    assert!(e.contains("expected {\"batch\""), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--recompute full` (each layer run again just before its backward) and `selective` (the
/// attention core and the experts' activations recomputed inside each layer) train the same
/// parameters, bit for bit, as keeping the activations, with and without pipeline stages.
#[test]
fn recomputation_trains_the_same_bits() {
    let (model, batch) = setup("recompute");
    let dir = model.parent().unwrap().to_path_buf();
    let layouts: [&[&str]; 2] = [
        &[
            "--dp",
            "2",
            "--ep",
            "2",
            "--zero",
            "2",
            "--micro-batches",
            "2",
        ],
        &[
            "--pp",
            "2",
            "--dp",
            "2",
            "--zero",
            "1",
            "--micro-batches",
            "2",
        ],
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let kept = train(
            &model,
            &batch,
            &dir.join(format!("kept{i}.safetensors")),
            layout,
        );
        for mode in ["full", "selective"] {
            let mut args = layout.to_vec();
            args.extend(["--recompute", mode]);
            let out = dir.join(format!("{mode}{i}.safetensors"));
            let recomputed = train(&model, &batch, &out, &args);
            assert_eq!(kept.len(), recomputed.len());
            for (name, t) in &kept {
                let (a, b) = (
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    recomputed[name]
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
                assert!(
                    a == b,
                    "{name} differs with --recompute {mode} at {layout:?}"
                );
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--reduce-dtype bf16` (FSDP2's `reduce_dtype`): the gradients cross the replicas in bf16 at
/// every ZeRO stage, so the run differs from the f32 one by bf16 rounding only.
#[test]
fn gradients_reduced_in_bf16_differ_by_rounding_only() {
    let (model, batch) = setup("reduce-bf16");
    let dir = model.parent().unwrap().to_path_buf();
    for zero in ["0", "1", "2", "3"] {
        let layout = ["--dp", "2", "--zero", zero, "--aux-coef", "0"];
        let f32_run = train(&model, &batch, &dir.join("f32.safetensors"), &layout);
        let mut args = layout.to_vec();
        args.extend(["--reduce-dtype", "bf16"]);
        let bf16_run = train(&model, &batch, &dir.join("bf16.safetensors"), &args);
        let mut differs = false;
        for (name, t) in &f32_run {
            let (a, b) = (
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                bf16_run[name]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            differs |= a != b;
            let scale = a.iter().map(|x| x.abs()).fold(1e-3, f32::max);
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(
                worst <= 1e-2 * scale,
                "zero {zero}: {name} differs by {worst} (scale {scale})"
            );
        }
        assert!(differs, "zero {zero}: bf16 reduction changed nothing");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Gradients reduced bucket by bucket while the backward runs (the default) and after it
/// (`--no-overlap`), and every communication lane off (`CANDLE_PARALLEL_OVERLAP=0`), give the
/// same model, bit for bit, at every ZeRO stage, with micro-batches, experts over ep and
/// pipeline stages on every schedule (interleaved: in its own test, on a deeper model).
#[test]
fn overlapped_gradient_reduction_writes_the_same_model() {
    let (model, batch) = setup("overlap");
    let dir = model.parent().unwrap().to_path_buf();
    let layouts: [&[&str]; 6] = [
        &["--dp", "2", "--zero", "0", "--micro-batches", "2"],
        &[
            "--pp",
            "2",
            "--dp",
            "2",
            "--zero",
            "1",
            "--micro-batches",
            "4",
            "--schedule",
            "zero-bubble",
        ],
        &[
            "--pp",
            "2",
            "--dp",
            "2",
            "--zero",
            "0",
            "--micro-batches",
            "2",
            "--schedule",
            "gpipe",
        ],
        &["--dp", "2", "--ep", "2", "--zero", "1"],
        &[
            "--pp",
            "2",
            "--dp",
            "2",
            "--zero",
            "2",
            "--micro-batches",
            "2",
        ],
        &["--dp", "2", "--zero", "3", "--micro-batches", "2"],
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let on = train(
            &model,
            &batch,
            &dir.join(format!("on{i}.safetensors")),
            layout,
        );
        let mut args = layout.to_vec();
        args.push("--no-overlap");
        let off = train(
            &model,
            &batch,
            &dir.join(format!("off{i}.safetensors")),
            &args,
        );
        // Every lane off too (pipeline messages and ZeRO 3's prefetch run where started).
        let lanes_off = train_env(
            &model,
            &batch,
            &dir.join(format!("lanes-off{i}.safetensors")),
            layout,
            &[("CANDLE_PARALLEL_OVERLAP", "0")],
        );
        // Pipeline messages on the lanes too (Megatron's overlap_p2p_comm).
        let p2p = train_env(
            &model,
            &batch,
            &dir.join(format!("p2p{i}.safetensors")),
            layout,
            &[("CANDLE_PARALLEL_OVERLAP_P2P", "1")],
        );
        assert_eq!(on.len(), off.len());
        for (name, t) in &on {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (what, other) in [
                ("--no-overlap", &off),
                ("the lanes off", &lanes_off),
                ("pipeline messages on the lanes", &p2p),
            ] {
                let b = other[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(a == b, "{name} differs with {what} at {layout:?}");
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--schedule` on the model path: GPipe, 1F1B and zero-bubble (its backwards split into
/// input- and weight-gradient steps, planned after the first step for the measured costs)
/// train what one device trains, with micro-batches, data parallelism and ZeRO; the
/// schedules that cannot run say why.
#[test]
fn every_schedule_on_the_model_path_matches_one_device() -> Result<()> {
    let (model, batch) = setup("schedules");
    let dir = model.parent().unwrap().to_path_buf();
    let before = initial(&model);
    let aux0 = ["--aux-coef", "0", "--micro-batches", "4"];
    let base = train(&model, &batch, &dir.join("base.safetensors"), &aux0);
    for schedule in ["gpipe", "1f1b", "zero-bubble"] {
        for layout in [
            &["--pp", "2"][..],
            &["--pp", "2", "--dp", "2", "--zero", "1"],
            &["--pp", "2", "--ep", "2", "--recompute", "selective"],
        ] {
            if schedule == "zero-bubble" && layout.contains(&"selective") {
                continue; // below, on its own
            }
            let args = [layout, &aux0[..], &["--schedule", schedule]].concat();
            let got = train(&model, &batch, &dir.join("s.safetensors"), &args);
            assert_same_run(&format!("{args:?}"), &got, &base, &before, 1e-5)?;
        }
    }
    let args = [
        &[
            "--pp",
            "2",
            "--schedule",
            "zero-bubble",
            "--recompute",
            "selective",
        ][..],
        &aux0[..],
    ]
    .concat();
    let got = train(&model, &batch, &dir.join("s.safetensors"), &args);
    assert_same_run("zero-bubble, selective", &got, &base, &before, 1e-5)?;
    for (args, want) in [
        (
            &["--pp", "2", "--zero", "3", "--schedule", "zero-bubble"][..],
            "use gpipe or 1f1b",
        ),
        (
            &[
                "--pp",
                "2",
                "--schedule",
                "zero-bubble",
                "--recompute",
                "full",
            ],
            "--recompute selective or none",
        ),
        (&["--pp", "2", "--schedule", "fast"], "use gpipe, 1f1b"),
    ] {
        let err = refused(&model, &batch, &dir, args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// `--schedule interleaved` on the model path: each pipeline rank holds several chunks of
/// layers (rank r stages r, r + pp, ...), and training over them matches one device, with the
/// load-balancing loss's running sums passed through every chunk, with data parallelism and
/// ZeRO, expert and tensor parallelism inside, fewer micro-batches than stages, and a
/// checkpoint saved by the chunked layout resumed by a 1F1B one; the pairings that cannot
/// run say what to change.
#[test]
fn interleaved_schedule_on_the_model_path_matches_one_device() -> Result<()> {
    let dir = tmp("interleaved");
    let mut cfg = config();
    cfg.num_hidden_layers = 4;
    let model = dir.join("model");
    write_random_mixtral(&model, &cfg, 21)?;
    let batch = dir.join("batch.json");
    std::fs::write(&batch, batch_json())?;
    let before = initial(&model);
    let mb4 = ["--micro-batches", "4"];
    let base = train(&model, &batch, &dir.join("base.safetensors"), &mb4);
    // With the load-balancing loss: its sums cross every chunk.
    for layout in [
        &["--pp", "2"][..],
        &["--pp", "2", "--recompute", "selective"],
    ] {
        let args = [layout, &mb4[..], &["--schedule", "interleaved"]].concat();
        let got = train(&model, &batch, &dir.join("s.safetensors"), &args);
        assert_same_run(&format!("{args:?}"), &got, &base, &before, 1e-5)?;
    }
    // Replicas holding other rows compute their own load-balancing loss (local scope): the
    // layouts with dp or ep compare without it.
    let mb4 = ["--micro-batches", "4", "--aux-coef", "0"];
    let base = train(&model, &batch, &dir.join("base0.safetensors"), &mb4);
    for layout in [
        &["--pp", "2", "--dp", "2", "--zero", "2"][..],
        &["--pp", "2", "--ep", "2", "--tp", "2"],
    ] {
        let args = [layout, &mb4[..], &["--schedule", "interleaved"]].concat();
        let got = train(&model, &batch, &dir.join("s.safetensors"), &args);
        assert_same_run(&format!("{args:?}"), &got, &base, &before, 1e-5)?;
    }
    // Fewer micro-batches than the pipeline's 4 stages.
    let mb2 = ["--micro-batches", "2"];
    let base2 = train(&model, &batch, &dir.join("base2.safetensors"), &mb2);
    let args = [&mb2[..], &["--pp", "2", "--schedule", "interleaved"]].concat();
    let got = train(&model, &batch, &dir.join("s.safetensors"), &args);
    assert_same_run("interleaved, 2 micro-batches", &got, &base2, &before, 1e-5)?;
    // Trained straight by `save` with a checkpoint at step 2, and resumed from it by
    // `resume`: the two runs' outputs.
    let save_then_resume = |tag: &str, save: &[&str], resume: &[&str]| {
        let ckpt = dir.join(format!("ckpt-{tag}"));
        let c = ckpt.to_string_lossy().to_string();
        let every = ["--checkpoint-dir", &c, "--checkpoint-every", "2"];
        let straight = train(
            &model,
            &batch,
            &dir.join(format!("straight-{tag}.safetensors")),
            &[&mb4[..], save, &every[..]].concat(),
        );
        let from = ckpt.join("step-000002").to_string_lossy().to_string();
        let resumed = train(
            &model,
            &batch,
            &dir.join(format!("resumed-{tag}.safetensors")),
            &[&mb4[..], resume, &["--resume", &from][..]].concat(),
        );
        (straight, resumed)
    };
    let interleaved = ["--pp", "2", "--schedule", "interleaved"];
    // Saved by the interleaved layout at step 2, resumed under 1F1B: step 3 is the same.
    let (straight, resumed) = save_then_resume("chunked", &interleaved, &["--pp", "2"]);
    let last = format!("loss.{}", STEPS - 1);
    let (a, b) = (scalar(&straight, &last), scalar(&resumed, &last));
    assert!(
        (a - b).abs() <= 1e-5 * b.abs(),
        "{last}: {a} resumed as {b}"
    );
    // Every parameter of two runs within 1e-5.
    let params_within = |x: &HashMap<String, Tensor>, y: &HashMap<String, Tensor>, what: &str| {
        for name in before.keys() {
            let a = x[name].flatten_all()?.to_vec1::<f32>()?;
            let b = y[name].flatten_all()?.to_vec1::<f32>()?;
            let diff = a
                .iter()
                .zip(&b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-5, "{name} differs by {diff} {what}");
        }
        Ok::<(), candle_core::Error>(())
    };
    params_within(&straight, &resumed, "after resuming")?;
    // And the other way: saved by 1F1B at step 2, resumed by the interleaved layout.
    let (straight_1f1b, resumed_chunked) = save_then_resume("1f1b", &["--pp", "2"], &interleaved);
    let (a, b) = (
        scalar(&straight_1f1b, &last),
        scalar(&resumed_chunked, &last),
    );
    assert!(
        (a - b).abs() <= 1e-5 * b.abs(),
        "{last}: {a} resumed as {b} by the interleaved layout"
    );
    params_within(
        &straight_1f1b,
        &resumed_chunked,
        "resumed by the interleaved layout",
    )?;
    // Overlap off, and pipeline messages on the lanes: the same model bit for bit.
    let layout = [
        &mb4[..],
        &[
            "--pp",
            "2",
            "--dp",
            "2",
            "--zero",
            "2",
            "--schedule",
            "interleaved",
        ],
    ]
    .concat();
    let on = train(&model, &batch, &dir.join("on.safetensors"), &layout);
    let off = train(
        &model,
        &batch,
        &dir.join("off.safetensors"),
        &[&layout[..], &["--no-overlap"]].concat(),
    );
    let p2p = train_env(
        &model,
        &batch,
        &dir.join("p2p.safetensors"),
        &layout,
        &[("CANDLE_PARALLEL_OVERLAP_P2P", "1")],
    );
    for (name, t) in &on {
        let a = t.flatten_all()?.to_vec1::<f32>()?;
        for (what, other) in [("--no-overlap", &off), ("messages on the lanes", &p2p)] {
            let b = other[name].flatten_all()?.to_vec1::<f32>()?;
            assert!(a == b, "interleaved: {name} differs with {what}");
        }
    }
    for (args, want) in [
        (
            &["--pp", "2", "--schedule", "interleaved", "--chunks", "3"][..],
            "use at most 2 chunks per rank",
        ),
        (
            &["--pp", "2", "--schedule", "1f1b", "--chunks", "2"],
            "--schedule interleaved",
        ),
        (
            &["--pp", "2", "--schedule", "interleaved", "--chunks", "1"],
            "--chunks 2",
        ),
        (
            &["--pp", "2", "--zero", "3", "--schedule", "interleaved"],
            "ZeRO 0-2 with --schedule interleaved",
        ),
        (
            &[
                "--pp",
                "2",
                "--schedule",
                "interleaved",
                "--recompute",
                "full",
            ],
            "several chunks per rank",
        ),
        (&["--schedule", "interleaved"], "2 or more pipeline ranks"),
    ] {
        let err = refused(&model, &batch, &dir, args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// DeepSeek-style routing from the config (`scoring_func: sigmoid`, `topk_method: noaux_tc`,
/// groups, a routed scaling factor): the selection biases move after every step, the same at
/// dp = 2 × ep = 2 (loads summed over the batch group) as on one device; they are written with
/// the parameters under HF's name, saved in checkpoints and read back, so a resumed job
/// continues bit for bit; ZeRO 3, which rebuilds its routers, refuses them.
#[test]
fn deepseek_routing_balances_saves_and_resumes_its_bias() -> Result<()> {
    let dir = tmp("deepseek");
    let mut cfg = config();
    cfg.num_local_experts = 4;
    cfg.num_experts_per_tok = 2;
    for (k, v) in [
        ("scoring_func", serde_json::json!("sigmoid")),
        ("topk_method", serde_json::json!("noaux_tc")),
        ("n_group", serde_json::json!(2)),
        ("topk_group", serde_json::json!(2)),
        ("routed_scaling_factor", serde_json::json!(1.5)),
        ("router_bias_update_rate", serde_json::json!(0.01)),
    ] {
        cfg.extra.insert(k.into(), v);
    }
    let model = dir.join("model");
    write_random_mixtral(&model, &cfg, 21).unwrap();
    let batch = dir.join("batch.json");
    std::fs::write(&batch, batch_json()).unwrap();
    let bias = |t: &HashMap<String, Tensor>, layer: usize| -> Vec<f32> {
        t[&format!("model.layers.{layer}.block_sparse_moe.gate.e_score_correction_bias")]
            .to_vec1::<f32>()
            .unwrap()
    };
    let aux0 = ["--aux-coef", "0"];
    let one = train(&model, &batch, &dir.join("one.safetensors"), &aux0);
    for layer in 0..2 {
        let b = bias(&one, layer);
        // Three updates of ±0.01 (or 0 for an expert exactly at the mean).
        assert!(
            b.iter().any(|&x| x != 0.0) && b.iter().all(|x| x.abs() <= 0.0301),
            "{b:?}"
        );
    }
    let split = train(
        &model,
        &batch,
        &dir.join("split.safetensors"),
        &[&aux0[..], &["--dp", "2", "--ep", "2", "--zero", "1"]].concat(),
    );
    for layer in 0..2 {
        assert_eq!(bias(&one, layer), bias(&split, layer), "layer {layer}");
    }
    // A checkpoint at step 2 carries the biases; resumed, step 3 is the straight run's.
    let ckpt = dir.join("ckpt");
    let c = ckpt.to_string_lossy().to_string();
    let straight = train(
        &model,
        &batch,
        &dir.join("straight.safetensors"),
        &[
            &aux0[..],
            &[
                "--dp",
                "2",
                "--checkpoint-dir",
                &c,
                "--checkpoint-every",
                "2",
            ],
        ]
        .concat(),
    );
    let from = ckpt.join("step-000002").to_string_lossy().to_string();
    let resumed = train(
        &model,
        &batch,
        &dir.join("resumed.safetensors"),
        &[&aux0[..], &["--dp", "2", "--resume", &from]].concat(),
    );
    for (name, t) in &straight {
        if name.starts_with("loss.0")
            || name.starts_with("loss.1")
            || name.starts_with("grad_norm.0")
            || name.starts_with("grad_norm.1")
        {
            continue;
        }
        let a = t.flatten_all()?.to_vec1::<f32>()?;
        let b = resumed[name].flatten_all()?.to_vec1::<f32>()?;
        assert!(a == b, "{name} differs after resuming");
    }
    // ZeRO 3 refuses the bias, and Mixtral's aux loss beside it is refused, naming why.
    for (extra, want) in [
        (&["--zero", "3", "--aux-coef", "0"][..], "ZeRO 0, 1 or 2"),
        (&["--zero", "1"][..], "set router_aux_loss_coef to 0"),
    ] {
        let err = refused(&model, &batch, &dir, &[&["--dp", "2"], extra].concat());
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// `--aux-scope global` (the default): the load-balancing loss counts each expert's load over
/// the whole global batch, so layouts that split the batch (ep × tp, dp × ep, dp 4 at ZeRO 3)
/// train what one device trains with the aux loss on, and so what transformers trains; with
/// `--aux-scope local` (each rank's tokens) a split batch trains otherwise.
#[test]
fn the_global_load_balancing_loss_matches_one_device_at_every_layout() -> Result<()> {
    let (model, batch) = setup("aux-global");
    let dir = model.parent().unwrap().to_path_buf();
    let before = initial(&model);
    let one = train(&model, &batch, &dir.join("one.safetensors"), &[]);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mixtral_train_reference.safetensors");
    let hf = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu)?;
    for layout in [
        &["--ep", "2", "--tp", "2"][..],
        &["--dp", "2", "--ep", "2"],
        &["--dp", "4", "--zero", "3"],
    ] {
        let got = train(&model, &batch, &dir.join("layout.safetensors"), layout);
        assert_same_run(
            &format!("global aux, {layout:?}"),
            &got,
            &one,
            &before,
            1e-5,
        )?;
        assert_same_run(
            &format!("global aux, {layout:?} vs HF"),
            &got,
            &hf,
            &before,
            1e-5,
        )?;
    }
    let local = train(
        &model,
        &batch,
        &dir.join("local.safetensors"),
        &["--dp", "4", "--aux-scope", "local"],
    );
    let (a, b) = (scalar(&local, "loss.0"), scalar(&one, "loss.0"));
    assert!(
        (a - b).abs() > 1e-6 * b.abs(),
        "the local aux loss of a split batch should differ from the whole batch's: {a} vs {b}"
    );
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

/// A Qwen MoE family's fixture config (`tests/fixtures/moe_families/<family>.json`).
fn family_config(family: &str) -> MixtralConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/moe_families/{family}.json"));
    MixtralConfig::from_file(&path).unwrap()
}

/// Qwen2-MoE (a shared expert with its sigmoid gate, q/k/v biases, a dense layer among the
/// sparse ones: `mlp_only_layers`) and Qwen3-MoE (q/k norms, `head_dim` unlike hidden / heads,
/// `decoder_sparse_step` 2, `norm_topk_prob`, rope in `rope_parameters`): the same steps as
/// transformers' `Qwen2MoeForCausalLM` / `Qwen3MoeForCausalLM` with torch's AdamW (losses with
/// the load-balancing loss, norms, every parameter's update) at one device and at ep × tp,
/// pp × tp (stages of dense layers only among them), dp × ep and ZeRO 3.
#[test]
fn qwen_moe_families_match_transformers_at_every_layout() -> Result<()> {
    for (family, layouts) in [
        (
            "qwen2_moe",
            vec![
                vec!["--ep", "2", "--tp", "2"],
                vec!["--pp", "3"],
                vec!["--pp", "2", "--tp", "2"],
                vec!["--dp", "2", "--ep", "2"],
                vec!["--zero", "3", "--dp", "2"],
            ],
        ),
        (
            "qwen3_moe",
            vec![
                vec!["--ep", "2", "--tp", "2"],
                vec!["--pp", "4"],
                vec!["--dp", "2", "--ep", "2", "--zero", "2"],
                vec!["--zero", "3", "--ep", "2"],
            ],
        ),
    ] {
        let dir = tmp(family);
        let model = dir.join("model");
        write_random_mixtral(&model, &family_config(family), 21)?;
        let batch = dir.join("batch.json");
        std::fs::write(&batch, batch_json()).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "tests/fixtures/moe_families/{family}_train_reference.safetensors"
        ));
        let mut want = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu)?;
        want.remove("generated");
        let before = initial(&model);
        let one = train_with(
            "moe",
            &model,
            &batch,
            &dir.join("one.safetensors"),
            &[],
            &[],
        );
        assert_same_run(
            &format!("{family}, one device vs transformers"),
            &one,
            &want,
            &before,
            1e-5,
        )?;
        // Checkpointed under ep x tp at step 2, resumed under dp x ZeRO 3 for step 3: the
        // uninterrupted run's last step and parameters.
        let ckpt = dir.join("ckpt");
        let c = ckpt.to_string_lossy().to_string();
        let every = ["--checkpoint-dir", &c, "--checkpoint-every", "2"];
        let full = [&["--ep", "2", "--tp", "2"][..], &every].concat();
        let full = train_with(
            "moe",
            &model,
            &batch,
            &dir.join("full.safetensors"),
            &full,
            &[],
        );
        let from = ckpt.join("step-000002").to_string_lossy().to_string();
        let resume = ["--dp", "2", "--zero", "3", "--resume", &from];
        let got = train_with(
            "moe",
            &model,
            &batch,
            &dir.join("resumed.safetensors"),
            &resume,
            &[],
        );
        for (name, want) in &full {
            if ["loss.0", "loss.1", "grad_norm.0", "grad_norm.1"].contains(&name.as_str()) {
                continue;
            }
            let d = (&got[name] - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let tol = 1e-5
                * want
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?
                    .max(1.0);
            assert!(
                d <= tol,
                "{family}, resumed at dp=2 ZeRO 3: {name} differs by {d:e}"
            );
        }
        for args in layouts {
            let got = train_with(
                "moe",
                &model,
                &batch,
                &dir.join("layout.safetensors"),
                &args,
                &[],
            );
            assert_same_run(
                &format!("{family}, {args:?} vs transformers"),
                &got,
                &want,
                &before,
                1e-5,
            )?;
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
    Ok(())
}

/// Greedy decoding with the KV cache gives transformers' `generate` tokens (the fixture's
/// `generated`, from the batch's first row) for both Qwen families, at one device and with the
/// experts and heads split (ep × tp).
#[test]
fn qwen_moe_families_generate_transformers_tokens() -> Result<()> {
    use candle_core::{DType, Device, IndexOp, D};
    use candle_parallel::checkpoint::ParallelVarBuilder;
    use candle_parallel::moe::Dispatch;
    use candle_parallel::MeshShape;
    use candle_parallel_models::mixtral::Mixtral;
    let v: serde_json::Value = serde_json::from_str(&batch_json()).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(v["batch"][0].clone()).unwrap();
    for family in ["qwen2_moe", "qwen3_moe"] {
        let cfg = family_config(family);
        let dir = tmp(&format!("gen-{family}"));
        write_random_mixtral(&dir, &cfg, 21)?;
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "tests/fixtures/moe_families/{family}_train_reference.safetensors"
        ));
        let want: Vec<i64> =
            candle_core::safetensors::load(&fixture, &Device::Cpu)?["generated"].to_vec1()?;
        for (ep, tp) in [(1, 1), (2, 2), (1, 2)] {
            let outs = common::Launcher::new(ep * tp)
                .mesh(MeshShape::new().ep(ep).tp(tp))
                .run(|ctx| {
                    let mesh = ctx.mesh()?;
                    let vb = ParallelVarBuilder::from_hf_dir(&dir, DType::F32, &Device::Cpu)?;
                    let model = Mixtral::new(&cfg, vb, mesh.ep(), mesh.tp(), Dispatch::AllReduce)?;
                    let mut cache = model.new_cache();
                    let mut ids = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                    let (mut pos, mut out) = (0, Vec::new());
                    for _ in 0..want.len() {
                        let logits = model.forward(&ids, pos, Some(&mut cache))?;
                        pos += ids.dim(1)?;
                        let next = logits.i((0, ids.dim(1)? - 1))?.argmax(D::Minus1)?;
                        let next = next.to_scalar::<u32>()?;
                        out.push(i64::from(next));
                        ids = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
                    }
                    Ok(out)
                })?;
            for (r, got) in outs.iter().enumerate() {
                assert_eq!(
                    got, &want,
                    "{family}, ep={ep} tp={tp}, rank {r}: greedy tokens"
                );
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
    Ok(())
}
