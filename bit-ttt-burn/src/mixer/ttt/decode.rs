//! One token through a TTT layer (TTT-Linear or TTT-MLP) in the primal form, on plain slices:
//! the fast weights are updated in place, and the weights `W_i` of the token are never formed.
//!
//! Per head, with `G` the learning-rate-weighted gradient sum of the mini-batch so far
//! (`TttCache::grads`), the token's gradient `∇ℓ(W_start)` is rank one, `XKᵀ ∇Z`; so
//! `XQ W_i = XQ W_start − token_eta · (XQ G + ttt_lr_eta · (XQ · XK) ∇Z)`. `G` itself is kept
//! as its rank-one terms (`G = Σ_j (η_j XK_j)ᵀ ∇Z_j` over the tokens of the mini-batch so far),
//! so `XQ G = Σ_j (XQ · η_j XK_j) ∇Z_j` costs `O(mini_batch · head_dim)` and a token reads
//! `W_start` once and never a dense `G`. At the end of a mini-batch
//! `W_start −= token_eta_last · G` (one pass adding all the terms) and the terms are dropped,
//! as `TttCache::advance` does.

use burn::tensor::backend::Backend;

use super::{state, InnerModule, TttLayer};
use crate::cpu_decode::linear::{DecodeLinear, Input};
use crate::cpu_decode::math::{
    add_vec_mat, axpy, dot, gelu_tanh, gelu_tanh_bwd, layer_norm, ln_l2_bwd, rotate_pairs,
    sigmoid_tanh,
};
use crate::cpu_decode::{for_each_head, values};
use crate::soul::{HostTensor, LayerSoul};
use crate::BitTttError;

/// The inner model of a [`TttDecode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    /// `f(z) = z + LN(z W1 + b1)`; fast weights `[W1, b1]`.
    Linear,
    /// `f(z) = z + LN(GELU(z W1 + b1) W2 + b2)`; fast weights `[W1, b1, W2, b2]`.
    Mlp {
        /// Hidden width (`4 · head_dim` in the paper).
        hidden: usize,
    },
}

/// A [`TttLayer`]'s weights, copied out of Burn tensors (the projections keep their packed
/// weights where they are).
#[derive(Debug)]
pub(crate) struct TttDecode {
    q_proj: DecodeLinear,
    k_proj: DecodeLinear,
    v_proj: DecodeLinear,
    o_proj: DecodeLinear,
    g_proj: Option<DecodeLinear>,
    inner: Inner,
    /// Initial fast weights, each `[heads, rows, cols]` flattened, in `TttCache` order.
    initial: Vec<Vec<f32>>,
    /// Inner LN scale and shift, `[heads, head_dim]`.
    ttt_norm_weight: Vec<f32>,
    ttt_norm_bias: Vec<f32>,
    ttt_norm_eps: f32,
    /// η gate, `[heads, d_model]` and `[heads]`.
    lr_weight: Vec<f32>,
    lr_bias: Vec<f32>,
    /// `base_lr / head_dim`.
    lr_scale: f32,
    /// `token_eta`, `[mini_batch_size]`.
    token_eta: Vec<f32>,
    /// RoPE cosines and sines per position in the mini-batch, `[mini_batch_size, head_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    post_norm_gamma: Vec<f32>,
    post_norm_beta: Option<Vec<f32>>,
    post_norm_eps: f32,
    heads: usize,
    head_dim: usize,
    mini_batch_size: usize,
}

/// The recurrent state of one TTT layer for one sequence: `TttCache` as flat f32 vectors.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TttFastWeights {
    /// `W_start` tensors, each `[heads, rows, cols]` flattened.
    pub weights: Vec<Vec<f32>>,
    /// The gradient sums of the unfinished mini-batch, shaped like `weights`. The bias sums are
    /// always here; the weight matrices' sums are in `terms`, and here only when
    /// `dense_grads` (a state continued from a Burn cache in the middle of a mini-batch).
    pub grads: Vec<Vec<f32>>,
    /// Whether `grads` of the weight matrices may be non-zero.
    pub dense_grads: bool,
    /// Per weight matrix (W1, and W2 for TTT-MLP), the rank-one terms of its gradient sum:
    /// `([heads, mini_batch, rows] η-scaled inputs, [heads, mini_batch, cols] ∇Z)`; the first
    /// `seq_len_offset % mini_batch` of each head are in use.
    pub terms: Vec<(Vec<f32>, Vec<f32>)>,
    /// Tokens seen.
    pub seq_len_offset: usize,
}

impl TttDecode {
    /// Copies the layer's parameters.
    pub fn new<B: Backend>(layer: &TttLayer<B>) -> Result<Self, BitTttError> {
        let (heads, head_dim) = (layer.num_heads, layer.head_dim);
        let (inner, initial, norm_weight, norm_bias, eps) = match &layer.inner {
            InnerModule::Linear(m) => (
                Inner::Linear,
                vec![values(m.w1.val())?, values(m.b1.val())?],
                &m.ttt_norm_weight,
                &m.ttt_norm_bias,
                m.eps,
            ),
            InnerModule::Mlp(m) => (
                Inner::Mlp { hidden: m.dims().2 },
                vec![
                    values(m.w1.val())?,
                    values(m.b1.val())?,
                    values(m.w2.val())?,
                    values(m.b2.val())?,
                ],
                &m.ttt_norm_weight,
                &m.ttt_norm_bias,
                m.eps,
            ),
        };
        // RoPE of the mini-batch positions from the layer's own table, [positions, head_dim, 2]
        // holding (cos, sin) repeated for both members of a pair.
        let freqs = values(layer.rope.freq_complex.clone())?;
        let half = head_dim / 2;
        let (mut rope_cos, mut rope_sin) = (Vec::new(), Vec::new());
        for p in 0..layer.mini_batch_size {
            for i in 0..half {
                let at = (p * head_dim + 2 * i) * 2;
                rope_cos.push(freqs[at]);
                rope_sin.push(freqs[at + 1]);
            }
        }
        Ok(Self {
            q_proj: DecodeLinear::from_projection(&layer.q_proj)?,
            k_proj: DecodeLinear::from_projection(&layer.k_proj)?,
            v_proj: DecodeLinear::from_projection(&layer.v_proj)?,
            o_proj: DecodeLinear::from_projection(&layer.o_proj)?,
            g_proj: layer
                .g_proj
                .as_ref()
                .map(DecodeLinear::from_projection)
                .transpose()?,
            inner,
            initial,
            ttt_norm_weight: values(norm_weight.val())?,
            ttt_norm_bias: values(norm_bias.val())?,
            ttt_norm_eps: eps as f32,
            lr_weight: values(layer.learnable_ttt_lr_weight.val())?,
            lr_bias: values(layer.learnable_ttt_lr_bias.val())?,
            lr_scale: (layer.base_lr / head_dim as f64) as f32,
            token_eta: values(layer.token_eta())?,
            rope_cos,
            rope_sin,
            post_norm_gamma: values(layer.post_norm.gamma.val())?,
            post_norm_beta: layer
                .post_norm
                .beta
                .as_ref()
                .map(|b| values(b.val()))
                .transpose()?,
            post_norm_eps: layer.post_norm_eps as f32,
            heads,
            head_dim,
            mini_batch_size: layer.mini_batch_size,
        })
    }

    /// The weight matrices of the inner model: `(index in the state, rows, cols)` per head.
    fn matrices(&self) -> Vec<(usize, usize, usize)> {
        let d = self.head_dim;
        match self.inner {
            Inner::Linear => vec![(0, d, d)],
            Inner::Mlp { hidden } => vec![(0, d, hidden), (2, hidden, d)],
        }
    }

    /// The lengths of the rank-one term buffers per weight matrix (see
    /// [`TttFastWeights::terms`]): room for a mini-batch of terms per head.
    fn term_sizes(&self) -> Vec<(usize, usize)> {
        let per_head = self.heads * self.mini_batch_size;
        self.matrices()
            .into_iter()
            .map(|(_, rows, cols)| (per_head * rows, per_head * cols))
            .collect()
    }

    /// Zeroed rank-one term buffers, [`term_sizes`](Self::term_sizes) long.
    fn empty_terms(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        self.term_sizes()
            .into_iter()
            .map(|(a, b)| (vec![0.0; a], vec![0.0; b]))
            .collect()
    }

    /// The projections, for checking their shapes.
    pub fn projections(&self) -> impl Iterator<Item = &DecodeLinear> {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
            .into_iter()
            .chain(self.g_proj.as_ref())
    }

    /// Bytes of parameters one step reads: the projections, the η gate, the inner and the
    /// post LayerNorms, `token_eta` and the RoPE tables. Not the initial fast weights: a step
    /// reads the state's `W_start` instead (see [`state_bytes_read`](Self::state_bytes_read)).
    pub fn weight_bytes(&self) -> usize {
        let vectors = [
            &self.ttt_norm_weight,
            &self.ttt_norm_bias,
            &self.lr_weight,
            &self.lr_bias,
            &self.token_eta,
            &self.rope_cos,
            &self.rope_sin,
            &self.post_norm_gamma,
        ];
        let values: usize = vectors.iter().map(|v| v.len()).sum::<usize>()
            + self.post_norm_beta.as_ref().map_or(0, Vec::len);
        self.projections()
            .map(DecodeLinear::weight_bytes)
            .sum::<usize>()
            + values * std::mem::size_of::<f32>()
    }

    /// Bytes of fast-weight state the step at sequence position `position` reads, for a state
    /// this decoder started: every `W_start` tensor, the bias gradient sums, and per weight
    /// matrix the rank-one terms of the tokens before it in its mini-batch.
    pub fn state_bytes_read(&self, position: usize) -> usize {
        let in_batch = position % self.mini_batch_size;
        let matrices = self.matrices();
        let tensors: usize = self.initial.iter().map(Vec::len).sum();
        let bias_grads: usize = (0..self.initial.len())
            .filter(|k| !matrices.iter().any(|&(m, _, _)| m == *k))
            .map(|k| self.initial[k].len())
            .sum();
        let terms: usize = matrices
            .iter()
            .map(|&(_, rows, cols)| self.heads * in_batch * (rows + cols))
            .sum();
        (tensors + bias_grads + terms) * std::mem::size_of::<f32>()
    }

    /// The state at position 0: the initial fast weights, no gradients.
    pub fn new_state(&self) -> TttFastWeights {
        TttFastWeights {
            weights: self.initial.clone(),
            grads: self.initial.iter().map(|w| vec![0.0; w.len()]).collect(),
            dense_grads: false,
            terms: self.empty_terms(),
            seq_len_offset: 0,
        }
    }

    /// The shape of state tensor `k` of one sequence, `[1, heads, rows, cols]` (biases have
    /// one row), as Burn's `TttCache` holds it.
    fn tensor_shape(&self, k: usize) -> [usize; 4] {
        match self.matrices().iter().find(|&&(m, _, _)| m == k) {
            Some(&(_, rows, cols)) => [1, self.heads, rows, cols],
            None => [1, self.heads, 1, self.initial[k].len() / self.heads],
        }
    }

    /// `state` as block `index`'s part of a `.soul` file, in the form Burn's `TttCache` saves:
    /// the weight matrices' gradient sums are formed from their rank-one terms (and the dense
    /// sum, if any), so a state saved in the middle of a mini-batch continues within float
    /// rounding of the uninterrupted run (exactly when saved at a mini-batch boundary).
    pub fn state_to_soul(
        &self,
        state: &TttFastWeights,
        index: usize,
    ) -> Result<LayerSoul, BitTttError> {
        let mut soul = LayerSoul::new(index);
        soul.fields
            .insert(state::TOKENS_READ.into(), state.seq_len_offset);
        soul.fields
            .insert("mini_batch_size".into(), self.mini_batch_size);
        let in_batch = state.seq_len_offset % self.mini_batch_size;
        let matrices = self.matrices();
        for (k, (w, g)) in state.weights.iter().zip(&state.grads).enumerate() {
            let shape = self.tensor_shape(k).to_vec();
            let mut grads = match matrices.iter().position(|&(mk, _, _)| mk == k) {
                Some(_) if !state.dense_grads => vec![0.0; g.len()],
                _ => g.clone(),
            };
            if let Some(m) = matrices.iter().position(|&(mk, _, _)| mk == k) {
                // G += Σ_j (η_j a_j)ᵀ ∇Z_j per head, over the terms of this mini-batch.
                let (_, rows, cols) = matrices[m];
                let (ta, tb) = &state.terms[m];
                let per_head = self.mini_batch_size;
                for h in 0..self.heads {
                    let g_head = &mut grads[h * rows * cols..(h + 1) * rows * cols];
                    let a_head = &ta[h * per_head * rows..(h + 1) * per_head * rows];
                    let b_head = &tb[h * per_head * cols..(h + 1) * per_head * cols];
                    for (a_j, b_j) in a_head
                        .chunks_exact(rows)
                        .zip(b_head.chunks_exact(cols))
                        .take(in_batch)
                    {
                        for (r, g_row) in g_head.chunks_exact_mut(cols).enumerate() {
                            axpy(a_j[r], b_j, g_row);
                        }
                    }
                }
            }
            soul.tensors.insert(
                format!("state.{k}"),
                HostTensor::new(shape.clone(), w.clone())?,
            );
            soul.tensors
                .insert(format!("grads.{k}"), HostTensor::new(shape, grads)?);
        }
        Ok(soul)
    }

    /// The state of one sequence that has read `position` tokens, from its part of a `.soul`
    /// file (taking its tensors out of `soul`).
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming the tensor or counter that is missing, of another
    /// shape (another model, or more than one sequence), or disagrees with `position` or the
    /// layer's mini-batch.
    pub fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
    ) -> Result<TttFastWeights, BitTttError> {
        let mut take = |kind: &str| -> Result<Vec<Vec<f32>>, BitTttError> {
            (0..self.initial.len())
                .map(|k| {
                    let shape = self.tensor_shape(k);
                    Ok(soul
                        .take_tensor(&format!("{kind}.{k}"), Some(&shape))?
                        .values)
                })
                .collect()
        };
        let weights = take("state")?;
        let grads = take("grads")?;
        let offset = soul.field(state::TOKENS_READ)?;
        if offset != position {
            return Err(soul.position_error(state::TOKENS_READ, offset, position));
        }
        let mini_batch = soul.field("mini_batch_size")?;
        if mini_batch != self.mini_batch_size {
            return Err(BitTttError::InvalidCache(format!(
                "layer {} was saved with mini-batch size {mini_batch}, the model uses {}",
                soul.index, self.mini_batch_size
            )));
        }
        let mut state = TttFastWeights {
            weights,
            grads,
            dense_grads: true,
            terms: self.empty_terms(),
            seq_len_offset: offset,
        };
        // At a mini-batch boundary the sums are unused and start afresh (`TttCache::advance`
        // replaces them); the step adds onto them, so they must be zero.
        if offset % self.mini_batch_size == 0 {
            state.grads.iter_mut().for_each(|g| g.fill(0.0));
            state.dense_grads = false;
        }
        Ok(state)
    }

    /// Checks that `state` has this layer's shapes (and so belongs to it).
    pub fn check_state(&self, state: &TttFastWeights) -> Result<(), BitTttError> {
        let sizes = |t: &[Vec<f32>]| t.iter().map(Vec::len).collect::<Vec<_>>();
        let expected = sizes(&self.initial);
        let term_sizes = |t: &[(Vec<f32>, Vec<f32>)]| {
            t.iter()
                .map(|(a, b)| (a.len(), b.len()))
                .collect::<Vec<_>>()
        };
        if sizes(&state.weights) != expected
            || sizes(&state.grads) != expected
            || term_sizes(&state.terms) != self.term_sizes()
        {
            return Err(BitTttError::InvalidCache(format!(
                "TTT state of sizes {:?} / {:?}, the layer's one-sequence state has {expected:?} \
                 (a state of another model, or of a batch of more than one sequence)",
                sizes(&state.weights),
                sizes(&state.grads)
            )));
        }
        Ok(())
    }

    /// Mixes one token `x` (the normed residual, `[d_model]`) into `out` (`[d_model]`) and
    /// advances `state` by one token.
    pub fn step(&self, x: &[f32], state: &mut TttFastWeights, threads: usize, out: &mut [f32]) {
        let d_model = x.len();
        // Q, K, V and the gate read the same input: one kernel call.
        let (mut xq, mut xk, mut xv) = (vec![0.0; d_model], vec![0.0; d_model], vec![0.0; d_model]);
        let mut gate = self.g_proj.as_ref().map(|_| vec![0.0; d_model]);
        let mut projections = vec![&self.q_proj, &self.k_proj, &self.v_proj];
        let mut outs = vec![&mut xq[..], &mut xk[..], &mut xv[..]];
        if let (Some(g_proj), Some(g)) = (&self.g_proj, gate.as_mut()) {
            projections.push(g_proj);
            outs.push(g);
        }
        DecodeLinear::forward_many(&projections, &Input::new(x), &mut outs, threads);

        let position = state.seq_len_offset % self.mini_batch_size;
        let closes_mini_batch = position + 1 == self.mini_batch_size;
        let step = HeadStep {
            layer: self,
            position,
            token_eta: self.token_eta[position],
            token_eta_last: closes_mini_batch.then_some(self.token_eta[self.mini_batch_size - 1]),
        };

        // Per head: its slices of every fast-weight tensor, its inputs and its output.
        let mut hidden = vec![0.0; d_model];
        let dense_grads = state.dense_grads;
        let weights = split_heads(state.weights.iter_mut(), self.heads);
        let grads = split_heads(state.grads.iter_mut(), self.heads);
        let (terms_a, terms_b): (Vec<_>, Vec<_>) =
            state.terms.iter_mut().map(|(a, b)| (a, b)).unzip();
        let terms_a = split_heads(terms_a.into_iter(), self.heads);
        let terms_b = split_heads(terms_b.into_iter(), self.heads);
        let d = self.head_dim;
        let work: Vec<_> = weights
            .into_iter()
            .zip(grads)
            .zip(terms_a.into_iter().zip(terms_b))
            .zip(hidden.chunks_exact_mut(d))
            .enumerate()
            .map(|(h, (((w, g), terms), out))| (h, w, g, terms, out))
            .collect();
        for_each_head(work, threads, |(h, mut w, mut g, (mut ta, mut tb), out)| {
            let head = h * d..(h + 1) * d;
            let mut fast = HeadFastWeights {
                w: &mut w,
                g: &mut g,
                dense_grads,
                terms_a: &mut ta,
                terms_b: &mut tb,
            };
            let inputs = HeadInputs {
                x,
                xq: &xq[head.clone()],
                xk: &xk[head.clone()],
                xv: &xv[head],
            };
            step.run(h, &mut fast, inputs, out);
        });
        state.seq_len_offset += 1;
        if closes_mini_batch {
            state.dense_grads = false;
        }

        // Post-norm, gate, output projection.
        let mut normed = vec![0.0; d_model];
        layer_norm(
            &hidden,
            &self.post_norm_gamma,
            self.post_norm_beta.as_deref(),
            self.post_norm_eps,
            &mut normed,
        );
        if let Some(gate) = gate {
            for (n, g) in normed.iter_mut().zip(gate) {
                *n *= gelu_tanh(g);
            }
        }
        self.o_proj.forward(&Input::new(&normed), out, threads);
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

/// One head's slices of a [`TttFastWeights`].
struct HeadFastWeights<'s, 'a> {
    /// `W_start` tensors.
    w: &'s mut [&'a mut [f32]],
    /// Gradient sums (the matrices' only when `dense_grads`).
    g: &'s mut [&'a mut [f32]],
    dense_grads: bool,
    /// Per weight matrix, `[mini_batch, rows]` η-scaled inputs and `[mini_batch, cols]` ∇Z.
    terms_a: &'s mut [&'a mut [f32]],
    terms_b: &'s mut [&'a mut [f32]],
}

impl HeadFastWeights<'_, '_> {
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

/// `[tensor][heads · per_head]` → `[head][tensor]` mutable slices.
fn split_heads<'a>(
    tensors: impl Iterator<Item = &'a mut Vec<f32>>,
    heads: usize,
) -> Vec<Vec<&'a mut [f32]>> {
    let mut per_head: Vec<Vec<&mut [f32]>> = (0..heads).map(|_| Vec::new()).collect();
    for tensor in tensors {
        let per = tensor.len() / heads;
        for (h, part) in tensor.chunks_exact_mut(per).enumerate() {
            per_head[h].push(part);
        }
    }
    per_head
}

/// What one head of a token's step reads: the layer's input and the head's parts of its
/// projections.
#[derive(Clone, Copy)]
struct HeadInputs<'a> {
    /// The normed residual (the η gate's input), `[d_model]`.
    x: &'a [f32],
    /// `XQ`, `XK`, `XV` before RoPE, `[head_dim]` each.
    xq: &'a [f32],
    xk: &'a [f32],
    xv: &'a [f32],
}

/// What every head of one token's step shares.
struct HeadStep<'a> {
    layer: &'a TttDecode,
    /// The token's position in its mini-batch.
    position: usize,
    /// `token_eta` at that position.
    token_eta: f32,
    /// `token_eta_last` when the token closes its mini-batch.
    token_eta_last: Option<f32>,
}

#[cfg(test)]
thread_local! {
    /// Set by tests to run this thread's heads through the generic code even where the CPU
    /// has AVX2, to compare the two.
    pub(crate) static GENERIC_HEADS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl HeadStep<'_> {
    /// One head (see [`run_generic`](Self::run_generic)), compiled for AVX2 and FMA where the
    /// CPU has them.
    ///
    /// A head's loops run over `head_dim` floats (rows of `W_start`, the η gate's `d_model`
    /// weights); compiled for the baseline x86_64 they are four wide. Inside
    /// [`run_avx2`](Self::run_avx2), with every helper inlined into it, they are eight wide.
    /// The heads mostly wait on memory (each reads its `W_start` once), so the gain is small:
    /// in a 1b model's one-thread decode step their `perf` samples fell by 5-18% (three
    /// alternated runs; about 1.5% of the step), on two threads no clear change (-10% to +6%).
    /// The operations and their order are the same (Rust contracts no multiply-add into an
    /// FMA), so the results are bit-identical (tested).
    fn run(
        &self,
        h: usize,
        fast: &mut HeadFastWeights<'_, '_>,
        inputs: HeadInputs<'_>,
        out: &mut [f32],
    ) {
        #[cfg(test)]
        if GENERIC_HEADS.get() {
            return self.run_generic(h, fast, inputs, out);
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.run_avx2(h, fast, inputs, out) };
        }
        self.run_generic(h, fast, inputs, out)
    }

    /// [`run_generic`](Self::run_generic) compiled with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2(
        &self,
        h: usize,
        fast: &mut HeadFastWeights<'_, '_>,
        inputs: HeadInputs<'_>,
        out: &mut [f32],
    ) {
        self.run_generic(h, fast, inputs, out)
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

    /// One head: `fast` is its part of the state; writes `f(XQ; W_i)` into `out`. Always
    /// inlined, as is every helper it calls, so that [`run_avx2`](Self::run_avx2) compiles all
    /// of it with its features.
    #[inline(always)]
    fn run_generic(
        &self,
        h: usize,
        fast: &mut HeadFastWeights<'_, '_>,
        HeadInputs { x, xq, xk, xv }: HeadInputs<'_>,
        out: &mut [f32],
    ) {
        let layer = self.layer;
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
        let gamma = &layer.ttt_norm_weight[h * d..(h + 1) * d];
        let beta = &layer.ttt_norm_bias[h * d..(h + 1) * d];
        let eps = layer.ttt_norm_eps;

        // State tensors: [W1, b1] (TTT-Linear) or [W1, b1, W2, b2] (TTT-MLP).
        let z_out = match layer.inner {
            Inner::Linear => {
                let (z, q_w) = affine_at_start(&xk, &xq, fast.w[0], fast.w[1]);
                let mut grad_z = vec![0.0; d];
                ln_l2_bwd(&z, &target, gamma, beta, eps, &mut grad_z);
                let q_g = fast.read_then_accumulate(0, 0, position, &xq, ttt_lr_eta, &xk, &grad_z);
                axpy(ttt_lr_eta, &grad_z, fast.g[1]);
                let lr_qa = ttt_lr_eta * dot(&xq, &xk);
                self.at_token_weights(&q_w, fast.w[1], &q_g, fast.g[1], &grad_z, lr_qa)
            }
            Inner::Mlp { hidden } => {
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
            fast.close_mini_batch(&layer.matrices(), position + 1, last);
        }
    }
}
