//! `Mixer`: the sequence-mixing layer of a block, and its per-sequence state.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::attention::{Attention, AttentionConfig, KvCache};
use crate::model::{BitLlamaConfig, MixerKind};
use crate::ttt::{TttCache, TttConfig, TttInner, TttLayer};
use crate::TernaryBackend;

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
                    .with_ternary(config.ternary)
                    .with_rope_theta(config.rope_theta)
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
}
