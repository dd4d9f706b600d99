//! Packed sequences: several examples in one row, each with its own positions (rotary
//! positions restart at 0 where an example starts) and its own attention (a block-diagonal
//! causal mask), as Hugging Face's `position_ids` packing and flash-attention's variable-length
//! path compute them. The positions (`[b, s]`, u32) say everything: token `i` of a row belongs
//! to the example that starts at `i - position[i]`, and attends to keys `i - position[i] ..= i`.
//!
//! The training entry points take them in [`crate::mixtral::Targets::position_ids`]; while a
//! step runs they are this thread's ([`with_position_ids`]), one tensor per micro-batch, and
//! the attention reads the current micro-batch's
//! ([`candle_parallel::pipeline::current_micro_batch`]), in the forward and in any recomputed
//! forward of the backward alike.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_parallel_models::packing::check_position_ids;
//! // Two examples of 3 and 2 tokens, then one token of padding (its own position 0).
//! let pos = Tensor::new(&[[0u32, 1, 2, 0, 1, 0]], &Device::Cpu)?;
//! check_position_ids(&pos, (1, 6))?;
//! let bad = Tensor::new(&[[0u32, 2, 3]], &Device::Cpu)?;
//! assert!(check_position_ids(&bad, (1, 3)).is_err());
//! # Ok::<(), candle_core::Error>(())
//! ```
use candle_core::{bail, DType, Result, Tensor};
use std::cell::RefCell;

thread_local! {
    static POSITIONS: RefCell<Option<Vec<Tensor>>> = const { RefCell::new(None) };
    /// The last mask built, by the positions tensor and the dtype: every layer of a
    /// micro-batch's forward (and recomputed forward) shares it.
    static MASK: RefCell<Option<(Tensor, DType, Tensor)>> = const { RefCell::new(None) };
}

/// Runs `f` with `per_micro_batch` (the position ids of each micro-batch, `[b, s]` u32) as
/// this thread's packed positions; `None` runs it without (every row one sequence from 0).
pub fn with_position_ids<R>(per_micro_batch: Option<&[Tensor]>, f: impl FnOnce() -> R) -> R {
    let _scope = PositionsScope::enter(per_micro_batch.map(<[Tensor]>::to_vec));
    f()
}

/// This thread's packed positions (one tensor per micro-batch) until dropped, then the ones
/// before (and no cached mask).
pub(crate) struct PositionsScope(Option<Vec<Tensor>>);

impl PositionsScope {
    fn enter(per_micro_batch: Option<Vec<Tensor>>) -> Self {
        Self(POSITIONS.with(|p| p.replace(per_micro_batch)))
    }

    /// Micro-batch `i`'s positions alone, for loops over micro-batches that run outside any
    /// schedule.
    pub(crate) fn micro_batch(per_micro_batch: &Option<Vec<Tensor>>, i: usize) -> Self {
        Self::enter(per_micro_batch.as_ref().map(|p| vec![p[i].clone()]))
    }
}

impl Drop for PositionsScope {
    fn drop(&mut self) {
        POSITIONS.with(|p| *p.borrow_mut() = self.0.take());
        MASK.with(|m| m.borrow_mut().take());
    }
}

/// The current micro-batch's packed positions, if a step with them is running.
pub(crate) fn current_position_ids() -> Option<Tensor> {
    POSITIONS.with(|p| {
        let p = p.borrow();
        let list = p.as_ref()?;
        let mb = candle_parallel::pipeline::current_micro_batch().unwrap_or(0);
        list.get(mb).cloned()
    })
}

/// Checks that `pos` are position ids of packed rows of shape `dims`: u32, each row starting at
/// 0 and each next position either 0 (a new example) or one more than the one before.
pub fn check_position_ids(pos: &Tensor, dims: (usize, usize)) -> Result<()> {
    if pos.dims() != [dims.0, dims.1] || pos.dtype() != DType::U32 {
        bail!(
            "position_ids of shape {:?} ({:?}) for ids of shape {:?}: give one u32 position per token",
            pos.dims(),
            pos.dtype(),
            [dims.0, dims.1]
        )
    }
    for (r, row) in pos.to_vec2::<u32>()?.iter().enumerate() {
        for (i, &p) in row.iter().enumerate() {
            let ok = p == 0 || (i > 0 && p == row[i - 1] + 1);
            if !ok {
                bail!(
                    "position_ids row {r}, token {i}: {p} after {:?}: packed positions start at 0 in each example and count up by one",
                    i.checked_sub(1).map(|j| row[j])
                )
            }
        }
    }
    Ok(())
}

/// The additive attention mask `[b, 1, s, s]` of packed rows: query `i` sees keys
/// `i - pos[i] ..= i` (its own example's, up to itself), every other key `-inf`.
pub(crate) fn packed_causal_mask(pos: &Tensor, dtype: DType) -> Result<Tensor> {
    let cached = MASK.with(|m| {
        m.borrow()
            .as_ref()
            .filter(|(p, d, _)| *d == dtype && p.id() == pos.id())
            .map(|(_, _, mask)| mask.clone())
    });
    if let Some(mask) = cached {
        return Ok(mask);
    }
    let mask = build_mask(pos, dtype)?;
    MASK.with(|m| *m.borrow_mut() = Some((pos.clone(), dtype, mask.clone())));
    Ok(mask)
}

fn build_mask(pos: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = pos.dims2()?;
    let rows = pos.to_vec2::<u32>()?;
    let mut mask = vec![f32::NEG_INFINITY; b * s * s];
    for (r, row) in rows.iter().enumerate() {
        for (i, &p) in row.iter().enumerate() {
            let start = i - (p as usize).min(i);
            for m in &mut mask[(r * s + i) * s + start..=(r * s + i) * s + i] {
                *m = 0.0;
            }
        }
    }
    Tensor::from_vec(mask, (b, 1, s, s), pos.device())?.to_dtype(dtype)
}

/// The rotary tables (`[max_pos, d]` each) at packed positions `pos` (`[b, s]`): `[b, s, d]`.
pub(crate) fn rope_at(table: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let (b, s) = pos.dims2()?;
    let max = table.dim(0)?;
    let flat = pos.flatten_all()?;
    if let Some(p) = flat.to_vec1::<u32>()?.iter().find(|&&p| p as usize >= max) {
        bail!("position_ids: position {p} is beyond the model's {max} positions (max_position_embeddings)")
    }
    table
        .index_select(&flat, 0)?
        .reshape((b, s, ()))?
        .contiguous()
}
