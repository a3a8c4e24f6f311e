//! GELU with the tanh approximation (as the reference uses, to match its JAX pre-training) and
//! its derivative, for TTT-MLP and the output gate.

use burn::tensor::{backend::Backend, Tensor};

/// `sqrt(2 / π)`.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
const CUBIC: f64 = 0.044_715;

/// `gelu_tanh(x) = ½ x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
///
/// # Shapes
/// - x, output: `[...]`
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(CUBIC)).mul_scalar(SQRT_2_OVER_PI);
    x.clone().mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
}

/// The derivative of [`gelu_tanh`] (reference: `gelu_bwd`):
/// `½ x (1 − t²) sqrt(2/π) (1 + 3 · 0.044715 x²) + ½ (1 + t)`, `t = tanh(sqrt(2/π) (x + 0.044715 x³))`.
///
/// # Shapes
/// - x, output: `[...]`
pub fn gelu_tanh_bwd<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x2 = x.clone().square();
    let t = (x.clone() * x2.clone().mul_scalar(CUBIC).add_scalar(1.0))
        .mul_scalar(SQRT_2_OVER_PI)
        .tanh();
    let one_minus_t2 = t.clone().square().neg().add_scalar(1.0);
    let d_inner = x2
        .mul_scalar(3.0 * CUBIC)
        .add_scalar(1.0)
        .mul_scalar(SQRT_2_OVER_PI);
    x.mul_scalar(0.5) * one_minus_t2 * d_inner + t.add_scalar(1.0).mul_scalar(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B64 = NdArray<f64>;

    fn gelu_by_hand(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }

    f64_test! {
        fn values_and_derivative_by_hand() {
            let xs = [-3.0, -1.2, -0.3, 0.0, 0.4, 1.0, 2.5];
            let device = Default::default();
            let x = Tensor::<B64, 1>::from_data(xs, &device);
            let y: Vec<f64> = gelu_tanh(x.clone()).into_data().to_vec().unwrap();
            let dy: Vec<f64> = gelu_tanh_bwd(x).into_data().to_vec().unwrap();
            for (i, &v) in xs.iter().enumerate() {
                assert!((y[i] - gelu_by_hand(v)).abs() < 1e-12);
                let h = 1e-5;
                let fd = (gelu_by_hand(v + h) - gelu_by_hand(v - h)) / (2.0 * h);
                assert!((dy[i] - fd).abs() < 1e-8, "x = {v}: {} vs {fd}", dy[i]);
            }
            // gelu(1) ≈ 0.8412 (tanh approximation).
            assert!((y[5] - 0.841_192).abs() < 1e-5);
        }
    }
}
