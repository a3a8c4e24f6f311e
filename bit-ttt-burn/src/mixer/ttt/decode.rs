//! One token through a TTT layer (TTT-Linear or TTT-MLP) in the primal form, on plain slices:
//! the projections, the per-head inner step and the post-norm and gate. The heads run
//! [`bit_ttt_kernels::cpu::TttStep::run_head`], whose module documents the algebra: the fast
//! weights are updated in place, the weights `W_i` of the token are never formed, and the
//! mini-batch's gradient sum `G` (`TttCache::grads`) is kept as its rank-one terms until the
//! mini-batch ends, as `TttCache::advance` does.

use burn::tensor::backend::Backend;

use bit_ttt_kernels::cpu::{
    axpy, gelu_tanh, layer_norm, KernelChoice, TttHeadInputs, TttHeadState, TttInner,
    TttLayerParams, TttStep,
};

use super::{state, InnerModule, TttLayer};
use crate::cpu_decode::linear::for_each_row;
use crate::cpu_decode::linear::{for_each_head, values, DecodeLinear, Input};
use crate::soul::{HostTensor, LayerSoul};
use crate::BitTttError;

/// A [`TttLayer`]'s weights, copied out of Burn tensors (the projections keep their packed
/// weights where they are).
#[derive(Debug)]
pub(crate) struct TttDecode {
    q_proj: DecodeLinear,
    k_proj: DecodeLinear,
    v_proj: DecodeLinear,
    o_proj: DecodeLinear,
    g_proj: Option<DecodeLinear>,
    inner: TttInner,
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
                TttInner::Linear,
                vec![values(m.w1.val())?, values(m.b1.val())?],
                &m.ttt_norm_weight,
                &m.ttt_norm_bias,
                m.eps,
            ),
            InnerModule::Mlp(m) => (
                TttInner::Mlp { hidden: m.dims().2 },
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

    /// Tokens per mini-batch.
    pub fn mini_batch_size(&self) -> usize {
        self.mini_batch_size
    }

    /// The weight matrices of the inner model: `(index in the state, rows, cols)` per head.
    fn matrices(&self) -> Vec<(usize, usize, usize)> {
        self.inner.matrices(self.head_dim)
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

    /// Q, K, V and the gate (they read the layer's input), and the output projection.
    pub fn input_and_output_projections(&self) -> (Vec<&DecodeLinear>, &DecodeLinear) {
        let inputs = [&self.q_proj, &self.k_proj, &self.v_proj]
            .into_iter()
            .chain(self.g_proj.as_ref())
            .collect();
        (inputs, &self.o_proj)
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

    /// Mixes the tokens of `x` (the normed residual, `[tokens, d_model]`) into `out`
    /// (`[tokens, d_model]`) and advances `state` by them: one token of a decode, or a chunk of
    /// a prompt (the fused prefill).
    ///
    /// The projections of every token run as one kernel call (Q, K, V and the gate together,
    /// then the output projection); each head then reads its tokens in order, the primal form
    /// of [`TttStep::run_head`] (the rank-one terms of a mini-batch are its dual form's
    /// attention-like sums), the heads spread over the threads. A token's result is the same,
    /// bit for bit, whether it comes alone or in a chunk.
    pub fn read(&self, x: &[f32], state: &mut TttFastWeights, threads: usize, out: &mut [f32]) {
        let d_model = self.lr_weight.len() / self.heads;
        let tokens = x.len() / d_model;
        // Q, K, V and the gate read the same input: one kernel call. Each [tokens, d_model].
        let input = Input::tokens(x, d_model);
        let (mut xq, mut xk, mut xv) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
        let mut gate = self.g_proj.as_ref().map(|_| vec![0.0; x.len()]);
        let mut projections = vec![&self.q_proj, &self.k_proj, &self.v_proj];
        let mut outs = vec![&mut xq[..], &mut xk[..], &mut xv[..]];
        if let (Some(g_proj), Some(g)) = (&self.g_proj, gate.as_mut()) {
            projections.push(g_proj);
            outs.push(g);
        }
        DecodeLinear::forward_many(&projections, &input, &mut outs, threads);

        let layer = TttLayerParams {
            inner: self.inner,
            head_dim: self.head_dim,
            lr_weight: &self.lr_weight,
            lr_bias: &self.lr_bias,
            lr_scale: self.lr_scale,
            rope_cos: &self.rope_cos,
            rope_sin: &self.rope_sin,
            norm_weight: &self.ttt_norm_weight,
            norm_bias: &self.ttt_norm_bias,
            norm_eps: self.ttt_norm_eps,
        };
        let mini_batch = self.mini_batch_size;
        let start = state.seq_len_offset;
        // Token t of this call: its position in its mini-batch, and whether it closes it.
        let position = |t: usize| (start + t) % mini_batch;
        let closes = |t: usize| position(t) + 1 == mini_batch;
        // Dense gradient sums (a state continued mid-mini-batch from Burn's form) last until
        // the first mini-batch closes.
        let first_close = (0..tokens).find(|&t| closes(t));
        let dense_until = if state.dense_grads {
            first_close.map_or(tokens, |t| t + 1)
        } else {
            0
        };

        // Per head: its slices of every fast-weight tensor, and its output `[tokens, head_dim]`.
        let d = self.head_dim;
        let weights = split_heads(state.weights.iter_mut(), self.heads);
        let grads = split_heads(state.grads.iter_mut(), self.heads);
        let (terms_a, terms_b): (Vec<_>, Vec<_>) =
            state.terms.iter_mut().map(|(a, b)| (a, b)).unzip();
        let terms_a = split_heads(terms_a.into_iter(), self.heads);
        let terms_b = split_heads(terms_b.into_iter(), self.heads);
        let mut head_outs = vec![vec![0.0; tokens * d]; self.heads];
        let work: Vec<_> = weights
            .into_iter()
            .zip(grads)
            .zip(terms_a.into_iter().zip(terms_b))
            .zip(head_outs.iter_mut())
            .enumerate()
            .map(|(h, (((w, g), terms), out))| (h, w, g, terms, out))
            .collect();
        let kernel = head_kernel();
        for_each_head(work, threads, |(h, mut w, mut g, (mut ta, mut tb), out)| {
            for (t, out) in out.chunks_exact_mut(d).enumerate() {
                let p = position(t);
                let step = TttStep {
                    layer,
                    position: p,
                    token_eta: self.token_eta[p],
                    token_eta_last: closes(t).then_some(self.token_eta[mini_batch - 1]),
                };
                let mut fast = TttHeadState {
                    w: &mut w,
                    g: &mut g,
                    dense_grads: t < dense_until,
                    terms_a: &mut ta,
                    terms_b: &mut tb,
                };
                let row = t * d_model;
                let head = row + h * d..row + (h + 1) * d;
                let inputs = TttHeadInputs {
                    x: &x[row..row + d_model],
                    xq: &xq[head.clone()],
                    xk: &xk[head.clone()],
                    xv: &xv[head],
                };
                step.run_head(kernel, h, &mut fast, inputs, out)
                    .expect("head_kernel picks code this CPU can run");
            }
        });
        state.seq_len_offset += tokens;
        if first_close.is_some() {
            state.dense_grads = false;
        }

        // Per token: the heads' outputs side by side, post-norm, gate; then the output
        // projection of every token.
        let mut hidden = vec![0.0; x.len()]; // [tokens, d_model]
        for (h, head_out) in head_outs.iter().enumerate() {
            for (t, row) in head_out.chunks_exact(d).enumerate() {
                hidden[t * d_model + h * d..][..d].copy_from_slice(row);
            }
        }
        let mut normed = vec![0.0; x.len()]; // [tokens, d_model]
        for_each_row(&hidden, &mut normed, d_model, threads, |hidden, normed| {
            layer_norm(
                hidden,
                &self.post_norm_gamma,
                self.post_norm_beta.as_deref(),
                self.post_norm_eps,
                normed,
            );
        });
        if let Some(gate) = &gate {
            for_each_row(gate, &mut normed, d_model, threads, |gate, normed| {
                for (n, g) in normed.iter_mut().zip(gate) {
                    *n *= gelu_tanh(*g);
                }
            });
        }
        self.o_proj
            .forward(&Input::tokens(&normed, d_model), out, threads);
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

#[cfg(test)]
thread_local! {
    /// Set by tests to run this thread's heads through the generic code even where the CPU
    /// has AVX2, to compare the two.
    pub(crate) static GENERIC_HEADS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The code the heads run: the fastest this CPU has ([`KernelChoice::Auto`]), or in tests the
/// generic code where [`GENERIC_HEADS`] asks for it.
fn head_kernel() -> KernelChoice {
    #[cfg(test)]
    if GENERIC_HEADS.get() {
        return KernelChoice::Reference;
    }
    KernelChoice::Auto
}
