//! `TttLayer`: a TTT layer (TTT-Linear or TTT-MLP) as a sequence mixer.

use burn::module::{Initializer, Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::{Projection, ProjectionConfig, TernaryBackend};

use super::autodiff::{autodiff_mini_batch, InnerModel};
use super::cache::{primal_mini_batch, TttCache};
use super::config::{InnerLoopImpl, TttConfig, TttInner};
use super::dual::{dual_mini_batch, dual_whole_mini_batches};
use super::gelu::gelu_tanh;
use super::inner::{InnerLinear, InnerMlp, InnerModule};
use super::mini_batch::{MiniBatch, WholeMiniBatches};

/// A TTT layer: a sequence mixer whose hidden state is the weights of an inner model, trained
/// by gradient steps on a self-supervised loss as the sequence is read (Sun et al. 2024).
///
/// Per head: `XQ = θ_Q x`, `XK = θ_K x`, `XV = θ_V x`, RoPE on `XQ`/`XK` at positions modulo
/// the mini-batch size; mini-batch TTT on `ℓ = ½ ‖f(XK; W) − XV‖²`; output `f(XQ_i; W_i)`; then
/// post-norm, the optional gate and the output projection.
///
/// Should be created with [`TttConfig`].
#[derive(Module, Debug)]
pub struct TttLayer<B: Backend> {
    /// `θ_Q`.
    pub q_proj: Projection<B>,
    /// `θ_K`.
    pub k_proj: Projection<B>,
    /// `θ_V`.
    pub v_proj: Projection<B>,
    /// The output projection.
    pub o_proj: Projection<B>,
    /// The gate projection, when `use_gate`.
    pub g_proj: Option<Projection<B>>,
    /// The inner model: initial fast weights and the inner LayerNorm.
    pub inner: InnerModule<B>,
    /// η gate weights, one vector over `d_model` per head, `[heads, d_model]`.
    pub learnable_ttt_lr_weight: Param<Tensor<B, 2>>,
    /// η gate biases, `[heads]`.
    pub learnable_ttt_lr_bias: Param<Tensor<B, 1>>,
    /// Learnable offset of the per-position factor `1 / (i + 1)`, `[mini_batch_size]`.
    pub learnable_token_idx: Param<Tensor<B, 1>>,
    /// LayerNorm over `d_model` after the inner loop.
    pub post_norm: LayerNorm<B>,
    /// The epsilon of `post_norm` (Burn's `LayerNorm` keeps its own private).
    pub post_norm_eps: f64,
    /// RoPE over `head_dim`, for positions `0..mini_batch_size`.
    pub rope: RotaryEncoding<B>,
    /// Number of heads.
    pub num_heads: usize,
    /// `d_model / num_heads`.
    pub head_dim: usize,
    /// Mini-batch size `b`.
    pub mini_batch_size: usize,
    /// Base inner learning rate.
    pub base_lr: f64,
    /// The implementation [`forward`](TttLayer::forward) uses.
    pub inner_loop: InnerLoopImpl,
}

impl TttConfig {
    /// Initializes a new [`TttLayer`] on `device`.
    ///
    /// # Panics
    /// If `d_model` is not a multiple of `num_heads`, `head_dim` is odd (RoPE rotates pairs), or
    /// `mini_batch_size` is 0.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TttLayer<B> {
        assert!(
            self.num_heads > 0 && self.d_model.is_multiple_of(self.num_heads),
            "d_model {} is not a multiple of num_heads {}",
            self.d_model,
            self.num_heads
        );
        let head_dim = self.head_dim();
        assert!(
            head_dim.is_multiple_of(2),
            "head_dim {head_dim} must be even for RoPE"
        );
        assert!(self.mini_batch_size > 0, "mini_batch_size must be positive");
        let projection = || {
            ProjectionConfig::new(self.d_model, self.d_model)
                .with_ternary(self.ternary)
                .init(device)
        };
        let inner = match self.inner {
            TttInner::Linear => InnerModule::Linear(InnerLinear::new(
                self.num_heads,
                head_dim,
                self.init_std,
                self.ttt_norm_eps,
                device,
            )),
            TttInner::Mlp => InnerModule::Mlp(InnerMlp::new(
                self.num_heads,
                head_dim,
                self.mlp_expansion * head_dim,
                self.init_std,
                self.ttt_norm_eps,
                device,
            )),
        };
        TttLayer {
            q_proj: projection(),
            k_proj: projection(),
            v_proj: projection(),
            o_proj: projection(),
            g_proj: self.use_gate.then(projection),
            inner,
            learnable_ttt_lr_weight: Initializer::Normal {
                mean: 0.0,
                std: self.init_std,
            }
            .init([self.num_heads, self.d_model], device),
            learnable_ttt_lr_bias: Initializer::Zeros.init([self.num_heads], device),
            learnable_token_idx: Initializer::Zeros.init([self.mini_batch_size], device),
            post_norm: LayerNormConfig::new(self.d_model)
                .with_epsilon(self.post_norm_eps)
                .init(device),
            post_norm_eps: self.post_norm_eps,
            rope: RotaryEncodingConfig::new(self.mini_batch_size, head_dim)
                .with_theta(self.rope_theta)
                .init(device),
            num_heads: self.num_heads,
            head_dim,
            mini_batch_size: self.mini_batch_size,
            base_lr: self.effective_base_lr(),
            inner_loop: self.inner_loop,
        }
    }
}

/// `sigmoid(x) = ½ (1 + tanh(x / 2))`: overflow-free and in the backend's precision.
/// (Burn 0.21's `sigmoid` computes in f32 even on an f64 backend, which would cap the
/// precision of the η gate and of its gradient checks.)
fn sigmoid_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.mul_scalar(0.5).tanh().add_scalar(1.0).mul_scalar(0.5)
}

impl<B: Backend> TttLayer<B> {
    /// The projections with their names inside the layer, in file order.
    pub fn projections(&self) -> Vec<(&'static str, &Projection<B>)> {
        let mut all = vec![
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
        ];
        all.extend(self.g_proj.as_ref().map(|g| ("g_proj", g)));
        all
    }

    /// As [`projections`](Self::projections), mutable.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Projection<B>)> {
        let mut all = vec![
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
        ];
        all.extend(self.g_proj.as_mut().map(|g| ("g_proj", g)));
        all
    }

    /// The shapes of a cache's state (and gradient) tensors for `batch_size` sequences,
    /// `[batch, heads, rows, cols]` each, read off the parameters without making a cache.
    pub fn state_dims(&self, batch_size: usize) -> Vec<[usize; 4]> {
        let params = match &self.inner {
            InnerModule::Linear(m) => vec![&m.w1, &m.b1],
            InnerModule::Mlp(m) => vec![&m.w1, &m.b1, &m.w2, &m.b2],
        };
        params
            .into_iter()
            .map(|p| {
                let [heads, rows, cols] = p.dims();
                [batch_size, heads, rows, cols]
            })
            .collect()
    }

    /// A cache at position 0 holding the initial fast weights.
    pub fn new_cache(&self, batch_size: usize) -> TttCache<B> {
        TttCache::new(self.inner.init_state(batch_size), self.mini_batch_size)
    }

    /// The per-position factor of the step size, `max(1 / (i + 1) + learnable_token_idx_i, 0)`.
    ///
    /// # Shapes
    /// - output: `[mini_batch_size]`
    pub fn token_eta(&self) -> Tensor<B, 1> {
        let device = self.learnable_token_idx.device();
        let token_idx = Tensor::<B, 1, Int>::arange(1..self.mini_batch_size as i64 + 1, &device)
            .float()
            .recip();
        (token_idx + self.learnable_token_idx.val()).clamp_min(0.0)
    }
}

impl<B: TernaryBackend> TttLayer<B> {
    /// Applies the layer to whole sequences with the configured inner loop (the dual form by
    /// default).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with_impl(x, self.inner_loop)
    }

    /// Applies the layer with the inner gradient taken by autodiff.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward_autodiff(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with_impl(x, InnerLoopImpl::Autodiff)
    }

    /// Applies the layer with the given inner-loop implementation.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward_with_impl(&self, x: Tensor<B, 3>, inner_loop: InnerLoopImpl) -> Tensor<B, 3> {
        self.forward_prefill(x, inner_loop).0
    }

    /// Applies the layer to whole sequences and returns the state after them, to continue
    /// with [`forward_with_cache`](TttLayer::forward_with_cache).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward_prefill(
        &self,
        x: Tensor<B, 3>,
        inner_loop: InnerLoopImpl,
    ) -> (Tensor<B, 3>, TttCache<B>) {
        let mut cache = self.new_cache(x.dims()[0]);
        let hidden = self.inner_outputs(x.clone(), &mut cache, inner_loop, false);
        (self.output_head(x, hidden), cache)
    }

    /// Continues sequences from `cache`: one token at a time (decoding) in the primal form;
    /// longer inputs with the configured inner loop (the dual form by default), the primal form
    /// for any single token left at the end of a mini-batch.
    ///
    /// # Shapes
    /// - x: `[batch, tokens, d_model]`, `tokens ≥ 1`
    /// - output: `[batch, tokens, d_model]`
    ///
    /// # Panics
    /// If the cache was made for another batch size, head count or mini-batch size.
    pub fn forward_with_cache(&self, x: Tensor<B, 3>, cache: &mut TttCache<B>) -> Tensor<B, 3> {
        let hidden = self.inner_outputs(x.clone(), cache, self.inner_loop, true);
        self.output_head(x, hidden)
    }

    /// The fast weights the last token seen by `cache` read its output with (the end weights
    /// `W_end` when that token closed a mini-batch).
    pub fn current_weights(&self, cache: &TttCache<B>) -> Vec<Tensor<B, 4>> {
        cache.current_weights(self.token_eta())
    }

    /// The learnable step size of every token and head, `base_lr · sigmoid(x·w_h + b_h) / head_dim`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`
    /// - output: `[batch, heads, seq]`
    pub fn ttt_lr_eta(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, _, d_model] = x.dims();
        let weight = self
            .learnable_ttt_lr_weight
            .val()
            .transpose()
            .unsqueeze_dim::<3>(0)
            .expand([batch, d_model, self.num_heads]); // [batch, d_model, heads]
        let bias = self
            .learnable_ttt_lr_bias
            .val()
            .reshape([1, 1, self.num_heads]);
        let logits = x.matmul(weight) + bias; // [batch, seq, heads]
        sigmoid_tanh(logits)
            .mul_scalar(self.base_lr / self.head_dim as f64)
            .swap_dims(1, 2) // [batch, heads, seq]
    }

    /// The per-head outputs of the inner loop, `f(XQ_i; W_i) = XQ_i + LN(f_res(XQ_i; W_i))`,
    /// before post-norm, gate and output projection, continuing from `cache` and advancing it.
    ///
    /// The tokens are split at mini-batch boundaries (of the whole sequence, counting the
    /// tokens `cache` has seen); each piece is one call of the chosen implementation. In the
    /// dual form, from a boundary, the leading whole mini-batches are one call of
    /// [`dual_whole_mini_batches`]. `single_token_primal` sends pieces of one token to the
    /// primal form.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`
    /// - output: `[batch, heads, seq, head_dim]`
    ///
    /// # Panics
    /// If `x` has no tokens, or the cache was made for another batch size, head count or
    /// mini-batch size.
    pub fn inner_outputs(
        &self,
        x: Tensor<B, 3>,
        cache: &mut TttCache<B>,
        inner_loop: InnerLoopImpl,
        single_token_primal: bool,
    ) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        assert!(seq > 0, "the input {:?} has no tokens", x.dims());
        assert!(
            cache.batch_size() == batch
                && cache.num_heads() == self.num_heads
                && cache.mini_batch_size() == self.mini_batch_size,
            "cache for batch {}, {} heads, mini-batch {} used with input {:?}, {} heads, mini-batch {}",
            cache.batch_size(),
            cache.num_heads(),
            cache.mini_batch_size(),
            x.dims(),
            self.num_heads,
            self.mini_batch_size
        );
        let xq = self.split_heads(self.q_proj.forward(x.clone())); // [batch, heads, seq, head_dim]
        let xk = self.split_heads(self.k_proj.forward(x.clone())); // [batch, heads, seq, head_dim]
        let xv = self.split_heads(self.v_proj.forward(x.clone())); // [batch, heads, seq, head_dim]
        let ttt_lr_eta = self.ttt_lr_eta(x); // [batch, heads, seq]
        let token_eta = self.token_eta(); // [mini_batch_size]
        let token_eta_last = token_eta.clone().narrow(0, self.mini_batch_size - 1, 1); // [1]

        let mut outputs = Vec::with_capacity(seq.div_ceil(self.mini_batch_size) + 1);
        let mut start = 0;
        // Whole mini-batches from a boundary: the dual form reads them at once.
        let whole = if inner_loop == InnerLoopImpl::Dual
            && cache.position_in_mini_batch() == 0
            && !(single_token_primal && seq == 1)
        {
            seq / self.mini_batch_size * self.mini_batch_size
        } else {
            0
        };
        if whole > 0 {
            let leading = |x: &Tensor<B, 4>| {
                if whole == seq {
                    x.clone()
                } else {
                    x.clone().narrow(2, 0, whole) // [batch, heads, whole, head_dim]
                }
            };
            let batches = WholeMiniBatches {
                xq: self.rope_mini_batches(leading(&xq)),
                xk: self.rope_mini_batches(leading(&xk)),
                xv: leading(&xv),
                token_eta: token_eta.clone(),
                ttt_lr_eta: if whole == seq {
                    ttt_lr_eta.clone()
                } else {
                    ttt_lr_eta.clone().narrow(2, 0, whole) // [batch, heads, whole]
                },
            };
            let (output, state) = dual_whole_mini_batches(&self.inner, cache.state(), &batches);
            cache.finish_whole_mini_batches(state, whole);
            outputs.push(output);
            start = whole;
        }
        while start < seq {
            let position = cache.position_in_mini_batch();
            let len = (self.mini_batch_size - position).min(seq - start);
            let mini_batch = MiniBatch {
                xq: self.rope.apply(xq.clone().narrow(2, start, len), position), // [batch, heads, len, head_dim]
                xk: self.rope.apply(xk.clone().narrow(2, start, len), position), // [batch, heads, len, head_dim]
                xv: xv.clone().narrow(2, start, len), // [batch, heads, len, head_dim]
                token_eta: token_eta.clone().narrow(0, position, len), // [len]
                ttt_lr_eta: ttt_lr_eta.clone().narrow(2, start, len), // [batch, heads, len]
            };
            let implementation = if len == 1 && single_token_primal {
                InnerLoopImpl::Primal
            } else {
                inner_loop
            };
            let state = cache.state();
            let earlier = cache.earlier_grads();
            let step = match implementation {
                InnerLoopImpl::Dual => dual_mini_batch(&self.inner, state, earlier, &mini_batch),
                InnerLoopImpl::Autodiff => {
                    autodiff_mini_batch(&self.inner, state, earlier, &mini_batch)
                }
                InnerLoopImpl::Primal => {
                    primal_mini_batch(&self.inner, state, earlier, &mini_batch)
                }
            };
            cache.advance(step.grads, len, token_eta_last.clone());
            outputs.push(step.output);
            start += len;
        }
        Tensor::cat(outputs, 2) // [batch, heads, seq, head_dim]
    }

    /// Post-norm, the optional gate and the output projection.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]` (the layer input, for the gate)
    /// - hidden: `[batch, heads, seq, head_dim]`
    /// - output: `[batch, seq, d_model]`
    pub fn output_head(&self, x: Tensor<B, 3>, hidden: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, seq, head_dim] = hidden.dims();
        let hidden = hidden
            .swap_dims(1, 2)
            .reshape([batch, seq, heads * head_dim]); // [batch, seq, d_model]
        let hidden = self.post_norm.forward(hidden);
        let hidden = match &self.g_proj {
            Some(g_proj) => hidden * gelu_tanh(g_proj.forward(x)),
            None => hidden,
        };
        self.o_proj.forward(hidden)
    }

    /// RoPE of every mini-batch at positions `0..K`, for tokens that are whole mini-batches from
    /// a boundary.
    ///
    /// # Shapes
    /// - x, output: `[batch, heads, n · K, head_dim]`
    fn rope_mini_batches(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, tokens, head_dim] = x.dims();
        let k = self.mini_batch_size;
        let per_mini_batch = x.reshape([batch, heads * tokens / k, k, head_dim]); // [batch, heads·n, K, head_dim]
        self.rope
            .apply(per_mini_batch, 0)
            .reshape([batch, heads, tokens, head_dim])
    }

    /// `[batch, seq, d_model]` → `[batch, heads, seq, head_dim]`.
    fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        x.reshape([batch, seq, self.num_heads, self.head_dim]) // [batch, seq, heads, head_dim]
            .swap_dims(1, 2) // [batch, heads, seq, head_dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ttt::test_util::{input, max_abs_diff, set_projection, values};
    use burn::backend::NdArray;

    type V = [f64; 2];
    type M = [[f64; 2]; 2];

    /// Row vector times matrix, `x M`.
    fn vm(x: V, m: M) -> V {
        [
            x[0] * m[0][0] + x[1] * m[1][0],
            x[0] * m[0][1] + x[1] * m[1][1],
        ]
    }

    fn add(a: V, b: V) -> V {
        [a[0] + b[0], a[1] + b[1]]
    }

    fn sub(a: V, b: V) -> V {
        [a[0] - b[0], a[1] - b[1]]
    }

    /// `(x̂, std)` of a 2-vector.
    fn normalise(z: V, eps: f64) -> (V, f64) {
        let mu = (z[0] + z[1]) / 2.0;
        let var = ((z[0] - mu).powi(2) + (z[1] - mu).powi(2)) / 2.0;
        let std = (var + eps).sqrt();
        ([(z[0] - mu) / std, (z[1] - mu) / std], std)
    }

    fn ln(z: V, gamma: V, beta: V, eps: f64) -> V {
        let (x_hat, _) = normalise(z, eps);
        [gamma[0] * x_hat[0] + beta[0], gamma[1] * x_hat[1] + beta[1]]
    }

    /// `∂/∂z ½ ‖ln(z) − target‖²` through the explicit Jacobian of LN:
    /// `∂x̂_k/∂z_m = (δ_km − 1/D) / std − x̂_k x̂_m / (D · std)`.
    fn ln_l2_grad(z: V, target: V, gamma: V, beta: V, eps: f64) -> V {
        let (x_hat, std) = normalise(z, eps);
        let y = ln(z, gamma, beta, eps);
        let mut grad = [0.0; 2];
        for (m, g) in grad.iter_mut().enumerate() {
            for k in 0..2 {
                let delta = if k == m { 1.0 } else { 0.0 };
                let jacobian = (delta - 0.5) / std - x_hat[k] * x_hat[m] / (2.0 * std);
                *g += (y[k] - target[k]) * gamma[k] * jacobian;
            }
        }
        grad
    }

    /// RoPE on one pair at position `p` (frequency 1 for the first pair).
    fn rope(x: V, p: usize) -> V {
        let (sin, cos) = (p as f64).sin_cos();
        [x[0] * cos - x[1] * sin, x[1] * cos + x[0] * sin]
    }

    fn tensor2(m: M) -> Tensor<NdArray<f64>, 2> {
        Tensor::from_data(m, &Default::default())
    }

    f64_test! {
        /// One head, head_dim 2, b = 2, three tokens (a full mini-batch and one more), every
        /// parameter set by hand; the expected values are computed below in plain Rust.
        fn hand_checkable_one_head() {
            type B = NdArray<f64>;
            let device = Default::default();
            let (theta_q, theta_k, theta_v, theta_o): (M, M, M, M) = (
                [[1.0, 0.2], [-0.3, 0.8]],
                [[0.5, -0.4], [0.9, 0.1]],
                [[-0.7, 0.6], [0.3, 1.1]],
                [[1.0, 0.5], [0.0, 1.0]],
            );
            let (w1, b1): (M, V) = ([[0.3, -0.2], [0.1, 0.4]], [0.05, -0.1]);
            let (gamma, beta): (V, V) = ([1.2, 0.8], [0.1, -0.2]);
            let (post_gamma, post_beta): (V, V) = ([1.5, 0.5], [0.2, -0.1]);
            let (gate_w, gate_b): (V, f64) = ([0.5, -0.25], 0.1);
            let token_idx_bias: V = [0.1, -0.2];
            let eps = 1.0; // both LNs: a 2-element LN with eps 1e-6 is nearly a sign function
            let xs: [V; 3] = [[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]];

            let mut layer = TttConfig::new(2, 1)
                .with_mini_batch_size(2)
                .with_ternary(false)
                .with_ttt_norm_eps(eps)
                .with_post_norm_eps(eps)
                .init::<B>(&device);
            set_projection(&mut layer.q_proj, tensor2(theta_q));
            set_projection(&mut layer.k_proj, tensor2(theta_k));
            set_projection(&mut layer.v_proj, tensor2(theta_v));
            set_projection(&mut layer.o_proj, tensor2(theta_o));
            match &mut layer.inner {
                InnerModule::Linear(inner) => {
                    inner.w1 = Param::from_tensor(Tensor::from_data([w1], &device));
                    inner.b1 = Param::from_tensor(Tensor::from_data([[b1]], &device));
                    inner.ttt_norm_weight = Param::from_tensor(Tensor::from_data([gamma], &device));
                    inner.ttt_norm_bias = Param::from_tensor(Tensor::from_data([beta], &device));
                }
                InnerModule::Mlp(_) => unreachable!(),
            }
            layer.post_norm.gamma = Param::from_tensor(Tensor::from_data(post_gamma, &device));
            layer.post_norm.beta = Some(Param::from_tensor(Tensor::from_data(post_beta, &device)));
            layer.learnable_ttt_lr_weight = Param::from_tensor(Tensor::from_data([gate_w], &device));
            layer.learnable_ttt_lr_bias = Param::from_tensor(Tensor::from_data([gate_b], &device));
            layer.learnable_token_idx = Param::from_tensor(Tensor::from_data(token_idx_bias, &device));

            // By hand.
            let token_eta = [1.0 + token_idx_bias[0], 0.5 + token_idx_bias[1]];
            let lr: Vec<f64> = xs
                .iter()
                .map(|x| {
                    let logit = x[0] * gate_w[0] + x[1] * gate_w[1] + gate_b;
                    1.0 / (1.0 + (-logit).exp()) / 2.0 // base_lr 1, head_dim 2
                })
                .collect();
            let q: Vec<V> = xs.iter().enumerate().map(|(t, x)| rope(vm(*x, theta_q), t % 2)).collect();
            let k: Vec<V> = xs.iter().enumerate().map(|(t, x)| rope(vm(*x, theta_k), t % 2)).collect();
            let v: Vec<V> = xs.iter().map(|x| vm(*x, theta_v)).collect();
            let (mut w, mut b) = (w1, b1);
            let mut hidden = Vec::new();
            let mut last_weights = (w, b);
            for tokens in [&[0usize, 1][..], &[2][..]] {
                // Every gradient at the mini-batch's start weights.
                let grads: Vec<(M, V)> = tokens
                    .iter()
                    .map(|&j| {
                        let z = add(vm(k[j], w), b);
                        let g = ln_l2_grad(z, sub(v[j], k[j]), gamma, beta, eps);
                        ([[k[j][0] * g[0], k[j][0] * g[1]], [k[j][1] * g[0], k[j][1] * g[1]]], g)
                    })
                    .collect();
                let weights_at = |i: usize, factor: f64| {
                    let (mut wi, mut bi) = (w, b);
                    for (j, (gw, gb)) in grads.iter().enumerate().take(i + 1) {
                        let step = factor * lr[tokens[j]];
                        for r in 0..2 {
                            for c in 0..2 {
                                wi[r][c] -= step * gw[r][c];
                            }
                            bi[r] -= step * gb[r];
                        }
                    }
                    (wi, bi)
                };
                for (i, &t) in tokens.iter().enumerate() {
                    let (wi, bi) = weights_at(i, token_eta[i]);
                    hidden.push(add(q[t], ln(add(vm(q[t], wi), bi), gamma, beta, eps)));
                    last_weights = (wi, bi);
                }
                if tokens.len() == 2 {
                    (w, b) = weights_at(1, token_eta[1]);
                }
            }
            let outputs: Vec<V> = hidden
                .iter()
                .map(|h| vm(ln(*h, post_gamma, post_beta, eps), theta_o))
                .collect();

            let x = Tensor::<B, 3>::from_data([xs], &device);
            let close = |got: Vec<f64>, expected: Vec<f64>, what: &str| {
                for (a, e) in got.iter().zip(&expected) {
                    assert!((a - e).abs() < 1e-12, "{what}: {got:?} vs {expected:?}");
                }
            };
            let expected_hidden: Vec<f64> = hidden.iter().flatten().copied().collect();
            let expected_out: Vec<f64> = outputs.iter().flatten().copied().collect();
            let expected_w: Vec<f64> = last_weights.0.iter().flatten().copied().collect();
            // The update moves the weights, so the checks below see the inner loop.
            assert!(expected_w.iter().zip(w1.iter().flatten()).any(|(a, b)| (a - b).abs() > 1e-3));
            for implementation in [InnerLoopImpl::Dual, InnerLoopImpl::Autodiff, InnerLoopImpl::Primal] {
                let mut cache = layer.new_cache(1);
                let got = layer.inner_outputs(x.clone(), &mut cache, implementation, false);
                close(values(got), expected_hidden.clone(), "inner outputs");
                let weights = layer.current_weights(&cache);
                close(values(weights[0].clone()), expected_w.clone(), "W1 after the last token");
                close(values(weights[1].clone()), last_weights.1.to_vec(), "b1 after the last token");
                close(values(layer.forward_with_impl(x.clone(), implementation)), expected_out.clone(), "outputs");
            }
        }
    }

    /// A small layer with f32 projections. These tests compare paths whose inner loops round
    /// differently (dual vs primal form); with int8 activations an `o_proj` input within a
    /// rounding error of a code boundary could round to the neighbouring code on one path and
    /// move the output by ~1e-3, so a random ternary layer would fail now and then.
    fn small(inner: TttInner, mini_batch_size: usize) -> TttLayer<NdArray> {
        TttConfig::new(16, 2)
            .with_inner(inner)
            .with_mini_batch_size(mini_batch_size)
            .with_use_gate(true)
            .with_ternary(false)
            .init(&Default::default())
    }

    #[test]
    fn changing_a_token_leaves_earlier_outputs_unchanged() {
        let device = Default::default();
        let (seq, t) = (20, 9);
        for inner in [TttInner::Linear, TttInner::Mlp] {
            let layer = small(inner, 4);
            let x = input::<NdArray>([2, seq, 16], 1, 1.0, &device);
            // Change token t + 1 only.
            let changed = x.clone().slice_assign(
                [0..2, t + 1..t + 2, 0..16],
                input::<NdArray>([2, 1, 16], 2, 1.0, &device),
            );
            for implementation in [
                InnerLoopImpl::Dual,
                InnerLoopImpl::Autodiff,
                InnerLoopImpl::Primal,
            ] {
                let a = layer.forward_with_impl(x.clone(), implementation);
                let b = layer.forward_with_impl(changed.clone(), implementation);
                let before =
                    max_abs_diff(a.clone().narrow(1, 0, t + 1), b.clone().narrow(1, 0, t + 1));
                let after = max_abs_diff(
                    a.narrow(1, t + 1, seq - t - 1),
                    b.narrow(1, t + 1, seq - t - 1),
                );
                assert!(
                    before < 1e-6,
                    "{inner:?} {implementation:?}: outputs ≤ {t} moved by {before}"
                );
                assert!(
                    after > 1e-3,
                    "{inner:?} {implementation:?}: the change had no effect ({after})"
                );
            }
        }
    }

    #[test]
    fn streaming_matches_whole_sequence_and_state_size_is_constant() {
        let device = Default::default();
        for inner in [TttInner::Linear, TttInner::Mlp] {
            let layer = small(inner, 16);
            let x = input::<NdArray>([1, 37, 16], 3, 1.0, &device);
            let whole = layer.forward(x.clone());
            let mut cache = layer.new_cache(1);
            let streamed: Vec<Tensor<NdArray, 3>> = (0..37)
                .map(|t| layer.forward_with_cache(x.clone().narrow(1, t, 1), &mut cache))
                .collect();
            let streamed = Tensor::cat(streamed, 1);
            let diff = max_abs_diff(whole, streamed);
            assert!(diff < 1e-4, "{inner:?}: streaming differs by {diff}");
            assert_eq!(cache.seq_len_offset(), 37);

            // The state's size does not grow with the tokens seen.
            let mut cache = layer.new_cache(1);
            for t in 0..10 {
                layer.forward_with_cache(x.clone().narrow(1, t, 1), &mut cache);
            }
            let (elements, bytes) = (cache.num_elements(), cache.size_bytes());
            let long = input::<NdArray>([1, 9_990, 16], 4, 1.0, &device);
            layer.forward_with_cache(long, &mut cache);
            assert_eq!(cache.seq_len_offset(), 10_000);
            assert_eq!(
                (cache.num_elements(), cache.size_bytes()),
                (elements, bytes)
            );
            let per_head = match inner {
                TttInner::Linear => 2 * (8 * 8 + 8),
                TttInner::Mlp => 2 * (8 * 32 + 32 + 32 * 8 + 8),
            };
            assert_eq!(elements, 2 * per_head, "state and gradient sums of 2 heads");
            assert_eq!(bytes, elements * 4);
            assert!(values(cache.state()[0].clone())
                .iter()
                .all(|v| v.is_finite()));
        }
    }

    #[test]
    fn prefill_then_decode_and_uneven_chunks_match_whole_sequence() {
        let device = Default::default();
        for inner in [TttInner::Linear, TttInner::Mlp] {
            // f32 projections: the chunks sum in another order, and int8 activation quantization
            // would turn those 1e-7 differences into whole 1/127 steps; this test is about the
            // inner loop, not the quantizer.
            let layer = TttConfig::new(16, 2)
                .with_inner(inner)
                .with_mini_batch_size(8)
                .with_use_gate(true)
                .with_ternary(false)
                .init::<NdArray>(&device);
            let x = input::<NdArray>([2, 37, 16], 5, 1.0, &device);
            let whole = layer.forward(x.clone());

            // Prefill 21 tokens (two mini-batches and 5 tokens) in the dual form, then decode.
            let (prefill, mut cache) =
                layer.forward_prefill(x.clone().narrow(1, 0, 21), InnerLoopImpl::Dual);
            assert_eq!(cache.position_in_mini_batch(), 5);
            assert!(values(cache.grads()[0].clone())
                .iter()
                .any(|v| v.abs() > 1e-6));
            let mut outputs = vec![prefill];
            for t in 21..37 {
                outputs.push(layer.forward_with_cache(x.clone().narrow(1, t, 1), &mut cache));
            }
            let diff = max_abs_diff(whole.clone(), Tensor::cat(outputs, 1));
            assert!(diff < 1e-4, "{inner:?}: prefill + decode differs by {diff}");

            // Chunks that start and end inside mini-batches.
            let mut cache = layer.new_cache(2);
            let mut outputs = Vec::new();
            let mut start = 0;
            for len in [5, 1, 13, 7, 11] {
                outputs.push(layer.forward_with_cache(x.clone().narrow(1, start, len), &mut cache));
                start += len;
            }
            let diff = max_abs_diff(whole, Tensor::cat(outputs, 1));
            assert!(diff < 1e-4, "{inner:?}: chunked differs by {diff}");
        }
    }

    #[test]
    fn cache_parts_round_trip_and_are_checked() {
        let layer = small(TttInner::Linear, 4);
        let device = Default::default();
        let (_, cache) = layer.forward_prefill(
            input::<NdArray>([1, 6, 16], 6, 1.0, &device),
            InnerLoopImpl::Dual,
        );
        let (state, grads, offset, mini_batch_size) = cache.clone().into_parts();
        let rebuilt =
            TttCache::from_parts(state.clone(), grads.clone(), offset, mini_batch_size).unwrap();
        assert_eq!(rebuilt.seq_len_offset(), 6);
        assert_eq!(
            max_abs_diff(rebuilt.grads()[0].clone(), cache.grads()[0].clone()),
            0.0
        );
        assert!(TttCache::from_parts(state.clone(), grads[..1].to_vec(), offset, 4).is_err());
        assert!(TttCache::from_parts(state, grads, offset, 0).is_err());
    }
}
