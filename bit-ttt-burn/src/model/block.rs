//! `Block`: one pre-norm residual block, `x + mixer(RMSNorm(x))` then `x + SwiGLU(RMSNorm(x))`.

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::mixer::{Mixer, MixerState};
use crate::model::BitLlamaConfig;
use crate::swiglu::{SwiGlu, SwiGluConfig};
use crate::TernaryBackend;

/// One residual block of a [`BitLlama`](super::BitLlama).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before the mixer.
    pub mixer_norm: RmsNorm<B>,
    /// The sequence mixer (TTT or attention).
    pub mixer: Mixer<B>,
    /// Norm before the feed-forward network.
    pub ffn_norm: RmsNorm<B>,
    /// The feed-forward network.
    pub ffn: SwiGlu<B>,
}

impl<B: Backend> Block<B> {
    /// Initializes a block of `config`'s shape.
    pub fn init(config: &BitLlamaConfig, device: &B::Device) -> Self {
        let norm = || {
            RmsNormConfig::new(config.d_model)
                .with_epsilon(config.norm_eps)
                .init(device)
        };
        Self {
            mixer_norm: norm(),
            mixer: Mixer::init(config, device),
            ffn_norm: norm(),
            ffn: SwiGluConfig::new(config.d_model, config.d_ffn)
                .with_ternary(config.ternary)
                .with_activation(config.ffn_activation())
                .with_sub_norm(config.has_sub_norms())
                .with_norm_eps(config.norm_eps)
                .init(device),
        }
    }
}

impl<B: TernaryBackend> Block<B> {
    /// Applies the block to a whole sequence.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; returns the same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.mixer.forward(self.mixer_norm.forward(x));
        x.clone() + self.ffn.forward(self.ffn_norm.forward(x))
    }

    /// Applies the block to the tokens that follow those `state` has seen.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; returns the same
    pub fn forward_with_state(&self, x: Tensor<B, 3>, state: &mut MixerState<B>) -> Tensor<B, 3> {
        let x = x.clone()
            + self
                .mixer
                .forward_with_state(self.mixer_norm.forward(x), state);
        x.clone() + self.ffn.forward(self.ffn_norm.forward(x))
    }
}
