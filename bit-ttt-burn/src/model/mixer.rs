//! `Mixer`: the sequence-mixing layer of a block, and its per-sequence state.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::attention::{Attention, AttentionConfig, KvCache};
use crate::model::{BitLlamaConfig, MixerKind};

/// The sequence mixer of one block.
#[derive(Module, Debug)]
pub enum Mixer<B: Backend> {
    /// Causal attention with a KV cache.
    Attention(Attention<B>),
}

/// What a mixer remembers of the tokens it has seen.
#[derive(Debug, Clone)]
pub enum MixerState<B: Backend> {
    /// Keys and values of every token seen (grows with the context).
    Attention(KvCache<B>),
}

impl<B: Backend> Mixer<B> {
    /// Initializes the mixer `config.mixer` selects.
    pub fn init(config: &BitLlamaConfig, device: &B::Device) -> Self {
        match config.mixer {
            MixerKind::Attention => Mixer::Attention(
                AttentionConfig::new(config.d_model, config.n_heads)
                    .with_ternary(config.ternary)
                    .with_rope_theta(config.rope_theta)
                    .init(device),
            ),
            MixerKind::TttLinear | MixerKind::TttMlp => {
                unimplemented!("TTT mixers land with the TTT layer")
            }
        }
    }

    /// An empty state for a new sequence.
    pub fn new_state(&self) -> MixerState<B> {
        match self {
            Mixer::Attention(_) => MixerState::Attention(KvCache::default()),
        }
    }

    /// Mixes a whole sequence from scratch.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; returns `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
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
            (Mixer::Attention(attention), MixerState::Attention(cache)) => {
                attention.forward_with_cache(x, cache)
            }
        }
    }
}

impl<B: Backend> MixerState<B> {
    /// Number of f32 values the state holds.
    pub fn num_elements(&self) -> usize {
        match self {
            MixerState::Attention(cache) => cache.num_elements(),
        }
    }
}
