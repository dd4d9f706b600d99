//! Column- and row-parallel linear layers (Megatron-LM), drop-in for `candle_nn::Linear`.

use crate::checkpoint::{ParallelVarBuilder, Placement};
use crate::comm::Comm;
use crate::lora::{adapter, Kind, LoraAdapter};
use crate::ops;
use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::{Init, Linear};

/// candle-nn's `linear` weight initialisation (Kaiming normal).
pub fn linear_weight_init() -> Init {
    candle_nn::init::DEFAULT_KAIMING_NORMAL
}

/// candle-nn's `linear` bias initialisation: uniform in ±1/√in_dim.
pub fn linear_bias_init(in_dim: usize) -> Init {
    let bound = 1.0 / (in_dim as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `x · wᵀ + b` (`ops::linear`: the weight's gradient arrives in its own layout).
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = ops::linear(x, w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn check_divisible(
    layer: &str,
    what: &str,
    size: usize,
    tp: &Comm,
    vb: &ParallelVarBuilder,
) -> Result<()> {
    if !size.is_multiple_of(tp.size()) {
        bail!(
            "{layer} {}: {what} {size} is not divisible by the tensor-parallel size {} (rank {} of {}): \
             choose a tp that divides {size}",
            vb.full_name("weight"),
            tp.size(),
            tp.rank(),
            tp.label()
        )
    }
    Ok(())
}

/// `y = x Wᵀ + b` with `W` (`[out, in]`) split along the output dim: rank `r` holds rows
/// `r·out/tp ..`, so its output is its slice of the features. The input is replicated
/// (`copy_to_group`: its gradient is summed over the group), or, with sequence parallelism,
/// split along the sequence and all-gathered first.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_parallel::checkpoint::ParallelVarBuilder;
/// use candle_parallel::{launch, tensor_parallel::column_parallel_linear};
///
/// let outs = launch(2, |ctx| {
///     let vb = ParallelVarBuilder::from_init(0, DType::F32, &Device::Cpu);
///     let layer = column_parallel_linear(4, 6, vb.pp("fc"), ctx.comm())?.with_gather_output(true);
///     layer.forward(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?)
/// })?;
/// assert_eq!(outs[0].dims(), &[3, 6]); // gathered: the full output on every rank
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ColumnParallelLinear {
    linear: Linear,
    tp: Comm,
    gather_output: bool,
    sequence_dim: Option<usize>,
    weight_group: Option<Comm>,
    external_comm: bool,
    lora: Option<LoraAdapter>,
}

impl ColumnParallelLinear {
    /// Wraps this rank's weight slice `[out/tp, in]` (and bias slice `[out/tp]`).
    pub fn new(weight: Tensor, bias: Option<Tensor>, tp: &Comm) -> Self {
        Self {
            linear: Linear::new(weight, bias),
            tp: tp.clone(),
            gather_output: false,
            sequence_dim: None,
            weight_group: None,
            external_comm: false,
            lora: None,
        }
    }

    /// A LoRA adapter added to the output ([`crate::lora`]).
    pub fn with_lora(mut self, lora: Option<LoraAdapter>) -> Self {
        self.lora = lora;
        self
    }

    /// The LoRA adapter, if any.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// All-gather the output so every rank gets all `out` features (default: keep the slice,
    /// as the input of a row-parallel layer wants).
    pub fn with_gather_output(mut self, gather: bool) -> Self {
        self.gather_output = gather;
        self
    }

    /// Sequence parallelism: the input is split along `dim` (the sequence) across the group and
    /// is all-gathered before the matmul; its gradient is reduce-scattered back.
    pub fn with_sequence_parallel(mut self, dim: Option<usize>) -> Self {
        self.sequence_dim = dim;
        self
    }

    /// Whether the layer is its weight and nothing else: no bias, adapter or weight group,
    /// its communication done by the caller (an expert's gate and up projections), so that
    /// `x · wᵀ` is all its forward computes.
    pub(crate) fn is_bare(&self) -> bool {
        self.external_comm
            && self.weight_group.is_none()
            && self.lora.is_none()
            && self.linear.bias().is_none()
    }

    /// Ranks of `group` hold the same weight slice (a key/value head replicated because tp
    /// exceeds the number of KV heads): their weight gradients are summed over it.
    pub fn with_weight_group(mut self, group: Option<Comm>) -> Self {
        self.weight_group = group;
        self
    }

    /// The caller does the group's communication: the input is taken as already copied to the
    /// group (no `copy_to_group`, nor the all-gather of sequence parallelism) and the output
    /// is never gathered. MoE experts use this: the layer copies all routed tokens to the
    /// group once and reduces every expert's output at once, instead of one collective per
    /// expert.
    pub fn with_external_communication(mut self, external: bool) -> Self {
        self.external_comm = external;
        self
    }

    /// This rank's weight slice.
    pub fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    /// This rank's bias slice.
    pub fn bias(&self) -> Option<&Tensor> {
        self.linear.bias()
    }
}

impl Module for ColumnParallelLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.sequence_dim {
            _ if self.external_comm => x.clone(),
            Some(dim) => ops::all_gather_to_group(x, dim, &self.tp)?,
            None => ops::copy_to_group(x, &self.tp)?,
        };
        let y = match &self.weight_group {
            Some(g) => {
                let w = ops::copy_to_group(self.linear.weight(), g)?;
                let b = self
                    .linear
                    .bias()
                    .map(|b| ops::copy_to_group(b, g))
                    .transpose()?;
                affine(&x, &w, b.as_ref())?
            }
            None => affine(&x, self.linear.weight(), self.linear.bias())?,
        };
        let y = match &self.lora {
            Some(l) => (y + l.column(&x)?)?,
            None => y,
        };
        if self.gather_output && !self.external_comm {
            ops::gather_from_group(&y, D::Minus1, &self.tp)
        } else {
            Ok(y)
        }
    }
}

fn column(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: ParallelVarBuilder,
    tp: &Comm,
) -> Result<ColumnParallelLinear> {
    check_divisible("column_parallel_linear", "out_dim", out_dim, tp, &vb)?;
    let shard = Placement::split_over(0, tp);
    let w = vb.get((out_dim, in_dim), "weight", shard, linear_weight_init())?;
    let b = if bias {
        Some(vb.get(out_dim, "bias", shard, linear_bias_init(in_dim))?)
    } else {
        None
    };
    let lora = adapter(&vb, in_dim, out_dim, Kind::Column, shard, None, tp)?;
    Ok(ColumnParallelLinear::new(w, b, tp).with_lora(lora))
}

/// A column-parallel twin of `candle_nn::linear(in_dim, out_dim, vb)`: this rank holds
/// `out_dim / tp` output features (from the checkpoint, or the slice of the unsharded
/// initialisation).
pub fn column_parallel_linear(
    in_dim: usize,
    out_dim: usize,
    vb: ParallelVarBuilder,
    tp: &Comm,
) -> Result<ColumnParallelLinear> {
    column(in_dim, out_dim, true, vb, tp)
}

/// [`column_parallel_linear`] without a bias.
pub fn column_parallel_linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: ParallelVarBuilder,
    tp: &Comm,
) -> Result<ColumnParallelLinear> {
    column(in_dim, out_dim, false, vb, tp)
}

/// `y = x Wᵀ + b` with `W` (`[out, in]`) split along the input dim: the input arrives split
/// (the output of a column-parallel layer), each rank computes a partial product, one
/// all-reduce sums them (`reduce_from_group`), and the bias is added once, after the reduce.
/// With sequence parallelism the sum is reduce-scattered along the sequence instead.
#[derive(Clone, Debug)]
pub struct RowParallelLinear {
    linear: Linear,
    bias: Option<Tensor>,
    tp: Comm,
    input_is_parallel: bool,
    sequence_dim: Option<usize>,
    external_comm: bool,
    lora: Option<LoraAdapter>,
}

impl RowParallelLinear {
    /// Wraps this rank's weight slice `[out, in/tp]` and the (replicated) bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, tp: &Comm) -> Self {
        Self {
            linear: Linear::new(weight, None),
            bias,
            tp: tp.clone(),
            input_is_parallel: true,
            sequence_dim: None,
            external_comm: false,
            lora: None,
        }
    }

    /// A LoRA adapter added to the output ([`crate::lora`]).
    pub fn with_lora(mut self, lora: Option<LoraAdapter>) -> Self {
        self.lora = lora;
        self
    }

    /// The LoRA adapter, if any.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// The rank's partial product, its adapter's columns added (reduced over tp after).
    fn partial(&self, x: &Tensor) -> Result<Tensor> {
        let lora = self.lora.as_ref().map(|l| (l.a(), l.b()));
        self.partial_with(x, self.linear.weight(), lora)
    }

    /// [`Self::partial`] computed with `weight` and the adapter's `(A, B)` given (the same
    /// values, e.g. as a checkpoint's inputs).
    /// The layer's settings with empty tensors for its weights, for [`Self::partial_with`]
    /// in a recomputation that must not hold the weights (they may be released: see
    /// `ops::released`).
    pub(crate) fn settings_only(&self) -> Result<Self> {
        let empty = Tensor::zeros(0, self.weight().dtype(), self.weight().device())?;
        Ok(Self {
            linear: Linear::new(empty.clone(), None),
            lora: self.lora.as_ref().map(|l| l.with_weights(&empty, &empty)),
            ..self.clone()
        })
    }

    pub(crate) fn partial_with(
        &self,
        x: &Tensor,
        weight: &Tensor,
        lora: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let y = ops::linear(x, weight)?;
        match (&self.lora, lora) {
            (Some(l), Some((a, b))) => y + l.with_weights(a, b).row(x, weight.dim(0)?)?,
            _ => Ok(y),
        }
    }

    /// When `false`, the input is replicated and each rank takes its slice of the features
    /// first (`scatter_to_group`). Default `true`.
    pub fn with_input_is_parallel(mut self, parallel: bool) -> Self {
        self.input_is_parallel = parallel;
        self
    }

    /// Sequence parallelism: reduce-scatter the output along `dim` instead of all-reducing it.
    pub fn with_sequence_parallel(mut self, dim: Option<usize>) -> Self {
        self.sequence_dim = dim;
        self
    }

    /// The caller does the group's communication: the input is taken as already split (no
    /// scatter, whatever `with_input_is_parallel` says) and the output is this rank's partial
    /// product, neither reduced nor reduce-scattered over the group (the caller reduces it,
    /// e.g. every MoE expert's output at once). A layer with a bias cannot do this: the bias
    /// belongs after the reduction.
    pub fn with_external_communication(mut self, external: bool) -> Self {
        self.external_comm = external;
        self
    }

    /// This rank's weight slice.
    pub fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    /// The bias (replicated).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for RowParallelLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.external_comm {
            if self.bias.is_some() {
                bail!(
                    "row_parallel_linear with external communication (rank {} of {}): the layer has \
                     a bias, which must be added after the reduction; build it without a bias",
                    self.tp.rank(),
                    self.tp.label()
                )
            }
            return self.partial(x);
        }
        let x = if self.input_is_parallel {
            x.clone()
        } else {
            ops::scatter_to_group(x, D::Minus1, &self.tp)?
        };
        let partial = self.partial(&x)?;
        let (y, bias) = match self.sequence_dim {
            // The bias now meets only this rank's part of the sequence: sum its gradient
            // over the group.
            Some(dim) => (
                ops::reduce_scatter_to_group(&partial, dim, &self.tp)?,
                self.bias
                    .as_ref()
                    .map(|b| ops::copy_to_group(b, &self.tp))
                    .transpose()?,
            ),
            None => (
                ops::reduce_from_group(&partial, &self.tp)?,
                self.bias.clone(),
            ),
        };
        match bias {
            Some(b) => y.broadcast_add(&b),
            None => Ok(y),
        }
    }
}

fn row(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: ParallelVarBuilder,
    tp: &Comm,
) -> Result<RowParallelLinear> {
    check_divisible("row_parallel_linear", "in_dim", in_dim, tp, &vb)?;
    let shard = Placement::split_over(1, tp);
    let w = vb.get((out_dim, in_dim), "weight", shard, linear_weight_init())?;
    let b = if bias {
        Some(vb.get(
            out_dim,
            "bias",
            Placement::Replicated,
            linear_bias_init(in_dim),
        )?)
    } else {
        None
    };
    let lora = adapter(&vb, in_dim, out_dim, Kind::Row, shard, None, tp)?;
    Ok(RowParallelLinear::new(w, b, tp).with_lora(lora))
}

/// A row-parallel twin of `candle_nn::linear(in_dim, out_dim, vb)`: this rank holds `in_dim / tp`
/// input features; the bias is replicated.
pub fn row_parallel_linear(
    in_dim: usize,
    out_dim: usize,
    vb: ParallelVarBuilder,
    tp: &Comm,
) -> Result<RowParallelLinear> {
    row(in_dim, out_dim, true, vb, tp)
}

/// [`row_parallel_linear`] without a bias.
pub fn row_parallel_linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: ParallelVarBuilder,
    tp: &Comm,
) -> Result<RowParallelLinear> {
    row(in_dim, out_dim, false, vb, tp)
}
