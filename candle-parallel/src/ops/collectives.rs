//! Collectives that take part in Candle's autograd.
//!
//! Each is a Candle custom op whose forward is a collective (or a local slice) and whose
//! backward is its conjugate, so `loss.backward()` moves gradients across ranks by itself.
//! They pair up as in Megatron-LM:
//!
//! | op | forward | backward | typical use |
//! |---|---|---|---|
//! | [`copy_to_group`] | identity | all-reduce | input of a column-parallel layer |
//! | [`reduce_from_group`] | all-reduce | identity | output of a row-parallel layer |
//! | [`gather_from_group`] | all-gather | keep own slice | gathered column-parallel output |
//! | [`scatter_to_group`] | keep own slice | all-gather | replicated input to a row-parallel layer |
//! | [`reduce_scatter_to_group`] | reduce-scatter | all-gather | sequence parallel, after a row layer |
//! | [`all_gather_to_group`] | all-gather | reduce-scatter | sequence parallel, before a column layer |
//! | [`all_to_all`] | ragged all-to-all | the inverse all-to-all | MoE token dispatch |
//!
//! Using all-reduce in both directions would give gradients `size` times too large: each
//! conjugate pair counts every contribution once.
//!
//! Every rank of the group must call the same op on tensors of the same shape (except
//! `all_to_all`'s rows), and — since the backward is collective too — must run the backward.

use super::copy_view;
use crate::comm::{Collective, CollectiveStorage, Comm, ReduceOp};
use candle_core::backend::BackendDevice;
use candle_core::shape::Dim;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[derive(Clone, Debug)]
enum Kind {
    CopyToGroup,
    ReduceFromGroup,
    GatherFromGroup { dim: usize },
    ScatterToGroup { dim: usize },
    ReduceScatterToGroup { dim: usize },
    AllGatherToGroup { dim: usize },
    AllToAll { send: Vec<usize>, recv: Vec<usize> },
}

struct GroupOp {
    comm: Comm,
    kind: Kind,
}

impl GroupOp {
    fn forward<S: CollectiveStorage>(&self, s: &S, l: &Layout) -> Result<(S, Shape)>
    where
        S::Device: BackendDevice<Storage = S>,
    {
        let coll = match &self.kind {
            Kind::CopyToGroup => return copy_view(s, l),
            Kind::ScatterToGroup { dim } => {
                let chunk = l.dims()[*dim] / self.comm.size();
                return copy_view(s, &l.narrow(*dim, self.comm.rank() * chunk, chunk)?);
            }
            Kind::ReduceFromGroup => Collective::AllReduce { op: ReduceOp::Sum },
            Kind::GatherFromGroup { dim } | Kind::AllGatherToGroup { dim } => {
                Collective::AllGather { dim: *dim }
            }
            Kind::ReduceScatterToGroup { dim } => Collective::ReduceScatter {
                dim: *dim,
                op: ReduceOp::Sum,
            },
            Kind::AllToAll { send, recv } => Collective::AllToAll {
                send_splits: send.clone(),
                recv_splits: recv.clone(),
            },
        };
        S::run(self.comm.backend(), &coll, s, l)
    }
}

impl CustomOp1 for GroupOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::CopyToGroup => "copy_to_group",
            Kind::ReduceFromGroup => "reduce_from_group",
            Kind::GatherFromGroup { .. } => "gather_from_group",
            Kind::ScatterToGroup { .. } => "scatter_to_group",
            Kind::ReduceScatterToGroup { .. } => "reduce_scatter_to_group",
            Kind::AllGatherToGroup { .. } => "all_gather_to_group",
            Kind::AllToAll { .. } => "all_to_all",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(s, l)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.forward(s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let c = &self.comm;
        let g = match &self.kind {
            Kind::CopyToGroup => c.all_reduce(grad, ReduceOp::Sum)?,
            Kind::ReduceFromGroup => grad.clone(),
            Kind::GatherFromGroup { dim } => {
                let chunk = arg.dim(*dim)?;
                grad.narrow(*dim, c.rank() * chunk, chunk)?
            }
            Kind::ScatterToGroup { dim } | Kind::ReduceScatterToGroup { dim } => {
                c.all_gather(grad, *dim)?
            }
            Kind::AllGatherToGroup { dim } => c.reduce_scatter(grad, *dim, ReduceOp::Sum)?,
            Kind::AllToAll { send, recv } => c.all_to_all(grad, recv, send)?,
        };
        Ok(Some(g))
    }
}

fn apply(x: &Tensor, comm: &Comm, kind: Kind) -> Result<Tensor> {
    if comm.size() == 1 {
        // Every op is the identity on a group of one.
        return Ok(x.clone());
    }
    // Behind whatever the group's lane still runs (one order on every rank), and before the
    // op holds its input's storage (a queued in-place reduction may need it).
    comm.drain();
    x.contiguous()?.apply_op1(GroupOp {
        comm: comm.clone(),
        kind,
    })
}

/// Identity forward, all-reduce (sum) backward: marks where a replicated activation enters
/// rank-local computation whose gradients must be summed over the group.
pub fn copy_to_group(x: &Tensor, comm: &Comm) -> Result<Tensor> {
    apply(x, comm, Kind::CopyToGroup)
}

/// All-reduce (sum) forward, identity backward: sums partial results (the output of a
/// row-parallel layer) into a replicated activation.
pub fn reduce_from_group(x: &Tensor, comm: &Comm) -> Result<Tensor> {
    apply(x, comm, Kind::ReduceFromGroup)
}

/// All-gather forward along `dim`; backward keeps this rank's slice of the (replicated)
/// gradient.
pub fn gather_from_group<D: Dim>(x: &Tensor, dim: D, comm: &Comm) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "gather_from_group")?;
    apply(x, comm, Kind::GatherFromGroup { dim })
}

/// Keeps this rank's chunk along `dim` of a replicated tensor; backward all-gathers the
/// gradient. The size of `dim` must be divisible by the group size.
pub fn scatter_to_group<D: Dim>(x: &Tensor, dim: D, comm: &Comm) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "scatter_to_group")?;
    let size = x.dim(dim)?;
    if !size.is_multiple_of(comm.size()) {
        bail!(
            "scatter_to_group on rank {} of {}: dim {dim} of shape {:?} has size {size}, which \
             is not divisible by the group size {}",
            comm.rank(),
            comm.label(),
            x.dims(),
            comm.size()
        )
    }
    apply(x, comm, Kind::ScatterToGroup { dim })
}

/// Reduce-scatter (sum) forward along `dim`; all-gather backward (sequence parallelism: after a
/// row-parallel layer, each rank keeps its part of the sequence).
pub fn reduce_scatter_to_group<D: Dim>(x: &Tensor, dim: D, comm: &Comm) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "reduce_scatter_to_group")?;
    apply(x, comm, Kind::ReduceScatterToGroup { dim })
}

/// All-gather forward along `dim`; reduce-scatter (sum) backward (sequence parallelism: before
/// a column-parallel layer, whose per-rank gradients are partial sums).
pub fn all_gather_to_group<D: Dim>(x: &Tensor, dim: D, comm: &Comm) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "all_gather_to_group")?;
    apply(x, comm, Kind::AllGatherToGroup { dim })
}

/// Ragged all-to-all along dim 0 ([`Comm::all_to_all`]); the backward sends the gradients back
/// along the inverse route.
pub fn all_to_all(
    x: &Tensor,
    send_splits: &[usize],
    recv_splits: &[usize],
    comm: &Comm,
) -> Result<Tensor> {
    apply(
        x,
        comm,
        Kind::AllToAll {
            send: send_splits.to_vec(),
            recv: recv_splits.to_vec(),
        },
    )
}
