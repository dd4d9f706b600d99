//! CRC32C (Castagnoli) of stored pieces, block by block, so that a load verifies exactly the
//! blocks it reads. The SSE4.2 `crc32` instruction where the CPU has it (about 8 bytes a
//! cycle), a table otherwise; both give the standard CRC-32C.

use candle_core::{bail, Result};

/// Bytes per checksummed block of a piece's data.
pub const BLOCK_BYTES: usize = 256 * 1024;

/// The reflected CRC-32C polynomial.
const POLY: u32 = 0x82F6_3B78;

const fn table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static TABLE: [u32; 256] = table();

fn crc32c_table(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = !0u32 as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        c = _mm_crc32_u64(c, u64::from_le_bytes(b));
    }
    let mut c = c as u32;
    for &b in words.remainder() {
        c = _mm_crc32_u8(c, b);
    }
    !c
}

/// The CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE4.2, checked just above.
        return unsafe { crc32c_sse42(data) };
    }
    crc32c_table(data)
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
    fn both_implementations_give_the_standard_crc32c() {
        // The check value of CRC-32C.
        assert_eq!(crc32c_table(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + i / 256) as u8).collect();
        for n in [0, 1, 7, 8, 9, 4096, 100_003] {
            assert_eq!(crc32c(&data[..n]), crc32c_table(&data[..n]), "{n} bytes");
        }
        assert_eq!(block_crcs(&data).len(), 1);
        assert_eq!(block_crcs(&vec![0u8; BLOCK_BYTES * 2 + 1]).len(), 3);
    }
}
