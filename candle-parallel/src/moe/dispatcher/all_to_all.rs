//! Tokens differ per ep rank: routed copies are permuted so that each expert's are contiguous,
//! per-expert counts exchanged, copies sent to the ranks owning their experts, each local expert
//! run as one matmul over its contiguous rows, sent back, and combined with the routing weights
//! (GShard / Megatron).

use super::{combine_outputs, Dispatched, TokenDispatcher};
use crate::comm::Comm;
use crate::moe::experts::LocalExperts;
use crate::moe::plan::Plan;
use crate::moe::router::Routing;
use crate::ops;
use candle_core::{bail, Result, Tensor};

/// See the [module docs](self).
pub struct AllToAllDispatcher {
    ep: Comm,
}

impl AllToAllDispatcher {
    /// A dispatcher over the expert-parallel group `ep`, each of whose ranks holds its own
    /// tokens.
    pub fn new(ep: &Comm) -> Self {
        Self { ep: ep.clone() }
    }
}

impl TokenDispatcher for AllToAllDispatcher {
    fn dispatch(
        &self,
        x: &Tensor,
        r: &Routing,
        p: &Plan,
        experts: &LocalExperts,
    ) -> Result<Dispatched> {
        let (t, h) = x.dims2()?;
        let (n_ep, el) = (self.ep.size(), experts.len());
        let first = experts.range().start;
        let dev = x.device();
        // Everyone's per-expert counts: split sizes in both directions and the regrouping.
        let counts = Tensor::new(
            p.counts
                .iter()
                .map(|&c| c as i64)
                .collect::<Vec<_>>()
                .as_slice(),
            dev,
        )?;
        let e = p.counts.len();
        if e != n_ep * el || experts.range().end > e {
            bail!(
                "moe all-to-all on {} (rank {}): {e} experts cannot be {el} local experts (at {:?}) \
                 on each of {n_ep} ranks: the dispatcher's ep group must be the layer's",
                self.ep.label(),
                self.ep.rank(),
                experts.range()
            )
        }
        let all: Vec<i64> = self.ep.all_gather(&counts, 0)?.to_vec1::<i64>()?;
        let c = |src: usize, expert: usize| all[src * e + expert] as usize;
        let send: Vec<usize> = (0..n_ep)
            .map(|j| (j * el..(j + 1) * el).map(|x| p.counts[x]).sum())
            .collect();
        let recv: Vec<usize> = (0..n_ep)
            .map(|s| experts.range().map(|x| c(s, x)).sum())
            .collect();
        let rows = x.index_select(&Tensor::new(p.token.as_slice(), dev)?, 0)?;
        let got = ops::all_to_all(&rows, &send, &recv, &self.ep)?;
        // Received: [from rank 0: its rows for local expert 0, 1, ...][from rank 1: ...].
        // Regroup by expert so that each expert's rows are contiguous.
        let mut offsets = vec![vec![0usize; el]; n_ep];
        let mut at = 0;
        for (s, row) in offsets.iter_mut().enumerate() {
            for (i, o) in row.iter_mut().enumerate() {
                *o = at;
                at += c(s, first + i);
            }
        }
        let mut order: Vec<u32> = Vec::with_capacity(at);
        let mut per_expert = vec![0usize; el];
        for (i, pe) in per_expert.iter_mut().enumerate() {
            for (s, row) in offsets.iter().enumerate() {
                let n = c(s, first + i);
                order.extend((row[i]..row[i] + n).map(|v| v as u32));
                *pe += n;
            }
        }
        let y = if at > 0 {
            let y = experts.forward_rows(&got, &order, &per_expert)?;
            // Back to arrival order: y_arrival[order[j]] = y[j].
            let mut inverse = vec![0u32; at];
            for (j, &o) in order.iter().enumerate() {
                inverse[o as usize] = j as u32;
            }
            y.index_select(&Tensor::new(inverse.as_slice(), dev)?, 0)?
        } else {
            ops::depend_on(&Tensor::zeros((0, h), x.dtype(), dev)?, &[&got])?
        };
        let back = ops::all_to_all(&y, &recv, &send, &self.ep)?;
        let output = combine_outputs(&back, &r.weights, &p.assignment, &p.token, t)?;
        let tokens_per_expert = (0..e).map(|x| (0..n_ep).map(|s| c(s, x)).sum()).collect();
        Ok(Dispatched {
            output,
            tokens_per_expert,
        })
    }
}
