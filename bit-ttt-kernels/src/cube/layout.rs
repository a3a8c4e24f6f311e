//! The device layout of packed ternary weights: the CPU blocks' 32-bit words, stored word-major.
//!
//! The CPU layout ([`crate::packing`]) keeps a row's blocks together: row `r` is
//! `blocks_per_row` blocks of 32 bytes, so 8 little-endian `u32` words per block. On a GPU one
//! thread computes one output row, and the 32 threads of a warp take 32 neighbouring rows; if
//! each read its own row's next word, the warp's 32 reads would land 4 · `words_per_row`
//! bytes apart. The device copy therefore transposes the words once, at upload:
//!
//! ```text
//! device[k · rows + r] = word k of row r        (k = 8 · block + m, m = 0..8)
//! ```
//!
//! so when the warp reads word `k` of its 32 rows it reads 128 consecutive bytes. The bits of a
//! word are unchanged: byte `j` (0..4) of word `m` of a block is the CPU block's byte
//! `4m + j`, whose bits `2g..2g+2` (g = 0..4) hold weight `4m + j + 32g` of the block, coded
//! `c = w + 1`. For a fixed `g` the four bytes of a word hold four consecutive weights, which
//! meet four consecutive activations: one 4-wide vector load.

use crate::packing::TernaryView;

/// 32-bit words in one packed block of 128 weights.
pub const WORDS_PER_BLOCK: usize = 8;

/// The words of `weights` in the device order: word `k` of row `r` at `k · rows + r`.
///
/// # Shapes
/// - weights: `[rows, cols]`, packed in `blocks_per_row(cols)` blocks a row
/// - result: `[words_per_row, rows]` with `words_per_row = 8 · blocks_per_row(cols)`
pub fn device_words(weights: TernaryView<'_>) -> Vec<u32> {
    let rows = weights.rows();
    let words_per_row = WORDS_PER_BLOCK * weights.blocks_per_row();
    let mut words = vec![0u32; words_per_row * rows];
    for r in 0..rows {
        for (b, block) in weights.row_blocks(r).iter().enumerate() {
            for (m, bytes) in block.qs.chunks_exact(4).enumerate() {
                let k = WORDS_PER_BLOCK * b + m;
                words[k * rows + r] = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
    }
    words
}

/// The weight at (`row`, `col`) read back from [`device_words`], as -1, 0 or +1: the layout's
/// definition in one function, so tests can check the kernels' indexing against it.
pub fn device_weight(words: &[u32], rows: usize, row: usize, col: usize) -> i8 {
    let (block, within) = (col / 128, col % 128);
    let (g, rest) = (within / 32, within % 32);
    let (m, byte) = (rest / 4, rest % 4);
    let k = WORDS_PER_BLOCK * block + m;
    let code = (words[k * rows + row] >> (8 * byte + 2 * g)) & 0b11;
    code as i8 - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PackedTernary;

    /// Every weight of odd-shaped matrices reads back through the device order.
    #[test]
    fn device_words_hold_every_weight() {
        for (rows, cols) in [(1, 1), (3, 127), (5, 129), (2, 300)] {
            let values: Vec<i8> = (0..rows * cols).map(|i| (i * 7 % 3) as i8 - 1).collect();
            let packed = PackedTernary::pack(&values, rows, cols, 1.0).unwrap();
            let words = device_words(packed.view());
            assert_eq!(words.len(), rows * 8 * cols.div_ceil(128));
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        device_weight(&words, rows, r, c),
                        values[r * cols + c],
                        "({r}, {c})"
                    );
                }
                // Padding reads as zero weights.
                for c in cols..cols.div_ceil(128) * 128 {
                    assert_eq!(device_weight(&words, rows, r, c), 0);
                }
            }
        }
    }

    /// Hand-checked: weight 0 of row 1 in a 2-row matrix is the low 2 bits of device word 1.
    #[test]
    fn first_word_of_the_second_row_follows_the_first() {
        let mut values = vec![0i8; 2 * 128];
        values[128] = 1; // row 1, col 0 -> code 0b10
        values[128 + 33] = -1; // row 1, col 33 = 32·1 + 1: byte 1, bits 2..4 -> code 0b00
        let packed = PackedTernary::pack(&values, 2, 128, 1.0).unwrap();
        let words = device_words(packed.view());
        // Zero weights are 0b01 everywhere else: 0x55 per byte. Byte 0 holds weights 0, 32, 64,
        // 96 (weight 0 is +1: 0b01_01_01_10 = 0x56); byte 1 holds 1, 33, 65, 97 (weight 33 is
        // -1, bits 2..4: 0b01_01_00_01 = 0x51).
        assert_eq!(words[0], 0x5555_5555);
        assert_eq!(words[1], 0x5555_5156);
    }
}
