//! The device mesh: the world's ranks laid out as `dp × pp × ep × tp`, with one communicator
//! per dimension.
//!
//! `tp` varies fastest, then `ep`, `pp`, `dp` (as in Megatron), so tensor-parallel peers are
//! neighbouring ranks: `rank = ((dp_i · pp + pp_i) · ep + ep_i) · tp + tp_i`.
//!
//! ```
//! use candle_parallel::launch::launch;
//! use candle_parallel::mesh::{DeviceMesh, MeshDim, MeshShape};
//!
//! // The EP × TP layout of world 4 = ep 2 × tp 2.
//! let groups = launch(4, |ctx| {
//!     let mesh = DeviceMesh::new(ctx.comm(), MeshShape::new().ep(2).tp(2))?;
//!     Ok((mesh.coord(MeshDim::Ep), mesh.coord(MeshDim::Tp), mesh.tp().ranks().to_vec()))
//! })?;
//! assert_eq!(groups[1], (0, 1, vec![0, 1]));
//! assert_eq!(groups[2], (1, 0, vec![2, 3]));
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::comm::Comm;
use candle_core::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// A parallel dimension of the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeshDim {
    /// Data parallel: replicas that see different batches.
    Dp,
    /// Pipeline parallel: stages of layers.
    Pp,
    /// Expert parallel: ranks that hold different MoE experts.
    Ep,
    /// Tensor parallel: ranks that hold slices of the same matrices.
    Tp,
}

impl MeshDim {
    /// All dimensions, slowest-varying first.
    pub const ALL: [MeshDim; 4] = [MeshDim::Dp, MeshDim::Pp, MeshDim::Ep, MeshDim::Tp];

    /// `"dp"`, `"pp"`, `"ep"` or `"tp"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dp => "dp",
            Self::Pp => "pp",
            Self::Ep => "ep",
            Self::Tp => "tp",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for MeshDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MeshDim {
    type Err = candle_core::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "dp" => Ok(Self::Dp),
            "pp" => Ok(Self::Pp),
            "ep" => Ok(Self::Ep),
            "tp" => Ok(Self::Tp),
            other => bail!("unknown mesh dimension '{other}': use dp, pp, ep or tp"),
        }
    }
}

/// The sizes of a mesh. Dimensions that are not named have size 1.
///
/// Parses from `"ep=2,tp=2"` (the form command-line flags use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeshShape {
    sizes: [usize; 4],
    named: [bool; 4],
}

impl Default for MeshShape {
    fn default() -> Self {
        Self::new()
    }
}

impl MeshShape {
    /// A mesh of one rank with no named dimension.
    pub fn new() -> Self {
        Self {
            sizes: [1; 4],
            named: [false; 4],
        }
    }

    /// Sets the size of `dim`.
    pub fn with(mut self, dim: MeshDim, size: usize) -> Self {
        self.sizes[dim.index()] = size;
        self.named[dim.index()] = true;
        self
    }

    pub fn dp(self, size: usize) -> Self {
        self.with(MeshDim::Dp, size)
    }

    pub fn pp(self, size: usize) -> Self {
        self.with(MeshDim::Pp, size)
    }

    pub fn ep(self, size: usize) -> Self {
        self.with(MeshDim::Ep, size)
    }

    pub fn tp(self, size: usize) -> Self {
        self.with(MeshDim::Tp, size)
    }

    /// The size of `dim` (1 when not named).
    pub fn size(&self, dim: MeshDim) -> usize {
        self.sizes[dim.index()]
    }

    /// The number of ranks: the product of the sizes.
    pub fn world_size(&self) -> usize {
        self.sizes.iter().product()
    }

    /// The dimensions that were named, slowest-varying first.
    pub fn named_dims(&self) -> Vec<MeshDim> {
        MeshDim::ALL
            .into_iter()
            .filter(|d| self.named[d.index()])
            .collect()
    }

    /// Checks that every size is positive and that they multiply to `world_size`.
    pub fn check(&self, world_size: usize) -> Result<()> {
        if let Some(d) = MeshDim::ALL.into_iter().find(|d| self.size(*d) == 0) {
            bail!("mesh {self}: dimension {d} has size 0; every size must be at least 1")
        }
        if self.world_size() != world_size {
            bail!(
                "mesh {self} has {} ranks but the world has {world_size}: choose sizes whose \
                 product is {world_size}",
                self.world_size()
            )
        }
        Ok(())
    }

    /// The coordinates of `rank`, indexed by [`MeshDim`] order (dp, pp, ep, tp).
    pub fn coords_of(&self, rank: usize) -> [usize; 4] {
        let mut c = [0; 4];
        let mut r = rank;
        for d in MeshDim::ALL.into_iter().rev() {
            c[d.index()] = r % self.size(d);
            r /= self.size(d);
        }
        c
    }

    /// The rank at `coords` (dp, pp, ep, tp order).
    pub fn rank_of(&self, coords: [usize; 4]) -> usize {
        MeshDim::ALL
            .into_iter()
            .fold(0, |r, d| r * self.size(d) + coords[d.index()])
    }

    /// Linear index of `coords` over `dims` only (in mesh order), ignoring the others.
    fn index_over(&self, coords: [usize; 4], dims: &[MeshDim]) -> usize {
        MeshDim::ALL
            .into_iter()
            .filter(|d| dims.contains(d))
            .fold(0, |r, d| r * self.size(d) + coords[d.index()])
    }
}

impl fmt::Display for MeshShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let named = self.named_dims();
        if named.is_empty() {
            return f.write_str("(single rank)");
        }
        let parts: Vec<String> = named
            .iter()
            .map(|d| format!("{d}={}", self.size(*d)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for MeshShape {
    type Err = candle_core::Error;
    /// Parses `"dp=2,tp=2"`; an empty string is the single-rank mesh.
    fn from_str(s: &str) -> Result<Self> {
        let mut shape = MeshShape::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, size)) = part.split_once('=') else {
                bail!("mesh '{s}': expected NAME=SIZE pairs such as 'ep=2,tp=2', got '{part}'")
            };
            let dim: MeshDim = name.parse()?;
            if shape.named[dim.index()] {
                bail!("mesh '{s}': dimension {dim} is given twice")
            }
            let size: usize = size.trim().parse().map_err(|_| {
                candle_core::Error::msg(format!("mesh '{s}': '{size}' is not a size"))
            })?;
            if size == 0 {
                bail!("mesh '{s}': dimension {dim} has size 0; every size must be at least 1 (leave a dimension out for size 1)")
            }
            shape = shape.with(dim, size);
        }
        Ok(shape)
    }
}

/// One rank's view of the mesh: its coordinates and one communicator per dimension.
///
/// See the [module documentation](self) for an example.
#[derive(Clone, Debug)]
pub struct DeviceMesh {
    shape: MeshShape,
    coords: [usize; 4],
    world: Comm,
    groups: [Comm; 4],
}

impl DeviceMesh {
    /// Builds the mesh over `world`. Collective: every rank of `world` must call it with the
    /// same shape, whose sizes must multiply to the world size.
    pub fn new(world: &Comm, shape: MeshShape) -> Result<Self> {
        shape.check(world.size())?;
        let coords = shape.coords_of(world.rank());
        let mut groups = Vec::with_capacity(4);
        for dim in MeshDim::ALL {
            let others: Vec<MeshDim> = MeshDim::ALL.into_iter().filter(|d| *d != dim).collect();
            let color = shape.index_over(coords, &others);
            let comm = world.split_labeled(Some(color), coords[dim.index()], dim.name())?;
            let Some(comm) = comm else {
                bail!("mesh {shape}: rank {} got no {dim} group", world.rank())
            };
            groups.push(comm);
        }
        let groups: [Comm; 4] = groups.try_into().expect("four dimensions");
        tracing::debug!(mesh = %shape, coords = ?coords, "device mesh ready");
        Ok(Self {
            shape,
            coords,
            world: world.clone(),
            groups,
        })
    }

    /// The mesh's sizes.
    pub fn shape(&self) -> &MeshShape {
        &self.shape
    }

    /// This rank's global rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// The world communicator.
    pub fn world(&self) -> &Comm {
        &self.world
    }

    /// This rank's coordinate along `dim`.
    pub fn coord(&self, dim: MeshDim) -> usize {
        self.coords[dim.index()]
    }

    /// This rank's coordinates (dp, pp, ep, tp order).
    pub fn coords(&self) -> [usize; 4] {
        self.coords
    }

    /// The size of `dim`.
    pub fn size(&self, dim: MeshDim) -> usize {
        self.shape.size(dim)
    }

    /// The communicator of this rank's group along `dim`: the ranks that share every other
    /// coordinate.
    pub fn comm(&self, dim: MeshDim) -> &Comm {
        &self.groups[dim.index()]
    }

    pub fn dp(&self) -> &Comm {
        self.comm(MeshDim::Dp)
    }

    pub fn pp(&self) -> &Comm {
        self.comm(MeshDim::Pp)
    }

    pub fn ep(&self) -> &Comm {
        self.comm(MeshDim::Ep)
    }

    pub fn tp(&self) -> &Comm {
        self.comm(MeshDim::Tp)
    }

    /// A communicator over several dimensions at once (e.g. `[Dp, Ep]` for the ranks that hold
    /// copies of the same non-expert weights). Collective over the world.
    pub fn comm_over(&self, dims: &[MeshDim]) -> Result<Comm> {
        let others: Vec<MeshDim> = MeshDim::ALL
            .into_iter()
            .filter(|d| !dims.contains(d))
            .collect();
        let color = self.shape.index_over(self.coords, &others);
        let key = self.shape.index_over(self.coords, dims);
        let mut sorted = dims.to_vec();
        sorted.sort();
        sorted.dedup();
        let label: Vec<&str> = sorted.iter().map(|d| d.name()).collect();
        match self
            .world
            .split_labeled(Some(color), key, &label.join("x"))?
        {
            Some(c) => Ok(c),
            None => bail!(
                "mesh {}: rank {} got no group over {dims:?}",
                self.shape,
                self.rank()
            ),
        }
    }

    /// `rank-1_ep-0_tp-1`: the rank and its coordinate in each named dimension, used to name
    /// per-rank log files.
    pub fn rank_name(&self) -> String {
        let mut s = format!("rank-{}", self.rank());
        for d in self.shape.named_dims() {
            s.push_str(&format!("_{d}-{}", self.coord(d)));
        }
        s
    }
}
