//! Dense matrices stored 8 bits a weight with one f32 scale per row, for the full-precision
//! projections that decide decode speed once the blocks are ternary: the LM head of a model
//! with a large vocabulary (BitNet b1.58 2B-4T's tied head, `128,256 × 2,560`, holds more
//! weights than all its ternary layers together). A quarter of the f32 bytes to read, with
//! the error of one rounding per weight (at most half a step of `max|row| / 127`).
//!
//! Rows are output features (`[d_output, d_input]`), so an output is one contiguous dot
//! product: [`Int8Rows::gemv`] quantizes the input to int8 once (absmax, like the ternary
//! projections' activations), then reads the matrix once in memory order, rows split over the
//! threads. The products are integer sums ([`dot_i8`]), exact, so every kernel and thread
//! count gives the same outputs bit for bit. (Widening the weights to f32 instead ran at a
//! third of the read bandwidth on a Zen 3 core: compute-bound.)

use rayon::prelude::*;

use crate::KernelError;

/// Below this many weights a product stays on one thread (splitting costs more).
const MIN_PARALLEL: usize = 1 << 16;

/// The widest row [`Int8Rows`] takes: an int8 dot product of `n` codes in -127..=127 is at
/// most `n · 127²`, which fits an `i32` up to 133,143 codes.
pub const MAX_INT8_COLS: usize = 1 << 17;

/// A `rows × cols` matrix, `w[r][c] ≈ values[r·cols + c] · scales[r]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Rows {
    rows: usize,
    cols: usize,
    /// `[rows, cols]`, row-major, in -127..=127.
    values: Vec<i8>,
    /// `[rows]`: `max|w[r]| / 127` (0 for a zero row).
    scales: Vec<f32>,
}

impl Int8Rows {
    /// Quantizes a row-major `[rows, cols]` matrix, each row with its own absmax scale.
    ///
    /// # Errors
    /// [`KernelError::LengthMismatch`] if `w` is not `rows · cols` long or `cols` is more than
    /// [`MAX_INT8_COLS`]; [`KernelError::InvalidScale`] if a weight is not finite.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        Self::quantize_with(w, rows, cols, |r, c| w[r * cols + c])
    }

    /// Quantizes a matrix given in the `[d_input, d_output]` orientation (Burn's `Linear`
    /// weight): row `r` of the result is column `r` of `w`.
    ///
    /// # Errors
    /// As [`quantize`](Self::quantize).
    pub fn quantize_columns(
        w: &[f32],
        d_input: usize,
        d_output: usize,
    ) -> Result<Self, KernelError> {
        Self::quantize_with(w, d_output, d_input, |r, c| w[c * d_output + r])
    }

    fn quantize_with(
        w: &[f32],
        rows: usize,
        cols: usize,
        at: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Result<Self, KernelError> {
        if cols > MAX_INT8_COLS {
            return Err(KernelError::LengthMismatch {
                what: "int8 rows: columns (at most MAX_INT8_COLS)",
                expected: MAX_INT8_COLS,
                actual: cols,
            });
        }
        let expected = rows.saturating_mul(cols);
        if w.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "int8 rows",
                expected,
                actual: w.len(),
            });
        }
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(KernelError::InvalidScale(*bad));
        }
        let mut values = vec![0i8; expected];
        let mut scales = vec![0.0f32; rows];
        // A tile of ROW_TILE rows at a time, each pass over its columns in order: in the
        // `[d_input, d_output]` orientation a row is a column of `w`, and reading it alone
        // would touch a new cache line per value (seconds for a large head); a tile reads
        // ROW_TILE neighbouring values per line instead.
        const ROW_TILE: usize = 64;
        values
            .par_chunks_mut((ROW_TILE * cols).max(1))
            .zip(scales.par_chunks_mut(ROW_TILE))
            .enumerate()
            .for_each(|(t, (tile, tile_scales))| {
                let r0 = t * ROW_TILE;
                let mut max = [0.0f32; ROW_TILE];
                for c in 0..cols {
                    for (i, m) in max[..tile_scales.len()].iter_mut().enumerate() {
                        *m = m.max(at(r0 + i, c).abs());
                    }
                }
                let mut inv = [0.0f32; ROW_TILE];
                for ((s, v), m) in tile_scales.iter_mut().zip(&mut inv).zip(&max) {
                    *s = m / 127.0;
                    *v = if *m > 0.0 { 127.0 / m } else { 0.0 };
                }
                for c in 0..cols {
                    for (i, v) in inv[..tile_scales.len()].iter().enumerate() {
                        tile[i * cols + c] = (at(r0 + i, c) * v).round().clamp(-127.0, 127.0) as i8;
                    }
                }
            });
        Ok(Self {
            rows,
            cols,
            values,
            scales,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a product reads: the codes and the scales.
    pub fn size_in_bytes(&self) -> usize {
        self.values.len() + self.scales.len() * std::mem::size_of::<f32>()
    }

    /// Row `r`'s weights as the quantization gives them back (`code · scale`).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let s = self.scales[r];
        self.values[r * self.cols..][..self.cols]
            .iter()
            .map(|&q| f32::from(q) * s)
            .collect()
    }

    /// `out[r] ≈ scales[r] · Σ_c values[r][c] · x[c]`: `x` is quantized to int8 with its
    /// absmax (`s = max|x| / 127`, one more rounding), each row's integer dot product
    /// ([`dot_i8`]) is scaled by `scales[r] · s`. Rows split over the current rayon pool when
    /// `threads > 1` and the matrix is large enough (call it inside
    /// [`install`](super::install) for this crate's pool).
    ///
    /// # Panics
    /// If `x` is not `cols` long or `out` not `rows` long (a programmer error).
    pub fn gemv(&self, x: &[f32], out: &mut [f32], threads: usize) {
        assert_eq!(x.len(), self.cols, "int8 rows: input of {} values", x.len());
        assert_eq!(
            out.len(),
            self.rows,
            "int8 rows: output of {} values",
            out.len()
        );
        let (xq, x_scale) = quantize_absmax(x);
        let row = |r: usize| {
            let acc = dot_i8(&self.values[r * self.cols..][..self.cols], &xq);
            acc as f32 * (self.scales[r] * x_scale)
        };
        if threads > 1 && self.values.len() >= MIN_PARALLEL {
            let chunk = self.rows.div_ceil(threads * 8).max(64);
            out.par_chunks_mut(chunk).enumerate().for_each(|(c, part)| {
                for (i, o) in part.iter_mut().enumerate() {
                    *o = row(c * chunk + i);
                }
            });
        } else {
            for (r, o) in out.iter_mut().enumerate() {
                *o = row(r);
            }
        }
    }
}

/// `x` as int8 codes in -127..=127 and their scale `max|x| / 127`: 0 for a zero (or empty)
/// input; NaN if a value is not finite, so that the outputs are NaN as the f32 product's would
/// be (a NaN would otherwise vanish: `f32::max` skips it and `NaN as i8` is 0).
fn quantize_absmax(x: &[f32]) -> (Vec<i8>, f32) {
    if x.iter().any(|v| !v.is_finite()) {
        return (vec![0; x.len()], f32::NAN);
    }
    let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max == 0.0 {
        return (vec![0; x.len()], 0.0);
    }
    let inv = 127.0 / max;
    let codes = x
        .iter()
        .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (codes, max / 127.0)
}

/// `Σ a[i] · b[i]` of int8 vectors, exactly: AVX2 where the CPU has it, else
/// [`dot_i8_scalar`]. The codes must lie in -127..=127 (the AVX2 sign trick turns a -128 in `b`
/// against a negative `a` into the wrong sign) and the vectors hold at most
/// [`MAX_INT8_COLS`] codes (so the sum fits an `i32`); [`Int8Rows`] keeps both.
///
/// # Panics
/// If the slices differ in length (a programmer error); in debug builds, for a -128 or a
/// longer vector.
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    assert_eq!(
        a.len(),
        b.len(),
        "dot_i8: {} and {} values",
        a.len(),
        b.len()
    );
    debug_assert!(
        a.len() <= MAX_INT8_COLS && !a.contains(&i8::MIN) && !b.contains(&i8::MIN),
        "dot_i8: codes must lie in -127..=127, at most MAX_INT8_COLS of them"
    );
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: the CPU has AVX2; the lengths are equal; the codes of this module are in
        // -127..=127.
        return unsafe { super::avx2::dot_i8(a, b) };
    }
    dot_i8_scalar(a, b)
}

/// The scalar reference of [`dot_i8`].
pub fn dot_i8_scalar(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| i32::from(a) * i32::from(b))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_and_multiply_by_hand() {
        // Row 0: max 2 → scale 2/127, codes [127, -64]; row 1 is zero.
        let m = Int8Rows::quantize(&[2.0, -1.0, 0.0, 0.0], 2, 2).unwrap();
        assert_eq!(m.values, vec![127, -64, 0, 0]);
        assert_eq!(m.scales, vec![2.0 / 127.0, 0.0]);
        let mut out = [f32::NAN; 2];
        m.gemv(&[1.0, 1.0], &mut out, 1);
        assert!(
            (out[0] - (127.0 - 64.0) * 2.0 / 127.0).abs() < 1e-6,
            "{out:?}"
        );
        assert_eq!(out[1], 0.0);
        // The column orientation gives the same matrix.
        let t = Int8Rows::quantize_columns(&[2.0, 0.0, -1.0, 0.0], 2, 2).unwrap();
        assert_eq!(t, m);
        assert!(Int8Rows::quantize(&[1.0, f32::NAN], 1, 2).is_err());
        assert!(Int8Rows::quantize(&[1.0], 1, 2).is_err());
    }

    /// The fast dot product against the reference on odd lengths (tails of every size, the
    /// extreme codes), bit for bit; the threaded product against one thread; the result
    /// within the two roundings of the f32 product.
    #[test]
    fn fast_dot_and_threads_agree_with_the_reference() {
        // Without AVX2 this compares the reference with itself (and says so); the rest holds
        // either way.
        crate::cpu::avx2_under_test("dot_i8");
        for n in [0, 1, 31, 32, 33, 63, 64, 65, 100, 257, 2561] {
            let a: Vec<i8> = (0..n)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let b: Vec<i8> = (0..n)
                .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
                .collect();
            assert_eq!(dot_i8(&a, &b), dot_i8_scalar(&a, &b), "n {n}");
            let extreme = vec![127i8; n];
            let low = vec![-127i8; n];
            assert_eq!(dot_i8(&extreme, &low), -(n as i32) * 127 * 127, "n {n}");
        }
        let (rows, cols) = (301, 257);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 * 0.414_213_5).fract() - 0.5) * 0.2)
            .collect();
        let m = Int8Rows::quantize(&w, rows, cols).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.1).sin()).collect();
        let mut one = vec![0.0; rows];
        m.gemv(&x, &mut one, 1);
        for threads in [2, 3] {
            let got = super::super::install(threads, || {
                let mut got = vec![f32::NAN; rows];
                m.gemv(&x, &mut got, threads);
                got
            });
            assert_eq!(got, one, "{threads} threads");
        }
        // Half a step of each weight and of each input, per product.
        let x_step = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        for (r, &y) in one.iter().enumerate() {
            let row = &w[r * cols..][..cols];
            let exact: f32 = row.iter().zip(&x).map(|(w, x)| w * x).sum();
            let w_step = m.scales[r];
            let bound: f32 = row
                .iter()
                .zip(&x)
                .map(|(w, x)| 0.5 * w_step * x.abs() + 0.5 * x_step * (w.abs() + 0.5 * w_step))
                .sum::<f32>()
                + 1e-5;
            assert!(
                (y - exact).abs() <= bound,
                "row {r}: {y} vs {exact} (bound {bound})"
            );
        }
        // A zero input gives zeros, a NaN in the input NaNs (not a silent zero).
        let mut zeros = vec![f32::NAN; rows];
        m.gemv(&vec![0.0; cols], &mut zeros, 1);
        assert!(zeros.iter().all(|&v| v == 0.0));
        let mut with_nan = x.clone();
        with_nan[3] = f32::NAN;
        m.gemv(&with_nan, &mut zeros, 1);
        assert!(zeros.iter().all(|v| v.is_nan()));
        assert!(Int8Rows::quantize(&[], 0, MAX_INT8_COLS + 1).is_err());
    }
}
