//! `BitLlama`: token embedding → blocks → final RMSNorm → LM head.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::mixer::MixerState;
use crate::model::block::Block;
use crate::model::BitLlamaConfig;
use crate::quantize::SharedWeightCodes;
use crate::{BitTttError, Projection, ProjectionConfig, TernaryBackend};

/// A Llama-shaped language model whose projections are ternary and whose mixers are TTT layers
/// (or attention, as a baseline).
#[derive(Module, Debug)]
pub struct BitLlama<B: Backend> {
    /// Token embedding, `[vocab_size, d_model]`, full precision.
    pub embedding: Embedding<B>,
    /// The residual blocks.
    pub blocks: Vec<Block<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head `d_model → vocab_size` (f32 unless `ternary_head`).
    pub lm_head: Projection<B>,
}

/// What a model remembers of one batch of sequences: one [`MixerState`] per block, and how
/// many tokens it has read.
#[derive(Debug, Clone)]
pub struct ModelState<B: Backend> {
    /// One state per block.
    pub layers: Vec<MixerState<B>>,
    /// Tokens read so far.
    pub position: usize,
}

impl<B: Backend> ModelState<B> {
    /// Number of f32 values held by all layers.
    pub fn num_elements(&self) -> usize {
        self.layers.iter().map(MixerState::num_elements).sum()
    }
}

impl BitLlamaConfig {
    /// Initializes a new model with random weights.
    ///
    /// Burn 0.21 initializes parameters lazily, on first read, and a clone of a parameter that
    /// was never read draws its own values: `model.clone()` of a fresh model is another model.
    /// Read it first (a forward pass, [`save`](BitLlama::save)) if the copies must agree.
    ///
    /// # Panics
    /// If the configuration does not [`validate`](Self::validate) (a programmer error; loading
    /// a model from files reports it as an error instead).
    pub fn init<B: Backend>(&self, device: &B::Device) -> BitLlama<B> {
        if let Err(problem) = self.validate() {
            panic!("invalid BitLlamaConfig: {problem}");
        }
        BitLlama {
            embedding: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(burn::module::Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            blocks: (0..self.n_layers)
                .map(|_| Block::init(self, device))
                .collect(),
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device),
            lm_head: ProjectionConfig::new(self.d_model, self.vocab_size)
                .with_ternary(self.ternary_head)
                .init(device),
        }
    }
}

impl<B: TernaryBackend> BitLlama<B> {
    /// Every ternary projection's weight quantized once (on `threads` threads), for forwards
    /// of copies of this model run inside the result's
    /// [`scope`](SharedWeightCodes::scope) before its weights change: training on several
    /// threads then quantizes each weight once per step instead of once per thread.
    pub fn shared_weight_codes(&self, threads: usize) -> SharedWeightCodes<B> {
        let weights = self
            .projections()
            .into_iter()
            .filter_map(|(_, projection)| match projection {
                Projection::Ternary(layer) => {
                    Some((layer.weight.id, layer.weight.val(), layer.eps))
                }
                _ => None,
            })
            .collect();
        SharedWeightCodes::new(weights, threads)
    }

    /// Logits for every position of a batch of whole sequences.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`; returns `[batch, seq, vocab_size]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut x = self.embedding.forward(tokens); // [batch, seq, d_model]
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.lm_head.forward(self.norm.forward(x))
    }

    /// Logits for `tokens`, which follow the tokens `state` has read; updates `state`.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`; returns `[batch, seq, vocab_size]`
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if `state` is not a state of this model for `batch`
    /// sequences ([`check_state`](Self::check_state)); `state` is then unchanged.
    pub fn forward_with_state(
        &self,
        tokens: Tensor<B, 2, Int>,
        state: &mut ModelState<B>,
    ) -> Result<Tensor<B, 3>, BitTttError> {
        let [batch, seq] = tokens.dims();
        self.check_state(state, batch)?;
        let mut x = self.embedding.forward(tokens);
        for (block, layer_state) in self.blocks.iter().zip(&mut state.layers) {
            x = block.forward_with_state(x, layer_state);
        }
        state.position += seq;
        Ok(self.lm_head.forward(self.norm.forward(x)))
    }
}

impl<B: Backend> BitLlama<B> {
    /// An empty state for reading one new sequence.
    pub fn new_state(&self) -> ModelState<B> {
        self.new_batch_state(1)
    }

    /// An empty state for reading `batch_size` new sequences side by side.
    pub fn new_batch_state(&self, batch_size: usize) -> ModelState<B> {
        ModelState {
            layers: self
                .blocks
                .iter()
                .map(|b| b.mixer.new_state(batch_size))
                .collect(),
            position: 0,
        }
    }

    /// Checks that `state` is a state of this model for `batch` sequences: one layer per
    /// block, each of the block's mixer kind and shapes. Without it a state of fewer layers
    /// would silently skip blocks and one of another kind or batch would panic in the mixer.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming the first layer that does not fit.
    pub fn check_state(&self, state: &ModelState<B>, batch: usize) -> Result<(), BitTttError> {
        if state.layers.len() != self.blocks.len() {
            return Err(BitTttError::InvalidCache(format!(
                "a state of {} layers for a model of {} blocks",
                state.layers.len(),
                self.blocks.len()
            )));
        }
        let d_model = self.embedding.weight.dims()[1];
        for (i, (block, layer)) in self.blocks.iter().zip(&state.layers).enumerate() {
            if !block.mixer.accepts(layer, batch, d_model) {
                return Err(BitTttError::InvalidCache(format!(
                    "layer {i}'s {} state does not fit this model's {} mixer for a batch of {batch}",
                    layer.kind_name(),
                    block.mixer.kind_name()
                )));
            }
        }
        Ok(())
    }

    /// Vocabulary size (rows of the embedding).
    pub fn vocab_size(&self) -> usize {
        self.embedding.weight.dims()[0]
    }
}
