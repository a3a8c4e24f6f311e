//! `TttConfig`: the configuration of a TTT layer (TTT-Linear or TTT-MLP).

use burn::config::Config;

/// Which inner model the fast weights parameterise.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum TttInner {
    /// TTT-Linear: `f(z) = z + LN(z W1 + b1)`, `W1` is `[head_dim, head_dim]`.
    Linear,
    /// TTT-MLP: `f(z) = z + LN(GELU(z W1 + b1) W2 + b2)`, hidden width `mlp_expansion · head_dim`.
    Mlp,
}

/// How the inner loop (the mini-batch gradient steps on the fast weights) is computed.
///
/// All three compute the same function; they differ in speed and in what they need.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum InnerLoopImpl {
    /// The dual form: matmuls only, with the analytic gradient of LayerNorm + L2
    /// (`ln_fused_l2_bwd`). The fast default for training and prefill.
    Dual,
    /// The inner gradient is taken by Burn's autodiff (`Autodiff<B>` around the current
    /// backend), which works for any [`InnerModel`](super::InnerModel) and keeps second-order
    /// terms when `B` is itself an autodiff backend.
    Autodiff,
    /// The primal form: forms every token's gradient and the fast weights every token reads
    /// with. Decoding with a [`TttCache`](super::TttCache) uses it, one token at a time.
    Primal,
}

/// Configuration of a [`TttLayer`](super::TttLayer), following Sun et al. 2024 and its
/// reference code (`ttt-lm-pytorch`, `TTTConfig`).
#[derive(Config, Debug)]
pub struct TttConfig {
    /// Width of the layer's input and output (`hidden_size`).
    pub d_model: usize,
    /// Number of heads; each head has its own fast weights. `head_dim = d_model / num_heads`.
    pub num_heads: usize,
    /// Mini-batch size `b` of the inner loop (tokens per inner gradient step).
    #[config(default = 16)]
    pub mini_batch_size: usize,
    /// The inner model.
    #[config(default = "TttInner::Linear")]
    pub inner: TttInner,
    /// Base inner learning rate (`ttt_base_lr`). `None` → 1.0 for TTT-Linear, 0.1 for TTT-MLP.
    #[config(default = "None")]
    pub base_lr: Option<f64>,
    /// Gate the output as in the Mamba backbone: `o = post_norm(out) · gelu_tanh(g_proj(x))`.
    #[config(default = false)]
    pub use_gate: bool,
    /// Ternary (BitLinear) XQ/XK/XV/output/gate projections when true, f32 `Linear` when false.
    #[config(default = true)]
    pub ternary: bool,
    /// RoPE base. Positions are taken modulo `mini_batch_size`, as in the reference.
    #[config(default = 10000.0)]
    pub rope_theta: f32,
    /// Hidden width of the TTT-MLP inner model, as a multiple of `head_dim`.
    #[config(default = 4)]
    pub mlp_expansion: usize,
    /// Epsilon of the inner (per-head) LayerNorm.
    #[config(default = 1e-6)]
    pub ttt_norm_eps: f64,
    /// Epsilon of the post-norm LayerNorm over `d_model`.
    #[config(default = 1e-6)]
    pub post_norm_eps: f64,
    /// Standard deviation of the normal init of `W1`/`W2` and of the η-gate weights.
    #[config(default = 0.02)]
    pub init_std: f64,
    /// The inner-loop implementation used by [`TttLayer::forward`](super::TttLayer::forward).
    #[config(default = "InnerLoopImpl::Dual")]
    pub inner_loop: InnerLoopImpl,
}

impl TttConfig {
    /// `d_model / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.num_heads
    }

    /// The base learning rate actually used: `base_lr`, or 1.0 (linear) / 0.1 (MLP).
    pub fn effective_base_lr(&self) -> f64 {
        self.base_lr.unwrap_or(match self.inner {
            TttInner::Linear => 1.0,
            TttInner::Mlp => 0.1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_reference() {
        let config = TttConfig::new(768, 12);
        assert_eq!(config.head_dim(), 64);
        assert_eq!(config.mini_batch_size, 16);
        assert_eq!(config.effective_base_lr(), 1.0);
        assert_eq!(config.with_inner(TttInner::Mlp).effective_base_lr(), 0.1);
        let config = TttConfig::new(8, 2).with_base_lr(Some(0.5));
        assert_eq!(config.effective_base_lr(), 0.5);
    }
}
