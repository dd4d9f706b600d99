//! CRC32C (Castagnoli) of stored pieces, block by block, so that a load verifies exactly the
//! blocks it reads. The `crc32c` crate computes it (the CPU's CRC instructions on x86 and ARM,
//! three streams interleaved: 2.2× our former single-stream SSE4.2 loop on this machine).

use candle_core::{bail, Result};

/// Bytes per checksummed block of a piece's data.
pub const BLOCK_BYTES: usize = 256 * 1024;

/// The CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The checksum of each `BLOCK_BYTES` block of `data` (the last one may be shorter).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_BYTES).map(crc32c).collect()
}

/// What a stored piece's data must hash to, block by block, and where it comes from (for
/// messages).
pub(crate) struct PieceCheck<'a> {
    pub crcs: &'a [u32],
    pub file: &'a str,
}

impl PieceCheck<'_> {
    /// Verifies the blocks of `data` that `start..start + len` touches and that `done` does not
    /// mark yet, then marks them.
    pub fn verify(
        &self,
        name: &str,
        data: &[u8],
        start: usize,
        len: usize,
        done: &mut [bool],
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let want_blocks = data.len().div_ceil(BLOCK_BYTES);
        if self.crcs.len() != want_blocks || done.len() != want_blocks {
            bail!(
                "tensor {name} in {}: {} bytes need {want_blocks} checksums, the metadata has {}: \
                 the checkpoint is corrupt",
                self.file,
                data.len(),
                self.crcs.len()
            )
        }
        if start + len > data.len() {
            bail!(
                "tensor {name} in {}: bytes {start}..{} are past its {} bytes",
                self.file,
                start + len,
                data.len()
            )
        }
        let (first, last) = (start / BLOCK_BYTES, (start + len - 1) / BLOCK_BYTES);
        for (b, done) in done.iter_mut().enumerate().take(last + 1).skip(first) {
            if *done {
                continue;
            }
            let (lo, hi) = (b * BLOCK_BYTES, ((b + 1) * BLOCK_BYTES).min(data.len()));
            let got = crc32c(&data[lo..hi]);
            if got != self.crcs[b] {
                bail!(
                    "tensor {name} in {}: bytes {lo}..{hi} of its data fail their CRC-32C check \
                     (stored {:08x}, read {got:08x}): the file is corrupt or was replaced",
                    self.file,
                    self.crcs[b]
                )
            }
            *done = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_the_standard_crc32c() {
        // The check value of CRC-32C, and RFC 3720's 32 bytes of zeros.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + i / 256) as u8).collect();
        assert_eq!(block_crcs(&data).len(), 1);
        assert_eq!(block_crcs(&vec![0u8; BLOCK_BYTES * 2 + 1]).len(), 3);
    }
}
