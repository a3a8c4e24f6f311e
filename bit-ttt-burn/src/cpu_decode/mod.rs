//! Fused CPU decoding: one token through a whole [`BitLlama`] on plain f32 slices and the
//! packed ternary CPU kernels, outside Burn's op-by-op execution.
//!
//! Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth,
//! and everything besides the ternary products should cost next to nothing. Through Burn each
//! small op of a decode step (the TTT inner update per head, norms, reshapes) allocates,
//! copies and dispatches on its own, which costs more than the products themselves at the
//! sizes of a decode step (`docs/measurements.md`). [`CpuDecoder`] does the same arithmetic in
//! place:
//! - Q, K, V (and the gate) quantize their shared input once;
//! - the TTT inner step updates the fast weights in place without forming `W_i` (see
//!   [`bit_ttt_kernels::cpu::ttt_head`] for the algebra), its heads spread over the kernel's
//!   threads;
//! - the ternary products read the packed weights where they lie (a memory-mapped
//!   [packed file](crate::model) stays mapped).
//!
//! It computes what [`BitLlama::forward_with_state`] computes for one token on the `ndarray`
//! backend, up to float summation order: with f32 activations the logits agree within 1e-4
//! (see the tests). With int8 activations they agree as closely unless an activation lies
//! within a rounding error of a code boundary: then the two paths can pick neighbouring codes,
//! which moves the logits by about 1e-3 to 1e-2 (the same holds between Burn backends). It decodes
//! one sequence (batch 1). A prompt is read by [`CpuDecoder::read`], the fused prefill: the
//! blocks read it in chunks, every ternary projection one kernel call (a GEMM) for all the
//! chunk's tokens, the mixer's heads spread over the threads; its result is the same, bit for bit, as
//! stepping each token. A state Burn prefilled carries over with
//! [`CpuDecoder::state_from_model`].
//!
//! ```no_run
//! # use bit_ttt_burn::{cpu_decode::CpuDecoder, BitLlama};
//! # fn run(model: &BitLlama<burn::backend::NdArray>) -> Result<(), bit_ttt_burn::BitTttError> {
//! let decoder = CpuDecoder::new(model, 0)?; // 0 threads: the kernels' default
//! let mut state = decoder.new_state();
//! let logits = decoder.step(1, &mut state)?; // [vocab_size]
//! # Ok(()) }
//! ```

pub(crate) mod linear;

use std::mem::size_of;
use std::ops::ControlFlow;
use std::path::Path;

use bit_ttt_kernels::cpu::{axpy, relu2_mul, silu_mul};
use burn::tensor::backend::Backend;

pub(crate) use self::linear::{for_each_row, Norm};
use self::linear::{values, DecodeLinear, Input};
use crate::decode::BlockStep;
use crate::generate::{generate_with, GenerationConfig};
use crate::mixer::{MixerDecode, MixerDecodeState};
use crate::model::{BitLlama, Block, FfnActivation, ModelState};
use crate::soul::{as_file_error, LayerSoul, Soul};
use crate::BitTttError;

/// One residual block in the fused CPU form: `x += mixer(RMSNorm(x))`, `x += SwiGLU(RMSNorm(x))`
/// on plain slices. Its [`BlockStep`] keeps the hidden state on the host.
#[derive(Debug)]
pub struct CpuBlock {
    mixer_norm: Norm,
    mixer: MixerDecode,
    ffn_norm: Norm,
    gate_proj: DecodeLinear,
    up_proj: DecodeLinear,
    /// The FFN hidden's RMSNorm before `down_proj` (BitNet's `ffn_sub_norm`).
    ffn_sub_norm: Option<Norm>,
    down_proj: DecodeLinear,
    activation: FfnActivation,
    d_model: usize,
    threads: usize,
}

impl CpuBlock {
    /// Prepares `block` (parameters copied out once, ternary projections packed, packed ones
    /// shared) to run with `threads` threads (`0`: the kernels' default).
    ///
    /// # Errors
    /// As [`CpuDecoder::new`]: a non-finite latent weight, a tensor that cannot be read as f32,
    /// projections that do not chain (`what` names the block in the message).
    pub fn new<B: Backend>(
        block: &Block<B>,
        threads: usize,
        what: &str,
    ) -> Result<Self, BitTttError> {
        let d_model = block.mixer_norm.gamma.dims()[0];
        let cpu = Self {
            mixer_norm: Norm::new(&block.mixer_norm)?,
            mixer: MixerDecode::new(&block.mixer)?,
            ffn_norm: Norm::new(&block.ffn_norm)?,
            gate_proj: DecodeLinear::from_projection(&block.ffn.gate_proj)?,
            up_proj: DecodeLinear::from_projection(&block.ffn.up_proj)?,
            ffn_sub_norm: block.ffn.sub_norm.as_ref().map(Norm::new).transpose()?,
            down_proj: DecodeLinear::from_projection(&block.ffn.down_proj)?,
            activation: block.ffn.activation,
            d_model,
            threads: resolve_threads(threads),
        };
        // The Burn forward would panic on a block whose projections do not chain; say so here.
        for (p, d_in, d_out) in cpu.mixer.projection_shapes(d_model) {
            p.check_shape(d_in, d_out, &format!("a projection of {what}'s mixer"))?;
        }
        let d_ffn = cpu.gate_proj.d_output();
        cpu.gate_proj
            .check_shape(d_model, d_ffn, &format!("{what}'s gate_proj"))?;
        cpu.up_proj
            .check_shape(d_model, d_ffn, &format!("{what}'s up_proj"))?;
        cpu.down_proj
            .check_shape(d_ffn, d_model, &format!("{what}'s down_proj"))?;
        Ok(cpu)
    }

    /// Bytes of parameters one step reads (see [`CpuDecoder::weight_bytes_per_token`]).
    pub fn weight_bytes(&self) -> usize {
        self.mixer.weight_bytes()
            + self.mixer_norm.size_bytes()
            + self.ffn_norm.size_bytes()
            + self.ffn_sub_norm.as_ref().map_or(0, Norm::size_bytes)
            + [&self.gate_proj, &self.up_proj, &self.down_proj]
                .into_iter()
                .map(DecodeLinear::weight_bytes)
                .sum::<usize>()
    }

    /// Bytes of state the step at `position` reads (see [`CpuDecoder::state_bytes_read`]).
    pub fn state_bytes_read(&self, position: usize) -> usize {
        self.mixer.state_bytes_read(position)
    }

    /// Reads the tokens of `x` (`[tokens, d_model]`, the residual stream entering the block)
    /// and leaves the stream leaving it there, advancing `state` by them: one token of a
    /// decode, or a chunk of a prompt. Every product runs once for all the tokens (one kernel
    /// call per group of projections sharing an input); the caller runs it inside the kernels'
    /// pool.
    fn read_in_place(&self, x: &mut [f32], state: &mut CpuBlockState) {
        let (threads, d_model) = (self.threads, self.d_model);
        let mut mixed = vec![0.0; x.len()]; // [tokens, d_model]
        let normed = self.mixer_norm.forward_rows(x, threads);
        self.mixer.read(&normed, &mut state.0, threads, &mut mixed);
        axpy(1.0, &mixed, x);

        // down(act(gate(h)) ⊙ up(h)), the hidden normed first where the model says so.
        let normed = self.ffn_norm.forward_rows(x, threads);
        let input = Input::tokens(&normed, d_model);
        let tokens = x.len() / d_model;
        let d_ffn = self.gate_proj.d_output();
        // [tokens, d_ffn] each.
        let (mut gate, mut up) = (vec![0.0; tokens * d_ffn], vec![0.0; tokens * d_ffn]);
        DecodeLinear::forward_many(
            &[&self.gate_proj, &self.up_proj],
            &input,
            &mut [&mut gate, &mut up],
            threads,
        );
        gate_rows(self.activation, &mut gate, &up, d_ffn, threads);
        if let Some(norm) = &self.ffn_sub_norm {
            gate = norm.forward_rows(&gate, threads);
        }
        self.down_proj
            .forward(&Input::tokens(&gate, d_ffn), &mut mixed, threads);
        axpy(1.0, &mixed, x);
    }

    /// Reads the tokens of `hidden` (`[tokens, d_model]`: the residual stream entering the
    /// block, left as the stream leaving it) in one pass, the block's part of a fused prefill:
    /// the same result, bit for bit, as [`step`](BlockStep::step) of each token in turn.
    /// Runs inside the kernels' pool (entered here unless the caller is in it).
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if `hidden` is not whole rows of `d_model`;
    /// [`BitTttError::InvalidCache`] if `state` is not this block's. Nothing changes then.
    pub fn read(&self, hidden: &mut [f32], state: &mut CpuBlockState) -> Result<(), BitTttError> {
        if !hidden.len().is_multiple_of(self.d_model) {
            return Err(BitTttError::InvalidInput(format!(
                "a hidden state of {} values is not whole rows of width {}",
                hidden.len(),
                self.d_model
            )));
        }
        if !self.fits(state) {
            return Err(BitTttError::InvalidCache(
                "the state belongs to another block".into(),
            ));
        }
        if !hidden.is_empty() {
            bit_ttt_kernels::cpu::install(self.threads, || self.read_in_place(hidden, state));
        }
        Ok(())
    }

    /// Runs only the block's products for the tokens of `x` (`[tokens, d_model]`) as
    /// [`read`](Self::read) does (one call for the projections that share an input; `h`, at
    /// least `[tokens, d_ffn]`, is the down projection's input) and discards them: the
    /// kernels' share of a prefill. The caller runs it inside the kernels' pool.
    fn run_products(&self, x: &[f32], h: &[f32]) {
        let tokens = x.len() / self.d_model;
        let d_ffn = self.gate_proj.d_output();
        let h = &h[..tokens * d_ffn];
        let mut out = vec![0.0; tokens * self.d_model];
        let (inputs, output) = self.mixer.input_and_output_projections();
        let mut qkv: Vec<Vec<f32>> = inputs
            .iter()
            .map(|p| vec![0.0; tokens * p.d_output()])
            .collect();
        let mut outs: Vec<&mut [f32]> = qkv.iter_mut().map(|o| &mut o[..]).collect();
        // A fresh input per group, as `read` quantizes four inputs a block.
        let input = || Input::tokens(x, self.d_model);
        DecodeLinear::forward_many(&inputs, &input(), &mut outs, self.threads);
        output.forward(&input(), &mut out, self.threads);
        let (mut gate, mut up) = (vec![0.0; tokens * d_ffn], vec![0.0; tokens * d_ffn]);
        DecodeLinear::forward_many(
            &[&self.gate_proj, &self.up_proj],
            &input(),
            &mut [&mut gate, &mut up],
            self.threads,
        );
        self.down_proj
            .forward(&Input::tokens(h, d_ffn), &mut out, self.threads);
        std::hint::black_box((qkv, out, gate));
    }
}

/// `gate[t] = act(gate[t]) ⊙ up[t]` for every token's row (`[tokens, d_ffn]`), one call per
/// row: the vectorized SiLU does a row's last `d_ffn % 8` values in scalar code (within 4 ulp
/// of the vector code), so row by row a token gets the same bits alone or in a prefill. Rows
/// spread over `threads` threads when there are several.
fn gate_rows(act: FfnActivation, gate: &mut [f32], up: &[f32], d_ffn: usize, threads: usize) {
    match act {
        FfnActivation::Silu => for_each_row(up, gate, d_ffn, threads, |u, g| silu_mul(g, u)),
        FfnActivation::Relu2 => for_each_row(up, gate, d_ffn, threads, |u, g| relu2_mul(g, u)),
    }
}

/// What one [`CpuBlock`] remembers of one sequence: its mixer's TTT fast weights (with room
/// for a mini-batch of rank-one gradient terms) or KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuBlockState(MixerDecodeState);

impl CpuBlockState {
    /// Number of f32 values the state holds.
    pub fn num_elements(&self) -> usize {
        self.0.num_elements()
    }
}

impl BlockStep for CpuBlock {
    type Hidden = Vec<f32>;
    type State = CpuBlockState;

    fn d_model(&self) -> usize {
        self.d_model
    }

    fn new_state(&self) -> CpuBlockState {
        CpuBlockState(self.mixer.new_state())
    }

    fn hidden_from_host(&self, hidden: &[f32]) -> Vec<f32> {
        hidden.to_vec()
    }

    fn hidden_to_host(&self, hidden: Vec<f32>) -> Result<Vec<f32>, BitTttError> {
        Ok(hidden)
    }

    /// Runs inside the kernels' thread pool: entered here, or, when the caller is already in
    /// it (a driver running several blocks in one `bit_ttt_kernels::cpu::install`), at no cost.
    fn step(&self, mut hidden: Vec<f32>, state: &mut CpuBlockState) -> Vec<f32> {
        bit_ttt_kernels::cpu::install(self.threads, || self.read_in_place(&mut hidden, state));
        hidden
    }

    fn fits(&self, state: &CpuBlockState) -> bool {
        self.mixer.fits(&state.0, self.d_model)
    }

    fn tokens_read(&self, state: &CpuBlockState) -> usize {
        self.mixer.tokens_read(&state.0, self.d_model)
    }

    fn state_to_soul(&self, state: &CpuBlockState, index: usize) -> Result<LayerSoul, BitTttError> {
        if !self.fits(state) {
            return Err(BitTttError::InvalidCache(format!(
                "the state of block {index} belongs to another block"
            )));
        }
        self.mixer.state_to_soul(&state.0, self.d_model, index)
    }

    fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
    ) -> Result<CpuBlockState, BitTttError> {
        Ok(CpuBlockState(self.mixer.state_from_soul(
            soul,
            position,
            self.d_model,
        )?))
    }
}

/// The most tokens of a prompt [`CpuDecoder::read`] sends through the blocks at once: enough
/// for the kernels' GEMM to reach its rate, few enough that the chunk's activations (a few
/// `[chunk, d_ffn]` f32 buffers per block) stay small next to the weights.
pub const PREFILL_CHUNK: usize = 512;

/// `threads`, or the kernels' default for 0.
fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        bit_ttt_kernels::cpu::num_threads()
    } else {
        threads
    }
}

/// The state of one sequence for a [`CpuDecoder`]: per block its [`CpuBlockState`], and the
/// number of tokens read.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuDecodeState {
    blocks: Vec<CpuBlockState>,
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
        self.blocks.iter().map(CpuBlockState::num_elements).sum()
    }
}

/// A [`BitLlama`] prepared for fused decoding on the CPU (see the [module docs](self)): the
/// embedding, a chain of [`CpuBlock`]s, the final norm and the head.
#[derive(Debug)]
pub struct CpuDecoder {
    /// `[vocab_size, d_model]`.
    embedding: Vec<f32>,
    d_model: usize,
    vocab_size: usize,
    blocks: Vec<CpuBlock>,
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
        let [vocab_size, d_model] = model.embedding.weight.dims();
        let blocks = model
            .blocks
            .iter()
            .enumerate()
            .map(|(i, block)| CpuBlock::new(block, threads, &format!("block {i}")))
            .collect::<Result<Vec<_>, BitTttError>>()?;
        if let Some((i, _)) = blocks
            .iter()
            .enumerate()
            .find(|(_, b)| b.d_model != d_model)
        {
            return Err(BitTttError::InvalidInput(format!(
                "block {i} is {} wide, the embedding {d_model}",
                blocks[i].d_model
            )));
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
            threads: resolve_threads(threads),
        })
    }

    /// The vocabulary size (length of the logits).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The model width (the hidden state's length).
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Bytes of parameters the final norm and the head hold (and one step reads).
    pub fn head_bytes(&self) -> usize {
        self.norm.size_bytes() + self.lm_head.weight_bytes()
    }

    /// The blocks, in order: each a [`BlockStep`], for drivers that run them (or some of
    /// them) block by block.
    pub fn blocks(&self) -> &[CpuBlock] {
        &self.blocks
    }

    /// This decoder with its f32 LM head stored 8 bits a weight, one scale per vocabulary row
    /// ([`Int8Rows`](bit_ttt_kernels::cpu::Int8Rows)): a quarter of the bytes the head reads
    /// per token, for one rounding per weight (at most half of `max|row| / 127`) and one of the
    /// head's input, quantized to int8 per token as the ternary projections' inputs are. A
    /// ternary head is left as it is. Where the head is most of a step's bytes (a large vocabulary, as
    /// BitNet b1.58 2B-4T's 128,256 tokens) decode speeds up by close to that factor; the
    /// logits move by the rounding (the tests and `bench --int8-head` report how much).
    ///
    /// # Errors
    /// [`BitTttError::Kernel`] if a head weight is not finite.
    pub fn with_int8_head(mut self) -> Result<Self, BitTttError> {
        if let Some(int8) = self.lm_head.to_int8()? {
            self.lm_head = int8;
        }
        Ok(self)
    }

    /// Whether the head is stored 8 bits a weight ([`with_int8_head`](Self::with_int8_head)).
    pub fn has_int8_head(&self) -> bool {
        matches!(self.lm_head, DecodeLinear::Int8 { .. })
    }

    /// Bytes of parameters one step reads: every projection (packed blocks and scale, or f32
    /// weights) with its bias, every norm, the TTT layers' own parameters, and one row of the
    /// embedding. What a memory-bound step must stream from memory at the least.
    pub fn weight_bytes_per_token(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(CpuBlock::weight_bytes).sum();
        blocks
            + self.d_model * size_of::<f32>()
            + self.norm.size_bytes()
            + self.lm_head.weight_bytes()
    }

    /// Bytes of recurrent state the step at sequence `position` (the tokens read before it)
    /// reads, for a state this decoder started: per TTT layer its `W_start`, bias gradient sums
    /// and the mini-batch's rank-one gradient terms so far; per attention layer its KV cache.
    pub fn state_bytes_read(&self, position: usize) -> usize {
        self.blocks
            .iter()
            .map(|b| b.state_bytes_read(position))
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
            blocks: self.blocks.iter().map(BlockStep::new_state).collect(),
            position: 0,
        }
    }

    /// `state` in the portable form of `.soul` files (see [`crate::soul`]): what
    /// [`save_state`](Self::save_state) writes, and what [`BitLlama::state_from_soul`] turns
    /// into a Burn state. A TTT layer's gradient terms of an unfinished mini-batch are summed
    /// into the dense form Burn keeps.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if `state` belongs to another model.
    pub fn state_to_soul(&self, state: &CpuDecodeState) -> Result<Soul, BitTttError> {
        self.check_state(state)?;
        Ok(Soul {
            position: state.position,
            layers: self
                .blocks
                .iter()
                .zip(&state.blocks)
                .enumerate()
                .map(|(i, (b, s))| b.state_to_soul(s, i))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The state a portable [`Soul`] describes (one sequence), checked against this model.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if it has another number of layers, another kind of
    /// mixer, other shapes (another model), more than one sequence, counters that disagree
    /// with its position, or tensors this model's state does not have.
    pub fn state_from_soul(&self, mut soul: Soul) -> Result<CpuDecodeState, BitTttError> {
        let total = soul.check_layer_count(self.blocks.len())?;
        soul.check_one_sequence()?;
        let blocks = self
            .blocks
            .iter()
            .zip(&mut soul.layers)
            .map(|(b, layer)| b.state_from_soul(layer, soul.position))
            .collect::<Result<Vec<_>, _>>()?;
        soul.check_all_taken(total)?;
        Ok(CpuDecodeState {
            blocks,
            position: soul.position,
        })
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
        self.state_from_soul(state.to_soul()?)
    }

    /// Writes `state` to a `.soul` file, atomically: the same file [`ModelState::save`]
    /// writes, so Burn ([`BitLlama::load_state`]) or this decoder can continue from it.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if `state` belongs to another model; [`BitTttError::Io`].
    pub fn save_state(&self, state: &CpuDecodeState, path: &Path) -> Result<(), BitTttError> {
        self.state_to_soul(state)?.save(path)
    }

    /// Restores a state from a `.soul` file written by [`save_state`](Self::save_state) or
    /// [`ModelState::save`] (one sequence).
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::CorruptFile`] if the
    /// file does not parse or does not fit this model (see
    /// [`state_from_soul`](Self::state_from_soul)).
    pub fn load_state(&self, path: &Path) -> Result<CpuDecodeState, BitTttError> {
        let (soul, _) = Soul::load(path, self.blocks.len())?;
        self.state_from_soul(soul).map_err(as_file_error(path))
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

    /// Reads `tokens` after what `state` has read and returns the logits after the last,
    /// `[vocab_size]`: a fused prefill. The prompt goes through the blocks in chunks of
    /// [`PREFILL_CHUNK`] tokens, each block reading a whole chunk at once (one kernel call per
    /// group of ternary projections for all its tokens, f32 ones token by token, the mixer's
    /// heads spread over the threads);
    /// the result is the same, bit for bit, as [`step`](Self::step) of each token in turn.
    ///
    /// # Errors
    /// As [`step`](Self::step); [`BitTttError::InvalidInput`] for no tokens. Every id is
    /// checked before any is read, so `state` is unchanged then.
    pub fn read(
        &self,
        tokens: &[u32],
        state: &mut CpuDecodeState,
    ) -> Result<Vec<f32>, BitTttError> {
        Ok(self
            .read_rows(tokens, state, false)?
            .pop()
            .unwrap_or_default())
    }

    /// As [`read`](Self::read), but the logits after every token of `tokens`,
    /// `[tokens.len() · vocab_size]` (row `t` predicts the token after `tokens[t]`): what an
    /// evaluation of a window needs.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_all(
        &self,
        tokens: &[u32],
        state: &mut CpuDecodeState,
    ) -> Result<Vec<f32>, BitTttError> {
        Ok(self.read_rows(tokens, state, true)?.concat())
    }

    /// The fused prefill: the logits after every token (`all`) or after the last.
    fn read_rows(
        &self,
        tokens: &[u32],
        state: &mut CpuDecodeState,
        all: bool,
    ) -> Result<Vec<Vec<f32>>, BitTttError> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(BitTttError::InvalidInput(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.vocab_size
            )));
        }
        if tokens.is_empty() {
            return Err(BitTttError::InvalidInput("no tokens to read".into()));
        }
        self.check_state(state)?;
        let d_model = self.d_model;
        Ok(bit_ttt_kernels::cpu::install(self.threads, || {
            let (mut logits, mut last) = (Vec::new(), Vec::new());
            for chunk in tokens.chunks(PREFILL_CHUNK) {
                // [chunk, d_model]: the embedding rows, then through every block.
                let mut x: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&t| {
                        let t = t as usize;
                        self.embedding[t * d_model..(t + 1) * d_model]
                            .iter()
                            .copied()
                    })
                    .collect();
                for (block, block_state) in self.blocks.iter().zip(&mut state.blocks) {
                    block.read_in_place(&mut x, block_state);
                }
                state.position += chunk.len();
                if all {
                    logits.extend(x.chunks_exact(d_model).map(|row| self.head(row)));
                }
                last = x;
            }
            if !all {
                logits.push(self.head(&last[last.len() - d_model..]));
            }
            logits
        }))
    }

    /// Runs only the blocks' products that a [`read`](Self::read) of `tokens` tokens runs
    /// (every projection, in the same chunks and calls, on fixed activations) and discards
    /// them: the time the kernels alone need for a prefill, the floor a prefill is measured
    /// against (`bench --prefill`). The head is left out, as a prefill runs it for one token.
    pub fn run_products(&self, tokens: usize) {
        // Fixed activations, made once (a prefill's come from the previous block).
        let d_ffn = self.blocks.iter().map(|b| b.gate_proj.d_output()).max();
        let chunk = PREFILL_CHUNK.min(tokens);
        let values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (i & 255) as f32 / 128.0 - 1.0 + (i >> 8 & 7) as f32 * 0.01)
                .collect()
        };
        let (x, h) = (
            values(chunk * self.d_model),
            values(chunk * d_ffn.unwrap_or(0)),
        );
        bit_ttt_kernels::cpu::install(self.threads, || {
            for start in (0..tokens).step_by(PREFILL_CHUNK) {
                let rows = PREFILL_CHUNK.min(tokens - start);
                for block in &self.blocks {
                    block.run_products(&x[..rows * self.d_model], &h);
                }
            }
        });
    }

    /// `state` stretched to `depth` tokens, for measuring decode speed by context depth
    /// without reading them all (`bench --context`): every KV cache repeats its rows up to
    /// `depth` (the bytes a step at that depth reads), every TTT state keeps its fast weights
    /// and advances its counter (its size does not grow with depth). The state of no real
    /// sequence: for benchmarks.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] for a state of another model; [`BitTttError::InvalidInput`]
    /// if `depth` is below the state's position, or a TTT layer's mini-batches do not divide
    /// the difference, or a KV cache is empty. `state` is unchanged then.
    pub fn stretch_state(
        &self,
        state: &CpuDecodeState,
        depth: usize,
    ) -> Result<CpuDecodeState, BitTttError> {
        self.check_state(state)?;
        let mut stretched = state.clone();
        for (block, s) in self.blocks.iter().zip(&mut stretched.blocks) {
            block.mixer.stretch(&mut s.0, self.d_model, depth)?;
        }
        stretched.position = depth;
        Ok(stretched)
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

    /// The embedding row of `token` (`[d_model]`): the hidden state entering the first block.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if `token` is not below the vocabulary size.
    pub fn embed(&self, token: u32) -> Result<Vec<f32>, BitTttError> {
        let token = token as usize;
        if token >= self.vocab_size {
            return Err(BitTttError::InvalidInput(format!(
                "token id {token} is out of range for a vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(self.embedding[token * self.d_model..(token + 1) * self.d_model].to_vec())
    }

    /// The logits (`[vocab_size]`) of the hidden state leaving the last block: final norm
    /// and head.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if `hidden` is not `d_model` long.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>, BitTttError> {
        if hidden.len() != self.d_model {
            return Err(BitTttError::InvalidInput(format!(
                "a hidden state of {} values for a model of width {}",
                hidden.len(),
                self.d_model
            )));
        }
        Ok(bit_ttt_kernels::cpu::install(self.threads, || {
            self.head(hidden)
        }))
    }

    fn check_state(&self, state: &CpuDecodeState) -> Result<(), BitTttError> {
        let fits = state.blocks.len() == self.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&state.blocks)
                .all(|(b, s)| b.fits(s) && b.tokens_read(s) == state.position);
        if fits {
            Ok(())
        } else {
            Err(BitTttError::InvalidCache(
                "the decode state belongs to another model".into(),
            ))
        }
    }

    fn head(&self, hidden: &[f32]) -> Vec<f32> {
        let mut logits = vec![0.0; self.vocab_size];
        self.lm_head.forward(
            &Input::new(&self.norm.forward(hidden)),
            &mut logits,
            self.threads,
        );
        logits
    }

    fn step_unchecked(&self, token: usize, state: &mut CpuDecodeState) -> Vec<f32> {
        let d_model = self.d_model;
        let mut x = self.embedding[token * d_model..(token + 1) * d_model].to_vec();
        for (block, block_state) in self.blocks.iter().zip(&mut state.blocks) {
            block.read_in_place(&mut x, block_state);
        }
        state.position += 1;
        self.head(&x)
    }
}

#[cfg(test)]
mod tests;
