//! Per-token absmax int8 quantization of activations (the "A8" of W1.58A8).

/// A batch of activations quantized to int8, one scale per token.
///
/// For token `t` with values `x`, `s_t = 127 / max(max|x|, eps)` and
/// `q = clamp(round_half_even(x · s_t), -128, 127)`; the dequantized value is `q / s_t`.
/// The scale is computed as `(1 / m) · 127`, the same floating-point operations
/// `bit-ttt-burn`'s BitLinear uses, so both produce bit-identical codes.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedActivations {
    /// Number of tokens (rows).
    pub tokens: usize,
    /// Values per token (columns).
    pub cols: usize,
    /// Codes, row-major `[tokens, cols]`.
    pub values: Vec<i8>,
    /// `s_t`, one per token.
    pub scales: Vec<f32>,
}

impl QuantizedActivations {
    /// Quantizes a row-major `[tokens, cols]` f32 batch.
    ///
    /// # Panics
    /// If `x.len()` is not a multiple of `cols` (a programmer error).
    pub fn quantize(x: &[f32], cols: usize, eps: f32) -> Self {
        assert!(
            cols > 0 && x.len().is_multiple_of(cols),
            "activations of length {} are not [tokens, cols={cols}]",
            x.len()
        );
        let tokens = x.len() / cols;
        let mut values = Vec::with_capacity(x.len());
        let mut scales = Vec::with_capacity(tokens);
        for row in x.chunks_exact(cols) {
            let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(eps);
            let scale = (1.0 / absmax) * 127.0;
            scales.push(scale);
            values.extend(
                row.iter()
                    .map(|v| (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8),
            );
        }
        Self {
            tokens,
            cols,
            values,
            scales,
        }
    }

    /// The codes of token `t`.
    pub fn row(&self, t: usize) -> &[i8] {
        &self.values[t * self.cols..(t + 1) * self.cols]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizes_by_hand() {
        // absmax 2 → s = 63.5; 1.0·63.5 = 63.5 → 64 (half to even); -2 → -127; 0.01·63.5 = 0.635 → 1.
        let q = QuantizedActivations::quantize(&[1.0, -2.0, 0.01, 0.0, 0.0, 0.0], 3, 1e-5);
        assert_eq!(q.tokens, 2);
        assert_eq!(q.row(0), &[64, -127, 1]);
        assert_eq!(q.scales[0], 63.5);
        // An all-zero row gets the eps scale and zero codes, never NaN.
        assert_eq!(q.row(1), &[0, 0, 0]);
        assert!(q.scales[1].is_finite());
    }
}
