//! The sequence mixers, one folder each: [`ttt`] (TTT-Linear and TTT-MLP) and [`attention`].
//!
//! A mixer's folder holds everything of it: the Burn module and its config, its state and the
//! state's `.soul` form (`state.rs`), the list of its projections, and its fused CPU decode form
//! (`decode.rs`), beside the module it must equal. [`Mixer`], [`MixerState`] and the CPU forms
//! here only delegate: a new mixer is a new folder, a variant in each of these four enums with
//! its one-line arms, and its name in [`MixerKind`].

pub mod attention;
pub mod ttt;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use self::attention::decode::{AttentionDecode, KvHeads};
use self::attention::{Attention, AttentionConfig, KvCache};
use self::ttt::decode::{TttDecode, TttFastWeights};
use self::ttt::{TttCache, TttConfig, TttInner, TttLayer};
use crate::cpu_decode::linear::DecodeLinear;
use crate::model::{BitLlamaConfig, MixerKind};
use crate::soul::LayerSoul;
use crate::{BitTttError, Projection, TernaryBackend};

/// The sequence mixer of one block.
// One mixer per block, built once and never moved on a hot path: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer<B: Backend> {
    /// A TTT layer (TTT-Linear or TTT-MLP): fast weights instead of a KV cache.
    Ttt(TttLayer<B>),
    /// Causal attention with a KV cache.
    Attention(Attention<B>),
}

/// What a mixer remembers of the tokens it has seen.
#[derive(Debug, Clone)]
pub enum MixerState<B: Backend> {
    /// The fast weights and the gradients of the unfinished mini-batch (constant size).
    Ttt(TttCache<B>),
    /// Keys and values of every token seen (grows with the context).
    Attention(KvCache<B>),
}

impl<B: Backend> MixerState<B> {
    /// `"TTT"` or `"attention"`, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            MixerState::Ttt(_) => "TTT",
            MixerState::Attention(_) => "attention",
        }
    }
}

impl<B: Backend> Mixer<B> {
    /// Initializes the mixer `config.mixer` selects.
    pub fn init(config: &BitLlamaConfig, device: &B::Device) -> Self {
        let ttt = |inner| {
            Mixer::Ttt(
                TttConfig::new(config.d_model, config.n_heads)
                    .with_inner(inner)
                    .with_mini_batch_size(config.mini_batch_size)
                    .with_base_lr(config.ttt_base_lr)
                    .with_ternary(config.ternary)
                    .with_rope_theta(config.rope_theta as f32)
                    .init(device),
            )
        };
        match config.mixer {
            MixerKind::TttLinear => ttt(TttInner::Linear),
            MixerKind::TttMlp => ttt(TttInner::Mlp),
            MixerKind::Attention => Mixer::Attention(
                AttentionConfig::new(config.d_model, config.n_heads)
                    .with_num_kv_heads(config.n_kv_heads)
                    .with_ternary(config.ternary)
                    .with_rope_theta(config.rope_theta)
                    .with_sub_norm(config.has_sub_norms())
                    .with_norm_eps(config.norm_eps)
                    .init(device),
            ),
        }
    }

    /// An empty state for `batch_size` new sequences.
    pub fn new_state(&self, batch_size: usize) -> MixerState<B> {
        match self {
            Mixer::Ttt(ttt) => MixerState::Ttt(ttt.new_cache(batch_size)),
            Mixer::Attention(_) => MixerState::Attention(KvCache::default()),
        }
    }

    /// The mixer's projections with their names inside it, in file order.
    pub fn projections(&self) -> Vec<(&'static str, &Projection<B>)> {
        match self {
            Mixer::Ttt(ttt) => ttt.projections(),
            Mixer::Attention(attention) => attention.projections(),
        }
    }

    /// As [`projections`](Self::projections), mutable.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Projection<B>)> {
        match self {
            Mixer::Ttt(ttt) => ttt.projections_mut(),
            Mixer::Attention(attention) => attention.projections_mut(),
        }
    }

    /// Restores the state of `batch` sequences that have read `position` tokens from the
    /// mixer's part of a `.soul` file (see [`crate::soul`]); `d_model` is the model width.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming what does not fit this mixer.
    pub fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
        batch: usize,
        d_model: usize,
        device: &B::Device,
    ) -> Result<MixerState<B>, BitTttError> {
        Ok(match self {
            Mixer::Ttt(ttt) => MixerState::Ttt(ttt.state_from_soul(soul, position, batch)?),
            Mixer::Attention(attention) => MixerState::Attention(
                attention.state_from_soul(soul, position, batch, d_model, device)?,
            ),
        })
    }
}

impl<B: Backend> Mixer<B> {
    /// `"TTT"` or `"attention"`, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Mixer::Ttt(_) => "TTT",
            Mixer::Attention(_) => "attention",
        }
    }

    /// Whether `state` is a state of this mixer for `batch` sequences: its kind and shapes, so
    /// that the next forward cannot panic on it. `d_model` is the model width.
    pub fn accepts(&self, state: &MixerState<B>, batch: usize, d_model: usize) -> bool {
        match (self, state) {
            (Mixer::Ttt(ttt), MixerState::Ttt(cache)) => {
                // Shapes from the parameters: a step-time check must not build a whole cache.
                let expected = ttt.state_dims(batch);
                let dims = |t: &[Tensor<B, 4>]| t.iter().map(|t| t.dims()).collect::<Vec<_>>();
                cache.mini_batch_size() == ttt.mini_batch_size
                    && dims(cache.state()) == expected
                    && dims(cache.grads()) == expected
            }
            (Mixer::Attention(attention), MixerState::Attention(kv)) => {
                let (heads, kv_heads) = (attention.num_heads, attention.num_kv_heads);
                let fits = |t: &Option<Tensor<B, 4>>| {
                    t.as_ref().is_none_or(|t| {
                        let [b, h, len, head_dim] = t.dims();
                        b == batch
                            && h == kv_heads
                            && head_dim * heads == d_model
                            && len == kv.len()
                    })
                };
                kv.keys.is_some() == kv.values.is_some() && fits(&kv.keys) && fits(&kv.values)
            }
            _ => false,
        }
    }
}

impl<B: TernaryBackend> Mixer<B> {
    /// Mixes a whole sequence from scratch.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; returns `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Mixer::Ttt(ttt) => ttt.forward(x),
            Mixer::Attention(attention) => attention.forward(x),
        }
    }

    /// Mixes `x`, the tokens that follow those `state` has seen, and updates `state`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; returns `[batch, seq, d_model]`
    ///
    /// # Panics
    /// If `state` belongs to another kind of mixer (a programmer error).
    pub fn forward_with_state(&self, x: Tensor<B, 3>, state: &mut MixerState<B>) -> Tensor<B, 3> {
        match (self, state) {
            (Mixer::Ttt(ttt), MixerState::Ttt(cache)) => ttt.forward_with_cache(x, cache),
            (Mixer::Attention(attention), MixerState::Attention(cache)) => {
                attention.forward_with_cache(x, cache)
            }
            _ => panic!("a mixer was given the state of another kind of mixer"),
        }
    }
}

impl<B: Backend> MixerState<B> {
    /// Number of values the state holds.
    pub fn num_elements(&self) -> usize {
        match self {
            MixerState::Ttt(cache) => cache.num_elements(),
            MixerState::Attention(cache) => cache.num_elements(),
        }
    }

    /// Bytes of the state's tensors.
    pub fn size_bytes(&self) -> usize {
        match self {
            MixerState::Ttt(cache) => cache.size_bytes(),
            MixerState::Attention(cache) => cache.size_bytes(),
        }
    }

    /// The number of tokens the state has read.
    pub fn tokens_read(&self) -> usize {
        match self {
            MixerState::Ttt(cache) => cache.seq_len_offset(),
            MixerState::Attention(cache) => cache.len(),
        }
    }

    /// The state as block `index`'s part of a `.soul` file.
    ///
    /// # Errors
    /// [`BitTttError::Data`] if a tensor cannot be read as f32.
    pub fn to_soul(&self, index: usize) -> Result<LayerSoul, BitTttError> {
        match self {
            MixerState::Ttt(cache) => cache.to_soul(index),
            MixerState::Attention(cache) => cache.to_soul(index),
        }
    }
}

/// A mixer in the fused CPU decoder's form: its parameters as plain slices, its projections
/// as the CPU kernels read them.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer, built once: boxing only adds an indirection
pub(crate) enum MixerDecode {
    Ttt(TttDecode),
    Attention(AttentionDecode),
}

/// The state of a [`MixerDecode`] for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MixerDecodeState {
    Ttt(TttFastWeights),
    Attention(KvHeads),
}

impl MixerDecode {
    /// The CPU form of `mixer` (parameters copied out once, packed weights shared).
    pub fn new<B: Backend>(mixer: &Mixer<B>) -> Result<Self, BitTttError> {
        Ok(match mixer {
            Mixer::Ttt(layer) => MixerDecode::Ttt(TttDecode::new(layer)?),
            Mixer::Attention(layer) => MixerDecode::Attention(AttentionDecode::new(layer)?),
        })
    }

    /// The projections with the `(d_input, d_output)` a model of width `d_model` needs of
    /// them, for checking their shapes.
    pub fn projection_shapes(&self, d_model: usize) -> Vec<(&DecodeLinear, usize, usize)> {
        match self {
            MixerDecode::Ttt(t) => t.projections().map(|p| (p, d_model, d_model)).collect(),
            MixerDecode::Attention(a) => a.projection_shapes(d_model),
        }
    }

    /// The projections that read the layer's input (Q, K, V and the gate, one kernel call in
    /// a step), and the output projection.
    pub fn input_and_output_projections(&self) -> (Vec<&DecodeLinear>, &DecodeLinear) {
        match self {
            MixerDecode::Ttt(t) => t.input_and_output_projections(),
            MixerDecode::Attention(a) => a.input_and_output_projections(),
        }
    }

    /// `state` (one sequence) stretched to `depth` tokens, for measuring decode speed by
    /// context depth without reading them all: a KV cache repeats its rows up to `depth` (the
    /// bytes a step at that depth reads); a TTT state keeps its fast weights and advances its
    /// counter by whole mini-batches (its size does not grow with depth).
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if `depth` is below the tokens read, or (TTT) the
    /// difference is not a whole number of mini-batches.
    pub fn stretch(
        &self,
        state: &mut MixerDecodeState,
        d_model: usize,
        depth: usize,
    ) -> Result<(), BitTttError> {
        let read = self.tokens_read(state, d_model);
        if depth < read {
            return Err(BitTttError::InvalidInput(format!(
                "a state of {read} tokens cannot be stretched to {depth}"
            )));
        }
        match (self, state) {
            (MixerDecode::Ttt(t), MixerDecodeState::Ttt(s)) => {
                let mini_batch = t.mini_batch_size();
                if !(depth - read).is_multiple_of(mini_batch) {
                    return Err(BitTttError::InvalidInput(format!(
                        "a TTT state of {read} tokens stretches by whole mini-batches of \
                         {mini_batch}, not to {depth}"
                    )));
                }
                s.seq_len_offset = depth;
            }
            (MixerDecode::Attention(_), MixerDecodeState::Attention(kv)) if read > 0 => {
                for rows in kv.keys.iter_mut().chain(kv.values.iter_mut()) {
                    let len = rows.len();
                    let target = len / read * depth;
                    rows.reserve_exact(target - len);
                    while rows.len() < target {
                        let take = (target - rows.len()).min(len);
                        rows.extend_from_within(..take);
                    }
                }
            }
            _ => {
                return Err(BitTttError::InvalidInput(
                    "an empty KV cache, or a state of another mixer, cannot be stretched".into(),
                ))
            }
        }
        Ok(())
    }

    /// Bytes of parameters one step reads.
    pub fn weight_bytes(&self) -> usize {
        match self {
            MixerDecode::Ttt(t) => t.weight_bytes(),
            MixerDecode::Attention(a) => a.weight_bytes(),
        }
    }

    /// Bytes of state the step at `position` reads.
    pub fn state_bytes_read(&self, position: usize) -> usize {
        match self {
            MixerDecode::Ttt(t) => t.state_bytes_read(position),
            MixerDecode::Attention(a) => a.state_bytes_read(position),
        }
    }

    /// The state before any token.
    pub fn new_state(&self) -> MixerDecodeState {
        match self {
            MixerDecode::Ttt(t) => MixerDecodeState::Ttt(t.new_state()),
            MixerDecode::Attention(a) => MixerDecodeState::Attention(a.new_state()),
        }
    }

    /// Whether `state` has this mixer's kind and shapes.
    pub fn fits(&self, state: &MixerDecodeState, d_model: usize) -> bool {
        match (self, state) {
            (MixerDecode::Ttt(t), MixerDecodeState::Ttt(s)) => t.check_state(s).is_ok(),
            (MixerDecode::Attention(a), MixerDecodeState::Attention(kv)) => a.fits(kv, d_model),
            _ => false,
        }
    }

    /// The number of tokens `state` has read.
    pub fn tokens_read(&self, state: &MixerDecodeState, d_model: usize) -> usize {
        match (self, state) {
            (MixerDecode::Attention(a), MixerDecodeState::Attention(kv)) => a.len(kv, d_model),
            (_, MixerDecodeState::Ttt(s)) => s.seq_len_offset,
            (MixerDecode::Ttt(_), MixerDecodeState::Attention(_)) => 0,
        }
    }

    /// Mixes the tokens of `x` (`[tokens, d_model]`: one token of a decode, or a chunk of a
    /// prompt) into `out` (`[tokens, d_model]`) and advances `state` by them.
    ///
    /// # Panics
    /// If `state` is not of this mixer (checked by [`fits`](Self::fits) first).
    pub fn read(&self, x: &[f32], state: &mut MixerDecodeState, threads: usize, out: &mut [f32]) {
        match (self, state) {
            (MixerDecode::Ttt(t), MixerDecodeState::Ttt(s)) => t.read(x, s, threads, out),
            (MixerDecode::Attention(a), MixerDecodeState::Attention(kv)) => {
                a.read(x, kv, threads, out)
            }
            _ => unreachable!("the decoder checks every state against its mixer first"),
        }
    }

    /// `state` as block `index`'s part of a `.soul` file.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if `state` is not of this mixer.
    pub fn state_to_soul(
        &self,
        state: &MixerDecodeState,
        d_model: usize,
        index: usize,
    ) -> Result<LayerSoul, BitTttError> {
        match (self, state) {
            (MixerDecode::Ttt(t), MixerDecodeState::Ttt(s)) => t.state_to_soul(s, index),
            (MixerDecode::Attention(a), MixerDecodeState::Attention(kv)) => {
                a.state_to_soul(kv, d_model, index)
            }
            _ => Err(BitTttError::InvalidCache(
                "a state of another kind of mixer".into(),
            )),
        }
    }

    /// The state of one sequence that has read `position` tokens from its part of a `.soul`
    /// file.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming what does not fit this mixer.
    pub fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
        d_model: usize,
    ) -> Result<MixerDecodeState, BitTttError> {
        Ok(match self {
            MixerDecode::Ttt(t) => MixerDecodeState::Ttt(t.state_from_soul(soul, position)?),
            MixerDecode::Attention(a) => {
                MixerDecodeState::Attention(a.state_from_soul(soul, position, d_model)?)
            }
        })
    }
}

impl MixerDecodeState {
    /// Number of f32 values the state holds (a TTT layer here also holds room for a
    /// mini-batch of rank-one gradient terms).
    pub fn num_elements(&self) -> usize {
        let len = |t: &[Vec<f32>]| t.iter().map(Vec::len).sum::<usize>();
        match self {
            MixerDecodeState::Ttt(s) => {
                let terms: usize = s.terms.iter().map(|(a, b)| a.len() + b.len()).sum();
                len(&s.weights) + len(&s.grads) + terms
            }
            MixerDecodeState::Attention(kv) => len(&kv.keys) + len(&kv.values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn shared_and_mutable_projection_lists_agree() {
        let device = Default::default();
        for mixer in [
            MixerKind::TttLinear,
            MixerKind::TttMlp,
            MixerKind::Attention,
        ] {
            let config = BitLlamaConfig::tiny(30).with_mixer(mixer);
            let mut layer = Mixer::<NdArray>::init(&config, &device);
            let shared: Vec<&str> = layer.projections().into_iter().map(|(n, _)| n).collect();
            let mutable: Vec<&str> = layer
                .projections_mut()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            assert_eq!(shared, mutable, "{mixer:?}");
            assert_eq!(&shared[..4], ["q_proj", "k_proj", "v_proj", "o_proj"]);
        }
    }
}
