//! Regions of a tensor and the copy that assembles a rank's slice from stored pieces, reading
//! only the bytes inside the slice.

use super::placement::Slice;
use candle_core::{bail, DType, Result};

/// This rank's part of tensor `name` (full shape `full`, `slice` of it or all) from stored
/// `pieces`, each a region of the full tensor and its row-major bytes of `dtype`, copying only
/// the bytes inside the wanted region. Pieces with identical regions (replicas) are read once.
/// Returns the bytes (padding rows zero), their dims, and how many bytes were copied.
pub(crate) fn assemble(
    name: &str,
    full: &[usize],
    slice: Option<&Slice>,
    dtype: DType,
    pieces: &[StoredPiece<'_>],
) -> Result<(Vec<u8>, Vec<usize>, usize)> {
    let want = match slice {
        None => Region::whole(full),
        Some(s) => Region::whole(full).restrict(s.dim, s.start, s.len),
    };
    let mut out_dims = want.lens();
    if let Some(s) = slice {
        out_dims[s.dim] = s.padded;
    }
    let elem = dtype.size_in_bytes();
    let mut out = vec![0u8; out_dims.iter().product::<usize>() * elem];
    let (mut seen, mut covered, mut read): (Vec<&Region>, usize, usize) = (Vec::new(), 0, 0);
    for (region, data) in pieces {
        if seen.contains(&region) {
            continue;
        }
        seen.push(region);
        let Some(common) = want.intersect(region) else {
            continue;
        };
        let n = common.volume();
        if data.len() != region.volume() * elem {
            bail!(
                "tensor {name}: a stored piece holds {} bytes but its region {:?} needs {}",
                data.len(),
                region.0,
                region.volume() * elem
            )
        }
        copy_box(data, region, &common, &mut out, &want, &out_dims, elem);
        covered += n;
        read += n * elem;
    }
    if covered != want.volume() {
        bail!(
            "tensor {name}: the checkpoint covers {covered} of the {} elements of region {:?}",
            want.volume(),
            want.0
        )
    }
    Ok((out, out_dims, read))
}

/// A stored piece of a tensor: the region of the full tensor it covers and its row-major bytes.
pub(crate) type StoredPiece<'a> = (Region, &'a [u8]);

/// A box in a tensor: `(start, len)` per dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Region(pub Vec<(usize, usize)>);

impl Region {
    pub fn whole(dims: &[usize]) -> Self {
        Self(dims.iter().map(|&d| (0, d)).collect())
    }

    pub fn restrict(mut self, dim: usize, start: usize, len: usize) -> Self {
        self.0[dim] = (start, len);
        self
    }

    pub fn lens(&self) -> Vec<usize> {
        self.0.iter().map(|r| r.1).collect()
    }

    pub fn volume(&self) -> usize {
        self.0.iter().map(|r| r.1).product()
    }

    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let mut r = Vec::with_capacity(self.0.len());
        for (&(a, al), &(b, bl)) in self.0.iter().zip(&other.0) {
            let (s, e) = (a.max(b), (a + al).min(b + bl));
            if s >= e {
                return None;
            }
            r.push((s, e - s));
        }
        Some(Region(r))
    }
}

/// Copies the elements of region `what` (global coordinates) from `src`, the row-major bytes of
/// region `src_region`, into `dst`, a buffer of dims `dst_dims` whose origin is at `dst_region`'s
/// start. Runs of contiguous elements are copied at once.
fn copy_box(
    src: &[u8],
    src_region: &Region,
    what: &Region,
    dst: &mut [u8],
    dst_region: &Region,
    dst_dims: &[usize],
    elem: usize,
) {
    let nd = what.0.len();
    let src_dims = src_region.lens();
    let lens = what.lens();
    // Merge trailing dims that are whole in source, destination and region into one run.
    let mut k = nd;
    while k > 0 && lens[k - 1] == src_dims[k - 1] && lens[k - 1] == dst_dims[k - 1] {
        k -= 1;
    }
    let tail: usize = lens[k..].iter().product::<usize>() * elem;
    let (run, outer_dims) = if k == 0 {
        (tail, 0)
    } else {
        (lens[k - 1] * tail, k - 1)
    };
    let strides = |dims: &[usize]| -> Vec<usize> {
        let mut s = vec![elem; nd];
        for i in (0..nd.saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1];
        }
        s
    };
    let (ss, ds) = (strides(&src_dims), strides(dst_dims));
    let mut idx = vec![0usize; outer_dims];
    loop {
        let (mut so, mut dofs) = (0, 0);
        for d in 0..nd {
            let i = if d < outer_dims { idx[d] } else { 0 };
            let g = what.0[d].0 + i; // global coordinate
            so += (g - src_region.0[d].0) * ss[d];
            dofs += (g - dst_region.0[d].0) * ds[d];
        }
        dst[dofs..dofs + run].copy_from_slice(&src[so..so + run]);
        // Next index over the outer dims, last fastest.
        let mut d = outer_dims;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < lens[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}
