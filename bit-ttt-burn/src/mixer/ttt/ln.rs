//! The inner LayerNorm of a TTT layer and its backward fused with the L2 reconstruction loss.
//!
//! Both work over the last dimension and take `gamma`/`beta` broadcastable to the input
//! (per head: `[1, heads, 1, head_dim]` against `[batch, heads, tokens, head_dim]`).

use burn::tensor::{backend::Backend, Tensor};

/// LayerNorm over the last dimension: `gamma · (x − μ) / sqrt(σ² + eps) + beta`, with the
/// biased variance (reference: `ln_fwd`).
///
/// # Shapes
/// - x: `[..., d]`
/// - gamma, beta: broadcastable to `[..., d]`
/// - output: `[..., d]`
pub fn ln_fwd<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, D>,
    beta: Tensor<B, D>,
    eps: f64,
) -> Tensor<B, D> {
    let (x_hat, _std) = normalize(x, eps);
    x_hat * gamma + beta
}

/// The gradient of `½ ‖ln_fwd(x) − target‖²` with respect to `x`, row by row, in closed form
/// (reference: `ln_fused_l2_bwd`):
///
/// `∇x = (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) / std` with `ĝ = (ln_fwd(x) − target) ⊙ gamma`.
///
/// # Shapes
/// - x, target: `[..., d]`
/// - gamma, beta: broadcastable to `[..., d]`
/// - output: `[..., d]`
pub fn ln_fused_l2_bwd<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    target: Tensor<B, D>,
    gamma: Tensor<B, D>,
    beta: Tensor<B, D>,
    eps: f64,
) -> Tensor<B, D> {
    ln_fused_l2_bwd_shifted(x, target - beta, gamma, eps)
}

/// [`ln_fused_l2_bwd`] with `target − beta` given: `ln_fwd(x) − target = x̂ ⊙ gamma − (target −
/// beta)`. The dual form over whole mini-batches forms `target − beta` once for all of them.
///
/// # Shapes
/// - x, target_minus_beta: `[..., d]`
/// - gamma: broadcastable to `[..., d]`
/// - output: `[..., d]`
pub fn ln_fused_l2_bwd_shifted<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    target_minus_beta: Tensor<B, D>,
    gamma: Tensor<B, D>,
    eps: f64,
) -> Tensor<B, D> {
    let (x_hat, std) = normalize(x, eps);
    let grad_x_hat = (x_hat.clone() * gamma.clone() - target_minus_beta) * gamma;
    let mean_grad = grad_x_hat.clone().mean_dim(D - 1); // [..., 1]
    let mean_grad_x_hat = (grad_x_hat.clone() * x_hat.clone()).mean_dim(D - 1); // [..., 1]
    (grad_x_hat - mean_grad - x_hat * mean_grad_x_hat) / std
}

/// `(x̂, std)`: the normalised input `[..., d]` and `sqrt(σ² + eps)` `[..., 1]`.
fn normalize<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    eps: f64,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let mu = x.clone().mean_dim(D - 1); // [..., 1]
    let centered = x - mu;
    let var = centered.clone().square().mean_dim(D - 1); // [..., 1]
    let std = var.add_scalar(eps).sqrt();
    (centered / std.clone(), std)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::TensorData;

    type B64 = NdArray<f64>;

    f64_test! {
        fn ln_fwd_by_hand() {
            let device = Default::default();
            // x = [1, 2, 3, 6]: μ = 3, σ² = (4 + 1 + 0 + 9) / 4 = 3.5.
            let x = Tensor::<B64, 2>::from_data([[1.0, 2.0, 3.0, 6.0]], &device);
            let gamma = Tensor::<B64, 2>::from_data([[1.0, 2.0, 0.5, -1.0]], &device);
            let beta = Tensor::<B64, 2>::from_data([[0.0, 0.1, 0.2, 0.3]], &device);
            let eps = 0.5;
            let y: Vec<f64> = ln_fwd(x, gamma, beta, eps).into_data().to_vec().unwrap();
            let s = (3.5f64 + 0.5).sqrt(); // = 2
            let expected = [
                -2.0 / s,
                2.0 * (-1.0 / s) + 0.1,
                0.2,
                -(3.0 / s) + 0.3,
            ];
            for (a, e) in y.iter().zip(expected) {
                assert!((a - e).abs() < 1e-12, "{y:?} vs {expected:?}");
            }
        }
    }

    f64_test! {
        fn fused_backward_matches_autodiff() {
            type A = Autodiff<B64>;
            let device = Default::default();
            let values = |n: usize, k: f64| -> Vec<f64> {
                (0..n).map(|i| ((i as f64 + 1.0) * k).sin() * 1.5).collect()
            };
            let shape = [2, 3, 5];
            let x = Tensor::<A, 3>::from_data(TensorData::new(values(30, 0.7), shape), &device)
                .require_grad();
            let target = Tensor::<A, 3>::from_data(TensorData::new(values(30, 1.3), shape), &device);
            let gamma = Tensor::<A, 3>::from_data(TensorData::new(values(5, 2.1), [1, 1, 5]), &device);
            let beta = Tensor::<A, 3>::from_data(TensorData::new(values(5, 0.4), [1, 1, 5]), &device);
            let eps = 1e-6;

            let loss = (ln_fwd(x.clone(), gamma.clone(), beta.clone(), eps) - target.clone())
                .square()
                .sum()
                .mul_scalar(0.5);
            let grads = loss.backward();
            let autodiff: Vec<f64> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let fused: Vec<f64> = ln_fused_l2_bwd(
                x.inner(),
                target.inner(),
                gamma.inner(),
                beta.inner(),
                eps,
            )
            .into_data()
            .to_vec()
            .unwrap();
            assert!(autodiff.iter().any(|g| g.abs() > 1e-3));
            for (a, f) in autodiff.iter().zip(&fused) {
                assert!((a - f).abs() < 1e-10, "{autodiff:?} vs {fused:?}");
            }
        }
    }
}
