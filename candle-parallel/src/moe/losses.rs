//! Auxiliary losses of MoE routing: load balancing (Hugging Face Mixtral's over all layers,
//! Switch / Megatron's per layer) and the router z-loss.

use crate::comm::{Comm, ReduceOp};
use crate::ops;
use candle_core::{bail, DType, Result, Tensor, D};

/// Over which tokens a training step's load-balancing loss counts each expert's load
/// (`--aux-scope`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AuxScope {
    /// The whole global batch: counts summed over every rank holding other tokens (dp, and ep
    /// with all-to-all dispatch) before the loss, so every layout computes Hugging Face's loss
    /// of the whole batch (Megatron-Core's `global_aux_loss`; [`hf_load_balancing_loss_over`]).
    #[default]
    Global,
    /// Each rank's own tokens (Megatron's default).
    Local,
}

impl std::fmt::Display for AuxScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Global => "global",
            Self::Local => "local",
        })
    }
}

impl std::str::FromStr for AuxScope {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "global" => Ok(Self::Global),
            "local" => Ok(Self::Local),
            other => bail!("unknown aux scope {other:?}: use global or local"),
        }
    }
}

/// Hugging Face Mixtral's `load_balancing_loss_func`: over the router logits of all layers
/// (each `[N, E]` for the same `N` tokens), `E · Σ_e f[e] · P[e]` with `f` the fraction of
/// top-k choices that are `e` and `P` the mean softmax probability. Unscaled (multiply by
/// `router_aux_loss_coef`). [`hf_load_balancing_loss_masked`] leaves padding out, as HF does
/// with an attention mask.
pub fn hf_load_balancing_loss(
    logits: &[Tensor],
    num_experts: usize,
    top_k: usize,
) -> Result<Tensor> {
    hf_load_balancing_loss_masked(logits, None, num_experts, top_k)
}

/// [`hf_load_balancing_loss`] over the tokens `mask` keeps (`[N]` or any shape of `N`
/// elements: 1 for a token, 0 for padding; HF's `attention_mask`), as HF computes it when
/// given an attention mask: the fractions and mean probabilities are over the kept tokens of
/// every layer.
pub fn hf_load_balancing_loss_masked(
    logits: &[Tensor],
    mask: Option<&Tensor>,
    num_experts: usize,
    top_k: usize,
) -> Result<Tensor> {
    hf_load_balancing_loss_over(logits, mask, num_experts, top_k, None)
}

/// [`hf_load_balancing_loss_masked`] over the whole batch that `batch` splits (its ranks hold
/// different tokens: dp, and ep with all-to-all dispatch; `None`: this rank's tokens only).
/// See [`hf_load_balancing_loss_of_token_sums_over`].
pub fn hf_load_balancing_loss_over(
    logits: &[Tensor],
    mask: Option<&Tensor>,
    num_experts: usize,
    top_k: usize,
    batch: Option<&Comm>,
) -> Result<Tensor> {
    let (p, f) = hf_load_balancing_token_sums(logits, num_experts, top_k)?;
    hf_load_balancing_loss_of_token_sums_over(&p, &f, mask, logits.len(), batch)
}

/// The per-token sums behind [`hf_load_balancing_loss`] over some of the layers (say, one
/// pipeline stage's): `(p, f)` with `p` (`[N, E]`, differentiable) each token's softmax
/// probabilities summed over the layers and `f` (`[N, k·E]`, constant) how many layers made
/// `e` the token's k-th choice. Sums over disjoint sets of layers add up (stages pass them
/// on); [`hf_load_balancing_loss_of_token_sums`] turns the totals into the loss, leaving out
/// padding only then, where the mask is known.
pub fn hf_load_balancing_token_sums(
    logits: &[Tensor],
    num_experts: usize,
    top_k: usize,
) -> Result<(Tensor, Tensor)> {
    let Some(first) = logits.first() else {
        bail!("hf_load_balancing_token_sums: no router logits")
    };
    let n = first.dim(0)?;
    let ids =
        Tensor::arange(0u32, num_experts as u32, first.device())?.reshape((1, 1, num_experts))?;
    let (mut p, mut f) = (None::<Tensor>, None::<Tensor>);
    for (i, l) in logits.iter().enumerate() {
        if l.dims() != [n, num_experts] {
            bail!(
                "hf_load_balancing_token_sums: router logits of layer {i} have shape {:?}, expected \
                 [{n}, {num_experts}] like the first layer's",
                l.dims()
            )
        }
        let probs = ops::softmax_last_dim(&l.to_dtype(DType::F32)?)?;
        let chosen = probs
            .detach()
            .arg_sort_last_dim(false)?
            .narrow(1, 0, top_k)?; // [N, k]
        let counts = chosen
            .unsqueeze(2)?
            .broadcast_eq(&ids)?
            .to_dtype(DType::F32)?
            .reshape((n, top_k * num_experts))?;
        p = Some(match p {
            Some(p) => (p + probs)?,
            None => probs,
        });
        f = Some(match f {
            Some(f) => (f + counts)?,
            None => counts,
        });
    }
    Ok((p.expect("a layer"), f.expect("a layer")))
}

/// [`hf_load_balancing_loss`] from the per-token sums `p` (`[N, E]`) and `f` (`[N, k·E]`) over
/// `layers` layers (see [`hf_load_balancing_token_sums`]), over the tokens `mask` keeps (see
/// [`hf_load_balancing_loss_masked`]; `None`: all).
pub fn hf_load_balancing_loss_of_token_sums(
    p: &Tensor,
    f: &Tensor,
    mask: Option<&Tensor>,
    layers: usize,
) -> Result<Tensor> {
    hf_load_balancing_loss_of_token_sums_over(p, f, mask, layers, None)
}

/// [`hf_load_balancing_loss_of_token_sums`] over the whole batch that `batch` splits (the
/// global-batch balance of Qiu et al. 2025, Megatron-Core's `global_aux_loss`): each expert's
/// choice counts, the probability sums and the token count are summed over `batch` before the
/// loss, so any layout computes Hugging Face's loss of the whole batch. What a rank returns is
/// its share of that loss (its own tokens' probabilities, differentiable, against the global
/// counts) times `batch`'s size, the convention of the gradients averaged over the replicas:
/// the ranks' values average to the global loss and their gradients to its gradient.
/// Collective over `batch`. `None`: this rank's tokens only (the local loss).
pub fn hf_load_balancing_loss_of_token_sums_over(
    p: &Tensor,
    f: &Tensor,
    mask: Option<&Tensor>,
    layers: usize,
    batch: Option<&Comm>,
) -> Result<Tensor> {
    let (n, num_experts) = p.dims2()?;
    if layers == 0 {
        bail!("hf_load_balancing_loss: sums over 0 layers")
    }
    let k = f.dim(1)? / num_experts.max(1);
    if f.dims() != [n, k * num_experts] || k == 0 {
        bail!(
            "hf_load_balancing_loss: choice counts of shape {:?} do not go with probabilities of \
             shape {:?} (expected [{n}, k · {num_experts}])",
            f.dims(),
            p.dims()
        )
    }
    let (p, f, kept) = match mask {
        None => (p.sum(0)?, f.sum(0)?, n as f64),
        Some(m) => {
            if m.elem_count() != n {
                bail!(
                    "hf_load_balancing_loss: an attention mask of shape {:?} for {n} tokens",
                    m.dims()
                )
            }
            let m = m.flatten_all()?.to_dtype(DType::F32)?.reshape((1, n))?;
            let kept = m.sum_all()?.to_scalar::<f32>()? as f64;
            // Over a batch group a rank without tokens still joins the sums (its peers wait
            // for it); the whole batch must keep one.
            if kept == 0.0 && batch.is_none_or(|c| c.size() < 2) {
                bail!("hf_load_balancing_loss: the attention mask keeps no token")
            }
            (m.matmul(p)?.squeeze(0)?, m.matmul(f)?.squeeze(0)?, kept)
        }
    };
    let (f, kept, replicas) = match batch.filter(|c| c.size() > 1) {
        None => (f.detach(), kept, 1.0),
        Some(c) => {
            // The counts and the kept tokens of every rank; the probabilities stay local (their
            // gradient is this rank's part).
            let stats = Tensor::cat(
                &[
                    f.detach().to_dtype(DType::F64)?,
                    Tensor::new(&[kept], f.device())?,
                ],
                0,
            )?;
            let all = c.all_reduce(&stats, ReduceOp::Sum)?;
            let f = all.narrow(0, 0, k * num_experts)?.to_dtype(DType::F32)?;
            let kept = all.narrow(0, k * num_experts, 1)?.to_vec1::<f64>()?[0];
            if kept == 0.0 {
                bail!(
                    "hf_load_balancing_loss: the attention masks of the whole batch keep no token"
                )
            }
            (f, kept, c.size() as f64)
        }
    };
    let total = kept * layers as f64;
    let f = (f.reshape((k, num_experts))? / total)?;
    f.broadcast_mul(&(p / total)?.unsqueeze(0)?)?.sum_all()? * (num_experts as f64 * replicas)
}

/// Router z-loss: mean over tokens of `logsumexp(logits)²`.
pub fn router_z_loss(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    lse.sqr()?.mean_all()
}

/// Switch / Megatron auxiliary loss of one layer: `E · Σ_e f_e · P_e`, with `f_e` the fraction
/// of routed copies sent to expert `e` (`fractions`) and `P_e` its mean router score (`scores`,
/// `[T, E]`).
pub fn switch_aux_loss(scores: &Tensor, fractions: &[f32]) -> Result<Tensor> {
    let e = fractions.len();
    let f = Tensor::new(fractions, scores.device())?;
    (scores.mean(0)? * f)?.sum_all()? * e as f64
}
