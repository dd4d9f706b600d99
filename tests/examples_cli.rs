//! The example programs as a user runs them, on bad input: a clear error and exit status 1,
//! never a panic (status 101), a hang or a healthy-looking report of a broken checkpoint.
mod common;

use common::example_path;
use std::path::PathBuf;
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(example: &str, args: &[&str]) -> Output {
    Command::new(example_path(example))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("the example runs")
}

/// The run failed cleanly (status 1, not a panic) and said `needle`.
fn fails_saying(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "status {:?}: {err}", out.status);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn finetune_rejects_zero_steps_and_a_model_dir_without_config() {
    let out = tmp("ft");
    let o = out.display().to_string();
    fails_saying(
        &run("finetune_mixtral", &["--steps", "0", "--out", &o]),
        "--steps must be at least 1",
    );
    fails_saying(
        &run("finetune_mixtral", &["--eval-every", "0", "--out", &o]),
        "--eval-every must be at least 1",
    );
    let model = tmp("ft-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
    fails_saying(
        &run(
            "finetune_mixtral",
            &["--model", &model.display().to_string(), "--out", &o],
        ),
        "has no config.json",
    );
    std::fs::remove_dir_all(model).unwrap();
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn inspect_and_verify_do_not_pass_a_broken_checkpoint() {
    let hf = tmp("hf");
    let dist = tmp("dist");
    let (h, d) = (hf.display().to_string(), dist.display().to_string());
    assert!(run("checkpoint", &["random", "--to", &h]).status.success());
    let o = run(
        "checkpoint",
        &["reshard", "--from", &h, "--to", &d, "--mesh", "tp=2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run("checkpoint", &["inspect", &d]).status.success());
    assert!(run("checkpoint", &["verify", &d]).status.success());
    // A truncated rank file: inspect sees it without reading the tensors.
    let rank1 = dist.join("rank-00001.safetensors");
    let bytes = std::fs::read(&rank1).unwrap();
    std::fs::write(&rank1, &bytes[..bytes.len() - 64]).unwrap();
    fails_saying(
        &run("checkpoint", &["inspect", &d]),
        "was truncated or replaced",
    );
    // Flipped bytes of the same size: only reading them finds it.
    let mut flipped = bytes.clone();
    let n = flipped.len();
    for b in &mut flipped[n - 64..n - 60] {
        *b ^= 0xFF;
    }
    std::fs::write(&rank1, &flipped).unwrap();
    assert!(run("checkpoint", &["inspect", &d]).status.success());
    fails_saying(&run("checkpoint", &["verify", &d]), "CRC-32C");
    // An interrupted save (rank files under temporary names only) is named as one.
    std::fs::remove_dir_all(&dist).unwrap();
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(dist.join("rank-00000.safetensors.tmp"), &bytes).unwrap();
    fails_saying(
        &run("checkpoint", &["inspect", &d]),
        "incomplete checkpoint",
    );
    std::fs::remove_dir_all(hf).unwrap();
    std::fs::remove_dir_all(dist).unwrap();
}

#[test]
fn the_pipeline_example_trains_and_draws_every_schedule() {
    for schedule in ["gpipe", "1f1b", "interleaved", "zero-bubble", "pipedream"] {
        let dir = tmp(&format!("pipeline-{schedule}"));
        let dir_s = dir.to_string_lossy().into_owned();
        let out = run(
            "pipeline",
            &[
                "--pp",
                "2",
                "--schedule",
                schedule,
                "--micro-batches",
                "4",
                "--layers",
                "4",
                "--hidden",
                "16",
                "--batch",
                "16",
                "--steps",
                "3",
                "--out",
                &dir_s,
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{schedule}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let simulated = if schedule == "pipedream" {
            "1f1b"
        } else {
            schedule
        };
        assert!(
            stdout.contains(&format!("schedule {simulated}")),
            "{stdout}"
        );
        let json = std::fs::read_to_string(dir.join("timeline.json")).unwrap();
        let svg = std::fs::read_to_string(dir.join("timeline.svg")).unwrap();
        // Two ranks, each with a forward and a backward (or its two halves) per micro-batch.
        let slices = json.matches("\"ph\":\"X\"").count();
        let moving = json.matches("\"cat\":\"communication\"").count();
        let waiting = json.matches("\"cat\":\"waiting for a message\"").count();
        let per_mb = if schedule == "zero-bubble" { 3 } else { 2 };
        let chunks = if schedule == "interleaved" { 2 } else { 1 };
        assert_eq!(
            slices - moving - waiting,
            2 * 4 * per_mb * chunks,
            "{schedule}: {json}"
        );
        // Activations and gradients crossed between the two ranks, on their lanes.
        assert!(moving >= 2, "{schedule}: no communication in the timeline");
        assert!(svg.contains("messages moving"), "{svg}");
        assert!(svg.starts_with("<svg") && svg.contains("rank 1"), "{svg}");
    }
    // Interleaving with micro-batches the ranks do not divide: uneven rounds.
    let uneven = tmp("pipeline-uneven");
    let out = run(
        "pipeline",
        &[
            "--schedule",
            "interleaved",
            "--pp",
            "4",
            "--micro-batches",
            "6",
            "--batch",
            "48",
            "--steps",
            "2",
            "--out",
            &uneven.to_string_lossy(),
        ],
    );
    let _ = std::fs::remove_dir_all(&uneven);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("pipeline", &["--schedule", "fastest"]);
    fails_saying(&out, "use gpipe, 1f1b");
}

/// `llama eval --pp P` writes what `--pp 1` writes (logits, loss, every gradient at full shape
/// under its HF name) for uneven splits (3 layers over 2 stages), every stage count up to the
/// number of layers, with tp inside, and with a head tied to the embedding (whose gradient is
/// the sum of the first and the last stage's).
#[test]
fn llama_eval_with_pipeline_stages_writes_what_one_stage_writes() {
    use candle_parallel_models::llama::LlamaConfig;
    use candle_parallel_models::testing::{max_rel_err, write_random_llama};
    for tied in [false, true] {
        let mut cfg = LlamaConfig::tiny();
        cfg.num_hidden_layers = 3;
        cfg.tie_word_embeddings = tied;
        let model = tmp(&format!("llama-pp-model-{tied}"));
        write_random_llama(&model, &cfg, 11).unwrap();
        let eval = |pp: usize, tp: usize| {
            let out = model.join(format!("out-pp{pp}-tp{tp}.safetensors"));
            let (m, o) = (model.to_string_lossy(), out.to_string_lossy());
            let (pp_s, tp_s) = (pp.to_string(), tp.to_string());
            let r = run(
                "llama",
                &[
                    "eval",
                    "--model",
                    &m,
                    "--tokens",
                    "1,17,99,3,200",
                    "--tp",
                    &tp_s,
                    "--pp",
                    &pp_s,
                    "--out",
                    &o,
                    "--grads",
                ],
            );
            assert!(
                r.status.success(),
                "pp={pp}: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()
        };
        let base = eval(1, 1);
        assert_eq!(
            base.len(),
            2 + 9 * 3 + 1 + usize::from(!tied) + 1,
            "tied={tied}"
        );
        for (pp, tp) in [(2, 1), (3, 1), (2, 2)] {
            let got = eval(pp, tp);
            assert_eq!(got.len(), base.len(), "pp={pp} tp={tp} tied={tied}");
            for (name, want) in &base {
                let e = max_rel_err(&got[name], want).unwrap();
                assert!(
                    e <= 1e-4,
                    "pp={pp} tp={tp} tied={tied}: {name} differs by {e:e}"
                );
            }
        }
        let r = run(
            "llama",
            &["eval", "--model", &model.to_string_lossy(), "--pp", "4"],
        );
        fails_saying(&r, "use at most 3 stages");
    }
}

/// `mixtral eval --pp P` writes what one stage writes — logits, ce_loss, aux_loss (HF's, over
/// every layer of every stage), loss and every gradient — with ep and tp inside the stages,
/// uneven splits and a tied head; and `moe eval` the same for Qwen2-MoE and Qwen3-MoE (whose
/// stages may hold dense layers only).
#[test]
fn mixtral_eval_with_pipeline_stages_writes_what_one_stage_writes() {
    use candle_parallel_models::mixtral::MixtralConfig;
    use candle_parallel_models::testing::{max_rel_err, write_random_mixtral};
    let fixture = |family: &str| {
        MixtralConfig::from_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/fixtures/moe_families/{family}.json")),
        )
        .unwrap()
    };
    let mut runs = Vec::new();
    for tied in [false, true] {
        let mut cfg = MixtralConfig::tiny();
        cfg.num_hidden_layers = 3;
        cfg.tie_word_embeddings = tied;
        runs.push((format!("mixtral-{tied}"), cfg, "1,17,99,3,200,5", "mixtral"));
    }
    for family in ["qwen2_moe", "qwen3_moe"] {
        runs.push((family.to_string(), fixture(family), "1,17,9,3,60,5", "moe"));
    }
    for (what, cfg, tokens, example) in runs {
        let tied = &what;
        let model = tmp(&format!("mixtral-pp-model-{what}"));
        write_random_mixtral(&model, &cfg, 13).unwrap();
        let eval = |pp: usize, ep: usize, tp: usize| {
            let out = model.join(format!("out-{pp}-{ep}-{tp}.safetensors"));
            let (m, o) = (model.to_string_lossy(), out.to_string_lossy());
            let (pp_s, ep_s, tp_s) = (pp.to_string(), ep.to_string(), tp.to_string());
            let r = run(
                example,
                &[
                    "eval", "--model", &m, "--tokens", tokens, "--pp", &pp_s, "--ep", &ep_s,
                    "--tp", &tp_s, "--out", &o, "--grads",
                ],
            );
            assert!(
                r.status.success(),
                "pp={pp}: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()
        };
        let base = eval(1, 1, 1);
        for (pp, ep, tp) in [(2, 1, 1), (3, 2, 1), (2, 2, 2)] {
            let got = eval(pp, ep, tp);
            assert_eq!(got.len(), base.len(), "pp={pp} ep={ep} tp={tp} tied={tied}");
            for (name, want) in &base {
                let e = max_rel_err(&got[name], want).unwrap();
                assert!(
                    e <= 1e-4,
                    "pp={pp} ep={ep} tp={tp} tied={tied}: {name} differs by {e:e}"
                );
            }
        }
    }
}

/// The main job with pipeline stages (`--mesh pp=2,ep=2`): it trains, saves a checkpoint that
/// verifies, and refuses micro-batch counts that do not divide the batch.
#[test]
fn finetune_runs_with_pipeline_stages() {
    let out = tmp("ft-pp");
    let o = out.to_string_lossy().into_owned();
    let model = tmp("ft-pp-model");
    let m = model.to_string_lossy().into_owned();
    let r = run(
        "finetune_mixtral",
        &[
            "--mesh",
            "pp=2,ep=2",
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--model",
            &m,
            "--out",
            &o,
        ],
    );
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        stdout.contains("loss ") && stdout.contains("accuracy"),
        "{stdout}"
    );
    let ckpt = out.join("step-000020");
    let v = run("checkpoint", &["verify", &ckpt.to_string_lossy()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let bad = run(
        "finetune_mixtral",
        &[
            "--mesh",
            "pp=2,ep=2",
            "--micro-batches",
            "5",
            "--model",
            &m,
            "--out",
            &o,
        ],
    );
    fails_saying(&bad, "--micro-batches");
}

/// A missing path is named, and a mesh size of 0 refused where the flag is parsed (it used to
/// panic dividing by it).
#[test]
fn missing_paths_are_named_and_a_zero_mesh_size_is_refused() {
    let missing = tmp("missing-model");
    let m = missing.display().to_string();
    fails_saying(
        &run("generate", &["--model", &m]),
        &format!("{m}/config.json"),
    );
    fails_saying(&run("checkpoint", &["inspect", &m]), &m);
    fails_saying(&run("checkpoint", &["verify", &m]), &m);
    fails_saying(&run("mixtral", &["eval", "--model", &m]), &m);
    let out = tmp("zero-mesh").display().to_string();
    fails_saying(
        &run("finetune_mixtral", &["--mesh", "ep=0,tp=2", "--out", &out]),
        "dimension ep has size 0",
    );
    assert!(!missing.exists());
}
