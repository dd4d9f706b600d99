//! Which layout fits, and how fast: the planner over a model's `config.json` (no weights read)
//! and a cluster.
//!
//! ```sh
//! cargo run --release --example plan -- --model config.json --devices 64 --device-memory 80 \
//!   --devices-per-node 8 --device h100 --global-batch 256 --seq-len 4096 --dtype bf16
//! cargo run --release --example plan -- --model config.json --devices 8 --lora-rank 16 \
//!   --layout dp=8,zero=2
//! ```
use candle_core::{bail, Result};
use candle_parallel_models::plan::{
    calibrate_cpu, enumerate, plan_layout, Cluster, DeviceSpec, Layout, ModelShape, Plan, Workload,
};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    about = "Rank the layouts (dp x pp x ep x tp, ZeRO, recomputation, micro-batches, schedule) that fit a model on a cluster, predicted from config.json"
)]
struct Args {
    /// A model directory (its config.json) or a config.json.
    #[arg(long)]
    model: PathBuf,
    /// Devices in all.
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// Devices per node (groups inside a node use its links).
    #[arg(long, default_value_t = 8)]
    devices_per_node: usize,
    /// h100, a100, or cpu (this machine, calibrated in a few seconds).
    #[arg(long, default_value = "h100")]
    device: String,
    /// Memory per device in GB (default: the device's).
    #[arg(long)]
    device_memory: Option<f64>,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 256)]
    global_batch: usize,
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    /// bf16 (with f32 master weights) or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Train LoRA adapters of this rank instead of every weight.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Evaluate this layout only, e.g. dp=4,ep=2,zero=3,recompute=full.
    #[arg(long)]
    layout: Option<String>,
    /// Every figure of every plan as JSON.
    #[arg(long)]
    json: bool,
    /// How many layouts the table shows.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Draw memory and step time per kind for the top layouts.
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn main() -> Result<()> {
    run(&Args::parse())
}

fn run(a: &Args) -> Result<()> {
    let path = if a.model.is_dir() {
        a.model.join("config.json")
    } else {
        a.model.clone()
    };
    // The directory that holds the weights beside the config.
    let model_dir = path
        .parent()
        .map_or(PathBuf::from("."), |p| p.to_path_buf());
    let text = std::fs::read_to_string(&path)
        .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", path.display())))?;
    let model = ModelShape::from_config_str(&text)?;
    let mut device = match a.device.as_str() {
        "cpu" => {
            let d = calibrate_cpu(a.devices)?;
            eprintln!(
                "calibrated: {:.1} GFLOP/s per rank with {} busy ({:.1}× that alone), elementwise {:.1} GB/s per rank, all-reduce {:.1} GB/s per rank, {}, {:.1} GB per rank",
                d.peak_flops_32 / 1e9,
                a.devices,
                d.alone_speedup,
                d.memory_bw / 1e9,
                d.collective_bw / 1e9,
                match d.intra_node_bw {
                    bw if bw >= 1e17 => "no link dialled (CANDLE_PARALLEL_LINK)".to_string(),
                    bw => format!("a dialled link of {:.2} GB/s per rank", bw / 1e9),
                },
                d.memory_bytes / 1e9
            );
            d
        }
        name => DeviceSpec::named(name)?,
    };
    if let Some(gb) = a.device_memory {
        device.memory_bytes = gb * 1e9;
    }
    let dtype_bytes = match a.dtype.as_str() {
        "bf16" | "f16" => 2,
        "f32" => 4,
        other => bail!("--dtype {other}: use bf16 or f32"),
    };
    let cluster = Cluster::new(device, a.devices, a.devices_per_node)?;
    let work = Workload {
        global_batch: a.global_batch,
        seq: a.seq_len,
        dtype_bytes,
        lora_rank: a.lora_rank,
    };
    let (plans, rejected) = match &a.layout {
        Some(l) => (
            vec![plan_layout(&model, &work, &cluster, &Layout::parse(l)?)?],
            vec![],
        ),
        None => enumerate(&model, &work, &cluster),
    };
    if a.json {
        let out = serde_json::json!({
            "model": model,
            "cluster": cluster,
            "workload": work,
            "plans": plans,
            "rejected": rejected.iter().map(|(l, why)| serde_json::json!({"layout": l, "why": why})).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(candle_core::Error::msg)?
        );
        return Ok(());
    }
    println!(
        "{} ({} layers, {:.2} B parameters, {:.2} B active per token) on {} × {} ({:.0} GB each, {} per node); {} sequences × {} tokens per step, {}{}",
        model.family,
        model.layers,
        model.params() as f64 / 1e9,
        model.active_params() as f64 / 1e9,
        cluster.devices,
        cluster.device.name,
        cluster.device.memory_bytes / 1e9,
        cluster.per_node,
        work.global_batch,
        work.seq,
        a.dtype,
        a.lora_rank.map_or(String::new(), |r| format!(", LoRA rank {r}"))
    );
    table(&plans[..plans.len().min(a.top)]);
    let fitting = plans.iter().filter(|p| p.fits).count();
    println!(
        "\n{} layouts evaluated: {fitting} fit; {} do not fit; {} do not divide the model or the batch.",
        plans.len() + rejected.len(),
        plans.len() - fitting,
        rejected.len()
    );
    if let Some(p) = plans.iter().find(|p| !p.fits) {
        println!(
            "Closest that does not fit: {} ({})",
            p.layout,
            p.why_not.clone().unwrap_or_default()
        );
    }
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for (_, why) in &rejected {
        match reasons.iter_mut().find(|(w, _)| w == why) {
            Some(r) => r.1 += 1,
            None => reasons.push((why.clone(), 1)),
        }
    }
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    for (why, n) in reasons.iter().take(5) {
        println!("  {n} × {why}");
    }
    match plans.iter().find(|p| p.fits) {
        Some(best) => println!(
            "\nRun the best:\n  cargo run --release --example finetune_mixtral -- --model {} {} --batch-size {} --seq-len {} --dtype {}{}",
            model_dir.display(),
            best.layout.flags(),
            work.global_batch,
            work.seq,
            a.dtype,
            a.lora_rank
                .map_or(String::new(), |r| format!(" --lora-rank {r}"))
        ),
        None => {
            println!("\nNo layout fits: more devices, LoRA (--lora-rank), or a shorter sequence.")
        }
    }
    if let Some(svg) = &a.svg {
        let top: Vec<&Plan> = plans.iter().filter(|p| p.fits).take(a.top.min(8)).collect();
        std::fs::write(svg, picture(&top, cluster.device.memory_bytes))
            .map_err(|e| candle_core::Error::msg(format!("cannot write {}: {e}", svg.display())))?;
        println!("Picture: {}", svg.display());
    }
    Ok(())
}

fn table(plans: &[Plan]) {
    println!("\n| layout | fits | GB/rank | params | grads | optim | activ. | buffers | step s | compute | tp | ep | dp (exposed) | pp | bubble | optimizer | tokens/s | MFU |");
    println!(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in plans {
        let memory: Vec<String> = p
            .memory
            .kinds()
            .iter()
            .map(|b| format!("{:.1}", b / 1e9))
            .collect();
        let time: Vec<String> = p.time.kinds().iter().map(|s| format!("{s:.3}")).collect();
        println!(
            "| {} | {} | {:.1} | {} | {:.3} | {} | {:.0} | {:.1}% |",
            p.layout,
            if p.fits { "yes" } else { "no" },
            p.memory.peak_bytes_per_rank / 1e9,
            memory.join(" | "),
            p.time.step,
            time.join(" | "),
            p.tokens_per_s,
            100.0 * p.mfu
        );
    }
}

/// Bars per layout: memory per rank stacked by kind, and step time stacked by kind.
fn picture(plans: &[&Plan], device_memory: f64) -> String {
    let (w, row_h, left) = (1000.0, 54.0, 350.0);
    let h = 60.0 + row_h * plans.len() as f64 + 50.0;
    let half = (w - left - 40.0) / 2.0;
    let max_mem = plans
        .iter()
        .map(|p| p.memory.peak_bytes_per_rank)
        .fold(device_memory, f64::max);
    let max_t = plans.iter().map(|p| p.time.step).fold(1e-12, f64::max);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<text x="10" y="18" font-size="14">Memory per rank (left, GB; the line: the device) and step time (right, s) by kind</text>
"#
    );
    let mem_kinds = [
        "parameters",
        "gradients",
        "optimizer",
        "activations",
        "buffers",
    ];
    let time_kinds = ["compute", "tp", "ep", "dp", "pp", "bubble", "optimizer"];
    let colors = [
        "#4f81bd", "#c0504d", "#9bbb59", "#8064a2", "#f79646", "#4bacc6", "#7f7f7f",
    ];
    for (i, p) in plans.iter().enumerate() {
        let y = 40.0 + row_h * i as f64;
        let l = &p.layout;
        let label = format!(
            "dp{} pp{} ep{} tp{} · ZeRO {} · {} · mb {}{}",
            l.dp,
            l.pp,
            l.ep,
            l.tp,
            l.zero,
            l.recompute,
            l.micro_batches,
            if l.pp > 1 {
                format!(" · {}", l.schedule)
            } else {
                String::new()
            }
        );
        svg += &format!(r#"<text x="10" y="{}">{label}</text>"#, y + 20.0);
        let mut x = left;
        for (j, v) in p.memory.kinds().iter().enumerate() {
            let bw = v / max_mem * half;
            svg += &format!(
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="30" fill="{}"/>"#,
                colors[j]
            );
            x += bw;
        }
        let mut x = left + half + 20.0;
        for (j, v) in p.time.kinds().iter().enumerate() {
            let bw = v / max_t * (half - 20.0);
            svg += &format!(
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="30" fill="{}"/>"#,
                colors[j]
            );
            x += bw;
        }
    }
    let line = left + device_memory / max_mem * half;
    svg += &format!(
        r#"<line x1="{line:.1}" y1="35" x2="{line:.1}" y2="{:.1}" stroke="black" stroke-dasharray="4,3"/>"#,
        40.0 + row_h * plans.len() as f64
    );
    let ly = h - 30.0;
    for (j, k) in mem_kinds.iter().enumerate() {
        let x = 10.0 + 85.0 * j as f64;
        svg += &format!(
            r#"<rect x="{x}" y="{ly}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{k}</text>"#,
            colors[j],
            x + 13.0,
            ly + 9.0
        );
    }
    for (j, k) in time_kinds.iter().enumerate() {
        let x = 470.0 + 68.0 * j as f64;
        svg += &format!(
            r#"<rect x="{x}" y="{ly}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{k}</text>"#,
            colors[j],
            x + 13.0,
            ly + 9.0
        );
    }
    svg + "</svg>\n"
}
