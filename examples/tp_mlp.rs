//! A candle-nn MLP and its tensor-parallel twin, side by side, on the same weights and input:
//! outputs and gradients agree.
//!
//! ```text
//! cargo run --release --example tp_mlp             # tp = 2
//! cargo run --release --example tp_mlp -- --tp 4
//! ```
//!
//! The user-facing difference is the two constructors and the builder:
//!
//! ```text
//! - let up   = candle_nn::linear(HIDDEN, FFN, vb.pp("up"))?;
//! - let down = candle_nn::linear(FFN, HIDDEN, vb.pp("down"))?;
//! + let up   = column_parallel_linear(HIDDEN, FFN, vb.pp("up"), tp)?;
//! + let down = row_parallel_linear(FFN, HIDDEN, vb.pp("down"), tp)?;
//! ```
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_parallel::checkpoint::{full_gradients, ParallelVarBuilder};
use candle_parallel::tensor_parallel::{column_parallel_linear, row_parallel_linear};
use candle_parallel::{launch, Comm};
use candle_parallel_models::testing::{max_rel_err, seeded};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 2)]
    tp: usize,
}

const HIDDEN: usize = 64;
const FFN: usize = 256;

/// The model code, once for candle-nn ...
struct Mlp {
    up: candle_nn::Linear,
    down: candle_nn::Linear,
}

impl Mlp {
    fn new(vb: candle_nn::VarBuilder) -> Result<Self> {
        let up = candle_nn::linear(HIDDEN, FFN, vb.pp("up"))?;
        let down = candle_nn::linear(FFN, HIDDEN, vb.pp("down"))?;
        Ok(Self { up, down })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.gelu()?)
    }
}

/// ... and once tensor parallel: the same forward, sharded layers.
struct TpMlp {
    up: candle_parallel::tensor_parallel::ColumnParallelLinear,
    down: candle_parallel::tensor_parallel::RowParallelLinear,
}

impl TpMlp {
    fn new(vb: ParallelVarBuilder, tp: &Comm) -> Result<Self> {
        let up = column_parallel_linear(HIDDEN, FFN, vb.pp("up"), tp)?;
        let down = row_parallel_linear(FFN, HIDDEN, vb.pp("down"), tp)?;
        Ok(Self { up, down })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.gelu()?)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let x = seeded(&[8, HIDDEN], 1, DType::F32)?;

    // Tensor parallel: each rank builds its shard (the slice of the seeded initialisation).
    let ranks = launch(args.tp, |ctx| {
        let vb = ParallelVarBuilder::from_init(7, DType::F32, &Device::Cpu).trainable();
        let mlp = TpMlp::new(vb.clone(), ctx.comm())?;
        let xv = Var::from_tensor(&x)?;
        let y = mlp.forward(xv.as_tensor())?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        let gx = grads.get(xv.as_tensor()).unwrap().clone();
        Ok((y, gx, full_gradients(&vb.params(), &grads, ctx.comm())?))
    })?;
    let (y_tp, gx_tp, grads_tp) = &ranks[0];

    // Single device: candle-nn's MLP on the same (full) weights, through the builder's
    // candle-nn view (its parameters are recorded by name, as the sharded ones are).
    let vb = ParallelVarBuilder::from_init(7, DType::F32, &Device::Cpu).trainable();
    let mlp = Mlp::new(vb.to_candle_nn())?;
    let xv = Var::from_tensor(&x)?;
    let y = mlp.forward(xv.as_tensor())?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    let params = vb.params();

    println!(
        "candle-nn MLP vs tensor-parallel MLP at tp={} (max relative error)",
        args.tp
    );
    println!("  output          {:.1e}", max_rel_err(y_tp, &y)?);
    println!(
        "  grad input      {:.1e}",
        max_rel_err(gx_tp, grads.get(xv.as_tensor()).unwrap())?
    );
    let mut worst = 0f64;
    for ((name, g), p) in grads_tp.iter().zip(&params) {
        assert_eq!(name, &p.name);
        let e = max_rel_err(g, grads.get(p.var.as_tensor()).unwrap())?;
        println!("  grad {name:<12}{e:.1e}");
        worst = worst.max(e);
    }
    if worst > 1e-5 {
        candle_core::bail!("the tensor-parallel gradients differ by {worst:e}");
    }
    Ok(())
}
