//! `MiniBatch`: the inputs of one inner-loop step, shared by the dual, autodiff and primal forms.

use burn::tensor::{backend::Backend, Tensor};

/// The inputs of one mini-batch (or of the part of a mini-batch that a call sees), for all
/// heads at once.
///
/// The step size of token `j`'s gradient as seen by token `i` (both in the mini-batch, `j ≤ i`)
/// is `eta[i, j] = token_eta[i] · ttt_lr_eta[j]`.
///
/// # Shapes
/// - `xq`, `xk`, `xv`: `[batch, heads, tokens, head_dim]` (after RoPE on `xq`/`xk`)
/// - `token_eta`: `[tokens]`
/// - `ttt_lr_eta`: `[batch, heads, tokens]`
#[derive(Clone, Debug)]
pub struct MiniBatch<B: Backend> {
    /// Queries `XQ`: the inputs the outputs are read at.
    pub xq: Tensor<B, 4>,
    /// Keys `XK`: the inputs of the reconstruction loss.
    pub xk: Tensor<B, 4>,
    /// Values `XV`: the loss reconstructs `XV − XK` from `XK`.
    pub xv: Tensor<B, 4>,
    /// Per-position factor of the step size, for the positions these tokens have in their
    /// mini-batch.
    pub token_eta: Tensor<B, 1>,
    /// Per-token, per-head learnable step size `base_lr · sigmoid(x·w_h + b_h) / head_dim`.
    pub ttt_lr_eta: Tensor<B, 3>,
}

impl<B: Backend> MiniBatch<B> {
    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.xq.dims()[2]
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lower-triangular step-size matrix `eta[i, j] = token_eta[i] · ttt_lr_eta[j]` for
    /// `j ≤ i`, zero above the diagonal.
    ///
    /// # Shapes
    /// - output: `[batch, heads, tokens, tokens]`
    pub fn eta(&self) -> Tensor<B, 4> {
        let k = self.len();
        let token_eta = self.token_eta.clone().reshape([1, 1, k, 1]); // [1, 1, K, 1]
        let ttt_lr_eta = self.ttt_lr_eta.clone().unsqueeze_dim::<4>(2); // [batch, heads, 1, K]
        (token_eta * ttt_lr_eta).tril(0) // [batch, heads, K, K]
    }

    /// `token_eta` shaped to scale per-token rows.
    ///
    /// # Shapes
    /// - output: `[1, 1, tokens, 1]`
    pub fn token_eta_rows(&self) -> Tensor<B, 4> {
        self.token_eta.clone().reshape([1, 1, self.len(), 1])
    }
}

/// The inputs of `n` whole mini-batches, one after the other along the token axis, starting at
/// a mini-batch boundary: what the dual form reads at once in [`super::dual_whole_mini_batches`].
///
/// # Shapes
/// - `xq`, `xk`, `xv`: `[batch, heads, n · K, head_dim]` (after RoPE on `xq`/`xk`, positions
///   `0..K` in every mini-batch)
/// - `token_eta`: `[K]`, the per-position factor of every mini-batch
/// - `ttt_lr_eta`: `[batch, heads, n · K]`
#[derive(Clone, Debug)]
pub struct WholeMiniBatches<B: Backend> {
    /// Queries, `[batch, heads, n · K, head_dim]`.
    pub xq: Tensor<B, 4>,
    /// Keys, `[batch, heads, n · K, head_dim]`.
    pub xk: Tensor<B, 4>,
    /// Values, `[batch, heads, n · K, head_dim]`.
    pub xv: Tensor<B, 4>,
    /// `token_eta` of positions `0..K`, `[K]`.
    pub token_eta: Tensor<B, 1>,
    /// Per-token, per-head learning rates, `[batch, heads, n · K]`.
    pub ttt_lr_eta: Tensor<B, 3>,
}

impl<B: Backend> WholeMiniBatches<B> {
    /// The mini-batch size `K`.
    pub fn mini_batch_size(&self) -> usize {
        self.token_eta.dims()[0]
    }

    /// The number of mini-batches `n`.
    pub fn count(&self) -> usize {
        self.xq.dims()[2] / self.mini_batch_size()
    }
}

/// What one inner-loop step over a [`MiniBatch`] returns.
#[derive(Clone, Debug)]
pub struct MiniBatchOutput<B: Backend> {
    /// `f(XQ_i; W_i)` for every token: `XQ_i + LN(f_res(XQ_i; W_i))`,
    /// `[batch, heads, tokens, head_dim]`.
    pub output: Tensor<B, 4>,
    /// The learning-rate-weighted gradient sums `Σ_j ttt_lr_eta_j ∇ℓ_j(W_start)` over these
    /// tokens, one per fast-weight tensor, shaped like the state (`[batch, heads, rows, cols]`).
    /// The mini-batch's end weights are `W_start − token_eta[last] · (earlier + these)`.
    pub grads: Vec<Tensor<B, 4>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn eta_is_lower_triangular_outer_product() {
        let device = Default::default();
        let zeros = Tensor::<NdArray, 4>::zeros([1, 1, 3, 2], &device);
        let mb = MiniBatch {
            xq: zeros.clone(),
            xk: zeros.clone(),
            xv: zeros,
            token_eta: Tensor::from_floats([1.0, 0.5, 0.25], &device),
            ttt_lr_eta: Tensor::from_floats([[[2.0, 3.0, 4.0]]], &device),
        };
        let eta: Vec<f32> = mb.eta().into_data().to_vec().unwrap();
        let expected = [2.0, 0.0, 0.0, 1.0, 1.5, 0.0, 0.5, 0.75, 1.0];
        assert_eq!(eta, expected);
    }
}
