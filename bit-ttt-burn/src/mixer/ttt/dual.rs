//! The closed-form inner loop: the dual form of TTT-Linear and TTT-MLP (matmuls only, with the
//! analytic gradient of LayerNorm + L2), and the closed-form gradient pieces the primal form
//! also uses.
//!
//! For TTT-Linear, with `Z1 = XK W1 + b1` and `∇Z1 = ln_fused_l2_bwd(Z1, XV − XK)`, every
//! token's gradient is rank one: `∇W1 ℓ_j = XK_jᵀ ∇Z1_j`, `∇b1 ℓ_j = ∇Z1_j`. The output of token
//! `i` at `W_i = W1 − Σ_{j≤i} eta[i, j] XK_jᵀ ∇Z1_j` is then
//! `XQ_i W_i + b_i = XQ_i W1 − Σ_j eta[i, j] (XQ_i · XK_j) ∇Z1_j + b1 − Σ_j eta[i, j] ∇Z1_j`,
//! i.e. `XQ W1 − (eta ⊙ XQ XKᵀ) ∇Z1 + b1 − eta ∇Z1` for all tokens at once, without ever
//! forming `W_i`. TTT-MLP applies the same to both of its affine maps.

use burn::tensor::{backend::Backend, Tensor};

use super::autodiff::Lift;
use super::gelu::{gelu_tanh, gelu_tanh_bwd};
use super::inner::{ln_params, InnerLinear, InnerMlp, InnerModule};
use super::ln::{ln_fused_l2_bwd, ln_fused_l2_bwd_shifted, ln_fwd};
use super::mini_batch::{MiniBatch, MiniBatchOutput, WholeMiniBatches};

/// For each affine map `z = a W + b` of the inner model, evaluated at `W_start` on the keys:
/// its input `a` and the gradient `∂ℓ/∂z` of each token's own loss.
///
/// # Shapes
/// - output: per affine map, `a`: `[batch, heads, tokens, rows]`, `∂ℓ/∂z`: `[batch, heads, tokens, cols]`
pub(crate) fn grad_pieces<B: Backend>(
    inner: &InnerModule<B>,
    state: &[Tensor<B, 4>],
    mini_batch: &MiniBatch<B>,
) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
    match inner {
        InnerModule::Linear(inner) => linear_pieces(inner, state, mini_batch).to_vec(),
        InnerModule::Mlp(inner) => mlp_pieces(inner, state, mini_batch).to_vec(),
    }
}

/// TTT-Linear's single piece `(XK, ∇Z1)`, `∇Z1 = ln_fused_l2_bwd(XK W1 + b1, XV − XK)`.
fn linear_pieces<B: Backend>(
    inner: &InnerLinear<B>,
    state: &[Tensor<B, 4>],
    mini_batch: &MiniBatch<B>,
) -> [(Tensor<B, 4>, Tensor<B, 4>); 1] {
    let (gamma, beta) = ln_params(
        &Lift::identity(),
        &inner.ttt_norm_weight,
        &inner.ttt_norm_bias,
    );
    let xk = mini_batch.xk.clone();
    let target = mini_batch.xv.clone() - xk.clone(); // [batch, heads, K, head_dim]
    let z1 = xk.clone().matmul(state[0].clone()) + state[1].clone(); // [batch, heads, K, head_dim]
    let grad_z1 = ln_fused_l2_bwd(z1, target, gamma, beta, inner.eps);
    [(xk, grad_z1)]
}

/// TTT-MLP's pieces `(XK, ∇Z1)`, `(X2, ∇Z2)`: `X2 = gelu(Z1)`, `∇Z2 = ln_fused_l2_bwd(Z2, XV − XK)`,
/// `∇Z1 = (∇Z2 W2ᵀ) ⊙ gelu'(Z1)`.
fn mlp_pieces<B: Backend>(
    inner: &InnerMlp<B>,
    state: &[Tensor<B, 4>],
    mini_batch: &MiniBatch<B>,
) -> [(Tensor<B, 4>, Tensor<B, 4>); 2] {
    let (gamma, beta) = ln_params(
        &Lift::identity(),
        &inner.ttt_norm_weight,
        &inner.ttt_norm_bias,
    );
    let xk = mini_batch.xk.clone();
    let target = mini_batch.xv.clone() - xk.clone(); // [batch, heads, K, head_dim]
    let z1 = xk.clone().matmul(state[0].clone()) + state[1].clone(); // [batch, heads, K, hidden]
    let x2 = gelu_tanh(z1.clone());
    let z2 = x2.clone().matmul(state[2].clone()) + state[3].clone(); // [batch, heads, K, head_dim]
    let grad_z2 = ln_fused_l2_bwd(z2, target, gamma, beta, inner.eps);
    let grad_z1 = grad_z2.clone().matmul(state[2].clone().swap_dims(2, 3)) * gelu_tanh_bwd(z1); // [batch, heads, K, hidden]
    [(xk, grad_z1), (x2, grad_z2)]
}

/// `Σ_j ttt_lr_eta_j ∇ℓ_j` for every fast-weight tensor, from the gradient pieces:
/// `(ttt_lr_eta ⊙ a)ᵀ ∂ℓ/∂z` for a weight, `ttt_lr_eta ∂ℓ/∂z` for a bias.
///
/// # Shapes
/// - output: `[batch, heads, rows, cols]` (weights), `[batch, heads, 1, cols]` (biases)
pub(crate) fn weighted_grads<B: Backend>(
    mini_batch: &MiniBatch<B>,
    pieces: &[(Tensor<B, 4>, Tensor<B, 4>)],
) -> Vec<Tensor<B, 4>> {
    let lr_rows = mini_batch.ttt_lr_eta.clone().unsqueeze_dim::<4>(3); // [batch, heads, K, 1]
    let lr_cols = mini_batch.ttt_lr_eta.clone().unsqueeze_dim::<4>(2); // [batch, heads, 1, K]
    pieces
        .iter()
        .flat_map(|(a, grad_z)| {
            let grad_w = (a.clone() * lr_rows.clone())
                .swap_dims(2, 3)
                .matmul(grad_z.clone()); // [batch, heads, rows, cols]
            let grad_b = lr_cols.clone().matmul(grad_z.clone()); // [batch, heads, 1, cols]
            [grad_w, grad_b]
        })
        .collect()
}

/// One affine map of the dual form: `XQ_i W_i + b_i` for every token without forming `W_i`:
/// `q W − (eta ⊙ q aᵀ) ∂ℓ/∂z + b − eta ∂ℓ/∂z`, minus `token_eta_i (q E_W + E_b)` for the
/// gradients `E` of tokens an earlier call already saw.
///
/// # Shapes
/// - q: `[batch, heads, K, rows]`, a: `[batch, heads, K, rows]`, grad_z: `[batch, heads, K, cols]`
/// - w: `[batch, heads, rows, cols]`, b: `[batch, heads, 1, cols]`, eta: `[batch, heads, K, K]`
/// - output: `[batch, heads, K, cols]`
#[allow(clippy::too_many_arguments)]
fn dual_affine<B: Backend>(
    q: Tensor<B, 4>,
    a: Tensor<B, 4>,
    grad_z: Tensor<B, 4>,
    w: Tensor<B, 4>,
    b: Tensor<B, 4>,
    eta: Tensor<B, 4>,
    earlier: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    token_eta_rows: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let attn = q.clone().matmul(a.swap_dims(2, 3)); // [batch, heads, K, K]
    let z_bar =
        q.clone().matmul(w) + b - (eta.clone() * attn).matmul(grad_z.clone()) - eta.matmul(grad_z); // [batch, heads, K, cols]
    match earlier {
        None => z_bar,
        Some((e_w, e_b)) => z_bar - (q.matmul(e_w) + e_b) * token_eta_rows,
    }
}

/// One mini-batch of TTT-Linear in the dual form.
///
/// `state = [W1, b1]` at the mini-batch start; `earlier` as in
/// [`autodiff_mini_batch`](super::autodiff_mini_batch).
///
/// # Shapes
/// - state, earlier: `[batch, heads, head_dim, head_dim]`, `[batch, heads, 1, head_dim]`
pub fn dual_linear<B: Backend>(
    inner: &InnerLinear<B>,
    state: &[Tensor<B, 4>],
    earlier: Option<&[Tensor<B, 4>]>,
    mini_batch: &MiniBatch<B>,
) -> MiniBatchOutput<B> {
    let pieces = linear_pieces(inner, state, mini_batch);

    let z1_bar = dual_affine(
        mini_batch.xq.clone(),
        pieces[0].0.clone(),
        pieces[0].1.clone(),
        state[0].clone(),
        state[1].clone(),
        mini_batch.eta(),
        earlier.map(|e| (e[0].clone(), e[1].clone())),
        mini_batch.token_eta_rows(),
    ); // [batch, heads, K, head_dim]
    let (gamma, beta) = ln_params(
        &Lift::identity(),
        &inner.ttt_norm_weight,
        &inner.ttt_norm_bias,
    );
    let output = mini_batch.xq.clone() + ln_fwd(z1_bar, gamma, beta, inner.eps);
    MiniBatchOutput {
        output,
        grads: weighted_grads(mini_batch, &pieces),
    }
}

/// One mini-batch of TTT-MLP in the dual form.
///
/// `state = [W1, b1, W2, b2]` at the mini-batch start; `earlier` as in
/// [`autodiff_mini_batch`](super::autodiff_mini_batch).
pub fn dual_mlp<B: Backend>(
    inner: &InnerMlp<B>,
    state: &[Tensor<B, 4>],
    earlier: Option<&[Tensor<B, 4>]>,
    mini_batch: &MiniBatch<B>,
) -> MiniBatchOutput<B> {
    let pieces = mlp_pieces(inner, state, mini_batch);

    let eta = mini_batch.eta(); // [batch, heads, K, K]
    let token_eta_rows = mini_batch.token_eta_rows();
    let z1_bar = dual_affine(
        mini_batch.xq.clone(),
        pieces[0].0.clone(),
        pieces[0].1.clone(),
        state[0].clone(),
        state[1].clone(),
        eta.clone(),
        earlier.map(|e| (e[0].clone(), e[1].clone())),
        token_eta_rows.clone(),
    ); // [batch, heads, K, hidden]
    let x2_bar = gelu_tanh(z1_bar);
    let z2_bar = dual_affine(
        x2_bar,
        pieces[1].0.clone(),
        pieces[1].1.clone(),
        state[2].clone(),
        state[3].clone(),
        eta,
        earlier.map(|e| (e[2].clone(), e[3].clone())),
        token_eta_rows,
    ); // [batch, heads, K, head_dim]
    let (gamma, beta) = ln_params(
        &Lift::identity(),
        &inner.ttt_norm_weight,
        &inner.ttt_norm_bias,
    );
    let output = mini_batch.xq.clone() + ln_fwd(z2_bar, gamma, beta, inner.eps);
    MiniBatchOutput {
        output,
        grads: weighted_grads(mini_batch, &pieces),
    }
}

/// One mini-batch of the layer's inner model in the dual form.
pub fn dual_mini_batch<B: Backend>(
    inner: &InnerModule<B>,
    state: &[Tensor<B, 4>],
    earlier: Option<&[Tensor<B, 4>]>,
    mini_batch: &MiniBatch<B>,
) -> MiniBatchOutput<B> {
    match inner {
        InnerModule::Linear(inner) => dual_linear(inner, state, earlier, mini_batch),
        InnerModule::Mlp(inner) => dual_mlp(inner, state, earlier, mini_batch),
    }
}

/// The dual form over `n` whole mini-batches read from a mini-batch boundary: what
/// [`dual_mini_batch`] computes one mini-batch at a time, with everything that does not depend
/// on the fast weights formed once for all mini-batches: `XV − XK − beta`, `eta`,
/// `eta ⊙ (XQ XKᵀ + 1)` (which turns `b1`'s correction into the same product), the step sizes
/// of the end-of-mini-batch update (`token_eta[K−1] · ttt_lr_eta`, folded into `XK`), and the
/// output LayerNorm. Each mini-batch then records a fixed, short list of operations: under
/// autodiff every operation costs bookkeeping (and, for a slice, a zero-filled gradient of the
/// whole input), which dominates small models.
///
/// Returns the outputs `XQ + LN(f_res(XQ; W_i))` and the fast weights after the last
/// mini-batch (`W_end` of each, `[W1, b1]` or `[W1, b1, W2, b2]`).
///
/// # Shapes
/// - state: as the inner model's, `[batch, heads, rows, cols]` each
/// - output: `[batch, heads, n · K, head_dim]`
pub fn dual_whole_mini_batches<B: Backend>(
    inner: &InnerModule<B>,
    state: &[Tensor<B, 4>],
    batches: &WholeMiniBatches<B>,
) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
    let k = batches.mini_batch_size();
    let n = batches.count();
    let [batch, heads, tokens, head_dim] = batches.xq.dims();
    assert_eq!(
        tokens,
        n * k,
        "{tokens} tokens are not whole mini-batches of {k}"
    );
    let (norm_weight, norm_bias, eps, fast_weights) = match inner {
        InnerModule::Linear(inner) => (&inner.ttt_norm_weight, &inner.ttt_norm_bias, inner.eps, 2),
        InnerModule::Mlp(inner) => (&inner.ttt_norm_weight, &inner.ttt_norm_bias, inner.eps, 4),
    };
    assert_eq!(
        state.len(),
        fast_weights,
        "fast weights of another inner model"
    );
    let (gamma, beta) = ln_params(&Lift::identity(), norm_weight, norm_bias);

    let target_minus_beta = batches.xv.clone() - batches.xk.clone() - beta.clone(); // [batch, heads, n·K, head_dim]
    let lr = batches.ttt_lr_eta.clone().reshape([batch, heads, n, 1, k]); // [batch, heads, n, 1, K]
    let token_eta = batches.token_eta.clone(); // [K]
    let eta = (token_eta.clone().reshape([1, 1, 1, k, 1]) * lr.clone()).tril(0); // [batch, heads, n, K, K]
    let xq = batches.xq.clone().reshape([batch, heads, n, k, head_dim]); // [batch, heads, n, K, head_dim]
    let xk = batches.xk.clone().reshape([batch, heads, n, k, head_dim]); // [batch, heads, n, K, head_dim]
    let attn1 = xq.matmul(xk.clone().swap_dims(3, 4)); // [batch, heads, n, K, K]
    let eta_attn1 = (eta.clone() * attn1.add_scalar(1.0)).reshape([batch, heads, tokens, k]); // [batch, heads, n·K, K]
    let eta = eta.reshape([batch, heads, tokens, k]); // [batch, heads, n·K, K]
    let lr_end = lr * token_eta.narrow(0, k - 1, 1).reshape([1, 1, 1, 1, 1]); // [batch, heads, n, 1, K]
    let xk_end_t = (xk * lr_end.clone().swap_dims(3, 4))
        .swap_dims(3, 4)
        .reshape([batch, heads, n * head_dim, k]); // [batch, heads, n·head_dim, K]
    let lr_end = lr_end.reshape([batch, heads, n, k]); // [batch, heads, n, K]

    let mut weights = state.to_vec();
    let mut z_bars = Vec::with_capacity(n);
    for i in 0..n {
        let rows = i * k;
        let xq_i = batches.xq.clone().narrow(2, rows, k); // [batch, heads, K, head_dim]
        let xk_i = batches.xk.clone().narrow(2, rows, k); // [batch, heads, K, head_dim]
        let target_i = target_minus_beta.clone().narrow(2, rows, k); // [batch, heads, K, head_dim]
        let eta_attn1_i = eta_attn1.clone().narrow(2, rows, k); // [batch, heads, K, K]
        let xk_end_t_i = xk_end_t.clone().narrow(2, i * head_dim, head_dim); // [batch, heads, head_dim, K]
        let lr_end_i = lr_end.clone().narrow(2, i, 1); // [batch, heads, 1, K]
        let (w1, b1) = (weights[0].clone(), weights[1].clone());
        let z1 = xk_i.matmul(w1.clone()) + b1.clone(); // [batch, heads, K, cols of W1]
        match inner {
            InnerModule::Linear(_) => {
                let grad_z1 = ln_fused_l2_bwd_shifted(z1, target_i, gamma.clone(), eps);
                let z1_bar =
                    xq_i.matmul(w1.clone()) + b1.clone() - eta_attn1_i.matmul(grad_z1.clone()); // [batch, heads, K, head_dim]
                weights = vec![
                    w1 - xk_end_t_i.matmul(grad_z1.clone()),
                    b1 - lr_end_i.matmul(grad_z1),
                ];
                z_bars.push(z1_bar);
            }
            InnerModule::Mlp(_) => {
                let (w2, b2) = (weights[2].clone(), weights[3].clone());
                let x2 = gelu_tanh(z1.clone()); // [batch, heads, K, hidden]
                let z2 = x2.clone().matmul(w2.clone()) + b2.clone(); // [batch, heads, K, head_dim]
                let grad_z2 = ln_fused_l2_bwd_shifted(z2, target_i, gamma.clone(), eps);
                let grad_z1 =
                    grad_z2.clone().matmul(w2.clone().swap_dims(2, 3)) * gelu_tanh_bwd(z1); // [batch, heads, K, hidden]
                let z1_bar =
                    xq_i.matmul(w1.clone()) + b1.clone() - eta_attn1_i.matmul(grad_z1.clone()); // [batch, heads, K, hidden]
                let x2_bar = gelu_tanh(z1_bar); // [batch, heads, K, hidden]
                let x2_t = x2.swap_dims(2, 3); // [batch, heads, hidden, K]
                let eta_attn2_i = eta.clone().narrow(2, rows, k)
                    * x2_bar.clone().matmul(x2_t.clone()).add_scalar(1.0); // [batch, heads, K, K]
                let z2_bar =
                    x2_bar.matmul(w2.clone()) + b2.clone() - eta_attn2_i.matmul(grad_z2.clone()); // [batch, heads, K, head_dim]
                weights = vec![
                    w1 - xk_end_t_i.matmul(grad_z1.clone()),
                    b1 - lr_end_i.clone().matmul(grad_z1),
                    w2 - (x2_t * lr_end_i.clone()).matmul(grad_z2.clone()),
                    b2 - lr_end_i.matmul(grad_z2),
                ];
                z_bars.push(z2_bar);
            }
        }
    }
    let z_bar = Tensor::cat(z_bars, 2); // [batch, heads, n·K, head_dim]
    let output = batches.xq.clone() + ln_fwd(z_bar, gamma, beta, eps);
    (output, weights)
}
