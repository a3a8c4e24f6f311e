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
        let mut values = vec![0i8; x.len()];
        // Several tokens (a prefill) quantized on a rayon pool this runs in (the kernels'
        // inside `cpu::install` with several threads) spread over its threads: a serial pass
        // would hold the others back. Each row's codes and scale are its own, so the result is
        // the same either way.
        let in_pool = rayon::current_thread_index().is_some() && rayon::current_num_threads() > 1;
        let scales = if tokens > 1 && in_pool {
            use rayon::prelude::*;
            x.par_chunks_exact(cols)
                .zip(values.par_chunks_exact_mut(cols))
                .map(|(row, codes)| quantize_row(row, eps, codes))
                .collect()
        } else {
            x.chunks_exact(cols)
                .zip(values.chunks_exact_mut(cols))
                .map(|(row, codes)| quantize_row(row, eps, codes))
                .collect()
        };
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

/// Quantizes one token into `codes` and returns its scale: the AVX2 kernel where the CPU has
/// it (quantizing is a scalar `round` call per value otherwise, a few percent of a decode step),
/// else [`quantize_row_scalar`]; both give the same codes and scale.
fn quantize_row(row: &[f32], eps: f32, codes: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: the CPU has AVX2; `codes` is as long as `row` (the caller's chunks).
        return unsafe { super::avx2::quantize_row(row, eps, codes) };
    }
    quantize_row_scalar(row, eps, codes)
}

/// The scalar reference of [`QuantizedActivations::quantize`] for one token: `absmax` ignores
/// NaN (as `f32::max` does), a NaN value gets code 0.
pub(crate) fn quantize_row_scalar(row: &[f32], eps: f32, codes: &mut [i8]) -> f32 {
    let scale = scale_of(row.iter().fold(0.0f32, |m, v| m.max(v.abs())), eps);
    for (c, &v) in codes.iter_mut().zip(row) {
        *c = code_of(v, scale);
    }
    scale
}

/// `s = 127 / max(absmax, eps)`, computed as `(1 / m) · 127` like BitLinear does.
pub(crate) fn scale_of(absmax: f32, eps: f32) -> f32 {
    (1.0 / absmax.max(eps)) * 127.0
}

/// The int8 code of one value.
pub(crate) fn code_of(v: f32, scale: f32) -> i8 {
    (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8
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

    /// The dispatching quantizer (AVX2 here) equals the scalar one, codes and scales, on odd
    /// lengths, ties, huge values, infinities and NaN.
    #[test]
    fn every_quantizer_equals_the_scalar_one() {
        crate::cpu::avx2_under_test("the AVX2 int8 quantizer");
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut ties = 0;
        for len in [1, 7, 8, 31, 32, 33, 100, 1000, 4097] {
            for case in 0..4 {
                let mut row: Vec<f32> = (0..len)
                    .map(|_| (next() % 20001) as f32 / 1000.0 - 10.0)
                    .collect();
                match case {
                    // Absmax 1, so the scale is exactly 127: values (n + 0.5) / 127 mostly scale
                    // back to exact ties (checked below).
                    1 => {
                        row.iter_mut()
                            .enumerate()
                            .for_each(|(i, v)| *v = ((i % 200) as f32 - 99.5) / 127.0);
                        row[0] = 1.0;
                        ties += row
                            .iter()
                            .filter(|&&v| (v * 127.0).fract().abs() == 0.5)
                            .count();
                    }
                    2 => {
                        row[len / 2] = f32::NAN;
                        row[len - 1] = 3.0e38;
                    }
                    3 => {
                        row[0] = f32::INFINITY;
                        row[len / 3] = f32::NEG_INFINITY;
                        row[len - 1] = f32::NAN;
                    }
                    _ => {}
                }
                let (mut want, mut got) = (vec![0i8; len], vec![0i8; len]);
                let want_scale = quantize_row_scalar(&row, 1e-5, &mut want);
                let got_scale = quantize_row(&row, 1e-5, &mut got);
                assert_eq!(got, want, "len {len} case {case}");
                assert_eq!(
                    got_scale.to_bits(),
                    want_scale.to_bits(),
                    "len {len} case {case}"
                );
            }
        }
        assert!(ties > 1000, "only {ties} exact ties were tested");
    }
}
