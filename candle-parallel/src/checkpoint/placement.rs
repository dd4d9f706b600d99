//! [`Placement`]: which part of a full tensor a rank holds, and [`Param`], a rank's slice of a
//! named parameter.

use crate::comm::Comm;
use crate::mesh::{DeviceMesh, MeshDim};
use candle_core::{bail, Result, Tensor, Var};

/// Which part of a full tensor a rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// The whole tensor.
    Replicated,
    /// Chunk `rank` of `parts` equal chunks along `dim` (the size must be divisible).
    Split {
        dim: usize,
        rank: usize,
        parts: usize,
    },
    /// Chunk `rank` of `parts` chunks of `ceil(size / parts)` along `dim`; the part past the
    /// end of the tensor is zero padding (a vocabulary not divisible by tp).
    SplitPadded {
        dim: usize,
        rank: usize,
        parts: usize,
    },
    /// Rows `start..start + len` along `dim` (e.g. a key/value head replicated over ranks).
    Range {
        dim: usize,
        start: usize,
        len: usize,
    },
}

/// Where a rank's slice lies: `len` elements from `start` along `dim` are real, then
/// `padded - len` zeros.
pub(crate) struct Slice {
    pub dim: usize,
    pub start: usize,
    pub len: usize,
    pub padded: usize,
}

impl Placement {
    /// Chunk `comm.rank()` of `comm.size()` equal chunks along `dim`: how a tensor split over a
    /// group (usually tp) is held by this rank.
    pub fn split_over(dim: usize, comm: &Comm) -> Self {
        Placement::Split {
            dim,
            rank: comm.rank(),
            parts: comm.size(),
        }
    }

    /// Chunk `comm.rank()` of `comm.size()` chunks of `ceil(size / parts)` along `dim`, zero
    /// padded at the end (see [`Placement::SplitPadded`]).
    pub fn split_padded_over(dim: usize, comm: &Comm) -> Self {
        Placement::SplitPadded {
            dim,
            rank: comm.rank(),
            parts: comm.size(),
        }
    }

    /// The slice of a tensor of shape `full` that this shard describes (`None`: all of it).
    pub(crate) fn slice(&self, full: &[usize], name: &str) -> Result<Option<Slice>> {
        let (dim, start, len, padded) = match *self {
            Placement::Replicated => return Ok(None),
            Placement::Split { dim, rank, parts } => {
                let size = dim_size(full, dim, name)?;
                if parts == 0 || !size.is_multiple_of(parts) || rank >= parts {
                    bail!(
                        "tensor {name} of shape {full:?}: dim {dim} of size {size} cannot be split \
                         into {parts} equal parts (rank {rank}); choose a parallel size that divides {size}"
                    )
                }
                let chunk = size / parts;
                (dim, rank * chunk, chunk, chunk)
            }
            Placement::SplitPadded { dim, rank, parts } => {
                let size = dim_size(full, dim, name)?;
                if parts == 0 || rank >= parts {
                    bail!("tensor {name}: rank {rank} is not one of {parts} parts")
                }
                let chunk = size.div_ceil(parts);
                let start = (rank * chunk).min(size);
                (dim, start, chunk.min(size - start), chunk)
            }
            Placement::Range { dim, start, len } => {
                let size = dim_size(full, dim, name)?;
                if start + len > size {
                    bail!(
                        "tensor {name} of shape {full:?}: rows {start}..{} are past the end of dim \
                         {dim} (size {size})",
                        start + len
                    )
                }
                (dim, start, len, len)
            }
        };
        Ok(Some(Slice {
            dim,
            start,
            len,
            padded,
        }))
    }

    /// The shape this rank holds of a tensor of shape `full`.
    pub fn local_dims(&self, full: &[usize]) -> Result<Vec<usize>> {
        let mut dims = full.to_vec();
        if let Some(s) = self.slice(full, "(shape)")? {
            dims[s.dim] = s.padded;
        }
        Ok(dims)
    }
}

fn dim_size(full: &[usize], dim: usize, name: &str) -> Result<usize> {
    match full.get(dim) {
        Some(s) => Ok(*s),
        None => bail!("tensor {name} of shape {full:?} has no dim {dim} to shard"),
    }
}

/// A trainable parameter: this rank's slice of the tensor `name`.
#[derive(Clone, Debug)]
pub struct Param {
    /// The full name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// This rank's slice.
    pub var: Var,
    /// The full tensor's shape.
    pub full_dims: Vec<usize>,
    /// Which part this rank holds.
    pub placement: Placement,
    /// The mesh dimensions along which ranks hold different data of this parameter: `Tp` for
    /// a tensor-parallel slice, `Ep` for an expert. Along every other dimension it is
    /// replicated (and, along the data-parallel dimensions, its gradients are summed). A
    /// pipeline stage's parameters are always its own: `Pp` need not be listed.
    pub local_to: Vec<MeshDim>,
}

impl Param {
    /// A replicated parameter that holds all of `var` (a plain single-device weight).
    pub fn replicated(name: impl Into<String>, var: Var) -> Self {
        Self {
            name: name.into(),
            full_dims: var.dims().to_vec(),
            var,
            placement: Placement::Replicated,
            local_to: Vec::new(),
        }
    }

    /// Whether ranks along `dim` hold different data of this parameter.
    pub fn is_local_to(&self, dim: MeshDim) -> bool {
        dim == MeshDim::Pp || self.local_to.contains(&dim)
    }

    /// How many ranks of `mesh` hold each element of this rank's slice: the sizes of the
    /// dimensions it is replicated over, times the copies a [`Placement::Range`] slice
    /// shares with its neighbours (replicated key/value heads). Counting every element once
    /// over the mesh (a global gradient norm) divides by this.
    pub fn holders(&self, mesh: &DeviceMesh) -> f64 {
        holders(&self.local_to, self.placement, &self.full_dims, mesh)
    }
}

/// [`Param::holders`] of a parameter local to `local_to`, placed as `placement` in a tensor
/// of `full_dims`.
pub(crate) fn holders(
    local_to: &[MeshDim],
    placement: Placement,
    full_dims: &[usize],
    mesh: &DeviceMesh,
) -> f64 {
    let mut n = 1.0;
    for dim in MeshDim::ALL {
        if dim != MeshDim::Pp && !local_to.contains(&dim) {
            n *= mesh.size(dim) as f64;
        }
    }
    if let Placement::Range { dim, len, .. } = placement {
        // `Range` slices are cut over tp: tp × len rows cover the full `full_dims[dim]`.
        let over = mesh.size(MeshDim::Tp) as f64 * len as f64 / full_dims[dim] as f64;
        n *= over.max(1.0);
    }
    n
}

/// This rank's `slice` of the full tensor `t` (all of it for `None`), zero padded to the
/// slice's padded length; always a fresh tensor, detached from `t`.
pub(crate) fn slice_of_full(t: &Tensor, slice: Option<&Slice>) -> Result<Tensor> {
    let t = t.detach();
    match slice {
        None => t.copy(),
        Some(s) => t
            .narrow(s.dim, s.start, s.len)?
            .pad_with_zeros(s.dim, 0, s.padded - s.len)?
            .contiguous(),
    }
}
