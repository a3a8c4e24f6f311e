//! The inner models of TTT-Linear and TTT-MLP: their learned initial fast weights, their
//! per-head LayerNorm, and their [`InnerModel`] implementations.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::autodiff::{InnerModel, Lift};
use super::gelu::gelu_tanh;
use super::ln::ln_fwd;

/// The inner model of TTT-Linear: `f(z) = z + LN(z W1 + b1)`.
///
/// `w1`/`b1` are the *initial* fast weights `W1`/`b1` (learned by outer training); the inner
/// loop updates copies of them. The LN scale/shift are ordinary learned parameters.
#[derive(Module, Debug)]
pub struct InnerLinear<B: Backend> {
    /// Initial `W1`, `[heads, head_dim, head_dim]`, normal(0, 0.02) init.
    pub w1: Param<Tensor<B, 3>>,
    /// Initial `b1`, `[heads, 1, head_dim]`, zeros.
    pub b1: Param<Tensor<B, 3>>,
    /// Per-head LN scale (`ttt_norm_weight`), `[heads, head_dim]`, ones.
    pub ttt_norm_weight: Param<Tensor<B, 2>>,
    /// Per-head LN shift (`ttt_norm_bias`), `[heads, head_dim]`, zeros.
    pub ttt_norm_bias: Param<Tensor<B, 2>>,
    /// LN epsilon.
    pub eps: f64,
}

/// The inner model of TTT-MLP: `f(z) = z + LN(GELU(z W1 + b1) W2 + b2)`, GELU with the tanh
/// approximation.
#[derive(Module, Debug)]
pub struct InnerMlp<B: Backend> {
    /// Initial `W1`, `[heads, head_dim, hidden]`, normal(0, 0.02) init.
    pub w1: Param<Tensor<B, 3>>,
    /// Initial `b1`, `[heads, 1, hidden]`, zeros.
    pub b1: Param<Tensor<B, 3>>,
    /// Initial `W2`, `[heads, hidden, head_dim]`, normal(0, 0.02) init.
    pub w2: Param<Tensor<B, 3>>,
    /// Initial `b2`, `[heads, 1, head_dim]`, zeros.
    pub b2: Param<Tensor<B, 3>>,
    /// Per-head LN scale (`ttt_norm_weight`), `[heads, head_dim]`, ones.
    pub ttt_norm_weight: Param<Tensor<B, 2>>,
    /// Per-head LN shift (`ttt_norm_bias`), `[heads, head_dim]`, zeros.
    pub ttt_norm_bias: Param<Tensor<B, 2>>,
    /// LN epsilon.
    pub eps: f64,
}

/// The inner model of a [`TttLayer`](super::TttLayer): TTT-Linear or TTT-MLP.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per layer; boxing would only add an indirection
pub enum InnerModule<B: Backend> {
    /// TTT-Linear.
    Linear(InnerLinear<B>),
    /// TTT-MLP.
    Mlp(InnerMlp<B>),
}

impl<B: Backend> InnerLinear<B> {
    /// A new inner model with the reference's init.
    pub fn new(heads: usize, head_dim: usize, init_std: f64, eps: f64, device: &B::Device) -> Self {
        let normal = Initializer::Normal {
            mean: 0.0,
            std: init_std,
        };
        Self {
            w1: normal.init([heads, head_dim, head_dim], device),
            b1: Initializer::Zeros.init([heads, 1, head_dim], device),
            ttt_norm_weight: Initializer::Ones.init([heads, head_dim], device),
            ttt_norm_bias: Initializer::Zeros.init([heads, head_dim], device),
            eps,
        }
    }

    /// `(heads, head_dim)`.
    pub fn dims(&self) -> (usize, usize) {
        let [heads, head_dim, _] = self.w1.dims();
        (heads, head_dim)
    }
}

impl<B: Backend> InnerMlp<B> {
    /// A new inner model with the reference's init; `hidden` is `4 · head_dim` in the paper.
    pub fn new(
        heads: usize,
        head_dim: usize,
        hidden: usize,
        init_std: f64,
        eps: f64,
        device: &B::Device,
    ) -> Self {
        let normal = Initializer::Normal {
            mean: 0.0,
            std: init_std,
        };
        Self {
            w1: normal.init([heads, head_dim, hidden], device),
            b1: Initializer::Zeros.init([heads, 1, hidden], device),
            w2: normal.init([heads, hidden, head_dim], device),
            b2: Initializer::Zeros.init([heads, 1, head_dim], device),
            ttt_norm_weight: Initializer::Ones.init([heads, head_dim], device),
            ttt_norm_bias: Initializer::Zeros.init([heads, head_dim], device),
            eps,
        }
    }

    /// `(heads, head_dim, hidden)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        let [heads, head_dim, hidden] = self.w1.dims();
        (heads, head_dim, hidden)
    }
}

/// The per-head LN scale and shift, lifted and shaped `[1, heads, 1, head_dim]`.
pub(crate) fn ln_params<B: Backend, C: Backend>(
    lift: &Lift<B, C>,
    weight: &Param<Tensor<B, 2>>,
    bias: &Param<Tensor<B, 2>>,
) -> (Tensor<C, 4>, Tensor<C, 4>) {
    let [heads, head_dim] = weight.dims();
    let gamma = lift.tensor(weight.val()).reshape([1, heads, 1, head_dim]);
    let beta = lift.tensor(bias.val()).reshape([1, heads, 1, head_dim]);
    (gamma, beta)
}

/// Tiles a `[heads, rows, cols]` parameter over the batch: `[batch, heads, rows, cols]`.
fn tile<B: Backend>(param: &Param<Tensor<B, 3>>, batch_size: usize) -> Tensor<B, 4> {
    let [heads, rows, cols] = param.dims();
    param
        .val()
        .unsqueeze_dim::<4>(0)
        .expand([batch_size, heads, rows, cols])
}

/// `z W + b` with one weight per token.
///
/// # Shapes
/// - z: `[batch, heads, tokens, rows]`
/// - w: `[batch, heads, tokens, rows, cols]`, b: `[batch, heads, tokens, 1, cols]`
/// - output: `[batch, heads, tokens, cols]`
fn per_token_affine<C: Backend>(
    z: Tensor<C, 4>,
    w: &Tensor<C, 5>,
    b: &Tensor<C, 5>,
) -> Tensor<C, 4> {
    let [batch, heads, tokens, _] = z.dims();
    let cols = w.dims()[4];
    let z = z.unsqueeze_dim::<5>(3); // [batch, heads, tokens, 1, rows]
    (z.matmul(w.clone()) + b.clone()).reshape([batch, heads, tokens, cols])
}

impl<B: Backend> InnerModel<B> for InnerLinear<B> {
    /// `[W1, b1]`: `[batch, heads, head_dim, head_dim]`, `[batch, heads, 1, head_dim]`.
    fn init_state(&self, batch_size: usize) -> Vec<Tensor<B, 4>> {
        vec![tile(&self.w1, batch_size), tile(&self.b1, batch_size)]
    }

    fn forward<C: Backend>(
        &self,
        lift: &Lift<B, C>,
        state: &[Tensor<C, 5>],
        z: Tensor<C, 4>,
    ) -> Tensor<C, 4> {
        assert_eq!(
            state.len(),
            2,
            "TTT-Linear state is [W1, b1], got {} tensors",
            state.len()
        );
        let (gamma, beta) = ln_params(lift, &self.ttt_norm_weight, &self.ttt_norm_bias);
        let z1 = per_token_affine(z.clone(), &state[0], &state[1]); // [batch, heads, K, head_dim]
        z + ln_fwd(z1, gamma, beta, self.eps)
    }
}

impl<B: Backend> InnerModel<B> for InnerMlp<B> {
    /// `[W1, b1, W2, b2]`: `[batch, heads, head_dim, hidden]`, `[batch, heads, 1, hidden]`,
    /// `[batch, heads, hidden, head_dim]`, `[batch, heads, 1, head_dim]`.
    fn init_state(&self, batch_size: usize) -> Vec<Tensor<B, 4>> {
        vec![
            tile(&self.w1, batch_size),
            tile(&self.b1, batch_size),
            tile(&self.w2, batch_size),
            tile(&self.b2, batch_size),
        ]
    }

    fn forward<C: Backend>(
        &self,
        lift: &Lift<B, C>,
        state: &[Tensor<C, 5>],
        z: Tensor<C, 4>,
    ) -> Tensor<C, 4> {
        assert_eq!(
            state.len(),
            4,
            "TTT-MLP state is [W1, b1, W2, b2], got {} tensors",
            state.len()
        );
        let (gamma, beta) = ln_params(lift, &self.ttt_norm_weight, &self.ttt_norm_bias);
        let x2 = gelu_tanh(per_token_affine(z.clone(), &state[0], &state[1])); // [batch, heads, K, hidden]
        let z2 = per_token_affine(x2, &state[2], &state[3]); // [batch, heads, K, head_dim]
        z + ln_fwd(z2, gamma, beta, self.eps)
    }
}

impl<B: Backend> InnerModel<B> for InnerModule<B> {
    fn init_state(&self, batch_size: usize) -> Vec<Tensor<B, 4>> {
        match self {
            InnerModule::Linear(inner) => inner.init_state(batch_size),
            InnerModule::Mlp(inner) => inner.init_state(batch_size),
        }
    }

    fn forward<C: Backend>(
        &self,
        lift: &Lift<B, C>,
        state: &[Tensor<C, 5>],
        z: Tensor<C, 4>,
    ) -> Tensor<C, 4> {
        match self {
            InnerModule::Linear(inner) => inner.forward(lift, state, z),
            InnerModule::Mlp(inner) => inner.forward(lift, state, z),
        }
    }
}

impl<B: Backend> InnerModule<B> {
    /// `(heads, head_dim)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            InnerModule::Linear(inner) => inner.dims(),
            InnerModule::Mlp(inner) => {
                let (heads, head_dim, _) = inner.dims();
                (heads, head_dim)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B64 = NdArray<f64>;

    f64_test! {
        fn linear_forward_by_hand() {
            // One head, head_dim 2, one token; LN eps 1 keeps the 2-element LN smooth.
            let device = Default::default();
            let mut inner = InnerLinear::<B64>::new(1, 2, 0.02, 1.0, &device);
            inner.ttt_norm_weight = Param::from_tensor(Tensor::from_data([[2.0, 0.5]], &device));
            inner.ttt_norm_bias = Param::from_tensor(Tensor::from_data([[0.1, -0.1]], &device));
            let w = Tensor::<B64, 5>::from_data([[[[[1.0, 2.0], [3.0, -1.0]]]]], &device);
            let b = Tensor::<B64, 5>::from_data([[[[[0.5, 0.0]]]]], &device);
            let z = Tensor::<B64, 4>::from_data([[[[1.0, 1.0]]]], &device);
            let y: Vec<f64> = inner
                .forward(&Lift::identity(), &[w, b], z)
                .into_data()
                .to_vec()
                .unwrap();
            // z W + b = [1 + 3 + 0.5, 2 − 1] = [4.5, 1]; μ = 2.75, deviations ±1.75, σ² = 3.0625.
            let std = (3.0625f64 + 1.0).sqrt();
            let expected = [1.0 + 2.0 * 1.75 / std + 0.1, 1.0 - 0.5 * 1.75 / std - 0.1];
            for (a, e) in y.iter().zip(expected) {
                assert!((a - e).abs() < 1e-12, "{y:?} vs {expected:?}");
            }
        }
    }

    f64_test! {
        fn init_state_tiles_over_batch() {
            let device = Default::default();
            let inner = InnerMlp::<B64>::new(2, 4, 16, 0.02, 1e-6, &device);
            let state = inner.init_state(3);
            let dims: Vec<[usize; 4]> = state.iter().map(|t| t.dims()).collect();
            assert_eq!(dims, vec![[3, 2, 4, 16], [3, 2, 1, 16], [3, 2, 16, 4], [3, 2, 1, 4]]);
            let w1: Vec<f64> = state[0].clone().into_data().to_vec().unwrap();
            let per_batch = 2 * 4 * 16;
            assert_eq!(w1[..per_batch], w1[2 * per_batch..]);
            assert!(w1.iter().any(|v| *v != 0.0));
        }
    }
}
