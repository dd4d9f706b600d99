//! Regions of a tensor and the copy that assembles a rank's slice from stored pieces, reading
//! only the bytes inside the slice.

use super::checksum::PieceCheck;
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
    let (want, out_dims) = wanted(full, slice, None);
    assemble_region(name, &want, out_dims, dtype, pieces)
}

/// [`assemble`] of rows `rows` (along dim 0) of the slice only: a part of a parameter
/// (ZeRO 3's partitions cut parameters anywhere) without reading the rest of it.
pub(crate) fn assemble_rows(
    name: &str,
    full: &[usize],
    slice: Option<&Slice>,
    rows: std::ops::Range<usize>,
    dtype: DType,
    pieces: &[StoredPiece<'_>],
) -> Result<(Vec<u8>, Vec<usize>, usize)> {
    if full.is_empty() {
        bail!("tensor {name}: a scalar has no rows to read")
    }
    let (want, out_dims) = wanted(full, slice, Some(rows));
    assemble_region(name, &want, out_dims, dtype, pieces)
}

/// The region of the full tensor to read, and the dims of what it is copied into (padding
/// rows of a padded slice included, zero): the slice, or rows `rows` of it.
fn wanted(
    full: &[usize],
    slice: Option<&Slice>,
    rows: Option<std::ops::Range<usize>>,
) -> (Region, Vec<usize>) {
    let mut want = match slice {
        None => Region::whole(full),
        Some(s) => Region::whole(full).restrict(s.dim, s.start, s.len),
    };
    let mut out_dims = want.lens();
    if let Some(s) = slice {
        out_dims[s.dim] = s.padded;
    }
    if let Some(r) = rows {
        // Row `i` of the slice is row `start + i` of the tensor; rows past the stored ones are
        // a padded slice's zeros.
        let (start, len) = want.0[0];
        let (a, b) = (
            (start + r.start).min(start + len),
            (start + r.end).min(start + len),
        );
        want.0[0] = (a, b - a);
        out_dims[0] = r.len();
    }
    (want, out_dims)
}

/// The bytes of region `want` from `pieces`, into a buffer of `out_dims` whose origin is
/// `want`'s start.
fn assemble_region(
    name: &str,
    want: &Region,
    out_dims: Vec<usize>,
    dtype: DType,
    pieces: &[StoredPiece<'_>],
) -> Result<(Vec<u8>, Vec<usize>, usize)> {
    let elem = dtype.size_in_bytes();
    let mut out = vec![0u8; out_dims.iter().product::<usize>() * elem];
    let mut filled = Bits::new(out.len() / elem.max(1));
    let (mut seen, mut read): (Vec<&Region>, usize) = (Vec::new(), 0);
    for piece in pieces {
        let (region, data) = (&piece.region, piece.data);
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
        // Every block of stored bytes this copy reads is checked against its checksum first.
        let mut checked = match piece.check {
            Some(_) => vec![false; data.len().div_ceil(super::checksum::BLOCK_BYTES)],
            None => Vec::new(),
        };
        let mut verify = |start: usize, len: usize| match &piece.check {
            Some(c) => c.verify(name, data, start, len, &mut checked),
            None => Ok(()),
        };
        let copied = copy_box(
            data,
            region,
            &common,
            &mut out,
            want,
            &out_dims,
            elem,
            &mut filled,
            &mut verify,
        )?;
        if let Err(i) = copied {
            bail!(
                "tensor {name}: stored pieces overlap with different values (piece {:?} differs \
                 at element {i} of the wanted region {:?}): the checkpoint is corrupt",
                region.0,
                want.0
            )
        }
        read += n * elem;
    }
    let covered = filled.count();
    if covered != want.volume() {
        bail!(
            "tensor {name}: the checkpoint covers {covered} of the {} elements of region {:?} \
             (its pieces leave a gap): the checkpoint is corrupt",
            want.volume(),
            want.0
        )
    }
    Ok((out, out_dims, read))
}

/// A stored piece of a tensor: the region of the full tensor it covers, its row-major bytes,
/// and the checksums they must match, where the source has them.
pub(crate) struct StoredPiece<'a> {
    pub region: Region,
    pub data: &'a [u8],
    pub check: Option<PieceCheck<'a>>,
}

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
///
/// `filled` marks the destination elements already written: a run that meets filled elements
/// is compared with them instead, and the first element that differs is returned (its index
/// in `dst`, as `Ok(Err(i))`), since overlapping pieces must be replicas of the same values.
/// `verify(start, len)` is called on each run of `src` bytes before they are read.
#[allow(clippy::too_many_arguments)]
fn copy_box(
    src: &[u8],
    src_region: &Region,
    what: &Region,
    dst: &mut [u8],
    dst_region: &Region,
    dst_dims: &[usize],
    elem: usize,
    filled: &mut Bits,
    verify: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<std::result::Result<(), usize>> {
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
        verify(so, run)?;
        let (first, count) = (dofs / elem, run / elem);
        if filled.none_in(first, count) {
            dst[dofs..dofs + run].copy_from_slice(&src[so..so + run]);
            filled.set(first, count);
        } else {
            for j in 0..count {
                let (d, s) = (dofs + j * elem, so + j * elem);
                if filled.get(first + j) {
                    if dst[d..d + elem] != src[s..s + elem] {
                        return Ok(Err(first + j));
                    }
                } else {
                    dst[d..d + elem].copy_from_slice(&src[s..s + elem]);
                    filled.set(first + j, 1);
                }
            }
        }
        // Next index over the outer dims, last fastest.
        let mut d = outer_dims;
        loop {
            if d == 0 {
                return Ok(Ok(()));
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

/// One bit per element of a buffer.
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    pub fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }

    pub fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }

    /// Calls `f(word, mask)` for the words covering `start..start + len`.
    fn words(start: usize, len: usize, mut f: impl FnMut(usize, u64) -> bool) -> bool {
        let end = start + len;
        let mut i = start;
        while i < end {
            let (w, b) = (i / 64, i % 64);
            let n = (64 - b).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            if !f(w, mask) {
                return false;
            }
            i += n;
        }
        true
    }

    /// Whether no element of `start..start + len` is set.
    pub fn none_in(&self, start: usize, len: usize) -> bool {
        Self::words(start, len, |w, m| self.0[w] & m == 0)
    }

    pub fn set(&mut self, start: usize, len: usize) {
        let bits = &mut self.0;
        Self::words(start, len, |w, m| {
            bits[w] |= m;
            true
        });
    }

    pub fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
}
