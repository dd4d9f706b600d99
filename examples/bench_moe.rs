//! MoE throughput, 2048 tokens (8 × 256), f32, at two shapes (`--shape`): Mixtral's (8
//! experts, top-2, hidden 1024, ffn 3584) and Qwen3-30B-A3B's (128 experts, top-8, hidden 2048,
//! expert ffn 768: many small experts).
//!
//! ```text
//! cargo run --release --example bench_moe
//! cargo run --release --example bench_moe -- --torch /work/venv-torch/bin/python
//! cargo run --release --example bench_moe -- --shape qwen3 --torch /work/venv-torch/bin/python
//! ```
//!
//! Measured side by side in one run, medians over `--reps` repetitions (spread: min–max):
//! - the ceiling: the FLOPs of the layer's expert matmuls at the GFLOP/s that Candle's matmul
//!   reaches on one expert's shapes (`[512, 1024] × [3584, 1024]ᵀ`, as `Linear` runs it),
//!   measured in every repetition next to the layer (forward + backward: a third of it, as
//!   backward does twice the forward's matmuls);
//! - our MoE layer alone, forward (inference: weights not trainable, as PyTorch's forward
//!   under `no_grad`) and forward + backward (training: gate gradient included), at ep = 1
//!   and ep = 2 (all-to-all between two ranks sharing the cores), and where its time goes:
//!   route, plan, permute, expert matmuls, SwiGLU, combine, each forward (timed where the
//!   inference layer runs it) and backward, and the share of the forward that is not a matmul;
//! - with `--torch PYTHON`: Hugging Face transformers' `MixtralSparseMoeBlock` (or
//!   `Qwen3MoeSparseMoeBlock`) on PyTorch with the same shapes and thread count (`scripts/bench_moe_torch.py`; the README says how to
//!   make the virtual environment);
//! - at Mixtral's shape, a one-layer Mixtral forward, ours against candle-transformers' on the same checkpoint
//!   (its sparse MoE block is not public, so the comparison is the smallest model that holds
//!   it).
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_parallel::checkpoint::ParallelVarBuilder;
use candle_parallel::moe::{
    combine_into, combine_outputs, moe_layer, plan_tokens, zeros_for_combine, Dispatch, MoeLayer,
    RouterConfig,
};
use candle_parallel::{ops, Launcher, MeshShape};
use candle_parallel_models::mixtral::{Mixtral, MixtralConfig};
use candle_parallel_models::testing::{seeded, write_random_mixtral};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Timed repetitions of each measurement (after one warm-up); the table shows medians.
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// A Python with torch and transformers: also time their `MixtralSparseMoeBlock`.
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Where the random benchmark checkpoint is written (created once, reused).
    #[arg(long, default_value = "target/bench-moe")]
    dir: PathBuf,
    /// The experts implementation transformers runs (`_experts_implementation`): grouped_mm
    /// (what `from_pretrained` gives in transformers 5), eager (the per-expert loop), batched_mm.
    #[arg(long, default_value = "grouped_mm")]
    torch_experts: String,
    /// The layer's shape: Mixtral's (8 experts, top-2) or Qwen3-30B-A3B's (128, top-8).
    #[arg(long, value_enum, default_value_t = ShapeName::Mixtral)]
    shape: ShapeName,
}

/// The layer shapes measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ShapeName {
    /// Mixtral 8×7B's expert count and top-k at a smaller width: 8 experts, top-2, hidden
    /// 1024, ffn 3584.
    Mixtral,
    /// Qwen3-30B-A3B's layer: 128 experts, top-8, hidden 2048, expert ffn 768 (many small
    /// experts).
    Qwen3,
}

/// One measured shape: batch × sequence tokens, hidden, expert ffn, experts, top-k, and the
/// Hugging Face block PyTorch runs for it.
#[derive(Debug)]
struct Shape {
    b: usize,
    s: usize,
    h: usize,
    f: usize,
    e: usize,
    k: usize,
    tokens: usize,
    hf_block: &'static str,
    family: &'static str,
}

static SHAPE: std::sync::OnceLock<Shape> = std::sync::OnceLock::new();

/// The shape chosen by `--shape`.
fn sh() -> &'static Shape {
    SHAPE.get().expect("the shape is set first")
}

impl ShapeName {
    fn shape(self) -> Shape {
        let (b, s) = (8, 256);
        let (h, f, e, k, hf_block, family) = match self {
            Self::Mixtral => (1024, 3584, 8, 2, "MixtralSparseMoeBlock", "mixtral"),
            Self::Qwen3 => (2048, 768, 128, 8, "Qwen3MoeSparseMoeBlock", "qwen3_moe"),
        };
        Shape {
            b,
            s,
            h,
            f,
            e,
            k,
            tokens: b * s,
            hf_block,
            family,
        }
    }
}

fn config() -> MixtralConfig {
    MixtralConfig {
        hidden_size: sh().h,
        intermediate_size: sh().f,
        vocab_size: 256,
        num_hidden_layers: 1,
        num_attention_heads: 8,
        // Grouped KV heads as in Mixtral (candle-transformers' attention also needs them: with
        // one query head per KV head its prefill matmul meets a strided value tensor).
        num_key_value_heads: 4,
        num_local_experts: sh().e,
        num_experts_per_tok: sh().k,
        max_position_embeddings: 4096,
        sliding_window: Some(4096),
        ..MixtralConfig::tiny()
    }
}

/// Timings in seconds: median and spread.
#[derive(Clone, Debug, Default)]
struct Times(Vec<f64>);

impl Times {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn spread(&self) -> String {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(0.0, f64::max);
        format!("{:.0}–{:.0}", min * 1e3, max * 1e3)
    }

    /// `self − other`, repetition by repetition (a backward as forward+backward − forward).
    fn minus(&self, other: &Times) -> Times {
        Times(self.0.iter().zip(&other.0).map(|(a, b)| a - b).collect())
    }
}

/// `reps` timings of `f`, after one warm-up.
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Times> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(Times(t))
}

fn layer(
    vb: ParallelVarBuilder,
    ep: &candle_parallel::Comm,
    tp: &candle_parallel::Comm,
) -> Result<MoeLayer> {
    moe_layer(
        sh().h,
        sh().f,
        RouterConfig::mixtral(sh().e, sh().k),
        Dispatch::AllToAll,
        vb.pp("moe"),
        ep,
        tp,
    )
}

/// The whole layer at `ep` (each ep rank takes its share of the tokens): forward and
/// forward + backward, each repetition next to a measurement of the ceiling's matmul
/// (GFLOP/s), so that the ratios see the same load on a shared machine.
fn layer_times(ep: usize, reps: usize) -> Result<(Times, Times, Times, Times)> {
    let times = Launcher::new(ep).mesh(MeshShape::new().ep(ep)).run(|ctx| {
        let mesh = ctx.mesh()?;
        let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable();
        let layer = layer(vb, mesh.ep(), mesh.tp())?;
        // Inference, as PyTorch's forward under `no_grad`: the same weights, not trainable, so
        // no graph keeps the intermediates alive.
        let frozen = self::layer(
            ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu),
            mesh.ep(),
            mesh.tp(),
        )?;
        let x = Var::from_tensor(&seeded(
            &[sh().tokens / ep, sh().h],
            1 + mesh.ep().rank() as u64,
            DType::F32,
        )?)?;
        let (rows, w) = (
            seeded(&[sh().tokens * sh().k / sh().e, sh().h], 3, DType::F32)?,
            seeded(&[sh().f, sh().h], 4, DType::F32)?,
        );
        let expert_w1 = candle_nn::Linear::new(w, None);
        let flops = 2.0 * (sh().tokens * sh().k / sh().e) as f64 * sh().h as f64 * sh().f as f64;
        // Each repetition: the ceiling (the fastest of three matmuls: what the matmul can do),
        // then the measured work. Forwards run back to back, as in inference, then the
        // training steps.
        let measure = |work: &mut dyn FnMut() -> Result<()>| -> Result<(Times, Times)> {
            let (mut t, mut g) = (Times::default(), Times::default());
            for rep in 0..=reps {
                let mut mm = f64::INFINITY;
                for _ in 0..3 {
                    let s = Instant::now();
                    std::hint::black_box(expert_w1.forward(&rows)?);
                    mm = mm.min(s.elapsed().as_secs_f64());
                }
                mesh.ep().barrier()?;
                let s = Instant::now();
                work()?;
                mesh.ep().barrier()?;
                if rep > 0 {
                    // The first repetition warms up.
                    t.0.push(s.elapsed().as_secs_f64());
                    g.0.push(flops / mm / 1e9);
                }
            }
            Ok((t, g))
        };
        let x_in = x.as_tensor().detach();
        let (fwd, gflops_fwd) = measure(&mut || {
            std::hint::black_box(frozen.forward(&x_in, false)?);
            Ok(())
        })?;
        let (both, gflops_both) = measure(&mut || {
            let o = layer.forward(x.as_tensor(), true)?;
            std::hint::black_box(ops::backward(&o.output.sqr()?.sum_all()?)?);
            Ok(())
        })?;
        Ok((fwd, both, gflops_fwd, gflops_both))
    })?;
    Ok(times.into_iter().next().expect("rank 0"))
}

/// One phase of the layer: its forward in the inference layer, and its backward.
struct Phase {
    name: &'static str,
    fwd: Times,
    bwd: Times,
}

/// The layer's phases at ep = 1: route (gate matmul, softmax, top-k), plan (which copies each
/// expert takes, in which order), permute (gathering each expert's rows), the expert matmuls
/// (w1, w3, w2), SwiGLU, combine (weighting and adding into the tokens' rows).
///
/// Forward: the inference layer's steps in its order (as `LocalExperts::forward_combined` runs
/// them), each timed where it runs; their sum, the layer's forward in situ, is returned too.
/// Backward: each phase alone on trainable inputs, as forward + backward − forward.
fn phase_times(reps: usize) -> Result<(Vec<Phase>, Times)> {
    let phases = Launcher::new(1).run(|ctx| {
        let frozen = layer(
            ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu),
            ctx.comm(),
            ctx.comm(),
        )?;
        let cfg = *frozen.router().config();
        let x = seeded(&[sh().tokens, sh().h], 1, DType::F32)?;
        const NAMES: [&str; 6] = [
            "route (gate, softmax, top-k)",
            "plan (capacity, order)",
            "permute (gather each expert's rows)",
            "expert matmuls (w1, w3, w2)",
            "SwiGLU",
            "combine (weight, add into the tokens' rows)",
        ];
        let mut fwd: Vec<Times> = (0..NAMES.len()).map(|_| Times::default()).collect();
        let mut total = Times::default();
        for rep in 0..=reps {
            let mut t = [0f64; NAMES.len()];
            let mut clock = |i: usize, s: Instant| t[i] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            let r = frozen.router().route(&x, false)?;
            clock(0, s);
            let s = Instant::now();
            let p = plan_tokens(&r.experts, &r.weights, &cfg)?;
            clock(1, s);
            let s = Instant::now();
            let w = r.weights.flatten_all()?.to_vec1::<f32>()?;
            let out = zeros_for_combine(sh().tokens, sh().h, DType::F32)?;
            clock(5, s);
            let mut at = 0;
            for (e, &n) in frozen.experts().experts().iter().zip(&p.counts) {
                let rows = &p.token[at..at + n];
                let s = Instant::now();
                let xi = x.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?;
                clock(2, s);
                let s = Instant::now();
                let (a, b) = (e.w1.forward(&xi)?, e.w3.forward(&xi)?);
                clock(3, s);
                let s = Instant::now();
                candle_parallel::ops::swiglu_in_place(&a, &b)?;
                clock(4, s);
                let s = Instant::now();
                let y = e.w2.forward(&a)?;
                clock(3, s);
                let s = Instant::now();
                let wj: Vec<f64> = p.assignment[at..at + n]
                    .iter()
                    .map(|&k| w[k as usize] as f64)
                    .collect();
                combine_into(&out, &y, &wj, rows)?;
                clock(5, s);
                at += n;
            }
            std::hint::black_box(out);
            if rep > 0 {
                for (f, t) in fwd.iter_mut().zip(t) {
                    f.0.push(t);
                }
                total.0.push(t.iter().sum());
            }
        }

        // Backward: each phase alone, on trainable inputs taken from the layer's own run.
        let trained = layer(
            ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu).trainable(),
            ctx.comm(),
            ctx.comm(),
        )?;
        let xv = Var::from_tensor(&x)?;
        let r = trained.router().route(&x, false)?;
        let p = plan_tokens(&r.experts, &r.weights, &cfg)?;
        let mut segments = Vec::new();
        let mut at = 0;
        for (e, &n) in trained.experts().experts().iter().zip(&p.counts) {
            let rows = Tensor::new(&p.token[at..at + n], &Device::Cpu)?;
            let xi = x.index_select(&rows, 0)?;
            let (a, b) = (e.w1.forward(&xi)?.detach(), e.w3.forward(&xi)?.detach());
            let h = candle_parallel::ops::swiglu(&a, &b)?;
            segments.push((
                rows,
                Var::from_tensor(&xi)?,
                Var::from_tensor(&a)?,
                Var::from_tensor(&b)?,
                Var::from_tensor(&h)?,
            ));
            at += n;
        }
        let y = Var::from_tensor(&trained.experts().forward_rows(&x, &p.token, &p.counts)?)?;
        let wv = Var::from_tensor(&r.weights.detach())?;
        let experts = trained.experts().experts();
        let alone: [&dyn Fn() -> Result<Vec<Tensor>>; NAMES.len()] = [
            &|| Ok(vec![trained.router().route(xv.as_tensor(), true)?.weights]),
            &|| Ok(vec![]),
            &|| {
                segments
                    .iter()
                    .map(|s| xv.as_tensor().index_select(&s.0, 0))
                    .collect()
            },
            &|| {
                let mut v = Vec::new();
                for (e, s) in experts.iter().zip(&segments) {
                    v.push(e.w1.forward(s.1.as_tensor())?);
                    v.push(e.w3.forward(s.1.as_tensor())?);
                    v.push(e.w2.forward(s.4.as_tensor())?);
                }
                Ok(v)
            },
            &|| {
                segments
                    .iter()
                    .map(|s| candle_parallel::ops::swiglu(s.2.as_tensor(), s.3.as_tensor()))
                    .collect()
            },
            &|| {
                Ok(vec![combine_outputs(
                    y.as_tensor(),
                    wv.as_tensor(),
                    &p.assignment,
                    &p.token,
                    sh().tokens,
                )?])
            },
        ];
        let mut out = Vec::new();
        for ((name, f), fwd) in NAMES.iter().zip(alone).zip(fwd) {
            let only = time(reps, || f().map(|t| drop(std::hint::black_box(t))))?;
            let both = time(reps, || {
                let outs = f()?;
                if !outs.is_empty() {
                    let sum = outs
                        .iter()
                        .map(|t| t.sum_all())
                        .reduce(|a, b| a? + b?)
                        .expect("not empty")?;
                    std::hint::black_box(ops::backward(&sum)?);
                }
                Ok(())
            })?;
            out.push(Phase {
                name,
                fwd,
                bwd: both.minus(&only),
            });
        }
        Ok((out, total))
    })?;
    Ok(phases.into_iter().next().expect("rank 0"))
}

/// Runs the PyTorch script; its forward and forward + backward timings.
fn torch_times(python: &Path, reps: usize, experts: &str) -> Result<(Times, Times, String)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_moe_torch.py");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let out = std::process::Command::new(python)
        .arg(&script)
        .args([
            "--tokens",
            &sh().tokens.to_string(),
            "--batch",
            &sh().b.to_string(),
        ])
        .args([
            "--hidden",
            &sh().h.to_string(),
            "--ffn",
            &sh().f.to_string(),
        ])
        .args([
            "--experts",
            &sh().e.to_string(),
            "--top-k",
            &sh().k.to_string(),
        ])
        .args(["--family", sh().family, "--experts-impl", experts])
        .args([
            "--threads",
            &threads.to_string(),
            "--reps",
            &reps.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| candle_core::Error::msg(format!("cannot run {}: {e}", python.display())))?;
    if !out.status.success() {
        candle_core::bail!(
            "{} {} failed: {}",
            python.display(),
            script.display(),
            out.status
        )
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(candle_core::Error::wrap)?;
    let times = |k: &str| -> Result<Times> {
        let v = json[k].as_array().ok_or_else(|| {
            candle_core::Error::msg(format!("the PyTorch script printed no {k:?}"))
        })?;
        Ok(Times(v.iter().filter_map(|x| x.as_f64()).collect()))
    };
    let version = format!(
        "torch {}, transformers {}, experts {}, {} threads",
        json["torch"].as_str().unwrap_or("?"),
        json["transformers"].as_str().unwrap_or("?"),
        json["experts_impl"].as_str().unwrap_or("?"),
        json["threads"]
    );
    Ok((times("forward_s")?, times("forward_backward_s")?, version))
}

/// The one-layer Mixtral forward, ours and candle-transformers'.
fn mixtral_times(dir: &Path, reps: usize) -> Result<(Times, Times)> {
    let cfg = config();
    let ids = Tensor::new(
        (0..sh().tokens)
            .map(|i| (i * 7 % 256) as u32)
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )?
    .reshape((sh().b, sh().s))?;
    let ours = Launcher::new(1).run(|ctx| {
        let vb = ParallelVarBuilder::from_hf_dir(dir, DType::F32, &Device::Cpu)?;
        let m = Mixtral::new(&cfg, vb, ctx.comm(), ctx.comm(), Dispatch::AllToAll)?;
        time(reps, || m.forward_shard(&ids, 0, None, false).map(|_| ()))
    })?;
    let theirs = {
        use candle_transformers::models::mixtral as ct;
        let mut json = serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?;
        json["use_flash_attn"] = serde_json::json!(false);
        let ct_cfg: ct::Config = serde_json::from_value(json).map_err(candle_core::Error::wrap)?;
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )?
        };
        // Its model keeps a KV cache across calls and cannot clear it: a fresh one per run
        // (built outside the timed region).
        let mut t = Vec::new();
        for i in 0..=reps {
            let mut m = ct::Model::new(&ct_cfg, vb.clone())?;
            let s = Instant::now();
            std::hint::black_box(m.forward(&ids, 0)?);
            if i > 0 {
                t.push(s.elapsed().as_secs_f64());
            }
        }
        Times(t)
    };
    Ok((ours.into_iter().next().expect("rank 0"), theirs))
}

fn row(what: &str, t: &Times, ratio: &str) {
    let m = t.median();
    println!(
        "| {what} | {:.0} | {} | {:.0} | {ratio} |",
        m * 1e3,
        t.spread(),
        sh().tokens as f64 / m
    );
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.reps == 0 {
        candle_core::bail!("--reps must be at least 1")
    }
    SHAPE.set(a.shape.shape()).expect("the shape is set once");
    // The one-layer model against candle-transformers' is Mixtral's (our models do not read
    // Qwen3-MoE checkpoints yet).
    let whole_model = a.shape == ShapeName::Mixtral;
    if whole_model && !a.dir.join("config.json").exists() {
        eprintln!(
            "creating a random one-layer Mixtral checkpoint in {} (once)",
            a.dir.display()
        );
        write_random_mixtral(&a.dir, &config(), 0)?;
    }
    let (f1, b1, gflops, gflops_b) = layer_times(1, a.reps)?;
    let torch = a
        .torch
        .as_ref()
        .map(|p| torch_times(p, a.reps, &a.torch_experts))
        .transpose()?;
    let (f2, b2, _, _) = layer_times(2, a.reps)?;
    let (phases, in_situ) = phase_times(a.reps)?;
    let models = whole_model
        .then(|| mixtral_times(&a.dir, a.reps))
        .transpose()?;

    // Forward FLOPs: three matmuls of 2·H·F per routed copy, K copies per token.
    let flops_per_token = (3 * 2 * sh().h * sh().f * sh().k) as f64;
    let ceiling = gflops.median() * 1e9 / flops_per_token;
    println!(
        "MoE ({:?}): {} experts, top-{}, hidden {}, ffn {}, {} tokens, f32; medians of {} runs (spread min–max)",
        a.shape,
        sh().e,
        sh().k,
        sh().h,
        sh().f,
        sh().tokens,
        a.reps
    );
    println!(
        "matmul ceiling: {:.0} GFLOP/s on one expert's shapes → {ceiling:.0} tokens/s forward, {:.0} forward + backward",
        gflops.median(),
        ceiling / 3.0
    );
    println!();
    println!("| what | median (ms) | spread (ms) | tokens/s | ratio |");
    println!("|---|---:|---:|---:|---:|");
    let of_ceiling =
        |t: &Times, c: f64| format!("{:.2} of ceiling", sh().tokens as f64 / t.median() / c);
    // Ours against the ceiling of the same repetition, then the median of those ratios.
    let per_rep = |t: &Times, gflops: &Times, share: f64| {
        let r = Times(
            t.0.iter()
                .zip(&gflops.0)
                .map(|(s, g)| sh().tokens as f64 / s / (g * 1e9 / flops_per_token * share))
                .collect(),
        );
        let (lo, hi) = (
            r.0.iter().copied().fold(f64::INFINITY, f64::min),
            r.0.iter().copied().fold(0.0, f64::max),
        );
        format!("{:.2} of ceiling ({lo:.2}–{hi:.2})", r.median())
    };
    row(
        "our MoE layer, forward, ep=1",
        &f1,
        &per_rep(&f1, &gflops, 1.0),
    );
    row(
        "our MoE layer, forward + backward, ep=1",
        &b1,
        &per_rep(&b1, &gflops_b, 1.0 / 3.0),
    );
    if let Some((tf, tb, version)) = &torch {
        row(
            &format!("PyTorch {}, forward ({version})", sh().hf_block),
            tf,
            &format!(
                "{} · ours {:.2}× its tokens/s",
                of_ceiling(tf, ceiling),
                tf.median() / f1.median()
            ),
        );
        row(
            &format!("PyTorch {}, forward + backward", sh().hf_block),
            tb,
            &format!(
                "{} · ours {:.2}× its tokens/s",
                of_ceiling(tb, ceiling / 3.0),
                tb.median() / b1.median()
            ),
        );
    }
    row(
        "our MoE layer, forward, ep=2 (all-to-all, same cores)",
        &f2,
        &format!("{:.2} × ep=1 time", f2.median() / f1.median()),
    );
    row(
        "our MoE layer, forward + backward, ep=2",
        &b2,
        &format!("{:.2} × ep=1 time", b2.median() / b1.median()),
    );
    if let Some((ours, theirs)) = &models {
        row(
            "1-layer Mixtral forward, candle-transformers",
            theirs,
            "1.00",
        );
        row(
            "1-layer Mixtral forward, ours (ep=1, tp=1)",
            ours,
            &format!(
                "{:.2} × candle-transformers' time",
                ours.median() / theirs.median()
            ),
        );
    }

    println!();
    println!(
        "Where the layer's time goes (ep=1; forward: the inference layer's steps timed where they \
         run, share of their sum; backward: each phase alone, share of the layer's forward + backward):"
    );
    println!();
    println!("| phase | forward (ms) | share | backward (ms) | share |");
    println!("|---|---:|---:|---:|---:|");
    for p in &phases {
        println!(
            "| {} | {:.1} | {:.1}% | {:.1} | {:.1}% |",
            p.name,
            p.fwd.median() * 1e3,
            100.0 * p.fwd.median() / in_situ.median(),
            p.bwd.median() * 1e3,
            100.0 * p.bwd.median() / b1.median()
        );
    }
    // Per repetition: everything but the matmuls, as a share of the forward.
    let matmuls = &phases
        .iter()
        .find(|p| p.name.starts_with("expert matmuls"))
        .expect("a matmul phase")
        .fwd;
    let other = Times(
        in_situ
            .0
            .iter()
            .zip(&matmuls.0)
            .map(|(t, m)| 1.0 - m / t)
            .collect(),
    );
    println!();
    println!(
        "Forward in situ: {:.1} ms (the layer's forward measured whole: {:.1} ms), of which the \
         expert matmuls {:.1} ms: everything else is {:.1}% of it (median over the repetitions, \
         {:.1}–{:.1}%; goal ≤ 5%).",
        in_situ.median() * 1e3,
        f1.median() * 1e3,
        matmuls.median() * 1e3,
        100.0 * other.median(),
        100.0 * other.0.iter().copied().fold(f64::INFINITY, f64::min),
        100.0 * other.0.iter().copied().fold(0.0, f64::max),
    );
    Ok(())
}
