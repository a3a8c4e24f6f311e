//! Scalar reference kernels: plain loops, always available, the ground truth for every fast kernel.
//!
//! The final scaling of every kernel goes through [`finish_i8`](super::finish_i8) and
//! [`finish_f32`](super::finish_f32), so the faster kernels produce bit-identical W1.58A8 outputs.

use super::{assert_product_shapes, finish_f32, finish_i8, i8_factor, QuantizedActivations};
use crate::packing::{BlockTernary, TernaryView, QK_TERNARY};

/// Integer dot product of one packed row with int8 activations: `Σ_k w_k · x_k`.
///
/// `x` may be shorter than the row's padded length; padded weights are zero.
pub fn dot_i8(row: &[BlockTernary], x: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (block, xs) in row.iter().zip(x.chunks(QK_TERNARY)) {
        for (i, &xv) in xs.iter().enumerate() {
            acc += (block.code(i) as i32 - 1) * xv as i32;
        }
    }
    acc
}

/// Dot product of one packed row with f32 activations (unscaled: `Σ_k w_k · x_k`).
pub fn dot_f32(row: &[BlockTernary], x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (block, xs) in row.iter().zip(x.chunks(QK_TERNARY)) {
        for (i, &xv) in xs.iter().enumerate() {
            acc += (block.code(i) as f32 - 1.0) * xv;
        }
    }
    acc
}

/// W1.58A8 product: `out[t, r] = (Σ_k W[r, k] · q[t, k]) · gamma / s_t`.
///
/// `w` is a [`&PackedTernary`](crate::PackedTernary) or a [`TernaryView`]. Single-threaded.
///
/// # Shapes
/// - `x`: `[tokens, cols]` codes with `tokens` scales
/// - `out`: `[tokens, rows]`, row-major
pub fn gemm_i8<'a>(w: impl Into<TernaryView<'a>>, x: &QuantizedActivations, out: &mut [f32]) {
    let w = w.into();
    assert_product_shapes(w, x.values.len(), x.tokens, out.len());
    for t in 0..x.tokens {
        let xs = x.row(t);
        let factor = i8_factor(w.scale(), x.scales[t]);
        for (r, y) in out[t * w.rows()..(t + 1) * w.rows()].iter_mut().enumerate() {
            *y = finish_i8(dot_i8(w.row_blocks(r), xs), factor);
        }
    }
}

/// W1.58A16 product: `out[t, r] = (Σ_k W[r, k] · x[t, k]) · gamma`.
///
/// `w` is a [`&PackedTernary`](crate::PackedTernary) or a [`TernaryView`]. Single-threaded.
///
/// # Shapes
/// - `x`: `[tokens, cols]`, row-major
/// - `out`: `[tokens, rows]`, row-major
pub fn gemm_f32<'a>(w: impl Into<TernaryView<'a>>, x: &[f32], tokens: usize, out: &mut [f32]) {
    let w = w.into();
    assert_product_shapes(w, x.len(), tokens, out.len());
    for t in 0..tokens {
        let xs = &x[t * w.cols()..(t + 1) * w.cols()];
        for (r, y) in out[t * w.rows()..(t + 1) * w.rows()].iter_mut().enumerate() {
            *y = finish_f32(dot_f32(w.row_blocks(r), xs), w.scale());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PackedTernary;

    #[test]
    fn gemm_by_hand() {
        // W = [[1, 0, -1], [-1, 1, 1]], gamma = 0.5; one token x = [2, -1, 1] (already int8).
        let w = PackedTernary::pack(&[1, 0, -1, -1, 1, 1], 2, 3, 0.5).unwrap();
        let x = QuantizedActivations {
            tokens: 1,
            cols: 3,
            values: vec![2, -1, 1],
            scales: vec![4.0],
        };
        let mut out = [0.0f32; 2];
        gemm_i8(&w, &x, &mut out);
        // Row 0: 2 - 1 = 1 → 1 · 0.5 / 4 = 0.125. Row 1: -2 - 1 + 1 = -2 → -0.25.
        assert_eq!(out, [0.125, -0.25]);

        let mut out = [0.0f32; 2];
        gemm_f32(&w, &[2.0, -1.0, 1.0], 1, &mut out);
        assert_eq!(out, [0.5, -1.0]);

        // A view gives the same.
        let mut out = [0.0f32; 2];
        gemm_f32(w.view(), &[2.0, -1.0, 1.0], 1, &mut out);
        assert_eq!(out, [0.5, -1.0]);
    }

    #[test]
    #[should_panic(expected = "activations hold 4 values, expected [tokens=1, cols=3]")]
    fn wrong_shape_panics_with_shapes() {
        let w = PackedTernary::pack(&[1, 0, -1], 1, 3, 1.0).unwrap();
        let mut out = [0.0f32; 1];
        gemm_f32(&w, &[0.0; 4], 1, &mut out);
    }
}
