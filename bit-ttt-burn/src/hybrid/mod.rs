//! Hybrid decoding: the first `n_gpu_layers` blocks on a GPU backend, the rest on the fused CPU
//! decoder, each block running where its weights live.
//!
//! A model too large for the GPU's memory still decodes with the GPU's bandwidth for the part
//! that fits: blocks `[0, N)` are [`Block`]s on a GPU backend (`Wgpu`, `Cuda`: packed weights
//! resident on the device, the CubeCL kernels), blocks `[N, L)` are the fused CPU decoder's
//! [`CpuBlock`]s (the packed file memory-mapped, read in place by the AVX2 kernels on their own
//! threads). The embedding is looked up on the host; the final norm and head run on the GPU
//! when every block does (and the plan gave them room), on the CPU otherwise.
//!
//! Per token the hidden state (`d_model` f32 values) crosses once each way: up after the
//! embedding, down after block `N − 1` (or, with the head on the GPU, the logits come down
//! instead). Each block's state (TTT fast weights, or a KV cache) stays on its side. A prompt of
//! `T` tokens goes up once as `[1, T, d_model]`, through the GPU blocks' batched forward (the
//! dual form), and down once; the CPU blocks then read it in chunks, as the fused decoder's
//! prefill does ([`CpuBlock::read`]).
//!
//! [`plan`] decides `N`: a count, or [`GpuLayers::Auto`], the most blocks whose packed weights,
//! f32 parameters and state fit a byte budget. A hybrid state saves to and restores from the
//! same `.soul` file as every other decoder (block `i`'s part is block `i`'s wherever it runs).
//!
//! ```no_run
//! # use bit_ttt_burn::hybrid::{GpuLayers, HybridDecoder};
//! # fn run<G: bit_ttt_burn::TernaryBackend>(path: &std::path::Path, device: &G::Device)
//! #     -> Result<(), bit_ttt_burn::BitTttError> {
//! // 8 GiB of the device for the model; the rest of the blocks on the CPU.
//! let layers = GpuLayers::Auto { budget_bytes: 8 << 30 };
//! let decoder = HybridDecoder::<G>::open(path, layers, 4096, device, 0)?;
//! let mut state = decoder.new_state();
//! let logits = decoder.read(&[1, 2, 3], &mut state)?; // [vocab_size]
//! # Ok(()) }
//! ```

#[cfg(test)]
mod tests;

use std::ops::ControlFlow;
use std::path::Path;

use burn::nn::RmsNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::cpu_decode::{CpuBlock, CpuBlockState, CpuDecoder, PREFILL_CHUNK};
use crate::decode::{BlockStep, BurnBlock};
use crate::generate::{generate_with, GenerationConfig};
use crate::mixer::MixerState;
use crate::model::{BitLlama, Block, PackedPart};
use crate::soul::{as_file_error, Soul};
use crate::{BitTttError, Projection, TernaryBackend};

/// How many blocks go to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuLayers {
    /// Exactly this many, from the first (at most the model's block count).
    Count(usize),
    /// As many as fit `budget_bytes` of device memory (see [`plan`]).
    Auto {
        /// Bytes of the device the model's part may take.
        budget_bytes: u64,
    },
}

/// Where each part of a model runs: what [`plan`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HybridPlan {
    /// Blocks `[0, n_gpu_layers)` run on the GPU, the rest on the CPU.
    pub n_gpu_layers: usize,
    /// The final norm and the head run on the GPU (only when every block does).
    pub head_on_gpu: bool,
    /// Bytes the GPU holds for this plan: its blocks' parameters and state (and the head's).
    pub gpu_bytes: u64,
}

/// Bytes block `block` takes on the GPU: its parameters (packed projections at 2 bits a
/// weight, f32 norms and TTT parameters) and the state it holds after `context` tokens (a TTT
/// layer's is constant, a KV cache grows with the context).
pub fn block_bytes(block: &CpuBlock, context: usize) -> u64 {
    (block.weight_bytes() + block.state_bytes_read(context)) as u64
}

/// The split of `cpu`'s model for `layers`, with room for the state of `context` tokens.
///
/// [`GpuLayers::Auto`] takes the largest `N` whose blocks' bytes ([`block_bytes`]) sum to at
/// most the budget, and the head too when every block fits and so does the head. Scratch
/// memory of a step (a few vectors of the model's widths) is not counted.
///
/// # Errors
/// [`BitTttError::InvalidInput`] for a count larger than the model's block count.
pub fn plan(
    cpu: &CpuDecoder,
    layers: GpuLayers,
    context: usize,
) -> Result<HybridPlan, BitTttError> {
    let blocks = cpu.blocks();
    let head_bytes = cpu.head_bytes() as u64;
    let (n, head_on_gpu) = match layers {
        GpuLayers::Count(n) if n > blocks.len() => {
            return Err(BitTttError::InvalidInput(format!(
                "{n} GPU layers asked for a model of {} blocks",
                blocks.len()
            )))
        }
        GpuLayers::Count(n) => (n, n == blocks.len()),
        GpuLayers::Auto { budget_bytes } => {
            let mut used = 0u64;
            let mut n = 0;
            for block in blocks {
                used += block_bytes(block, context);
                if used > budget_bytes {
                    break;
                }
                n += 1;
            }
            let head = n == blocks.len() && used + head_bytes <= budget_bytes;
            (n, head)
        }
    };
    let gpu_bytes = blocks[..n]
        .iter()
        .map(|b| block_bytes(b, context))
        .sum::<u64>()
        + if head_on_gpu { head_bytes } else { 0 };
    Ok(HybridPlan {
        n_gpu_layers: n,
        head_on_gpu,
        gpu_bytes,
    })
}

/// The parts of a model a GPU runs: its first blocks, and the final norm and head if it runs
/// them.
pub type GpuPart<G> = (Vec<Block<G>>, Option<(RmsNorm<G>, Projection<G>)>);

/// The GPU part of a packed model file for `plan`: blocks `[0, n_gpu_layers)` loaded onto
/// `device` (their packed weights uploaded straight from the mapped file), and the final norm
/// and head when the plan puts them there; nothing else of the file is loaded there.
///
/// # Errors
/// As [`BitLlama::load_packed`]; [`BitTttError::InvalidInput`] for a plan this file's model
/// cannot have (more blocks than it has, the head without every block).
pub fn load_gpu_part<G: TernaryBackend>(
    path: &Path,
    plan: HybridPlan,
    device: &G::Device,
) -> Result<GpuPart<G>, BitTttError> {
    if plan.n_gpu_layers == 0 {
        return Ok((Vec::new(), None));
    }
    let part = PackedPart::FirstBlocks {
        n_blocks: plan.n_gpu_layers,
        head: plan.head_on_gpu,
    };
    let (on_device, _) = BitLlama::<G>::load_packed_part(path, device, part)?;
    let head = plan
        .head_on_gpu
        .then_some((on_device.norm, on_device.lm_head));
    Ok((on_device.blocks, head))
}

/// A model split between a GPU backend `G` and the fused CPU decoder (see the
/// [module docs](self)); reads and generates one sequence.
#[derive(Debug)]
pub struct HybridDecoder<G: TernaryBackend> {
    /// The embedding, blocks `[N, L)` and (unless on the GPU) the head.
    cpu: CpuDecoder,
    /// Blocks `[0, N)`.
    gpu_blocks: Vec<Block<G>>,
    /// The final norm and the head, when they run on the GPU.
    gpu_head: Option<(RmsNorm<G>, Projection<G>)>,
    device: G::Device,
    plan: HybridPlan,
}

/// What a [`HybridDecoder`] has read of one sequence: each block's state on its block's side.
#[derive(Debug, Clone)]
pub struct HybridState<G: Backend> {
    /// Blocks `[0, N)`: one-sequence Burn states on the device.
    gpu: Vec<MixerState<G>>,
    /// Blocks `[N, L)`.
    cpu: Vec<CpuBlockState>,
    position: usize,
}

impl<G: Backend> HybridState<G> {
    /// Tokens read so far.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl<G: TernaryBackend> HybridDecoder<G> {
    /// Opens a packed model file (`BitLlama::save_packed`, e.g. `bit-ttt-train export`'s)
    /// split as `layers` says (room for the state of `context` tokens): the CPU side maps the
    /// file, the GPU side loads only its blocks (and the head, if the plan puts it there) onto
    /// `device` ([`load_gpu_part`]); the CPU part runs `threads` threads (`0`: the kernels'
    /// default). The file is opened by both sides: it must not change while the decoder lives,
    /// nor between the two opens (see [`BitLlama::load_packed`]).
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] for a model directory (a split reads the packed form,
    /// whose size the plan counts: export it first); as [`BitLlama::load_packed`],
    /// [`CpuDecoder::new`] and [`plan`].
    #[cfg(feature = "ndarray")]
    pub fn open(
        path: &Path,
        layers: GpuLayers,
        context: usize,
        device: &G::Device,
        threads: usize,
    ) -> Result<Self, BitTttError> {
        use burn::backend::NdArray;

        if path.is_dir() {
            return Err(BitTttError::InvalidInput(format!(
                "{} is a model directory: a split model reads the packed file \
                 (`bit-ttt-train export --model DIR` writes it)",
                path.display()
            )));
        }
        // The CPU side holds every block (the file's weights stay mapped, not copied), so
        // that the plan can weigh them all.
        let (on_host, _) = BitLlama::<NdArray>::load_packed(path, &Default::default())?;
        let cpu = CpuDecoder::new(&on_host, threads)?;
        drop(on_host);
        let plan = plan(&cpu, layers, context)?;
        let (blocks, head) = load_gpu_part::<G>(path, plan, device)?;
        let mut decoder = Self::new(cpu, blocks, head, device)?;
        // The plan's byte count, with the context's state.
        decoder.plan = plan;
        Ok(decoder)
    }

    /// Assembles a decoder: `cpu` (the whole model in the fused form: the embedding, the
    /// blocks from `gpu_blocks.len()` on, and the head unless `gpu_head`), `gpu_blocks` (the
    /// first blocks of the same model, on `device`) and, when every block is on the GPU
    /// optionally, the final norm and head there.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if there are more GPU blocks than the model has, a GPU
    /// block of another width, or a GPU head with blocks left on the CPU.
    pub fn new(
        cpu: CpuDecoder,
        gpu_blocks: Vec<Block<G>>,
        gpu_head: Option<(RmsNorm<G>, Projection<G>)>,
        device: &G::Device,
    ) -> Result<Self, BitTttError> {
        let n = gpu_blocks.len();
        let total = cpu.blocks().len();
        if n > total || (gpu_head.is_some() && n < total) {
            return Err(BitTttError::InvalidInput(format!(
                "{n} GPU blocks{} for a model of {total}",
                if gpu_head.is_some() {
                    " and the head"
                } else {
                    ""
                }
            )));
        }
        if let Some((i, b)) = gpu_blocks
            .iter()
            .enumerate()
            .find(|(_, b)| BurnBlock::new(b, device).d_model() != cpu.d_model())
        {
            return Err(BitTttError::InvalidInput(format!(
                "GPU block {i} is {} wide, the model {}",
                BurnBlock::new(b, device).d_model(),
                cpu.d_model()
            )));
        }
        let plan = HybridPlan {
            n_gpu_layers: n,
            head_on_gpu: gpu_head.is_some(),
            gpu_bytes: 0,
        };
        let mut decoder = Self {
            cpu,
            gpu_blocks,
            gpu_head,
            device: device.clone(),
            plan,
        };
        decoder.plan.gpu_bytes = decoder.cpu.blocks()[..n]
            .iter()
            .map(|b| block_bytes(b, 0))
            .sum::<u64>()
            + if decoder.plan.head_on_gpu {
                decoder.cpu.head_bytes() as u64
            } else {
                0
            };
        Ok(decoder)
    }

    /// Where each part runs (`gpu_bytes` as [`plan`] counted it for [`open`](Self::open), with
    /// the state of a new sequence for [`new`](Self::new)).
    pub fn plan(&self) -> HybridPlan {
        self.plan
    }

    /// The vocabulary size (length of the logits).
    pub fn vocab_size(&self) -> usize {
        self.cpu.vocab_size()
    }

    /// The CPU side: the embedding, every block in the fused form (those from
    /// [`HybridPlan::n_gpu_layers`] on run here) and the head.
    pub fn cpu(&self) -> &CpuDecoder {
        &self.cpu
    }

    /// The state before any token.
    pub fn new_state(&self) -> HybridState<G> {
        HybridState {
            gpu: self.gpu_steps().iter().map(BlockStep::new_state).collect(),
            cpu: self.cpu_blocks().iter().map(BlockStep::new_state).collect(),
            position: 0,
        }
    }

    /// Reads `tokens` after everything `state` has read and returns the logits of the token
    /// that follows, `[vocab_size]`.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] for no tokens or an id not below the vocabulary size,
    /// [`BitTttError::InvalidCache`] for a state of another decoder (`state` is unchanged
    /// then); [`BitTttError::Data`] if the device's output cannot be read.
    pub fn read(
        &self,
        tokens: &[u32],
        state: &mut HybridState<G>,
    ) -> Result<Vec<f32>, BitTttError> {
        self.forward(tokens, state, false)
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
        state: &mut HybridState<G>,
    ) -> Result<Vec<f32>, BitTttError> {
        self.forward(tokens, state, true)
    }

    /// The logits after the last token, or after every token (`all`).
    fn forward(
        &self,
        tokens: &[u32],
        state: &mut HybridState<G>,
        all: bool,
    ) -> Result<Vec<f32>, BitTttError> {
        self.check_state(state)?;
        if tokens.is_empty() {
            return Err(BitTttError::InvalidInput("no tokens to read".into()));
        }
        let (seq, d_model) = (tokens.len(), self.cpu.d_model());
        // [seq · d_model]: the embedding rows, looked up on the host (every id checked first).
        let mut hidden = Vec::with_capacity(seq * d_model);
        for &token in tokens {
            hidden.extend(self.cpu.embed(token)?);
        }
        // The GPU blocks advance copies of their states (tensor handles, not data), kept only
        // once everything is read back: a device error leaves `state` as it was.
        let mut gpu_states = state.gpu.clone();
        if !self.gpu_blocks.is_empty() {
            // Up once, [1, seq, d_model], through the GPU blocks' batched forward.
            let mut x =
                Tensor::<G, 3>::from_data(TensorData::new(hidden, [1, seq, d_model]), &self.device);
            for (block, block_state) in self.gpu_blocks.iter().zip(&mut gpu_states) {
                x = block.forward_with_state(x, block_state);
            }
            if let Some((norm, head)) = &self.gpu_head {
                let rows = if all { seq } else { 1 };
                let x = x.narrow(1, seq - rows, rows); // [1, rows, d_model]
                let logits = head.forward(norm.forward(x)); // [1, rows, vocab]
                let logits = logits.into_data().convert::<f32>().into_vec::<f32>()?;
                if logits.len() != rows * self.vocab_size() {
                    return Err(BitTttError::InvalidInput(format!(
                        "the GPU head gives {} logits a token, the embedding has {} tokens",
                        logits.len() / rows,
                        self.vocab_size()
                    )));
                }
                state.gpu = gpu_states;
                state.position += seq;
                return Ok(logits);
            }
            // Down once: [seq · d_model].
            hidden = x.into_data().convert::<f32>().into_vec::<f32>()?;
        }
        let cpu_blocks = self.cpu_blocks();
        let threads = self.cpu.threads();
        let logits = bit_ttt_kernels::cpu::install(threads, || {
            // The fused prefill: each CPU block reads a chunk of tokens at once.
            let mut logits = Vec::new();
            for chunk in hidden.chunks_mut(PREFILL_CHUNK * d_model) {
                for (block, block_state) in cpu_blocks.iter().zip(&mut state.cpu) {
                    block.read(chunk, block_state)?;
                }
                if all {
                    for row in chunk.chunks_exact(d_model) {
                        logits.extend(self.cpu.logits(row)?);
                    }
                }
            }
            if !all {
                logits = self.cpu.logits(&hidden[hidden.len() - d_model..])?;
            }
            Ok::<_, BitTttError>(logits)
        })?;
        state.gpu = gpu_states;
        state.position += seq;
        Ok(logits)
    }

    /// Generates after `prompt` as [`BitLlama::generate`] does (same sampling, same stops,
    /// streamed to `on_token`), continuing `state`.
    ///
    /// # Errors
    /// As [`BitLlama::generate`] and [`read`](Self::read).
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        state: &mut HybridState<G>,
        on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Vec<u32>, BitTttError> {
        generate_with(prompt, config, |tokens| self.read(tokens, state), on_token)
    }

    /// `state` in the portable form of `.soul` files: block `i`'s part is what block `i`
    /// holds, on whichever side it runs, so any decoder of the model continues from it.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] for a state of another decoder; [`BitTttError::Data`] if
    /// a device tensor cannot be read.
    pub fn state_to_soul(&self, state: &HybridState<G>) -> Result<Soul, BitTttError> {
        self.check_state(state)?;
        let n = self.gpu_blocks.len();
        let mut layers = Vec::with_capacity(n + state.cpu.len());
        for (i, s) in state.gpu.iter().enumerate() {
            layers.push(s.to_soul(i)?);
        }
        for (j, (block, s)) in self.cpu_blocks().iter().zip(&state.cpu).enumerate() {
            layers.push(block.state_to_soul(s, n + j)?);
        }
        Ok(Soul {
            position: state.position,
            layers,
        })
    }

    /// The state a portable [`Soul`] describes (one sequence, any decoder's), each block's
    /// part moved to its side.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if it does not fit this model (layer count, mixer kind,
    /// shapes, counters, more than one sequence, tensors left over).
    pub fn state_from_soul(&self, mut soul: Soul) -> Result<HybridState<G>, BitTttError> {
        let total = soul.check_layer_count(self.cpu.blocks().len())?;
        soul.check_one_sequence()?;
        let n = self.gpu_blocks.len();
        let position = soul.position;
        let (gpu_part, cpu_part) = soul.layers.split_at_mut(n);
        let gpu = self
            .gpu_steps()
            .iter()
            .zip(gpu_part)
            .map(|(b, layer)| b.state_from_soul(layer, position))
            .collect::<Result<Vec<_>, _>>()?;
        let cpu = self
            .cpu_blocks()
            .iter()
            .zip(cpu_part)
            .map(|(b, layer)| b.state_from_soul(layer, position))
            .collect::<Result<Vec<_>, _>>()?;
        soul.check_all_taken(total)?;
        Ok(HybridState { gpu, cpu, position })
    }

    /// Writes `state` to a `.soul` file, atomically.
    ///
    /// # Errors
    /// As [`state_to_soul`](Self::state_to_soul); [`BitTttError::Io`].
    pub fn save_state(&self, state: &HybridState<G>, path: &Path) -> Result<(), BitTttError> {
        self.state_to_soul(state)?.save(path)
    }

    /// Restores a state from a `.soul` file of this model (one sequence), written by any
    /// decoder.
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::CorruptFile`] if the
    /// file does not parse or does not fit this model.
    pub fn load_state(&self, path: &Path) -> Result<HybridState<G>, BitTttError> {
        let (soul, _) = Soul::load(path, self.cpu.blocks().len())?;
        self.state_from_soul(soul).map_err(as_file_error(path))
    }

    /// The GPU blocks as decode steps.
    fn gpu_steps(&self) -> Vec<BurnBlock<'_, G>> {
        self.gpu_blocks
            .iter()
            .map(|b| BurnBlock::new(b, &self.device))
            .collect()
    }

    /// The blocks that run on the CPU.
    fn cpu_blocks(&self) -> &[CpuBlock] {
        &self.cpu.blocks()[self.gpu_blocks.len()..]
    }

    fn check_state(&self, state: &HybridState<G>) -> Result<(), BitTttError> {
        let p = state.position;
        let gpu_fits = state.gpu.len() == self.gpu_blocks.len()
            && self
                .gpu_steps()
                .iter()
                .zip(&state.gpu)
                .all(|(b, s)| b.fits(s) && b.tokens_read(s) == p);
        let cpu_fits = state.cpu.len() == self.cpu_blocks().len()
            && self
                .cpu_blocks()
                .iter()
                .zip(&state.cpu)
                .all(|(b, s)| b.fits(s) && b.tokens_read(s) == p);
        if gpu_fits && cpu_fits {
            Ok(())
        } else {
            Err(BitTttError::InvalidCache(
                "the decode state belongs to another model or split".into(),
            ))
        }
    }
}
