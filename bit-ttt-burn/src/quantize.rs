//! BitNet b1.58 quantizers as Burn tensor functions, with and without the straight-through estimator.
//!
//! - Weights, per tensor (absmean): `gamma = max(mean|W|, eps)`, `Wq = clamp(round(W / gamma), -1, 1)`;
//!   the effective weight is `Wq · gamma`.
//! - Activations, per token (absmax over the last dimension): `s = 127 / max(max|x|, eps)`,
//!   `xq = clamp(round(x · s), -128, 127) / s`.
//!
//! `round` is Burn's round-half-to-even, the rounding `bit-ttt-kernels` uses too, so the packed
//! inference path sees exactly the codes training saw.

use burn::tensor::{backend::Backend, Tensor};

/// Ternary codes of a weight matrix and its absmean scale.
///
/// # Shapes
/// - `weight`: `[d_output, d_input]`
/// - returns: codes `[d_output, d_input]` with values in {-1, 0, +1}, and `gamma` `[1]`
pub fn ternary_codes<B: Backend>(weight: Tensor<B, 2>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let gamma = weight.clone().abs().mean().clamp_min(eps); // [1]
    let codes = weight
        .div(gamma.clone().unsqueeze::<2>()) // [d_output, d_input] / [1, 1]
        .round()
        .clamp(-1.0, 1.0);
    (codes, gamma)
}

/// The effective ternary weight `Wq · gamma` (no gradient trick).
///
/// # Shapes
/// - `weight`, returns: `[d_output, d_input]`
pub fn quantize_weight<B: Backend>(weight: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let (codes, gamma) = ternary_codes(weight, eps);
    codes.mul(gamma.unsqueeze::<2>())
}

/// Activations quantized to int8 levels per token and returned dequantized (no gradient trick).
///
/// # Shapes
/// - `x`, returns: `[..., d]`, quantized over the last dimension
pub fn quantize_activations<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let scale = activation_scale(x.clone(), eps); // [..., 1]
    x.mul(scale.clone()).round().clamp(-128.0, 127.0).div(scale)
}

/// The per-token scale `s = 127 / max(max|x|, eps)`, computed as `(1 / m) · 127`.
///
/// # Shapes
/// - `x`: `[..., d]`; returns `[..., 1]`
pub fn activation_scale<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    x.abs()
        .max_dim(D - 1)
        .clamp_min(eps)
        .recip()
        .mul_scalar(127.0)
}

/// Straight-through estimator: the forward value of `quantized`, the gradient of `v` (identity).
///
/// `v + (q(v) - v).detach()`
pub fn straight_through<B: Backend, const D: usize>(
    v: Tensor<B, D>,
    quantized: Tensor<B, D>,
) -> Tensor<B, D> {
    // Both detached first: the subtraction is not recorded by autodiff.
    let offset = quantized.detach().sub(v.clone().detach());
    v.add(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray;

    #[test]
    fn ternary_codes_by_hand() {
        let device = Default::default();
        // mean|W| = (0.9 + 0.1 + 0.5 + 1.5) / 4 = 0.75.
        // W / gamma = [1.2, -0.133, -0.667, 2.0] → round → [1, 0, -1, 2] → clamp → [1, 0, -1, 1].
        let w = Tensor::<B, 2>::from_floats([[0.9, -0.1], [-0.5, 1.5]], &device);
        let (codes, gamma) = ternary_codes(w, 1e-5);
        codes
            .into_data()
            .assert_eq(&TensorData::from([[1.0f32, 0.0], [-1.0, 1.0]]), false);
        assert_eq!(gamma.into_scalar(), 0.75);
    }

    #[test]
    fn activations_by_hand() {
        let device = Default::default();
        // absmax 2 → s = 63.5: [63.5, -127, 0.635] → [64, -127, 1] (half to even) → / 63.5.
        let x = Tensor::<B, 2>::from_floats([[1.0, -2.0, 0.01]], &device);
        let q = quantize_activations(x, 1e-5)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let expected = [64.0 / 63.5, -127.0 / 63.5, 1.0 / 63.5];
        for (a, e) in q.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{q:?} vs {expected:?}");
        }
    }
}
