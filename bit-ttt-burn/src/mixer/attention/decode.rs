//! One token through causal attention with a KV cache, on plain slices.

use bit_ttt_kernels::cpu::{axpy, dot, rope_angles, rotate_pairs};
use burn::tensor::backend::Backend;

use super::{state, Attention};
use crate::cpu_decode::linear::{for_each_head, DecodeLinear, Input, Norm};
use crate::soul::{HostTensor, LayerSoul};
use crate::BitTttError;

/// An [`Attention`] layer's projections and shape.
#[derive(Debug)]
pub(crate) struct AttentionDecode {
    q_proj: DecodeLinear,
    k_proj: DecodeLinear,
    v_proj: DecodeLinear,
    o_proj: DecodeLinear,
    /// BitNet's `attn_sub_norm` before `o_proj`.
    sub_norm: Option<Norm>,
    heads: usize,
    kv_heads: usize,
    rope_theta: f64,
}

/// The keys and values of every token seen, per key/value head `[tokens, head_dim]` flattened
/// (RoPE already applied to the keys).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KvHeads {
    /// One vector per key/value head.
    pub keys: Vec<Vec<f32>>,
    /// One vector per key/value head.
    pub values: Vec<Vec<f32>>,
}

impl AttentionDecode {
    /// Bytes of parameters one step reads: the four projections (and the sub-norm).
    pub fn weight_bytes(&self) -> usize {
        self.projections()
            .map(DecodeLinear::weight_bytes)
            .sum::<usize>()
            + self.sub_norm.as_ref().map_or(0, Norm::size_bytes)
    }

    /// Bytes of KV cache the step at sequence position `position` reads: the keys and values
    /// of the `position` tokens before it and its own.
    pub fn state_bytes_read(&self, position: usize) -> usize {
        2 * (position + 1) * self.k_proj.d_output() * std::mem::size_of::<f32>()
    }

    /// Copies the layer's parameters.
    pub fn new<B: Backend>(layer: &Attention<B>) -> Result<Self, BitTttError> {
        Ok(Self {
            q_proj: DecodeLinear::from_projection(&layer.q_proj)?,
            k_proj: DecodeLinear::from_projection(&layer.k_proj)?,
            v_proj: DecodeLinear::from_projection(&layer.v_proj)?,
            o_proj: DecodeLinear::from_projection(&layer.o_proj)?,
            sub_norm: layer.sub_norm.as_ref().map(Norm::new).transpose()?,
            heads: layer.num_heads,
            kv_heads: layer.num_kv_heads,
            rope_theta: layer.rope_theta,
        })
    }

    /// The projections, for checking their shapes.
    pub fn projections(&self) -> impl Iterator<Item = &DecodeLinear> {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj].into_iter()
    }

    /// The projections with the `(d_input, d_output)` a model of width `d_model` needs: K and
    /// V map to the key/value heads only.
    pub fn projection_shapes(&self, d_model: usize) -> Vec<(&DecodeLinear, usize, usize)> {
        let kv_dim = self.kv_heads * (d_model / self.heads);
        vec![
            (&self.q_proj, d_model, d_model),
            (&self.k_proj, d_model, kv_dim),
            (&self.v_proj, d_model, kv_dim),
            (&self.o_proj, d_model, d_model),
        ]
    }

    /// Q, K and V (they read the layer's input), and the output projection.
    pub fn input_and_output_projections(&self) -> (Vec<&DecodeLinear>, &DecodeLinear) {
        (vec![&self.q_proj, &self.k_proj, &self.v_proj], &self.o_proj)
    }

    /// Whether `cache` has this layer's key/value heads, whole `head_dim` rows and as many
    /// keys as values.
    pub fn fits(&self, cache: &KvHeads, d_model: usize) -> bool {
        let head_dim = d_model / self.heads;
        let len = cache.keys.first().map_or(0, Vec::len);
        cache.keys.len() == self.kv_heads
            && cache.values.len() == self.kv_heads
            && len.is_multiple_of(head_dim)
            && cache
                .keys
                .iter()
                .chain(&cache.values)
                .all(|t| t.len() == len)
    }

    /// The number of tokens `cache` holds.
    pub fn len(&self, cache: &KvHeads, d_model: usize) -> usize {
        cache.keys.first().map_or(0, Vec::len) / (d_model / self.heads)
    }

    /// An empty cache.
    pub fn new_state(&self) -> KvHeads {
        KvHeads {
            keys: vec![Vec::new(); self.kv_heads],
            values: vec![Vec::new(); self.kv_heads],
        }
    }

    /// `cache` as block `index`'s part of a `.soul` file, in the form Burn's `KvCache` saves
    /// (`[1, kv_heads, tokens, head_dim]` keys and values).
    pub fn state_to_soul(
        &self,
        cache: &KvHeads,
        d_model: usize,
        index: usize,
    ) -> Result<LayerSoul, BitTttError> {
        let mut soul = LayerSoul::new(index);
        let len = self.len(cache, d_model);
        soul.fields.insert(state::TOKENS_READ.into(), len);
        if len > 0 {
            let shape = vec![1, self.kv_heads, len, d_model / self.heads];
            for (name, heads) in [("keys", &cache.keys), ("values", &cache.values)] {
                let values = heads.concat();
                soul.tensors
                    .insert(name.into(), HostTensor::new(shape.clone(), values)?);
            }
        }
        Ok(soul)
    }

    /// The cache of one sequence that has read `position` tokens, from its part of a `.soul`
    /// file (taking its tensors out of `soul`).
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming the tensor or counter that is missing, of another
    /// shape (another model, or more than one sequence), or disagrees with `position`.
    pub fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
        d_model: usize,
    ) -> Result<KvHeads, BitTttError> {
        let kv_len = soul.field(state::TOKENS_READ)?;
        if kv_len != position {
            return Err(soul.position_error(state::TOKENS_READ, kv_len, position));
        }
        let mut cache = self.new_state();
        if kv_len == 0 {
            return Ok(cache);
        }
        let head_dim = d_model / self.heads;
        let expected = [1, self.kv_heads, kv_len, head_dim];
        for (name, heads) in [("keys", &mut cache.keys), ("values", &mut cache.values)] {
            let all = soul.take_tensor(name, Some(&expected))?.values;
            // [1, kv_heads, tokens, head_dim]: each head's rows are contiguous.
            for (h, part) in all.chunks_exact(kv_len * head_dim).enumerate() {
                heads[h] = part.to_vec();
            }
        }
        Ok(cache)
    }

    /// Attends the tokens of `x` (`[tokens, d_model]`), causally, to themselves and the cache
    /// (the first one's position is the number of cached tokens, as in
    /// [`Attention::forward_with_cache`]); writes the output projection into `out`
    /// (`[tokens, d_model]`) and appends the tokens' keys and values to `cache`. One token of
    /// a decode, or a chunk of a prompt (the fused prefill): the projections of every token
    /// run as one kernel call, the heads spread over the threads, and a token's result is the
    /// same, bit for bit, whether it comes alone or in a chunk.
    pub fn read(&self, x: &[f32], cache: &mut KvHeads, threads: usize, out: &mut [f32]) {
        let d_model = self.q_proj.d_input();
        let tokens = x.len() / d_model;
        let head_dim = d_model / self.heads;
        let kv_dim = self.kv_heads * head_dim;
        // Query heads per key/value head.
        let group = self.heads / self.kv_heads;
        let start = cache.keys[0].len() / head_dim;
        // Q, K and V read the same input: one kernel call. Q [tokens, d_model], K and V
        // [tokens, kv_dim].
        let (mut q, mut k, mut v) = (
            vec![0.0; x.len()],
            vec![0.0; tokens * kv_dim],
            vec![0.0; tokens * kv_dim],
        );
        DecodeLinear::forward_many(
            &[&self.q_proj, &self.k_proj, &self.v_proj],
            &Input::tokens(x, d_model),
            &mut [&mut q, &mut k, &mut v],
            threads,
        );
        let (mut cos, mut sin) = (vec![0.0; head_dim / 2], vec![0.0; head_dim / 2]);
        for (t, (qt, kt)) in q
            .chunks_exact_mut(d_model)
            .zip(k.chunks_exact_mut(kv_dim))
            .enumerate()
        {
            rope_angles(start + t, self.rope_theta, &mut cos, &mut sin);
            for h in qt
                .chunks_exact_mut(head_dim)
                .chain(kt.chunks_exact_mut(head_dim))
            {
                rotate_pairs(h, &cos, &sin);
            }
        }

        // Per key/value head: its cache, and the output of its group of query heads
        // [group, tokens, head_dim].
        let mut group_outs = vec![vec![0.0; group * tokens * head_dim]; self.kv_heads];
        let scale = (head_dim as f32).sqrt();
        let work: Vec<_> = cache
            .keys
            .iter_mut()
            .zip(cache.values.iter_mut())
            .zip(group_outs.iter_mut())
            .enumerate()
            .map(|(g, ((keys, vals), out))| (g, keys, vals, out))
            .collect();
        for_each_head(work, threads, |(g, keys, vals, out)| {
            let mut scores = Vec::with_capacity(start + tokens);
            let kv_head = |t: usize| t * kv_dim + g * head_dim..t * kv_dim + (g + 1) * head_dim;
            for t in 0..tokens {
                keys.extend_from_slice(&k[kv_head(t)]);
                vals.extend_from_slice(&v[kv_head(t)]);
                // The token sees the cache up to and including itself.
                let seen = (start + t + 1) * head_dim;
                for (j, out) in out.chunks_exact_mut(tokens * head_dim).enumerate() {
                    let h = g * group + j;
                    let qh = &q[t * d_model + h * head_dim..][..head_dim];
                    let out = &mut out[t * head_dim..][..head_dim];
                    // softmax(q kᵀ / sqrt(head_dim)) v over every token so far.
                    scores.clear();
                    scores.extend(
                        keys[..seen]
                            .chunks_exact(head_dim)
                            .map(|kt| dot(qh, kt) / scale),
                    );
                    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                    }
                    let total: f32 = scores.iter().sum();
                    for (w, vt) in scores.iter().zip(vals[..seen].chunks_exact(head_dim)) {
                        axpy(w / total, vt, out);
                    }
                }
            }
        });
        // [kv_heads][group, tokens, head_dim] -> [tokens, d_model], query head h = g·group + j.
        let mut mixed = vec![0.0; x.len()];
        for (g, group_out) in group_outs.iter().enumerate() {
            for (j, head_out) in group_out.chunks_exact(tokens * head_dim).enumerate() {
                let h = g * group + j;
                for (t, row) in head_out.chunks_exact(head_dim).enumerate() {
                    mixed[t * d_model + h * head_dim..][..head_dim].copy_from_slice(row);
                }
            }
        }
        if let Some(norm) = &self.sub_norm {
            mixed = norm.forward_rows(&mixed, threads);
        }
        self.o_proj
            .forward(&Input::tokens(&mixed, d_model), out, threads);
    }
}
