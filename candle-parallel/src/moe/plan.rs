//! Token planning: which routed copies each expert keeps (capacity, drop policy) and in which
//! order they travel. Shared by every dispatcher.

use super::router::{DropPolicy, RouterConfig};
use candle_core::{bail, DType, Result, Tensor};

/// The kept routed copies of this rank, sorted by (expert, token position).
pub struct Plan {
    /// Index into the flattened `[T·k]` assignments.
    pub assignment: Vec<u32>,
    /// The token of each kept copy (`assignment / k`).
    pub token: Vec<u32>,
    /// Kept copies per expert (all `E` experts).
    pub counts: Vec<usize>,
    /// Copies dropped by the capacity limit.
    pub dropped: usize,
    /// Fraction of the routed copies per expert, before dropping (for the Switch loss).
    pub fractions: Vec<f32>,
}

/// Which routed copies of `experts` / `weights` (`[T, k]`) each expert keeps under `cfg`'s
/// capacity limit, in the order every dispatcher uses.
pub fn plan_tokens(experts: &Tensor, weights: &Tensor, cfg: &RouterConfig) -> Result<Plan> {
    let (t, k) = experts.dims2()?;
    let e = cfg.num_experts;
    if weights.dims() != experts.dims() {
        bail!(
            "moe plan: routing weights of shape {:?} for chosen experts of shape {:?}: they must match",
            weights.dims(),
            experts.dims()
        )
    }
    let ids = experts.flatten_all()?.to_vec1::<u32>()?;
    let mut by_expert: Vec<Vec<u32>> = vec![Vec::new(); e];
    for (a, &x) in ids.iter().enumerate() {
        match by_expert.get_mut(x as usize) {
            Some(list) => list.push(a as u32),
            None => bail!("moe plan: expert {x} chosen, but there are only {e} experts"),
        }
    }
    let fractions = by_expert
        .iter()
        .map(|v| v.len() as f32 / (t * k).max(1) as f32)
        .collect();
    let mut dropped = 0;
    if let Some(f) = cfg.capacity_factor {
        let cap = ((t * k) as f64 / e as f64 * f).ceil() as usize;
        let w = match cfg.drop_policy {
            DropPolicy::Probability => Some(
                weights
                    .detach()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            ),
            DropPolicy::Position => None,
        };
        for list in by_expert.iter_mut() {
            if list.len() > cap {
                if let Some(w) = &w {
                    // Highest weight first; the sort is stable, so ties keep token order.
                    list.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]));
                }
                dropped += list.len() - cap;
                list.truncate(cap);
                list.sort_unstable();
            }
        }
    }
    let counts = by_expert.iter().map(Vec::len).collect();
    let assignment: Vec<u32> = by_expert.into_iter().flatten().collect();
    let token = assignment.iter().map(|&a| a / k as u32).collect();
    Ok(Plan {
        assignment,
        token,
        counts,
        dropped,
        fractions,
    })
}
