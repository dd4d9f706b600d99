//! `mixtral`: the [`moe`](moe/main.rs) example under its first name (the same subcommands,
//! flags and outputs, for every sparse MoE family).
//!
//! ```text
//! cargo run --release --example mixtral -- eval --tokens 1,2,3 --tp 2 --ep 2 --out out.safetensors
//! ```
#[path = "moe/main.rs"]
mod moe;

fn main() -> candle_core::Result<()> {
    moe::main()
}
