//! Auxiliary losses of MoE routing: load balancing (Hugging Face Mixtral's over all layers,
//! Switch / Megatron's per layer) and the router z-loss.

use crate::ops;
use candle_core::{bail, DType, Result, Tensor, D};

/// Hugging Face Mixtral's `load_balancing_loss_func`: over the router logits of all layers
/// (concatenated), `E · Σ_{k,e} f[k,e] · P[e]` with `f` the fraction of tokens whose k-th choice
/// is `e` and `P` the mean softmax probability. Unscaled (multiply by `router_aux_loss_coef`).
pub fn hf_load_balancing_loss(
    logits: &[Tensor],
    num_experts: usize,
    top_k: usize,
) -> Result<Tensor> {
    let (p, f, n) = hf_load_balancing_sums(logits, num_experts, top_k)?;
    hf_load_balancing_loss_of_sums(&p, &f, n)
}

/// The sums behind [`hf_load_balancing_loss`] for some of the layers (say, one pipeline
/// stage's): `(p, f, n)` with `p` (`[E]`, differentiable) the summed softmax probabilities,
/// `f` (`[k, E]`, constant) the counts of tokens whose k-th choice is `e`, and `n` the tokens
/// counted. Sums over disjoint sets of layers add up; [`hf_load_balancing_loss_of_sums`]
/// turns the totals into the loss.
pub fn hf_load_balancing_sums(
    logits: &[Tensor],
    num_experts: usize,
    top_k: usize,
) -> Result<(Tensor, Tensor, usize)> {
    if logits.is_empty() {
        bail!("hf_load_balancing_sums: no router logits")
    }
    let all = Tensor::cat(logits, 0)?.to_dtype(DType::F32)?;
    let probs = ops::softmax_last_dim(&all)?;
    let chosen = probs
        .detach()
        .arg_sort_last_dim(false)?
        .narrow(1, 0, top_k)?; // [N, k]
    let ids = Tensor::arange(0u32, num_experts as u32, all.device())?;
    let counts = chosen
        .unsqueeze(2)?
        .broadcast_eq(&ids.reshape((1, 1, num_experts))?)?
        .to_dtype(DType::F32)?
        .sum(0)?; // [k, E]
    Ok((probs.sum(0)?, counts, all.dim(0)?))
}

/// [`hf_load_balancing_loss`] from the summed probabilities `p` (`[E]`), counts `f`
/// (`[k, E]`) and token count `n` of every layer (see [`hf_load_balancing_sums`]).
pub fn hf_load_balancing_loss_of_sums(p: &Tensor, f: &Tensor, n: usize) -> Result<Tensor> {
    let num_experts = p.dim(0)?;
    let n = n as f64;
    (f / n)?.broadcast_mul(&(p / n)?.unsqueeze(0)?)?.sum_all()? * num_experts as f64
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
