//! Starts the ranks of one node as processes, torchrun style.
//!
//! ```text
//! cargo build --release --example NAME
//! cargo run --release --example launch -- --nproc 4 -- NAME [ARGS...]
//! # two nodes of 8 GPUs, one launcher per node:
//! cargo run --release --example launch -- --nproc 8 --nnodes 2 --node-rank 0 \
//!     --master-addr 10.0.0.1 --master-port 29500 -- NAME [ARGS...]
//! ```
//!
//! Each process gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; its
//! output comes back prefixed with `[rank R]`; if one exits with an error, the others are
//! stopped and the launcher fails. `NAME` is an example built next to this launcher (in
//! `target/release/examples`) or a path to any program. A program joins the job with
//! `candle_parallel::launch::process::{ProcessEnv::from_env, rendezvous}`; the NCCL backend
//! (`--features nccl`) uses the rendezvous to share its unique id.
use candle_core::Result;
use candle_parallel::launch::process::{spawn_ranks, NodePlan};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Start the ranks of one node as processes")]
struct Args {
    /// Processes on this node.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// Machines (nodes) in the job.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0 to --nnodes − 1.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of the node whose rank 0 hands out the NCCL id (reachable from every node).
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// 0 picks a free port (single node only).
    #[arg(long, default_value_t = 0)]
    master_port: u16,
    /// The program (an example name or a path) and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let (name, rest) = a.command.split_first().expect("clap requires a command");
    let path = PathBuf::from(name);
    let program = if path.components().count() > 1 || path.is_file() {
        // A bare name would be looked up on PATH when started: `launch -- prog` means ./prog.
        std::path::absolute(&path)?
    } else {
        let sibling = std::env::current_exe()?.with_file_name(name);
        if !sibling.is_file() {
            candle_core::bail!(
                "no program {name}: build it first (cargo build --release --example {name}) or give a path"
            );
        }
        sibling
    };
    let plan = NodePlan {
        nproc: a.nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
    };
    spawn_ranks(&program, rest, &plan)
}
