//! Decoding block by block: the contract a decoder's blocks keep, whatever runs them.
//!
//! A decoder reads one token at a time: the embedding gives the token's hidden state (the
//! residual stream, `[d_model]`), every block reads it, updates its own state (TTT fast
//! weights or a KV cache) and passes the stream on, and the head turns the last one into
//! logits. [`BlockStep`] is one block of that chain. Two implementations:
//! - [`CpuBlock`](crate::cpu_decode::CpuBlock): the fused CPU decoder's, on plain slices and
//!   the packed CPU kernels ([`CpuDecoder`](crate::cpu_decode::CpuDecoder) drives a chain of
//!   them);
//! - [`BurnBlock`]: a [`Block`]'s own forward on Burn tensors, on any [`TernaryBackend`]
//!   (`NdArray`, `Wgpu`, `Cuda`).
//!
//! Each keeps the stream where it computes ([`BlockStep::Hidden`]): consecutive blocks of one
//! kind ([`step_blocks`]) move it there once and back once per token, so a chain split between
//! devices crosses each boundary once. Every state saves to and restores from the same
//! portable form ([`LayerSoul`], the block's part of a `.soul` file), so a context read by one
//! implementation continues on another.

use burn::tensor::{Tensor, TensorData};

use crate::mixer::MixerState;
use crate::model::Block;
use crate::soul::LayerSoul;
use crate::{BitTttError, TernaryBackend};

/// One residual block as a decoder runs it, one token at a time.
pub trait BlockStep {
    /// One token's hidden state where the block computes.
    type Hidden;
    /// What the block remembers of the tokens it has read (one sequence).
    type State: Clone;

    /// The model width: the hidden state's length.
    fn d_model(&self) -> usize;

    /// The state before any token.
    fn new_state(&self) -> Self::State;

    /// Moves a hidden state (`[d_model]`) from the host to where the block computes.
    fn hidden_from_host(&self, hidden: &[f32]) -> Self::Hidden;

    /// Moves a hidden state back to the host.
    ///
    /// # Errors
    /// [`BitTttError::Data`] if it cannot be read as f32.
    fn hidden_to_host(&self, hidden: Self::Hidden) -> Result<Vec<f32>, BitTttError>;

    /// Reads one token: `hidden` is the residual stream entering the block; returns the stream
    /// leaving it and advances `state` by one token.
    ///
    /// # Panics
    /// If `state` is not this block's (check with [`fits`](Self::fits)).
    fn step(&self, hidden: Self::Hidden, state: &mut Self::State) -> Self::Hidden;

    /// Whether `state` belongs to this block (its kind and shapes).
    fn fits(&self, state: &Self::State) -> bool;

    /// The number of tokens `state` has read.
    fn tokens_read(&self, state: &Self::State) -> usize;

    /// `state` as block `index`'s part of a `.soul` file.
    ///
    /// # Errors
    /// [`BitTttError::Data`] if a tensor cannot be read as f32.
    fn state_to_soul(&self, state: &Self::State, index: usize) -> Result<LayerSoul, BitTttError>;

    /// The state of a sequence that has read `position` tokens, from this block's part of a
    /// `.soul` file (its tensors are taken out of `soul`).
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming what does not fit this block.
    fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
    ) -> Result<Self::State, BitTttError>;
}

/// Runs consecutive blocks of one kind for one token: the hidden state goes to their side
/// once, through every block, and back once. (A run of [`CpuBlock`](crate::cpu_decode::CpuBlock)s
/// with several threads is best called inside `bit_ttt_kernels::cpu::install(threads, …)`: each
/// block then finds itself in the kernels' pool instead of entering it, as
/// [`CpuDecoder`](crate::cpu_decode::CpuDecoder) does for its whole chain.)
///
/// # Errors
/// [`BitTttError::InvalidCache`] if the numbers of blocks and states differ or a state does
/// not fit its block (nothing is changed then); [`BitTttError::Data`] from the way back.
pub fn step_blocks<S: BlockStep>(
    blocks: &[S],
    states: &mut [S::State],
    hidden: &[f32],
) -> Result<Vec<f32>, BitTttError> {
    if blocks.len() != states.len() || !blocks.iter().zip(&*states).all(|(b, s)| b.fits(s)) {
        return Err(BitTttError::InvalidCache(
            "the states do not belong to these blocks".into(),
        ));
    }
    let Some(first) = blocks.first() else {
        return Ok(hidden.to_vec());
    };
    let mut x = first.hidden_from_host(hidden);
    for (block, state) in blocks.iter().zip(states) {
        x = block.step(x, state);
    }
    first.hidden_to_host(x)
}

/// A [`Block`] run by Burn on its backend: the hidden state is a `[1, 1, d_model]` tensor on
/// the block's device, the state a one-sequence [`MixerState`]. What
/// [`BitLlama::forward_with_state`](crate::BitLlama::forward_with_state) computes for one
/// token, block by block.
#[derive(Debug)]
pub struct BurnBlock<'m, B: TernaryBackend> {
    block: &'m Block<B>,
    device: B::Device,
    d_model: usize,
}

impl<'m, B: TernaryBackend> BurnBlock<'m, B> {
    /// The block, run on `device` (where its parameters are).
    pub fn new(block: &'m Block<B>, device: &B::Device) -> Self {
        Self {
            block,
            device: device.clone(),
            d_model: block.mixer_norm.gamma.dims()[0],
        }
    }
}

impl<B: TernaryBackend> BlockStep for BurnBlock<'_, B> {
    /// `[1, 1, d_model]`.
    type Hidden = Tensor<B, 3>;
    type State = MixerState<B>;

    fn d_model(&self) -> usize {
        self.d_model
    }

    fn new_state(&self) -> MixerState<B> {
        self.block.mixer.new_state(1)
    }

    fn hidden_from_host(&self, hidden: &[f32]) -> Tensor<B, 3> {
        Tensor::from_data(
            TensorData::new(hidden.to_vec(), [1, 1, hidden.len()]),
            &self.device,
        )
    }

    fn hidden_to_host(&self, hidden: Tensor<B, 3>) -> Result<Vec<f32>, BitTttError> {
        Ok(hidden.into_data().convert::<f32>().into_vec::<f32>()?)
    }

    fn step(&self, hidden: Tensor<B, 3>, state: &mut MixerState<B>) -> Tensor<B, 3> {
        self.block.forward_with_state(hidden, state)
    }

    fn fits(&self, state: &MixerState<B>) -> bool {
        self.block.mixer.accepts(state, 1, self.d_model)
    }

    fn tokens_read(&self, state: &MixerState<B>) -> usize {
        state.tokens_read()
    }

    fn state_to_soul(&self, state: &MixerState<B>, index: usize) -> Result<LayerSoul, BitTttError> {
        state.to_soul(index)
    }

    fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
    ) -> Result<MixerState<B>, BitTttError> {
        self.block
            .mixer
            .state_from_soul(soul, position, 1, self.d_model, &self.device)
    }
}
