//! The inner loop by autodiff: the [`InnerModel`] trait and [`autodiff_mini_batch`].
//!
//! The inner gradient `∇ℓ_j(W_start)` is taken by Burn's autodiff. The function is generic over
//! the backend `B` and wraps its tensors in `Autodiff<B>` with
//! [`Tensor::from_inner`](burn::tensor::Tensor::from_inner); the gradients come back as `B`
//! tensors. When `B` is itself an autodiff backend (outer training), the backward pass of
//! `Autodiff<B>` runs `B` operations, which `B` records on its own tape: outer training then
//! differentiates through the inner update (second order), so `θ_K`, `θ_V`, the LN parameters
//! and the η gate get their full gradients. (Lifting from `B::InnerBackend` instead would
//! detach them.)

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::mini_batch::{MiniBatch, MiniBatchOutput};

/// Moves a tensor of the layer's backend `B` onto the backend `C` an inner model computes on:
/// `B` itself ([`Lift::identity`]) or `Autodiff<B>` ([`Lift::autodiff`]), so that one generic
/// [`InnerModel::forward`] serves both the outputs and the inner gradient.
pub struct Lift<B: Backend, C: Backend> {
    lift: fn(FloatTensor<B>) -> FloatTensor<C>,
}

impl<B: Backend, C: Backend> Clone for Lift<B, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend, C: Backend> Copy for Lift<B, C> {}

impl<B: Backend> Lift<B, B> {
    /// Computes on `B` itself.
    pub fn identity() -> Self {
        Self { lift: |t| t }
    }
}

impl<B: Backend> Lift<B, Autodiff<B>> {
    /// Computes on `Autodiff<B>`; lifted tensors are constants of the inner tape and stay on
    /// `B`'s own tape if `B` has one.
    pub fn autodiff() -> Self {
        Self {
            lift: <Autodiff<B> as AutodiffBackend>::from_inner,
        }
    }
}

impl<B: Backend, C: Backend> Lift<B, C> {
    /// Lifts one tensor.
    pub fn tensor<const D: usize>(&self, tensor: Tensor<B, D>) -> Tensor<C, D> {
        let primitive = (self.lift)(tensor.into_primitive().tensor());
        Tensor::from_primitive(TensorPrimitive::Float(primitive))
    }
}

/// An inner model for test-time training: a function `f(z; W)` of fast weights `W` (learned
/// at test time, one set per sequence and head), plus ordinary parameters held by `self`
/// (learned by outer training), and its self-supervised loss.
///
/// Fast weights are a list of tensors, each `[batch, heads, rows, cols]` (a bias is
/// `[batch, heads, 1, cols]`). When the inner model is evaluated, every token carries its own
/// copy: `[batch, heads, tokens, rows, cols]`.
///
/// Implement [`forward`](InnerModel::forward) once, generically over the compute backend `C`,
/// and lift the parameters `self` holds with `lift`. The inner loop by autodiff then works for
/// the model ([`autodiff_mini_batch`]); TTT-Linear and TTT-MLP implement it
/// ([`InnerLinear`](super::InnerLinear), [`InnerMlp`](super::InnerMlp)).
pub trait InnerModel<B: Backend> {
    /// The initial fast weights `W_0` (learned parameters, tiled over the batch), each
    /// `[batch, heads, rows, cols]`.
    fn init_state(&self, batch_size: usize) -> Vec<Tensor<B, 4>>;

    /// `f(z; W)` for every token with its own weights.
    ///
    /// # Shapes
    /// - state: each `[batch, heads, tokens, rows, cols]`
    /// - z: `[batch, heads, tokens, head_dim]`
    /// - output: `[batch, heads, tokens, head_dim]`
    fn forward<C: Backend>(
        &self,
        lift: &Lift<B, C>,
        state: &[Tensor<C, 5>],
        z: Tensor<C, 4>,
    ) -> Tensor<C, 4>;

    /// The inner loss summed over tokens (and heads and batch), `Σ_j ℓ_j`. Since token `j`
    /// uses its own copy of the weights, the gradient with respect to copy `j` is `∇ℓ_j`.
    ///
    /// The default is the reconstruction loss of the paper, `ℓ_j = ½ ‖f(XK_j) − XV_j‖²`, which
    /// for `f(z) = z + LN(g(z))` is `½ ‖LN(g(XK_j)) − (XV_j − XK_j)‖²`.
    ///
    /// # Shapes
    /// - state: each `[batch, heads, tokens, rows, cols]`
    /// - xk, xv: `[batch, heads, tokens, head_dim]`
    /// - output: `[1]`
    fn loss<C: Backend>(
        &self,
        lift: &Lift<B, C>,
        state: &[Tensor<C, 5>],
        xk: Tensor<C, 4>,
        xv: Tensor<C, 4>,
    ) -> Tensor<C, 1> {
        (self.forward(lift, state, xk) - xv)
            .square()
            .sum()
            .mul_scalar(0.5)
    }
}

/// One mini-batch of TTT with the inner gradient taken by autodiff.
///
/// `state` is `W_start`, the fast weights at the start of the mini-batch. `earlier` holds the
/// learning-rate-weighted gradient sums of tokens of this mini-batch that an earlier call
/// already saw (when decoding resumes mid-mini-batch); `None` means zero.
///
/// Token `i` reads its output with `W_i = W_start − token_eta[i] · earlier − Σ_{j≤i} eta[i, j] G_j`,
/// `G_j = ∇ℓ_j(W_start)`. The fast weights are replicated once per token as one leaf of the
/// `Autodiff<B>` tape, `Σ_j ℓ_j` is differentiated once, and `G_j` is read from copy `j`;
/// the sum over `j` is then a matmul over the token axis.
///
/// # Shapes
/// - state, earlier: each `[batch, heads, rows, cols]`
/// - output: see [`MiniBatchOutput`]
pub fn autodiff_mini_batch<B: Backend, M: InnerModel<B>>(
    model: &M,
    state: &[Tensor<B, 4>],
    earlier: Option<&[Tensor<B, 4>]>,
    mini_batch: &MiniBatch<B>,
) -> MiniBatchOutput<B> {
    let k = mini_batch.len();
    let lift = Lift::<B, Autodiff<B>>::autodiff();

    // One copy of the weights per token, as leaves of the inner tape.
    let copies: Vec<Tensor<Autodiff<B>, 5>> = state
        .iter()
        .map(|w| {
            let [batch, heads, rows, cols] = w.dims();
            let w = w
                .clone()
                .unsqueeze_dim::<5>(2)
                .expand([batch, heads, k, rows, cols]); // [batch, heads, K, rows, cols]
            lift.tensor(w).require_grad()
        })
        .collect();
    let loss = model.loss(
        &lift,
        &copies,
        lift.tensor(mini_batch.xk.clone()),
        lift.tensor(mini_batch.xv.clone()),
    );
    let tape = loss.backward();

    let eta = mini_batch.eta(); // [batch, heads, K, K]
    let ttt_lr_eta = mini_batch.ttt_lr_eta.clone().unsqueeze_dim::<4>(2); // [batch, heads, 1, K]
    let token_eta = mini_batch.token_eta_rows().unsqueeze_dim::<5>(4); // [1, 1, K, 1, 1]

    let mut per_token = Vec::with_capacity(state.len());
    let mut grads = Vec::with_capacity(state.len());
    for (index, (w, copy)) in state.iter().zip(&copies).enumerate() {
        let [batch, heads, rows, cols] = w.dims();
        // G_j: [batch, heads, K, rows, cols]; a weight the loss does not use gets zeros.
        let g = copy
            .grad(&tape)
            .unwrap_or_else(|| Tensor::zeros([batch, heads, k, rows, cols], &w.device()));
        let g = g.reshape([batch, heads, k, rows * cols]); // [batch, heads, K, rows·cols]
                                                           // Σ_{j≤i} eta[i, j] G_j: [batch, heads, K, rows, cols].
        let step = eta
            .clone()
            .matmul(g.clone())
            .reshape([batch, heads, k, rows, cols]);
        let mut w_i = w.clone().unsqueeze_dim::<5>(2) - step; // [batch, heads, K, rows, cols]
        if let Some(earlier) = earlier {
            let e = earlier[index].clone().unsqueeze_dim::<5>(2); // [batch, heads, 1, rows, cols]
            w_i = w_i - e * token_eta.clone();
        }
        per_token.push(w_i);
        // Σ_j ttt_lr_eta_j G_j: [batch, heads, rows, cols].
        grads.push(
            ttt_lr_eta
                .clone()
                .matmul(g)
                .reshape([batch, heads, rows, cols]),
        );
    }
    let output = model.forward(&Lift::identity(), &per_token, mini_batch.xq.clone());
    MiniBatchOutput { output, grads }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// A user-defined inner model: `f(z; W) = s ⊙ (z W)` with a learned scale `s` and no
    /// residual or LayerNorm, trained with the default loss `½ ‖f(XK) − XV‖²`.
    struct ScaledLinear<B: Backend> {
        w0: Tensor<B, 2>,
        scale: Tensor<B, 1>,
    }

    impl<B: Backend> InnerModel<B> for ScaledLinear<B> {
        fn init_state(&self, batch_size: usize) -> Vec<Tensor<B, 4>> {
            let [rows, cols] = self.w0.dims();
            vec![self
                .w0
                .clone()
                .reshape([1, 1, rows, cols])
                .expand([batch_size, 1, rows, cols])]
        }

        fn forward<C: Backend>(
            &self,
            lift: &Lift<B, C>,
            state: &[Tensor<C, 5>],
            z: Tensor<C, 4>,
        ) -> Tensor<C, 4> {
            let [batch, heads, tokens, _] = z.dims();
            let cols = state[0].dims()[4];
            let scale = lift.tensor(self.scale.clone()).reshape([1, 1, 1, cols]);
            z.unsqueeze_dim::<5>(3)
                .matmul(state[0].clone())
                .reshape([batch, heads, tokens, cols])
                * scale
        }
    }

    f64_test! {
        fn custom_inner_model_by_hand() {
            type B = NdArray<f64>;
            let device = Default::default();
            let w0 = [[0.5, -0.2], [0.3, 0.8]];
            let scale = [1.5, 0.5];
            let model = ScaledLinear::<B> {
                w0: Tensor::from_data(w0, &device),
                scale: Tensor::from_data(scale, &device),
            };
            let (xq, xk, xv) = (
                [[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]],
                [[0.2, 0.9], [-0.7, 0.1], [0.5, 0.5]],
                [[1.0, 0.0], [0.4, -0.6], [-0.3, 0.2]],
            );
            let (token_eta, lr) = ([1.0, 0.5, 1.0 / 3.0], [0.2, 0.3, 0.1]);
            let earlier = [[0.1, -0.3], [0.2, 0.05]];
            let tokens = |rows: [[f64; 2]; 3]| Tensor::<B, 4>::from_data([[rows]], &device);
            let mini_batch = MiniBatch {
                xq: tokens(xq),
                xk: tokens(xk),
                xv: tokens(xv),
                token_eta: Tensor::from_data(token_eta, &device),
                ttt_lr_eta: Tensor::from_data([[lr]], &device),
            };
            let state = model.init_state(1);
            let earlier_t = vec![Tensor::<B, 4>::from_data([[earlier]], &device)];
            let step = autodiff_mini_batch(&model, &state, Some(&earlier_t), &mini_batch);

            // By hand: G_j = k_jᵀ (s ⊙ (s ⊙ (k_j W0) − v_j)), all at W0.
            let f = |z: [f64; 2], w: [[f64; 2]; 2]| {
                [
                    scale[0] * (z[0] * w[0][0] + z[1] * w[1][0]),
                    scale[1] * (z[0] * w[0][1] + z[1] * w[1][1]),
                ]
            };
            let grads: Vec<[[f64; 2]; 2]> = (0..3)
                .map(|j| {
                    let y = f(xk[j], w0);
                    let dz = [scale[0] * (y[0] - xv[j][0]), scale[1] * (y[1] - xv[j][1])];
                    [[xk[j][0] * dz[0], xk[j][0] * dz[1]], [xk[j][1] * dz[0], xk[j][1] * dz[1]]]
                })
                .collect();
            let mut expected = Vec::new();
            for i in 0..3 {
                let mut w = w0;
                for r in 0..2 {
                    for c in 0..2 {
                        w[r][c] -= token_eta[i] * earlier[r][c];
                        for j in 0..=i {
                            w[r][c] -= token_eta[i] * lr[j] * grads[j][r][c];
                        }
                    }
                }
                expected.extend(f(xq[i], w));
            }
            let got: Vec<f64> = step.output.into_data().to_vec().unwrap();
            for (a, e) in got.iter().zip(&expected) {
                assert!((a - e).abs() < 1e-12, "{got:?} vs {expected:?}");
            }
            let mut expected_sum = [0.0; 4];
            for (j, g) in grads.iter().enumerate() {
                for (k, v) in g.iter().flatten().enumerate() {
                    expected_sum[k] += lr[j] * v;
                }
            }
            let got: Vec<f64> = step.grads[0].clone().into_data().to_vec().unwrap();
            for (a, e) in got.iter().zip(&expected_sum) {
                assert!((a - e).abs() < 1e-12, "{got:?} vs {expected_sum:?}");
            }
        }
    }

    /// The inner gradient stays on the outer tape: d(output)/d(XK) through the inner step
    /// matches finite differences (second order).
    #[test]
    fn inner_gradient_is_differentiable_by_the_outer_tape() {
        type A = Autodiff<NdArray>;
        let device = Default::default();
        let model = ScaledLinear::<A> {
            w0: Tensor::from_data([[0.5, -0.2], [0.3, 0.8]], &device),
            scale: Tensor::from_data([1.5, 0.5], &device),
        };
        let run = |xk: Tensor<A, 4>| {
            let mini_batch = MiniBatch {
                xq: Tensor::from_data([[[[1.0, -0.5], [0.3, 0.8]]]], &device),
                xk,
                xv: Tensor::from_data([[[[1.0, 0.0], [0.4, -0.6]]]], &device),
                token_eta: Tensor::from_data([1.0, 0.5], &device),
                ttt_lr_eta: Tensor::from_data([[[0.2, 0.3]]], &device),
            };
            autodiff_mini_batch(&model, &model.init_state(1), None, &mini_batch)
                .output
                .sum()
        };
        let xk_values = [[0.2, 0.9], [-0.7, 0.1]];
        let xk = Tensor::<A, 4>::from_data([[xk_values]], &device).require_grad();
        let grads = run(xk.clone()).backward();
        let analytic: Vec<f32> = xk.grad(&grads).unwrap().into_data().to_vec().unwrap();
        // XK enters the output only through the inner gradient, so this is all second order.
        assert!(analytic.iter().any(|g| g.abs() > 1e-2), "{analytic:?}");
        let h = 1e-2;
        for index in 0..4 {
            let bumped = |delta: f64| {
                let mut v = xk_values;
                v[index / 2][index % 2] += delta;
                run(Tensor::from_data([[v]], &device)).into_scalar() as f64
            };
            let fd = (bumped(h) - bumped(-h)) / (2.0 * h);
            assert!(
                (analytic[index] as f64 - fd).abs() < 1e-3 * fd.abs().max(1.0),
                "d/dXK[{index}]: {} vs {fd}",
                analytic[index]
            );
        }
    }
}
