//! `TttCache`: the recurrent state of a TTT layer for decoding, and the primal form that
//! decoding uses.
//!
//! The state is the fast weights at the start of the current mini-batch plus the
//! learning-rate-weighted gradient sums of the tokens of that mini-batch seen so far (as the
//! reference's `TTTCache` keeps `W1_states`/`W1_grad`). Its size depends only on the model, never
//! on how many tokens were seen.

use burn::tensor::{backend::Backend, Tensor};

use crate::BitTttError;

use super::autodiff::{InnerModel, Lift};
use super::dual::grad_pieces;
use super::inner::InnerModule;
use super::mini_batch::{MiniBatch, MiniBatchOutput};

/// The state of a TTT layer after some tokens: enough to continue the sequence.
///
/// - `state`: the fast weights `W_start` at the start of the current mini-batch (TTT-Linear:
///   `[W1, b1]`; TTT-MLP: `[W1, b1, W2, b2]`), each `[batch, heads, rows, cols]`.
/// - `grads`: `Σ_j ttt_lr_eta_j ∇ℓ_j(W_start)` over the tokens of the current mini-batch seen so
///   far, shaped like `state`; zero at a mini-batch boundary. The weights token `i` of the
///   mini-batch reads with are `W_start − token_eta[i] · grads`.
/// - `seq_len_offset`: the number of tokens seen (positions for RoPE and `token_eta` are taken
///   modulo `mini_batch_size`).
#[derive(Clone, Debug)]
pub struct TttCache<B: Backend> {
    state: Vec<Tensor<B, 4>>,
    grads: Vec<Tensor<B, 4>>,
    seq_len_offset: usize,
    mini_batch_size: usize,
}

impl<B: Backend> TttCache<B> {
    /// A cache at position 0 with fast weights `state` and no accumulated gradients.
    ///
    /// # Panics
    /// If `state` is empty or `mini_batch_size` is zero.
    pub fn new(state: Vec<Tensor<B, 4>>, mini_batch_size: usize) -> Self {
        assert!(
            !state.is_empty(),
            "a TTT cache needs at least one fast-weight tensor"
        );
        assert!(mini_batch_size > 0, "mini_batch_size must be positive");
        let grads = state.iter().map(|w| w.zeros_like()).collect();
        Self {
            state,
            grads,
            seq_len_offset: 0,
            mini_batch_size,
        }
    }

    /// Rebuilds a cache from its parts (e.g. loaded from a file), checking that they fit.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if `state` is empty, `grads` does not have the shapes of
    /// `state`, the batch size or head count differ between tensors, or `mini_batch_size` is 0.
    pub fn from_parts(
        state: Vec<Tensor<B, 4>>,
        grads: Vec<Tensor<B, 4>>,
        seq_len_offset: usize,
        mini_batch_size: usize,
    ) -> Result<Self, BitTttError> {
        let invalid = |reason: String| Err(BitTttError::InvalidCache(reason));
        if state.is_empty() {
            return invalid("no fast-weight tensors".into());
        }
        if mini_batch_size == 0 {
            return invalid("mini_batch_size is 0".into());
        }
        let state_dims: Vec<[usize; 4]> = state.iter().map(|t| t.dims()).collect();
        let grad_dims: Vec<[usize; 4]> = grads.iter().map(|t| t.dims()).collect();
        if state_dims != grad_dims {
            return invalid(format!(
                "grads have shapes {grad_dims:?}, the state {state_dims:?}"
            ));
        }
        if state_dims.iter().any(|d| d[..2] != state_dims[0][..2]) {
            return invalid(format!(
                "batch and head sizes differ between state tensors: {state_dims:?}"
            ));
        }
        Ok(Self {
            state,
            grads,
            seq_len_offset,
            mini_batch_size,
        })
    }

    /// The fast weights at the start of the current mini-batch, `[batch, heads, rows, cols]` each.
    pub fn state(&self) -> &[Tensor<B, 4>] {
        &self.state
    }

    /// The accumulated `Σ_j ttt_lr_eta_j ∇ℓ_j` of the current, unfinished mini-batch.
    pub fn grads(&self) -> &[Tensor<B, 4>] {
        &self.grads
    }

    /// The number of tokens seen.
    pub fn seq_len_offset(&self) -> usize {
        self.seq_len_offset
    }

    /// The mini-batch size the cache was made for.
    pub fn mini_batch_size(&self) -> usize {
        self.mini_batch_size
    }

    /// The position of the next token in its mini-batch, `seq_len_offset % mini_batch_size`.
    pub fn position_in_mini_batch(&self) -> usize {
        self.seq_len_offset % self.mini_batch_size
    }

    /// The number of sequences.
    pub fn batch_size(&self) -> usize {
        self.state[0].dims()[0]
    }

    /// The number of heads.
    pub fn num_heads(&self) -> usize {
        self.state[0].dims()[1]
    }

    /// The number of elements of all tensors of the cache.
    pub fn num_elements(&self) -> usize {
        self.state
            .iter()
            .chain(&self.grads)
            .map(|t| t.shape().num_elements())
            .sum()
    }

    /// The size of all tensors of the cache in bytes (plus nothing for the two counters).
    pub fn size_bytes(&self) -> usize {
        self.state
            .iter()
            .chain(&self.grads)
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum()
    }

    /// `(state, grads, seq_len_offset, mini_batch_size)`.
    pub fn into_parts(self) -> (Vec<Tensor<B, 4>>, Vec<Tensor<B, 4>>, usize, usize) {
        (
            self.state,
            self.grads,
            self.seq_len_offset,
            self.mini_batch_size,
        )
    }

    /// The accumulated gradients if any token of the current mini-batch was seen, `None` at a
    /// mini-batch boundary: the `earlier` argument of the mini-batch functions
    /// ([`dual_mini_batch`](super::dual_mini_batch) and the others).
    pub fn earlier_grads(&self) -> Option<&[Tensor<B, 4>]> {
        (self.position_in_mini_batch() != 0).then_some(self.grads.as_slice())
    }

    /// The fast weights the last token seen read its output with:
    /// `W_start − token_eta[p] · grads` for its position `p`, or `W_start` at a boundary.
    /// `token_eta` is the layer's `[mini_batch_size]` factor.
    pub fn current_weights(&self, token_eta: Tensor<B, 1>) -> Vec<Tensor<B, 4>> {
        let position = self.position_in_mini_batch();
        if position == 0 {
            return self.state.clone();
        }
        let factor = token_eta.narrow(0, position - 1, 1).reshape([1, 1, 1, 1]);
        self.state
            .iter()
            .zip(&self.grads)
            .map(|(w, g)| w.clone() - g.clone() * factor.clone())
            .collect()
    }

    /// Moves past `tokens` whole mini-batches read from a mini-batch boundary, whose end fast
    /// weights are `state` (what [`super::dual_whole_mini_batches`] returns); the gradient sums
    /// are cleared, as at the end of any mini-batch.
    ///
    /// # Panics
    /// If the cache is not at a mini-batch boundary or `tokens` is not a whole number of
    /// mini-batches.
    pub(crate) fn finish_whole_mini_batches(&mut self, state: Vec<Tensor<B, 4>>, tokens: usize) {
        assert!(
            self.position_in_mini_batch() == 0 && tokens.is_multiple_of(self.mini_batch_size),
            "{tokens} tokens from position {} are not whole mini-batches of {}",
            self.position_in_mini_batch(),
            self.mini_batch_size
        );
        assert_eq!(
            state.len(),
            self.state.len(),
            "fast weights of another inner model"
        );
        self.state = state;
        self.grads = self.state.iter().map(|w| w.zeros_like()).collect();
        self.seq_len_offset += tokens;
    }

    /// Takes in the gradient sums of `len` more tokens; at the end of a mini-batch, steps the
    /// weights (`W_end = W_start − token_eta_last · grads`) and clears the sums.
    ///
    /// # Panics
    /// If the tokens run past the end of the current mini-batch.
    pub(crate) fn advance(
        &mut self,
        grads: Vec<Tensor<B, 4>>,
        len: usize,
        token_eta_last: Tensor<B, 1>,
    ) {
        let position = self.position_in_mini_batch();
        assert!(
            position + len <= self.mini_batch_size,
            "{len} tokens from position {position} run past a mini-batch of {}",
            self.mini_batch_size
        );
        let accumulated: Vec<Tensor<B, 4>> = if position == 0 {
            grads
        } else {
            self.grads
                .iter()
                .zip(grads)
                .map(|(a, g)| a.clone() + g)
                .collect()
        };
        self.seq_len_offset += len;
        if self.position_in_mini_batch() == 0 {
            let factor = token_eta_last.reshape([1, 1, 1, 1]);
            self.state = self
                .state
                .iter()
                .zip(&accumulated)
                .map(|(w, g)| w.clone() - g.clone() * factor.clone())
                .collect();
            self.grads = accumulated.iter().map(|g| g.zeros_like()).collect();
        } else {
            self.grads = accumulated;
        }
    }
}

/// Tokens of one mini-batch in the primal form (reference: the `use_dual_form = False`
/// branch): every token's gradient `G_j = ∇ℓ_j(W_start)` is formed explicitly, their running
/// sums `Σ_{j≤i} ttt_lr_eta_j G_j` (plus `earlier`) give `W_i = W_start − token_eta[i] · sum_i`,
/// and the output is `f(XQ_i; W_i)`. Decoding calls it with one token.
///
/// # Shapes
/// - state, earlier: each `[batch, heads, rows, cols]`
pub fn primal_mini_batch<B: Backend>(
    inner: &InnerModule<B>,
    state: &[Tensor<B, 4>],
    earlier: Option<&[Tensor<B, 4>]>,
    mini_batch: &MiniBatch<B>,
) -> MiniBatchOutput<B> {
    let k = mini_batch.len();
    let pieces = grad_pieces(inner, state, mini_batch);
    // Per-token gradients, in the order of the state: [W, b] for each affine map.
    let per_token: Vec<Tensor<B, 5>> = pieces
        .into_iter()
        .flat_map(|(a, grad_z)| {
            let grad_w = a.unsqueeze_dim::<5>(4) * grad_z.clone().unsqueeze_dim::<5>(3); // [batch, heads, K, rows, cols]
            let grad_b = grad_z.unsqueeze_dim::<5>(3); // [batch, heads, K, 1, cols]
            [grad_w, grad_b]
        })
        .collect();
    let [batch, heads, _] = mini_batch.ttt_lr_eta.dims();
    // tril(ttt_lr_eta[j]) over (i, j): [batch, heads, K, K].
    let lr = mini_batch
        .ttt_lr_eta
        .clone()
        .unsqueeze_dim::<4>(2)
        .expand([batch, heads, k, k])
        .tril(0);
    let token_eta = mini_batch.token_eta_rows().unsqueeze_dim::<5>(4); // [1, 1, K, 1, 1]

    let mut weights = Vec::with_capacity(state.len());
    let mut grads = Vec::with_capacity(state.len());
    for (index, (w, g)) in state.iter().zip(per_token).enumerate() {
        let [_, _, rows, cols] = w.dims();
        let g = g.reshape([batch, heads, k, rows * cols]); // [batch, heads, K, rows·cols]
        let mut running = lr.clone().matmul(g).reshape([batch, heads, k, rows, cols]); // Σ_{j≤i}
        grads.push(
            running
                .clone()
                .narrow(2, k - 1, 1)
                .reshape([batch, heads, rows, cols]),
        );
        if let Some(earlier) = earlier {
            running = running + earlier[index].clone().unsqueeze_dim::<5>(2);
        }
        weights.push(w.clone().unsqueeze_dim::<5>(2) - running * token_eta.clone());
        // W_i: [batch, heads, K, rows, cols]
    }
    let output = inner.forward(&Lift::identity(), &weights, mini_batch.xq.clone());
    MiniBatchOutput { output, grads }
}
