//! One head of one token through a TTT layer (TTT-Linear or TTT-MLP) in the primal form, on
//! plain slices: the head's fast weights are updated in place, and the weights `W_i` of the
//! token are never formed.
//!
//! With `G` the learning-rate-weighted gradient sum of the mini-batch so far, the token's
//! gradient `∇ℓ(W_start)` is rank one, `XKᵀ ∇Z`; so
//! `XQ W_i = XQ W_start − token_eta · (XQ G + ttt_lr_eta · (XQ · XK) ∇Z)`. `G` itself is kept
//! as its rank-one terms (`G = Σ_j (η_j XK_j)ᵀ ∇Z_j` over the tokens of the mini-batch so far),
//! so `XQ G = Σ_j (XQ · η_j XK_j) ∇Z_j` costs `O(mini_batch · head_dim)` and a token reads
//! `W_start` once and never a dense `G`. At the end of a mini-batch
//! `W_start −= token_eta_last · G` (one pass adding all the terms) and the terms are dropped.
//!
//! [`TttStep::run_head`] runs the generic code ([`KernelChoice::Reference`]) or the same code
//! compiled for AVX2 and FMA ([`KernelChoice::Avx2`], in the `avx2` module), chosen at run time
//! by [`KernelChoice::Auto`]. Both do the same operations in the same order (Rust contracts no
//! multiply-add into an FMA), so their results are bit-identical (tested).

use super::math::{add_vec_mat, axpy, dot, gelu_tanh, gelu_tanh_bwd, layer_norm, ln_l2_bwd};
use super::math::{rotate_pairs, sigmoid_tanh};
use super::KernelChoice;
use crate::KernelError;

/// The inner model of a TTT layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TttInner {
    /// `f(z) = z + LN(z W1 + b1)`; fast weights `[W1, b1]`.
    Linear,
    /// `f(z) = z + LN(GELU(z W1 + b1) W2 + b2)`; fast weights `[W1, b1, W2, b2]`.
    Mlp {
        /// Hidden width (`4 · head_dim` in the paper).
        hidden: usize,
    },
}

impl TttInner {
    /// The weight matrices among the fast-weight tensors, per head:
    /// `(index of the tensor, rows, cols)`; the other tensors are biases.
    pub fn matrices(self, head_dim: usize) -> Vec<(usize, usize, usize)> {
        let d = head_dim;
        match self {
            TttInner::Linear => vec![(0, d, d)],
            TttInner::Mlp { hidden } => vec![(0, d, hidden), (2, hidden, d)],
        }
    }
}

/// A TTT layer's parameters that every head's step reads (each head its part).
#[derive(Debug, Clone, Copy)]
pub struct TttLayerParams<'a> {
    /// The inner model.
    pub inner: TttInner,
    /// Features per head (even, for RoPE).
    pub head_dim: usize,
    /// The η gate's weights, `[heads, d_model]`.
    pub lr_weight: &'a [f32],
    /// The η gate's biases, `[heads]`.
    pub lr_bias: &'a [f32],
    /// `base_lr / head_dim`, the scale of the gate's sigmoid.
    pub lr_scale: f32,
    /// RoPE cosines per position in the mini-batch, `[mini_batch_size, head_dim / 2]`.
    pub rope_cos: &'a [f32],
    /// RoPE sines, shaped like `rope_cos`.
    pub rope_sin: &'a [f32],
    /// The inner LayerNorm's scale, `[heads, head_dim]`.
    pub norm_weight: &'a [f32],
    /// The inner LayerNorm's shift, `[heads, head_dim]`.
    pub norm_bias: &'a [f32],
    /// The inner LayerNorm's epsilon.
    pub norm_eps: f32,
}

/// One head's part of a TTT layer's recurrent state for one sequence.
///
/// The fast-weight tensors are `[W1, b1]` (TTT-Linear) or `[W1, b1, W2, b2]` (TTT-MLP), each
/// the head's `[rows, cols]` (or `[cols]`) slice.
#[derive(Debug)]
pub struct TttHeadState<'s, 'a> {
    /// `W_start` tensors.
    pub w: &'s mut [&'a mut [f32]],
    /// The gradient sums of the unfinished mini-batch, shaped like `w`: always those of the
    /// biases; those of the weight matrices only when `dense_grads`.
    pub g: &'s mut [&'a mut [f32]],
    /// Whether `g` of the weight matrices may be non-zero (a state continued in the middle of
    /// a mini-batch from one that kept dense sums); their rank-one terms are added to them.
    pub dense_grads: bool,
    /// Per weight matrix ([`TttInner::matrices`] order), `[mini_batch, rows]` η-scaled inputs
    /// of the rank-one terms of its gradient sum; the first `position` are in use.
    pub terms_a: &'s mut [&'a mut [f32]],
    /// Per weight matrix, the `[mini_batch, cols]` `∇Z` of the terms.
    pub terms_b: &'s mut [&'a mut [f32]],
}

/// What one head of a token's step reads: the layer's input and the head's parts of its
/// projections.
#[derive(Debug, Clone, Copy)]
pub struct TttHeadInputs<'a> {
    /// The normed residual (the η gate's input), `[d_model]`.
    pub x: &'a [f32],
    /// `XQ` before RoPE, `[head_dim]`.
    pub xq: &'a [f32],
    /// `XK` before RoPE, `[head_dim]`.
    pub xk: &'a [f32],
    /// `XV`, `[head_dim]`.
    pub xv: &'a [f32],
}

/// What every head of one token's step shares.
#[derive(Debug, Clone, Copy)]
pub struct TttStep<'a> {
    /// The layer's parameters.
    pub layer: TttLayerParams<'a>,
    /// The token's position in its mini-batch.
    pub position: usize,
    /// `token_eta` at that position.
    pub token_eta: f32,
    /// `token_eta` of the mini-batch's last position when the token closes its mini-batch
    /// (the fast weights then take the mini-batch's update), else `None`.
    pub token_eta_last: Option<f32>,
}

impl TttStep<'_> {
    /// Head `h` of the token: `fast` is its part of the state, advanced by the token; writes
    /// `f(XQ; W_i)` (`[head_dim]`) into `out`, with the code `kernel` picks
    /// ([`KernelChoice::Auto`]: AVX2 and FMA where the CPU has them).
    ///
    /// A head's loops run over `head_dim` floats (rows of `W_start`) and over `d_model` (the η
    /// gate); compiled for the baseline x86_64 they are four wide, compiled for AVX2 eight
    /// wide. The heads mostly wait on memory (each reads its `W_start` once), so the gain is
    /// small, but it costs nothing: the results are bit-identical.
    ///
    /// # Errors
    /// [`KernelError::KernelUnavailable`] if `kernel` forces code this CPU cannot run.
    ///
    /// # Panics
    /// On slices of the wrong lengths (a programmer error).
    pub fn run_head(
        &self,
        kernel: KernelChoice,
        h: usize,
        fast: &mut TttHeadState<'_, '_>,
        inputs: TttHeadInputs<'_>,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        match kernel.resolve()? {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `resolve` returned Avx2, so the CPU has AVX2 and FMA.
            KernelChoice::Avx2 => unsafe { super::avx2::ttt_head(self, h, fast, inputs, out) },
            _ => self.run_generic(h, fast, inputs, out),
        }
        Ok(())
    }

    /// The query's pre-activation `q W_i + b_i` at the token's weights
    /// `W_i = W_start − token_eta · (G + ttt_lr_eta · a ⊗ ∇z)` (`G` before this token, `gb`
    /// after it), from `q_w = q W_start` and `q_g = q G`: with `lr_qa = ttt_lr_eta · (q · a)`,
    /// `q_w + b − token_eta · (q_g + lr_qa · ∇z + gb)`.
    #[inline(always)]
    fn at_token_weights(
        &self,
        q_w: &[f32],
        b: &[f32],
        q_g: &[f32],
        gb: &[f32],
        grad: &[f32],
        lr_qa: f32,
    ) -> Vec<f32> {
        (0..q_w.len())
            .map(|c| q_w[c] + b[c] - self.token_eta * (q_g[c] + lr_qa * grad[c] + gb[c]))
            .collect()
    }

    /// One head, generic code. Always inlined, as is every helper it calls, so that the AVX2
    /// twin (`avx2::ttt_head`) compiles all of it with its features.
    #[inline(always)]
    pub(crate) fn run_generic(
        &self,
        h: usize,
        fast: &mut TttHeadState<'_, '_>,
        TttHeadInputs { x, xq, xk, xv }: TttHeadInputs<'_>,
        out: &mut [f32],
    ) {
        let layer = &self.layer;
        let d_model = x.len();
        let lr_logit = dot(x, &layer.lr_weight[h * d_model..(h + 1) * d_model]) + layer.lr_bias[h];
        let ttt_lr_eta = sigmoid_tanh(lr_logit) * layer.lr_scale;
        let d = layer.head_dim;
        let half = d / 2;
        let position = self.position;
        let rope = position * half..(position + 1) * half;
        let (cos, sin) = (&layer.rope_cos[rope.clone()], &layer.rope_sin[rope]);
        let (mut xq, mut xk) = (xq.to_vec(), xk.to_vec());
        rotate_pairs(&mut xq, cos, sin);
        rotate_pairs(&mut xk, cos, sin);
        let target: Vec<f32> = xv.iter().zip(&xk).map(|(v, k)| v - k).collect();
        let gamma = &layer.norm_weight[h * d..(h + 1) * d];
        let beta = &layer.norm_bias[h * d..(h + 1) * d];
        let eps = layer.norm_eps;

        // State tensors: [W1, b1] (TTT-Linear) or [W1, b1, W2, b2] (TTT-MLP).
        let z_out = match layer.inner {
            TttInner::Linear => {
                let (z, q_w) = affine_at_start(&xk, &xq, fast.w[0], fast.w[1]);
                let mut grad_z = vec![0.0; d];
                ln_l2_bwd(&z, &target, gamma, beta, eps, &mut grad_z);
                let q_g = fast.read_then_accumulate(0, 0, position, &xq, ttt_lr_eta, &xk, &grad_z);
                axpy(ttt_lr_eta, &grad_z, fast.g[1]);
                let lr_qa = ttt_lr_eta * dot(&xq, &xk);
                self.at_token_weights(&q_w, fast.w[1], &q_g, fast.g[1], &grad_z, lr_qa)
            }
            TttInner::Mlp { hidden } => {
                // First affine map; its input is XK for the gradient, XQ for the output.
                let (z1, q1_w) = affine_at_start(&xk, &xq, fast.w[0], fast.w[1]);
                let x2: Vec<f32> = z1.iter().map(|&v| gelu_tanh(v)).collect();
                let mut z2 = fast.w[3].to_vec();
                add_vec_mat(&x2, fast.w[2], &mut z2);
                let mut grad_z2 = vec![0.0; d];
                ln_l2_bwd(&z2, &target, gamma, beta, eps, &mut grad_z2);
                // ∇Z1 = (∇Z2 W2ᵀ) ⊙ gelu'(Z1), at W2_start.
                let w2 = &*fast.w[2];
                let grad_z1: Vec<f32> = (0..hidden)
                    .map(|s| dot(&w2[s * d..(s + 1) * d], &grad_z2) * gelu_tanh_bwd(z1[s]))
                    .collect();
                let q1_g =
                    fast.read_then_accumulate(0, 0, position, &xq, ttt_lr_eta, &xk, &grad_z1);
                axpy(ttt_lr_eta, &grad_z1, fast.g[1]);
                let lr_qa = ttt_lr_eta * dot(&xq, &xk);
                let zq1 =
                    self.at_token_weights(&q1_w, fast.w[1], &q1_g, fast.g[1], &grad_z1, lr_qa);
                let xq2: Vec<f32> = zq1.iter().map(|&v| gelu_tanh(v)).collect();
                // Second affine map: its input is X2 for the gradient, XQ2 for the output; XQ2 G2
                // is read before this token's term is added.
                let mut q2_w = vec![0.0; d];
                add_vec_mat(&xq2, fast.w[2], &mut q2_w);
                let q2_g =
                    fast.read_then_accumulate(1, 2, position, &xq2, ttt_lr_eta, &x2, &grad_z2);
                axpy(ttt_lr_eta, &grad_z2, fast.g[3]);
                let lr_qa = ttt_lr_eta * dot(&xq2, &x2);
                self.at_token_weights(&q2_w, fast.w[3], &q2_g, fast.g[3], &grad_z2, lr_qa)
            }
        };
        // f(XQ; W_i) = XQ + LN(z).
        layer_norm(&z_out, gamma, Some(beta), eps, out);
        for (o, q) in out.iter_mut().zip(&xq) {
            *o += q;
        }
        if let Some(last) = self.token_eta_last {
            fast.close_mini_batch(&layer.inner.matrices(d), position + 1, last);
        }
    }
}

/// One affine map `z = a W + b` at `W_start` in one pass over the rows of `W` (`[rows, cols]`):
/// returns `(XK W + b, XQ W)`.
#[inline(always)]
fn affine_at_start(xk: &[f32], xq: &[f32], w: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let cols = b.len();
    let mut z = b.to_vec();
    let mut q_w = vec![0.0; cols];
    for (r, w_row) in w.chunks_exact(cols).enumerate() {
        axpy(xk[r], w_row, &mut z);
        axpy(xq[r], w_row, &mut q_w);
    }
    (z, q_w)
}

impl TttHeadState<'_, '_> {
    /// For weight matrix `m` (state tensor `k`): returns `q G` for the gradient sum before this
    /// token (`position` terms, plus the dense sum when there is one), then records this
    /// token's term `(lr · a) ⊗ grad` at `position`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn read_then_accumulate(
        &mut self,
        m: usize,
        k: usize,
        position: usize,
        q: &[f32],
        lr: f32,
        a: &[f32],
        grad: &[f32],
    ) -> Vec<f32> {
        let (rows, cols) = (a.len(), grad.len());
        let mut q_g = vec![0.0; cols];
        if self.dense_grads {
            add_vec_mat(q, self.g[k], &mut q_g);
        }
        let (ta, tb) = (&mut *self.terms_a[m], &mut *self.terms_b[m]);
        for (a_j, b_j) in ta
            .chunks_exact(rows)
            .zip(tb.chunks_exact(cols))
            .take(position)
        {
            axpy(dot(q, a_j), b_j, &mut q_g);
        }
        for (t, v) in ta[position * rows..(position + 1) * rows].iter_mut().zip(a) {
            *t = lr * v;
        }
        tb[position * cols..(position + 1) * cols].copy_from_slice(grad);
        q_g
    }

    /// The end of a mini-batch of `len` tokens: `W_start −= eta_last · G` for every tensor, in
    /// one pass over each weight matrix (all its rank-one terms added row by row), and the
    /// sums start afresh.
    #[inline(always)]
    fn close_mini_batch(&mut self, matrices: &[(usize, usize, usize)], len: usize, eta_last: f32) {
        for (m, &(k, rows, cols)) in matrices.iter().enumerate() {
            let (ta, tb) = (&*self.terms_a[m], &*self.terms_b[m]);
            for (r, w_row) in self.w[k].chunks_exact_mut(cols).enumerate() {
                for (a_j, b_j) in ta.chunks_exact(rows).zip(tb.chunks_exact(cols)).take(len) {
                    axpy(-eta_last * a_j[r], b_j, w_row);
                }
            }
        }
        for (k, (w, g)) in self.w.iter_mut().zip(self.g.iter_mut()).enumerate() {
            let is_matrix = matrices.iter().any(|&(mk, _, _)| mk == k);
            if is_matrix && !self.dense_grads {
                continue;
            }
            for (wv, gv) in w.iter_mut().zip(g.iter_mut()) {
                *wv -= eta_last * *gv;
                *gv = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::math::{layer_norm, ln_l2_bwd, rotate_pairs, sigmoid_tanh};
    use super::*;

    /// Deterministic values in `[-scale, scale)`.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// One layer's parameters and one sequence's state and inputs, owned.
    struct Layer {
        inner: TttInner,
        head_dim: usize,
        mini_batch: usize,
        lr_weight: Vec<f32>,
        lr_bias: Vec<f32>,
        rope_cos: Vec<f32>,
        rope_sin: Vec<f32>,
        norm_weight: Vec<f32>,
        norm_bias: Vec<f32>,
        token_eta: Vec<f32>,
    }

    /// Per head: the fast-weight tensors, their gradient sums, the term buffers.
    #[derive(Clone, Debug, PartialEq)]
    struct HeadState {
        w: Vec<Vec<f32>>,
        g: Vec<Vec<f32>>,
        dense_grads: bool,
        terms: Vec<(Vec<f32>, Vec<f32>)>,
    }

    impl Layer {
        fn new(inner: TttInner, heads: usize, head_dim: usize, d_model: usize) -> Self {
            let mini_batch = 3;
            let half = head_dim / 2;
            let angles: Vec<f32> = (0..mini_batch * half)
                .map(|i| (i / half) as f32 * (1.0 + (i % half) as f32).recip())
                .collect();
            Self {
                inner,
                head_dim,
                mini_batch,
                lr_weight: values(heads * d_model, 1, 0.3),
                lr_bias: values(heads, 2, 0.5),
                rope_cos: angles.iter().map(|a| a.cos()).collect(),
                rope_sin: angles.iter().map(|a| a.sin()).collect(),
                norm_weight: values(heads * head_dim, 3, 0.2)
                    .iter()
                    .map(|v| 1.0 + v)
                    .collect(),
                norm_bias: values(heads * head_dim, 4, 0.1),
                token_eta: (1..=mini_batch).map(|i| 1.0 / i as f32).collect(),
            }
        }

        fn params(&self) -> TttLayerParams<'_> {
            TttLayerParams {
                inner: self.inner,
                head_dim: self.head_dim,
                lr_weight: &self.lr_weight,
                lr_bias: &self.lr_bias,
                lr_scale: 0.7,
                rope_cos: &self.rope_cos,
                rope_sin: &self.rope_sin,
                norm_weight: &self.norm_weight,
                norm_bias: &self.norm_bias,
                norm_eps: 1e-6,
            }
        }

        /// A head's state at the start of a sequence; with `dense_grads`, a state continued in
        /// the middle of a mini-batch, whose gradient sums are all non-zero.
        fn state(&self, seed: u64, dense_grads: bool) -> HeadState {
            let d = self.head_dim;
            let shapes = match self.inner {
                TttInner::Linear => vec![d * d, d],
                TttInner::Mlp { hidden } => vec![d * hidden, hidden, hidden * d, d],
            };
            let w = shapes
                .iter()
                .enumerate()
                .map(|(k, &n)| values(n, seed + k as u64, 0.3))
                .collect();
            let g = shapes
                .iter()
                .enumerate()
                .map(|(k, &n)| match dense_grads {
                    true => values(n, seed + 10 + k as u64, 0.05),
                    false => vec![0.0; n],
                })
                .collect();
            let terms = self
                .inner
                .matrices(d)
                .iter()
                .map(|&(_, rows, cols)| {
                    (
                        vec![0.0; self.mini_batch * rows],
                        vec![0.0; self.mini_batch * cols],
                    )
                })
                .collect();
            HeadState {
                w,
                g,
                dense_grads,
                terms,
            }
        }

        /// Token `t` of the sequence, starting at mini-batch position `start`: head `h` of it
        /// advances `state` and returns its output.
        #[allow(clippy::too_many_arguments)]
        fn run(
            &self,
            kernel: KernelChoice,
            t: usize,
            start: usize,
            h: usize,
            x: &[f32],
            qkv: &[Vec<f32>; 3],
            state: &mut HeadState,
        ) -> Vec<f32> {
            let position = (start + t) % self.mini_batch;
            let closes = position + 1 == self.mini_batch;
            let step = TttStep {
                layer: self.params(),
                position,
                token_eta: self.token_eta[position],
                token_eta_last: closes.then_some(self.token_eta[self.mini_batch - 1]),
            };
            let mut w: Vec<&mut [f32]> = state.w.iter_mut().map(|v| &mut v[..]).collect();
            let mut g: Vec<&mut [f32]> = state.g.iter_mut().map(|v| &mut v[..]).collect();
            let (mut ta, mut tb): (Vec<&mut [f32]>, Vec<&mut [f32]>) = state
                .terms
                .iter_mut()
                .map(|(a, b)| (&mut a[..], &mut b[..]))
                .unzip();
            let mut fast = TttHeadState {
                w: &mut w,
                g: &mut g,
                dense_grads: state.dense_grads,
                terms_a: &mut ta,
                terms_b: &mut tb,
            };
            let inputs = TttHeadInputs {
                x,
                xq: &qkv[0],
                xk: &qkv[1],
                xv: &qkv[2],
            };
            let mut out = vec![f32::NAN; self.head_dim];
            step.run_head(kernel, h, &mut fast, inputs, &mut out)
                .unwrap();
            if closes {
                state.dense_grads = false;
            }
            out
        }
    }

    fn token(t: usize, d_model: usize, head_dim: usize) -> (Vec<f32>, [Vec<f32>; 3]) {
        let seed = 100 + 4 * t as u64;
        (
            values(d_model, seed, 1.0),
            [
                values(head_dim, seed + 1, 1.0),
                values(head_dim, seed + 2, 1.0),
                values(head_dim, seed + 3, 1.0),
            ],
        )
    }

    /// The AVX2 build of the head step and the generic one give the same outputs and states,
    /// bit for bit, over eight tokens (two mini-batch closes), for both inner models, with and
    /// without dense gradient sums, on widths that leave tails in every vector loop.
    #[test]
    fn avx2_and_generic_heads_are_bit_identical() {
        if !crate::cpu::avx2_under_test("the TTT head step's AVX2 build") {
            return;
        }
        let (heads, head_dim, d_model) = (2, 10, 37);
        for inner in [TttInner::Linear, TttInner::Mlp { hidden: 13 }] {
            let layer = Layer::new(inner, heads, head_dim, d_model);
            for (dense_grads, start) in [(false, 0), (true, 1)] {
                for h in 0..heads {
                    let mut states = [
                        layer.state(7 + h as u64, dense_grads),
                        layer.state(7 + h as u64, dense_grads),
                    ];
                    for t in 0..8 {
                        let (x, qkv) = token(t, d_model, head_dim);
                        let [generic, avx2] = &mut states;
                        let want =
                            layer.run(KernelChoice::Reference, t, start, h, &x, &qkv, generic);
                        let got = layer.run(KernelChoice::Avx2, t, start, h, &x, &qkv, avx2);
                        assert!(want.iter().all(|v| v.is_finite()), "{want:?}");
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "{inner:?} head {h} token {t}");
                        assert_eq!(avx2, generic, "{inner:?} head {h} token {t}");
                    }
                }
            }
        }
    }

    /// TTT-Linear against the update written out: the dense gradient sum `G` and the token's
    /// weights `W_i = W_start − token_eta · G` formed explicitly, `W_start −= eta_last · G` at
    /// each mini-batch's end. Agrees up to float rounding (the sums go in another order).
    #[test]
    fn ttt_linear_head_equals_the_explicit_update() {
        let (heads, d, d_model) = (2, 6, 12);
        let layer = Layer::new(TttInner::Linear, heads, d, d_model);
        let params = layer.params();
        for h in 0..heads {
            let mut state = layer.state(3, false);
            let (mut w, mut b) = (state.w[0].clone(), state.w[1].clone());
            let (mut gw, mut gb) = (vec![0.0f32; d * d], vec![0.0f32; d]);
            let gamma = &layer.norm_weight[h * d..(h + 1) * d];
            let beta = &layer.norm_bias[h * d..(h + 1) * d];
            for t in 0..7 {
                let (x, qkv) = token(t, d_model, d);
                let got = layer.run(KernelChoice::Auto, t, 0, h, &x, &qkv, &mut state);

                let position = t % layer.mini_batch;
                let lr_weight = &layer.lr_weight[h * d_model..(h + 1) * d_model];
                let logit: f32 = x.iter().zip(lr_weight).map(|(a, b)| a * b).sum::<f32>();
                let eta = sigmoid_tanh(logit + layer.lr_bias[h]) * params.lr_scale;
                let rope = position * d / 2..(position + 1) * d / 2;
                let (cos, sin) = (&layer.rope_cos[rope.clone()], &layer.rope_sin[rope]);
                let (mut xq, mut xk) = (qkv[0].clone(), qkv[1].clone());
                rotate_pairs(&mut xq, cos, sin);
                rotate_pairs(&mut xk, cos, sin);
                let times = |a: &[f32], m: &[f32], b: &[f32]| -> Vec<f32> {
                    (0..d)
                        .map(|c| b[c] + (0..d).map(|r| a[r] * m[r * d + c]).sum::<f32>())
                        .collect()
                };
                let z = times(&xk, &w, &b);
                let target: Vec<f32> = qkv[2].iter().zip(&xk).map(|(v, k)| v - k).collect();
                let mut grad = vec![0.0; d];
                ln_l2_bwd(&z, &target, gamma, beta, params.norm_eps, &mut grad);
                for r in 0..d {
                    for c in 0..d {
                        gw[r * d + c] += eta * xk[r] * grad[c];
                    }
                }
                for c in 0..d {
                    gb[c] += eta * grad[c];
                }
                let eta_t = layer.token_eta[position];
                let w_i: Vec<f32> = w.iter().zip(&gw).map(|(w, g)| w - eta_t * g).collect();
                let b_i: Vec<f32> = b.iter().zip(&gb).map(|(b, g)| b - eta_t * g).collect();
                let mut want = vec![0.0; d];
                layer_norm(
                    &times(&xq, &w_i, &b_i),
                    gamma,
                    Some(beta),
                    params.norm_eps,
                    &mut want,
                );
                for (o, q) in want.iter_mut().zip(&xq) {
                    *o += q;
                }
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() < 1e-4,
                        "head {h} token {t}: {got:?} vs {want:?}"
                    );
                }
                if position + 1 == layer.mini_batch {
                    let last = layer.token_eta[layer.mini_batch - 1];
                    w.iter_mut().zip(&gw).for_each(|(w, g)| *w -= last * g);
                    b.iter_mut().zip(&gb).for_each(|(b, g)| *b -= last * g);
                    gw.fill(0.0);
                    gb.fill(0.0);
                }
            }
            for (got, want) in state.w[0].iter().chain(&state.w[1]).zip(w.iter().chain(&b)) {
                assert!(
                    (got - want).abs() < 1e-5,
                    "head {h}: W_start {got} vs {want}"
                );
            }
        }
    }
}
