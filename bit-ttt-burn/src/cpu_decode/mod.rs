//! Fused CPU decoding: one token through a whole [`BitLlama`] on plain f32 slices and the
//! packed ternary CPU kernels, outside Burn's op-by-op execution.
//!
//! Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth,
//! and everything besides the ternary products should cost next to nothing. Through Burn each
//! small op of a decode step (the TTT inner update per head, norms, reshapes) allocates,
//! copies and dispatches on its own; with the weights of a 1B model that was three quarters
//! of the step's time. [`CpuDecoder`] does the same arithmetic in place:
//! - Q, K, V (and the gate) quantize their shared input once;
//! - the TTT inner step updates the fast weights in place without forming `W_i` (see
//!   [`ttt`](self) for the algebra), its heads spread over the kernel's threads;
//! - the ternary products read the packed weights where they lie (a memory-mapped
//!   [packed file](crate::model) stays mapped).
//!
//! It computes what [`BitLlama::forward_with_state`] computes for one token on the `ndarray`
//! backend, up to float summation order: with f32 activations the logits agree within 1e-4
//! (see the tests). With int8 activations they agree as closely unless an activation lies
//! within a rounding error of a code boundary: then the two paths can pick neighbouring codes,
//! which moves the logits by about 1e-3 to 1e-2 (the same holds between Burn backends). It decodes
//! one sequence (batch 1); prefill a prompt with either (Burn's dual form is faster for long
//! prompts) and carry the state over with [`CpuDecoder::state_from_model`].
//!
//! ```no_run
//! # use bit_ttt_burn::{cpu_decode::CpuDecoder, BitLlama};
//! # fn run(model: &BitLlama<burn::backend::NdArray>) -> Result<(), bit_ttt_burn::BitTttError> {
//! let decoder = CpuDecoder::new(model, 0)?; // 0 threads: the kernels' default
//! let mut state = decoder.new_state();
//! let logits = decoder.step(1, &mut state)?; // [vocab_size]
//! # Ok(()) }
//! ```

mod attention;
mod linear;
mod ttt;

use std::ops::ControlFlow;

use bit_ttt_kernels::cpu::{axpy, rms_norm};
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use self::attention::{AttentionDecode, KvHeads};
use self::linear::{DecodeLinear, Input};
use self::ttt::{TttDecode, TttFastWeights};
use crate::generate::{generate_with, GenerationConfig};
use crate::model::{BitLlama, Mixer, MixerState, ModelState};
use crate::BitTttError;

/// All of a tensor's values as f32, row-major.
pub(crate) fn values<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
) -> Result<Vec<f32>, BitTttError> {
    Ok(tensor.into_data().convert::<f32>().into_vec::<f32>()?)
}

/// Runs `f` on every item: on the current rayon pool (the kernels' pool inside
/// [`bit_ttt_kernels::cpu::install`]) when `threads > 1`, else in order on this thread.
fn for_each_head<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) + Sync + Send) {
    if threads > 1 {
        items.into_par_iter().for_each(f);
    } else {
        items.into_iter().for_each(f);
    }
}

/// An RMSNorm's scale and epsilon.
#[derive(Debug)]
struct Norm {
    gamma: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn new<B: Backend>(norm: &burn::nn::RmsNorm<B>) -> Result<Self, BitTttError> {
        Ok(Self {
            gamma: values(norm.gamma.val())?,
            eps: norm.epsilon as f32,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        rms_norm(x, &self.gamma, self.eps, &mut out);
        out
    }
}

/// A block's mixer.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer, built once: boxing only adds an indirection
enum DecodeMixer {
    Ttt(TttDecode),
    Attention(AttentionDecode),
}

/// One residual block: `x += mixer(RMSNorm(x))`, `x += SwiGLU(RMSNorm(x))`.
#[derive(Debug)]
struct DecodeBlock {
    mixer_norm: Norm,
    mixer: DecodeMixer,
    ffn_norm: Norm,
    gate_proj: DecodeLinear,
    up_proj: DecodeLinear,
    down_proj: DecodeLinear,
}

/// What one layer remembers.
#[derive(Debug, Clone, PartialEq)]
enum LayerState {
    Ttt(TttFastWeights),
    Attention(KvHeads),
}

/// The state of one sequence for a [`CpuDecoder`]: per layer the TTT fast weights (constant
/// size) or the KV cache, and the number of tokens read.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuDecodeState {
    layers: Vec<LayerState>,
    position: usize,
}

impl CpuDecodeState {
    /// Tokens read so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Number of f32 values the state holds (compare [`ModelState::num_elements`]; a TTT layer
    /// here also holds room for a mini-batch of rank-one gradient terms, so the count is larger
    /// by a constant).
    pub fn num_elements(&self) -> usize {
        let len = |t: &[Vec<f32>]| t.iter().map(Vec::len).sum::<usize>();
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Ttt(s) => {
                    let terms: usize = s.terms.iter().map(|(a, b)| a.len() + b.len()).sum();
                    len(&s.weights) + len(&s.grads) + terms
                }
                LayerState::Attention(kv) => len(&kv.keys) + len(&kv.values),
            })
            .sum()
    }
}

/// A [`BitLlama`] prepared for fused decoding on the CPU (see the [module docs](self)).
#[derive(Debug)]
pub struct CpuDecoder {
    /// `[vocab_size, d_model]`.
    embedding: Vec<f32>,
    d_model: usize,
    vocab_size: usize,
    blocks: Vec<DecodeBlock>,
    norm: Norm,
    lm_head: DecodeLinear,
    threads: usize,
}

impl CpuDecoder {
    /// Prepares `model` (any backend; its parameters are copied out once, ternary projections
    /// packed, packed ones shared) to decode with `threads` threads (`0`: the kernels' default,
    /// [`bit_ttt_kernels::cpu::num_threads`]).
    ///
    /// # Errors
    /// [`BitTttError::Kernel`] if a latent ternary weight is not finite; [`BitTttError::Data`]
    /// if a tensor cannot be read as f32; [`BitTttError::InvalidInput`] if the projections do
    /// not chain (a hand-assembled model: block widths, FFN width, head and vocabulary).
    pub fn new<B: Backend>(model: &BitLlama<B>, threads: usize) -> Result<Self, BitTttError> {
        let blocks = model
            .blocks
            .iter()
            .map(|block| {
                Ok(DecodeBlock {
                    mixer_norm: Norm::new(&block.mixer_norm)?,
                    mixer: match &block.mixer {
                        Mixer::Ttt(layer) => DecodeMixer::Ttt(TttDecode::new(layer)?),
                        Mixer::Attention(layer) => {
                            DecodeMixer::Attention(AttentionDecode::new(layer)?)
                        }
                    },
                    ffn_norm: Norm::new(&block.ffn_norm)?,
                    gate_proj: DecodeLinear::from_projection(&block.ffn.gate_proj)?,
                    up_proj: DecodeLinear::from_projection(&block.ffn.up_proj)?,
                    down_proj: DecodeLinear::from_projection(&block.ffn.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>, BitTttError>>()?;
        let [vocab_size, d_model] = model.embedding.weight.dims();
        // The Burn forward would panic on a model whose projections do not chain; say so here.
        for (i, block) in blocks.iter().enumerate() {
            let mixer: Box<dyn Iterator<Item = &DecodeLinear>> = match &block.mixer {
                DecodeMixer::Ttt(t) => Box::new(t.projections()),
                DecodeMixer::Attention(a) => Box::new(a.projections()),
            };
            for p in mixer {
                p.check_shape(
                    d_model,
                    d_model,
                    &format!("a projection of block {i}'s mixer"),
                )?;
            }
            let d_ffn = block.gate_proj.d_output();
            block
                .gate_proj
                .check_shape(d_model, d_ffn, &format!("block {i}'s gate_proj"))?;
            block
                .up_proj
                .check_shape(d_model, d_ffn, &format!("block {i}'s up_proj"))?;
            block
                .down_proj
                .check_shape(d_ffn, d_model, &format!("block {i}'s down_proj"))?;
        }
        let lm_head = DecodeLinear::from_projection(&model.lm_head)?;
        lm_head.check_shape(d_model, vocab_size, "the LM head")?;
        Ok(Self {
            embedding: values(model.embedding.weight.val())?,
            d_model,
            vocab_size,
            blocks,
            norm: Norm::new(&model.norm)?,
            lm_head,
            threads: if threads == 0 {
                bit_ttt_kernels::cpu::num_threads()
            } else {
                threads
            },
        })
    }

    /// The vocabulary size (length of the logits).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Bytes of parameters one step reads: every projection (packed blocks and scale, or f32
    /// weights) with its bias, every norm, the TTT layers' own parameters, and one row of the
    /// embedding. What a memory-bound step must stream from memory at the least.
    pub fn weight_bytes_per_token(&self) -> usize {
        let f32_bytes = |n: usize| n * std::mem::size_of::<f32>();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let mixer = match &b.mixer {
                    DecodeMixer::Ttt(t) => t.weight_bytes(),
                    DecodeMixer::Attention(a) => a.weight_bytes(),
                };
                mixer
                    + f32_bytes(b.mixer_norm.gamma.len() + b.ffn_norm.gamma.len())
                    + [&b.gate_proj, &b.up_proj, &b.down_proj]
                        .into_iter()
                        .map(DecodeLinear::weight_bytes)
                        .sum::<usize>()
            })
            .sum();
        blocks + f32_bytes(self.d_model + self.norm.gamma.len()) + self.lm_head.weight_bytes()
    }

    /// Bytes of recurrent state the step at sequence `position` (the tokens read before it)
    /// reads, for a state this decoder started: per TTT layer its `W_start`, bias gradient sums
    /// and the mini-batch's rank-one gradient terms so far; per attention layer its KV cache.
    pub fn state_bytes_read(&self, position: usize) -> usize {
        self.blocks
            .iter()
            .map(|b| match &b.mixer {
                DecodeMixer::Ttt(t) => t.state_bytes_read(position),
                DecodeMixer::Attention(a) => a.state_bytes_read(position),
            })
            .sum()
    }

    /// The number of threads a step uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The state before any token: every TTT layer at its initial fast weights, every KV
    /// cache empty.
    pub fn new_state(&self) -> CpuDecodeState {
        CpuDecodeState {
            layers: self
                .blocks
                .iter()
                .map(|b| match &b.mixer {
                    DecodeMixer::Ttt(t) => LayerState::Ttt(t.new_state()),
                    DecodeMixer::Attention(a) => LayerState::Attention(a.new_state()),
                })
                .collect(),
            position: 0,
        }
    }

    /// The state of a one-sequence [`ModelState`] of the same model (e.g. after a prefill
    /// with [`BitLlama::forward_with_state`], or restored from a `.soul` file).
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if the state has another number of layers, another kind
    /// of mixer, other shapes (another model), or more than one sequence.
    pub fn state_from_model<B: Backend>(
        &self,
        state: &ModelState<B>,
    ) -> Result<CpuDecodeState, BitTttError> {
        if state.layers.len() != self.blocks.len() {
            return Err(BitTttError::InvalidCache(format!(
                "a state of {} layers for a model of {}",
                state.layers.len(),
                self.blocks.len()
            )));
        }
        let layers = self
            .blocks
            .iter()
            .zip(&state.layers)
            .map(|(block, layer)| match (&block.mixer, layer) {
                (DecodeMixer::Ttt(t), MixerState::Ttt(cache)) => {
                    Ok(LayerState::Ttt(t.state_from_cache(cache)?))
                }
                (DecodeMixer::Attention(a), MixerState::Attention(cache)) => Ok(
                    LayerState::Attention(a.state_from_cache(cache, self.d_model)?),
                ),
                _ => Err(BitTttError::InvalidCache(
                    "a state of another kind of mixer".into(),
                )),
            })
            .collect::<Result<Vec<_>, BitTttError>>()?;
        // Every forward advances the position, each TTT offset and each KV length together.
        for (block, layer) in self.blocks.iter().zip(&layers) {
            let seen = match (&block.mixer, layer) {
                (DecodeMixer::Attention(a), LayerState::Attention(kv)) => a.len(kv, self.d_model),
                (_, LayerState::Ttt(s)) => s.seq_len_offset,
                _ => continue,
            };
            if seen != state.position {
                return Err(BitTttError::InvalidCache(format!(
                    "a layer has read {seen} tokens, the state's position is {}",
                    state.position
                )));
            }
        }
        Ok(CpuDecodeState {
            layers,
            position: state.position,
        })
    }

    /// Reads `token` and returns the logits of the next token, `[vocab_size]`; advances
    /// `state` by one token.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if `token` is not below the vocabulary size;
    /// [`BitTttError::InvalidCache`] if `state` belongs to another model. `state` is unchanged
    /// then.
    pub fn step(&self, token: u32, state: &mut CpuDecodeState) -> Result<Vec<f32>, BitTttError> {
        let token = token as usize;
        if token >= self.vocab_size {
            return Err(BitTttError::InvalidInput(format!(
                "token id {token} is out of range for a vocabulary of {}",
                self.vocab_size
            )));
        }
        self.check_state(state)?;
        Ok(bit_ttt_kernels::cpu::install(self.threads, || {
            self.step_unchecked(token, state)
        }))
    }

    /// Reads every token of `tokens` in turn and returns the logits after the last.
    ///
    /// # Errors
    /// As [`step`](Self::step); [`BitTttError::InvalidInput`] for no tokens. Every id is
    /// checked before any is read, so `state` is unchanged then.
    pub fn read(
        &self,
        tokens: &[u32],
        state: &mut CpuDecodeState,
    ) -> Result<Vec<f32>, BitTttError> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(BitTttError::InvalidInput(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.vocab_size
            )));
        }
        let mut logits = Err(BitTttError::InvalidInput("no tokens to read".into()));
        for &token in tokens {
            logits = Ok(self.step(token, state)?);
        }
        logits
    }

    /// Generates after `prompt` as [`BitLlama::generate`] does (same sampling, same stops,
    /// streamed to `on_token`), continuing `state`.
    ///
    /// # Errors
    /// As [`BitLlama::generate`].
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        state: &mut CpuDecodeState,
        on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Vec<u32>, BitTttError> {
        generate_with(prompt, config, |tokens| self.read(tokens, state), on_token)
    }

    fn check_state(&self, state: &CpuDecodeState) -> Result<(), BitTttError> {
        let fits = state.layers.len() == self.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&state.layers)
                .all(|(b, l)| match (&b.mixer, l) {
                    (DecodeMixer::Ttt(t), LayerState::Ttt(s)) => t.check_state(s).is_ok(),
                    (DecodeMixer::Attention(a), LayerState::Attention(kv)) => {
                        a.fits(kv, self.d_model)
                    }
                    _ => false,
                });
        if fits {
            Ok(())
        } else {
            Err(BitTttError::InvalidCache(
                "the decode state belongs to another model".into(),
            ))
        }
    }

    fn step_unchecked(&self, token: usize, state: &mut CpuDecodeState) -> Vec<f32> {
        let d_model = self.d_model;
        let threads = self.threads;
        let mut x = self.embedding[token * d_model..(token + 1) * d_model].to_vec();
        let mut mixed = vec![0.0; d_model];
        for (block, layer) in self.blocks.iter().zip(&mut state.layers) {
            let normed = block.mixer_norm.forward(&x);
            match (&block.mixer, layer) {
                (DecodeMixer::Ttt(t), LayerState::Ttt(s)) => {
                    t.step(&normed, s, threads, &mut mixed);
                }
                (DecodeMixer::Attention(a), LayerState::Attention(kv)) => {
                    a.step(&normed, kv, threads, &mut mixed);
                }
                _ => unreachable!("check_state matched every layer with its mixer"),
            }
            axpy(1.0, &mixed, &mut x);

            // SwiGLU: down(silu(gate(h)) ⊙ up(h)).
            let normed = block.ffn_norm.forward(&x);
            let input = Input::new(&normed);
            let d_ffn = block.gate_proj.d_output();
            let (mut gate, mut up) = (vec![0.0; d_ffn], vec![0.0; d_ffn]);
            DecodeLinear::forward_many(
                &[&block.gate_proj, &block.up_proj],
                &input,
                &mut [&mut gate, &mut up],
                threads,
            );
            bit_ttt_kernels::cpu::silu_mul(&mut gate, &up);
            block
                .down_proj
                .forward(&Input::new(&gate), &mut mixed, threads);
            axpy(1.0, &mixed, &mut x);
        }
        state.position += 1;
        let mut logits = vec![0.0; self.vocab_size];
        self.lm_head
            .forward(&Input::new(&self.norm.forward(&x)), &mut logits, threads);
        logits
    }
}

#[cfg(test)]
mod tests;
