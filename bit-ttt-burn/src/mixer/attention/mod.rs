//! Causal multi-head self-attention with RoPE and a KV cache: the baseline mixer the TTT papers
//! compare against, and what BitNet checkpoints use.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{activation::softmax, backend::Backend, Bool, Tensor};

use crate::rope::apply_rope;
use crate::{Projection, ProjectionConfig, TernaryBackend};

pub(crate) mod decode;
mod state;

/// Configuration of an [`Attention`] layer.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Number of heads; `d_model` must be a multiple of it.
    pub num_heads: usize,
    /// Ternary projections (BitLinear) or f32.
    #[config(default = true)]
    pub ternary: bool,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
}

/// Causal multi-head self-attention with rotary position embeddings.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection `d_model → d_model`.
    pub q_proj: Projection<B>,
    /// Key projection `d_model → d_model`.
    pub k_proj: Projection<B>,
    /// Value projection `d_model → d_model`.
    pub v_proj: Projection<B>,
    /// Output projection `d_model → d_model`.
    pub o_proj: Projection<B>,
    /// Number of heads.
    pub num_heads: usize,
    /// RoPE base.
    pub rope_theta: f64,
}

/// Keys and values of the tokens seen so far, one entry per token: it grows with the context.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// `[batch, heads, seen, head_dim]`, `None` before the first token.
    pub keys: Option<Tensor<B, 4>>,
    /// `[batch, heads, seen, head_dim]`.
    pub values: Option<Tensor<B, 4>>,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        Self {
            keys: None,
            values: None,
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// Number of tokens cached.
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of f32 values held.
    pub fn num_elements(&self) -> usize {
        [&self.keys, &self.values]
            .into_iter()
            .flatten()
            .map(|t| t.shape().num_elements())
            .sum()
    }

    /// Bytes of the keys and values.
    pub fn size_bytes(&self) -> usize {
        [&self.keys, &self.values]
            .into_iter()
            .flatten()
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum()
    }
}

impl AttentionConfig {
    /// Initializes a new [`Attention`] on `device`.
    ///
    /// # Panics
    /// If `d_model` is not a multiple of `num_heads` or the head size is odd.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        assert!(
            self.d_model.is_multiple_of(self.num_heads)
                && (self.d_model / self.num_heads).is_multiple_of(2),
            "d_model {} must split into {} heads of even size",
            self.d_model,
            self.num_heads
        );
        let proj = || {
            ProjectionConfig::new(self.d_model, self.d_model)
                .with_ternary(self.ternary)
                .init(device)
        };
        Attention {
            q_proj: proj(),
            k_proj: proj(),
            v_proj: proj(),
            o_proj: proj(),
            num_heads: self.num_heads,
            rope_theta: self.rope_theta,
        }
    }
}

impl<B: Backend> Attention<B> {
    /// The projections with their names inside the layer, in file order.
    pub fn projections(&self) -> Vec<(&'static str, &Projection<B>)> {
        vec![
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
        ]
    }

    /// As [`projections`](Self::projections), mutable.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Projection<B>)> {
        vec![
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
        ]
    }
}

impl<B: TernaryBackend> Attention<B> {
    /// Attends over the whole sequence, causally.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; returns `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with_cache(x, &mut KvCache::default())
    }

    /// Attends over the cached tokens and `x`, then appends `x`'s keys and values to the cache.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; returns `[batch, seq, d_model]`
    pub fn forward_with_cache(&self, x: Tensor<B, 3>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        let (heads, head_dim) = (self.num_heads, d_model / self.num_heads);
        let start = cache.len();
        let split = |t: Tensor<B, 3>| {
            t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2) // [batch, heads, seq, head_dim]
        };
        let q = apply_rope(
            split(self.q_proj.forward(x.clone())),
            start,
            self.rope_theta,
        );
        let k = apply_rope(
            split(self.k_proj.forward(x.clone())),
            start,
            self.rope_theta,
        );
        let v = split(self.v_proj.forward(x));

        let (k, v) = match (cache.keys.take(), cache.values.take()) {
            (Some(k_old), Some(v_old)) => (
                Tensor::cat(vec![k_old, k], 2),
                Tensor::cat(vec![v_old, v], 2),
            ),
            _ => (k, v),
        };
        cache.keys = Some(k.clone());
        cache.values = Some(v.clone());
        let total = start + seq;

        let scores = q
            .matmul(k.swap_dims(2, 3))
            .div_scalar((head_dim as f64).sqrt()); // [batch, heads, seq, total]
                                                   // Query i (absolute position start + i) may see keys 0..=start + i.
        let mask = Tensor::<B, 2, Bool>::tril_mask([seq, total], start as i64, &scores.device());
        let scores = scores.mask_fill(mask.reshape([1, 1, seq, total]), f32::NEG_INFINITY);
        let out = softmax(scores, 3).matmul(v); // [batch, heads, seq, head_dim]
        let out = out.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.o_proj.forward(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray;

    fn max_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        a.sub(b).abs().max().into_scalar()
    }

    #[test]
    fn single_token_attends_to_itself_only() {
        // With one token the softmax is 1: the output is o_proj(v_proj(x)).
        let device = Default::default();
        let attn = AttentionConfig::new(8, 2)
            .with_ternary(false)
            .init::<B>(&device);
        let x = Tensor::<B, 3>::random([1, 1, 8], Distribution::Normal(0.0, 1.0), &device);
        let expected = attn.o_proj.forward(attn.v_proj.forward(x.clone()));
        assert!(max_diff(attn.forward(x), expected) < 1e-6);
    }

    #[test]
    fn causal_and_cache_agree_with_full_sequence() {
        let device = Default::default();
        // f32 projections: the cached and the full path round differently, and with int8
        // activations an `o_proj` input near a code boundary could round to another code on
        // one of them (a ~1e-3 jump), failing 1e-4 now and then.
        let attn = AttentionConfig::new(16, 4)
            .with_ternary(false)
            .init::<B>(&device);
        let x = Tensor::<B, 3>::random([2, 9, 16], Distribution::Normal(0.0, 1.0), &device);
        let full = attn.forward(x.clone());

        // Token by token through the cache.
        let mut cache = KvCache::default();
        let steps: Vec<_> = (0..9)
            .map(|t| attn.forward_with_cache(x.clone().narrow(1, t, 1), &mut cache))
            .collect();
        assert_eq!(cache.len(), 9);
        assert!(max_diff(Tensor::cat(steps, 1), full.clone()) < 1e-4);

        // Changing the last token leaves the earlier outputs unchanged.
        let mut changed = x.clone();
        changed = changed.slice_assign([0..2, 8..9, 0..16], Tensor::ones([2, 1, 16], &device));
        let out = attn.forward(changed);
        assert!(max_diff(out.narrow(1, 0, 8), full.narrow(1, 0, 8)) < 1e-6);
    }
}
