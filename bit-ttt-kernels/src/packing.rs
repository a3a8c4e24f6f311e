//! The 2-bit packed layout of ternary weight matrices.
//!
//! A weight matrix of `rows × cols` ternary values (rows = output features, cols = input features,
//! the PyTorch `[out, in]` orientation) is stored row by row. Each row is cut into blocks of
//! [`QK_TERNARY`] = 128 weights; the last block of a row is padded with zero weights.
//!
//! A [`BlockTernary`] is 32 bytes. Each weight is a 2-bit code `c = w + 1`:
//!
//! | weight | code |
//! |--------|------|
//! | -1     | `0b00` |
//! |  0     | `0b01` |
//! | +1     | `0b10` |
//!
//! (`0b11` never occurs; unpacking reports it as corrupt data.) Within a block, byte `j` (0..32)
//! holds the four weights `j`, `j + 32`, `j + 64` and `j + 96` at bit offsets 0, 2, 4 and 6. This
//! interleaving lets a SIMD kernel decode 32 consecutive weights of a group with one shift and one
//! mask over a 32-byte vector, and the `w + 1` code lets it multiply unsigned codes with signed int8
//! activations (`Σ c·x = Σ w·x + Σ x`) and correct with the activation sum afterwards.
//!
//! One `f32` scale per matrix (the BitNet b1.58 absmean `gamma`) is stored beside the blocks: the
//! effective weight is `w · scale`.
//!
//! This is the layout of files and of the CPU kernels. The GPU kernels keep the same 32-bit words
//! in another order, transposed once at upload so that neighbouring threads (rows) read
//! neighbouring words: `cube::layout` (feature `cubecl`) documents it.

use crate::KernelError;

/// Number of weights in one [`BlockTernary`].
pub const QK_TERNARY: usize = 128;

/// 128 ternary weights, 2 bits each. See the [module docs](self) for the bit layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockTernary {
    /// Packed codes: byte `j` holds weights `j + 32·g` at bits `2g..2g+2`, `g = 0..4`.
    pub qs: [u8; QK_TERNARY / 4],
}

const _: () = assert!(std::mem::size_of::<BlockTernary>() == 32);
const _: () = assert!(std::mem::align_of::<BlockTernary>() == 1);

/// The code of a zero weight: padding uses it, so padded weights contribute nothing.
pub const CODE_ZERO: u8 = 0b01;

impl BlockTernary {
    /// A block of zero weights.
    pub const ZERO: Self = Self {
        qs: [CODE_ZERO * 0b0101_0101; QK_TERNARY / 4],
    };

    /// The 2-bit code of weight `i` (0..128) of this block.
    #[inline]
    pub fn code(&self, i: usize) -> u8 {
        (self.qs[i % 32] >> (2 * (i / 32))) & 0b11
    }

    /// Reinterprets bytes as blocks without copying; `None` unless the length is a multiple of 32.
    pub fn slice_from_bytes(bytes: &[u8]) -> Option<&[BlockTernary]> {
        if !bytes
            .len()
            .is_multiple_of(std::mem::size_of::<BlockTernary>())
        {
            return None;
        }
        let n = bytes.len() / std::mem::size_of::<BlockTernary>();
        // SAFETY: `BlockTernary` is `#[repr(C)]` around `[u8; 32]`: size 32 and align 1 (both
        // checked at compile time above), and every byte pattern is a valid value. The new slice
        // covers exactly the `n · 32` bytes of `bytes` and borrows it for the same lifetime.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<BlockTernary>(), n) })
    }

    /// The bytes of blocks, as stored in a packed file.
    pub fn slice_as_bytes(blocks: &[BlockTernary]) -> &[u8] {
        // SAFETY: as in `slice_from_bytes`: plain bytes, no padding, align 1; same memory range.
        unsafe {
            std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
        }
    }

    /// Sets the 2-bit code of weight `i` (0..128).
    #[inline]
    fn set_code(&mut self, i: usize, code: u8) {
        let shift = 2 * (i / 32);
        let byte = &mut self.qs[i % 32];
        *byte = (*byte & !(0b11 << shift)) | (code << shift);
    }
}

/// Number of blocks that hold one row of `cols` weights.
#[inline]
pub fn blocks_per_row(cols: usize) -> usize {
    cols.div_ceil(QK_TERNARY)
}

/// A `rows × cols` ternary matrix, packed 2 bits a weight, with its per-tensor scale.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedTernary {
    rows: usize,
    cols: usize,
    scale: f32,
    blocks: Vec<BlockTernary>,
}

impl PackedTernary {
    /// Packs a row-major `rows × cols` matrix of values in {-1, 0, +1} with its scale.
    ///
    /// # Errors
    /// [`KernelError::LengthMismatch`] if `values.len() != rows * cols`,
    /// [`KernelError::NotTernary`] for any other value, [`KernelError::InvalidScale`] if the scale
    /// is not finite and positive.
    pub fn pack(values: &[i8], rows: usize, cols: usize, scale: f32) -> Result<Self, KernelError> {
        check_len("ternary values", rows * cols, values.len())?;
        check_scale(scale)?;
        let bpr = blocks_per_row(cols);
        let mut blocks = vec![BlockTernary::ZERO; rows * bpr];
        for (index, &value) in values.iter().enumerate() {
            if !(-1..=1).contains(&value) {
                return Err(KernelError::NotTernary { index, value });
            }
            let (row, col) = (index / cols, index % cols);
            let block = &mut blocks[row * bpr + col / QK_TERNARY];
            block.set_code(col % QK_TERNARY, (value + 1) as u8);
        }
        Ok(Self {
            rows,
            cols,
            scale,
            blocks,
        })
    }

    /// Wraps blocks that are already packed (for example read from a file), checking every code.
    ///
    /// # Errors
    /// [`KernelError::LengthMismatch`] if there are not `rows * ceil(cols / 128)` blocks,
    /// [`KernelError::InvalidCode`] if a weight (padding included) holds the code `0b11`,
    /// [`KernelError::InvalidScale`] for a bad scale.
    pub fn from_blocks(
        blocks: Vec<BlockTernary>,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<Self, KernelError> {
        TernaryView::new(&blocks, rows, cols, scale)?.verify_codes()?;
        Ok(Self {
            rows,
            cols,
            scale,
            blocks,
        })
    }

    /// Unpacks into a row-major `rows × cols` matrix of values in {-1, 0, +1}.
    pub fn unpack(&self) -> Vec<i8> {
        let bpr = blocks_per_row(self.cols);
        let mut values = Vec::with_capacity(self.rows * self.cols);
        for row in 0..self.rows {
            let row_blocks = &self.blocks[row * bpr..(row + 1) * bpr];
            values.extend(
                (0..self.cols)
                    .map(|col| row_blocks[col / QK_TERNARY].code(col % QK_TERNARY) as i8 - 1),
            );
        }
        values
    }

    /// Unpacks into the effective f32 weights `w · scale`, row-major `rows × cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.unpack()
            .into_iter()
            .map(|w| w as f32 * self.scale)
            .collect()
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The per-tensor scale (`gamma`).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// All blocks, row after row (`rows * ceil(cols / 128)` of them).
    pub fn blocks(&self) -> &[BlockTernary] {
        &self.blocks
    }

    /// The blocks of one row.
    pub fn row_blocks(&self, row: usize) -> &[BlockTernary] {
        let bpr = blocks_per_row(self.cols);
        &self.blocks[row * bpr..(row + 1) * bpr]
    }

    /// Size of the packed weights in bytes (without the scale).
    pub fn size_in_bytes(&self) -> usize {
        std::mem::size_of_val(self.blocks.as_slice())
    }

    /// A borrowed view of this matrix, the form every kernel takes.
    pub fn view(&self) -> TernaryView<'_> {
        TernaryView {
            rows: self.rows,
            cols: self.cols,
            scale: self.scale,
            blocks: &self.blocks,
        }
    }
}

/// A borrowed packed ternary matrix: shape, scale and blocks that live elsewhere (in a
/// [`PackedTernary`], or in the memory-mapped packed model file
/// of `bit-ttt-burn`).
///
/// The fields are private so that the invariant the kernels rely on always holds:
/// `blocks.len() == rows * ceil(cols / 128)` and the scale is finite and positive. The codes are
/// not checked by [`new`](Self::new) (that would read every weight); a `0b11` code is not a memory
/// hazard, but the products of such a row are unspecified (the reference reads it as `+2`, the
/// SIMD kernels may differ). Use [`verify_codes`](Self::verify_codes) to reject such data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TernaryView<'a> {
    rows: usize,
    cols: usize,
    scale: f32,
    blocks: &'a [BlockTernary],
}

impl<'a> TernaryView<'a> {
    /// A view of `blocks` as a `rows × cols` matrix with the given scale.
    ///
    /// # Errors
    /// [`KernelError::LengthMismatch`] if there are not `rows * ceil(cols / 128)` blocks,
    /// [`KernelError::InvalidScale`] for a bad scale.
    pub fn new(
        blocks: &'a [BlockTernary],
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<Self, KernelError> {
        let expected =
            rows.checked_mul(blocks_per_row(cols))
                .ok_or(KernelError::LengthMismatch {
                    what: "packed blocks",
                    expected: usize::MAX,
                    actual: blocks.len(),
                })?;
        check_len("packed blocks", expected, blocks.len())?;
        check_scale(scale)?;
        Ok(Self {
            rows,
            cols,
            scale,
            blocks,
        })
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The per-tensor scale (`gamma`).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Blocks per row, `ceil(cols / 128)`.
    pub fn blocks_per_row(&self) -> usize {
        blocks_per_row(self.cols)
    }

    /// All blocks, row after row.
    pub fn blocks(&self) -> &'a [BlockTernary] {
        self.blocks
    }

    /// The blocks of one row.
    pub fn row_blocks(&self, row: usize) -> &'a [BlockTernary] {
        let bpr = blocks_per_row(self.cols);
        &self.blocks[row * bpr..(row + 1) * bpr]
    }

    /// Size of the packed weights in bytes (without the scale).
    pub fn size_in_bytes(&self) -> usize {
        std::mem::size_of_val(self.blocks)
    }

    /// Checks that no weight, padding included, holds the invalid code `0b11`.
    ///
    /// # Errors
    /// [`KernelError::InvalidCode`] naming the first offending weight.
    pub fn verify_codes(&self) -> Result<(), KernelError> {
        let bpr = blocks_per_row(self.cols);
        for (b, block) in self.blocks.iter().enumerate() {
            // A byte holds an invalid code iff some 2-bit field is 0b11.
            if block.qs.iter().all(|&q| q & (q >> 1) & 0b0101_0101 == 0) {
                continue;
            }
            for i in 0..QK_TERNARY {
                if block.code(i) == 0b11 {
                    let (row, col) = (b / bpr, (b % bpr) * QK_TERNARY + i);
                    return Err(KernelError::InvalidCode { row, col });
                }
            }
        }
        Ok(())
    }

    /// Copies the view into an owned [`PackedTernary`], checking the codes.
    ///
    /// # Errors
    /// As [`PackedTernary::from_blocks`].
    pub fn to_owned(&self) -> Result<PackedTernary, KernelError> {
        PackedTernary::from_blocks(self.blocks.to_vec(), self.rows, self.cols, self.scale)
    }
}

impl<'a> From<&TernaryView<'a>> for TernaryView<'a> {
    fn from(w: &TernaryView<'a>) -> Self {
        *w
    }
}

impl<'a> From<&'a PackedTernary> for TernaryView<'a> {
    fn from(w: &'a PackedTernary) -> Self {
        w.view()
    }
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), KernelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

fn check_scale(scale: f32) -> Result<(), KernelError> {
    if scale.is_finite() && scale > 0.0 {
        Ok(())
    } else {
        Err(KernelError::InvalidScale(scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic ternary values without a random-number dependency.
    fn ternary_values(n: usize, seed: u64) -> Vec<i8> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % 3) as i8 - 1
            })
            .collect()
    }

    #[test]
    fn round_trip_on_odd_shapes() {
        for &(rows, cols) in &[
            (1, 1),
            (3, 31),
            (17, 127),
            (2, 128),
            (5, 129),
            (33, 1000),
            (1, 4097),
        ] {
            let values = ternary_values(rows * cols, (rows * 31 + cols) as u64);
            let packed = PackedTernary::pack(&values, rows, cols, 0.5).unwrap();
            assert_eq!(packed.blocks().len(), rows * cols.div_ceil(128));
            assert_eq!(packed.unpack(), values, "round trip {rows}x{cols}");
            let again =
                PackedTernary::from_blocks(packed.blocks().to_vec(), rows, cols, 0.5).unwrap();
            assert_eq!(again, packed);
        }
    }

    #[test]
    fn bit_layout_is_as_documented() {
        // Row of 128: weight 0 = +1, weight 32 = -1, weight 97 = +1, everything else 0.
        let mut values = vec![0i8; 128];
        values[0] = 1;
        values[32] = -1;
        values[97] = 1;
        let packed = PackedTernary::pack(&values, 1, 128, 1.0).unwrap();
        let qs = packed.blocks()[0].qs;
        // byte 0: w0 = +1 (0b10) at bits 0-1, w32 = -1 (0b00) at 2-3, w64 = 0 (0b01), w96 = 0 (0b01).
        assert_eq!(qs[0], 0b01_01_00_10);
        // byte 1: w1 = 0, w33 = 0, w65 = 0, w97 = +1.
        assert_eq!(qs[1], 0b10_01_01_01);
        assert_eq!(qs[2], 0b01_01_01_01);
    }

    #[test]
    fn padding_is_zero_weights() {
        let packed = PackedTernary::pack(&[1, -1, 1], 1, 3, 2.0).unwrap();
        let block = packed.blocks()[0];
        assert!((3..128).all(|i| block.code(i) == CODE_ZERO));
        assert_eq!(packed.dequantize(), vec![2.0, -2.0, 2.0]);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            PackedTernary::pack(&[0, 2, 0], 1, 3, 1.0),
            Err(KernelError::NotTernary { index: 1, value: 2 })
        );
        assert!(matches!(
            PackedTernary::pack(&[0, 1], 1, 3, 1.0),
            Err(KernelError::LengthMismatch {
                expected: 3,
                actual: 2,
                ..
            })
        ));
        assert_eq!(
            PackedTernary::pack(&[0], 1, 1, f32::NAN)
                .unwrap_err()
                .to_string(),
            "invalid scale NaN: must be finite and > 0"
        );
        let mut block = BlockTernary::ZERO;
        block.qs[5] = 0b11 << 4; // weight 5 + 64 gets the invalid code
        assert_eq!(
            PackedTernary::from_blocks(vec![block], 1, 100, 1.0),
            Err(KernelError::InvalidCode { row: 0, col: 69 })
        );
    }
}
