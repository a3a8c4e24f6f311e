//! Causal multi-head self-attention with RoPE and a KV cache: the baseline mixer the TTT papers
//! compare against, and what BitNet checkpoints use (with grouped-query heads and the
//! sub-norm before the output projection).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
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
    /// Number of (query) heads; `d_model` must be a multiple of it.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention), dividing `num_heads`; `None`: `num_heads`.
    #[config(default = "None")]
    pub num_kv_heads: Option<usize>,
    /// Ternary projections (BitLinear) or f32.
    #[config(default = true)]
    pub ternary: bool,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// An RMSNorm on the attention output before `o_proj` (BitNet's `attn_sub_norm`).
    #[config(default = false)]
    pub sub_norm: bool,
    /// The sub-norm's epsilon.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
}

/// Causal multi-head self-attention with rotary position embeddings; query head `h` reads
/// key/value head `h / (num_heads / num_kv_heads)`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection `d_model → d_model`.
    pub q_proj: Projection<B>,
    /// Key projection `d_model → num_kv_heads · head_dim`.
    pub k_proj: Projection<B>,
    /// Value projection `d_model → num_kv_heads · head_dim`.
    pub v_proj: Projection<B>,
    /// Output projection `d_model → d_model`.
    pub o_proj: Projection<B>,
    /// The output's RMSNorm before `o_proj` (`attn_sub_norm`), if the model has one.
    pub sub_norm: Option<RmsNorm<B>>,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// RoPE base.
    pub rope_theta: f64,
}

/// Keys and values of the tokens seen so far, one entry per token: it grows with the context.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// `[batch, kv_heads, seen, head_dim]`, `None` before the first token.
    pub keys: Option<Tensor<B, 4>>,
    /// `[batch, kv_heads, seen, head_dim]`.
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
    /// If `d_model` is not a multiple of `num_heads`, the head size is odd or `num_kv_heads`
    /// does not divide `num_heads` (a [`BitLlamaConfig`](crate::model::BitLlamaConfig) checks
    /// all three before).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let kv_heads = self.num_kv_heads.unwrap_or(self.num_heads);
        assert!(
            self.d_model.is_multiple_of(self.num_heads)
                && (self.d_model / self.num_heads).is_multiple_of(2)
                && kv_heads > 0
                && self.num_heads.is_multiple_of(kv_heads),
            "d_model {} must split into {} heads of even size, served by {kv_heads} key/value heads",
            self.d_model,
            self.num_heads
        );
        let kv_dim = kv_heads * (self.d_model / self.num_heads);
        let proj = |d_out| {
            ProjectionConfig::new(self.d_model, d_out)
                .with_ternary(self.ternary)
                .init(device)
        };
        Attention {
            q_proj: proj(self.d_model),
            k_proj: proj(kv_dim),
            v_proj: proj(kv_dim),
            o_proj: proj(self.d_model),
            sub_norm: self.sub_norm.then(|| {
                RmsNormConfig::new(self.d_model)
                    .with_epsilon(self.norm_eps)
                    .init(device)
            }),
            num_heads: self.num_heads,
            num_kv_heads: kv_heads,
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
        let (heads, kv_heads) = (self.num_heads, self.num_kv_heads);
        let head_dim = d_model / heads;
        let start = cache.len();
        let split = |t: Tensor<B, 3>, heads| {
            t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2) // [batch, heads, seq, head_dim]
        };
        let q = apply_rope(
            split(self.q_proj.forward(x.clone()), heads),
            start,
            self.rope_theta,
        );
        let k = apply_rope(
            split(self.k_proj.forward(x.clone()), kv_heads),
            start,
            self.rope_theta,
        );
        let v = split(self.v_proj.forward(x), kv_heads);

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
        // Each key/value head serves `heads / kv_heads` consecutive query heads.
        let group = heads / kv_heads;
        let widen = |t: Tensor<B, 4>| {
            if group == 1 {
                t
            } else {
                t.unsqueeze_dim::<5>(2) // [batch, kv_heads, 1, total, head_dim]
                    .repeat_dim(2, group)
                    .reshape([batch, heads, total, head_dim])
            }
        };
        let (k, v) = (widen(k), widen(v));

        let scores = q
            .matmul(k.swap_dims(2, 3))
            .div_scalar((head_dim as f64).sqrt()); // [batch, heads, seq, total]
                                                   // Query i (absolute position start + i) may see keys 0..=start + i.
        let mask = Tensor::<B, 2, Bool>::tril_mask([seq, total], start as i64, &scores.device());
        let scores = scores.mask_fill(mask.reshape([1, 1, seq, total]), f32::NEG_INFINITY);
        let out = softmax(scores, 3).matmul(v); // [batch, heads, seq, head_dim]
        let out = out.swap_dims(1, 2).reshape([batch, seq, d_model]);
        let out = match &self.sub_norm {
            Some(norm) => norm.forward(out),
            None => out,
        };
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

    #[test]
    fn grouped_heads_read_their_group_key_and_value() {
        // Two query heads share one key/value head: the same as ordinary attention whose two
        // key (and value) heads are copies of it.
        let device = Default::default();
        let gqa = AttentionConfig::new(8, 2)
            .with_num_kv_heads(Some(1))
            .with_ternary(false)
            .init::<B>(&device);
        let mut mha = AttentionConfig::new(8, 2)
            .with_ternary(false)
            .init::<B>(&device);
        let twice = |p: &Projection<B>| match p {
            Projection::Float(l) => {
                let w = l.weight.val(); // [8, 4]
                let mut l = l.clone();
                l.weight = burn::module::Param::from_tensor(Tensor::cat(vec![w.clone(), w], 1));
                l.bias = None;
                Projection::Float(l)
            }
            _ => unreachable!("f32 projections"),
        };
        let mut gqa = gqa;
        for (_, p) in gqa.projections_mut() {
            if let Projection::Float(l) = p {
                // Read once: a clone of a lazily initialized parameter would draw its own.
                l.weight = burn::module::Param::from_tensor(l.weight.val());
                l.bias = None;
            }
        }
        mha.q_proj = gqa.q_proj.clone();
        mha.o_proj = gqa.o_proj.clone();
        mha.k_proj = twice(&gqa.k_proj);
        mha.v_proj = twice(&gqa.v_proj);
        let x = Tensor::<B, 3>::random([1, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        assert!(max_diff(gqa.forward(x.clone()), mha.forward(x)) < 1e-5);
        let mut cache = KvCache::default();
        gqa.forward_with_cache(Tensor::zeros([1, 3, 8], &device), &mut cache);
        assert_eq!(
            cache.keys.unwrap().dims(),
            [1, 1, 3, 4],
            "the cache holds kv heads"
        );
    }
}
