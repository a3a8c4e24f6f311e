//! End-to-end CPU benchmark: a packed model (random weights, or a packed file such as `export`
//! writes), memory-mapped from its packed file, decoding with the fused [`CpuDecoder`] and with
//! Burn's op-by-op forward on the `ndarray` backend, against the machine's read bandwidth
//! measured in the same run; prefilling with the fused prefill against the kernels alone
//! running the same products (and Burn's batched forward); and decoding at given context
//! depths.
//!
//! Decoding one token reads every weight once, so `tokens/s × bytes/token` cannot exceed the
//! read bandwidth; the share of it a decode reaches says how much time goes elsewhere (kernel
//! compute, the TTT update, per-op overhead). The read bandwidth of a shared machine moves
//! between minutes, so the fused decode runs in rounds, each right after its own read pass, and
//! the share is the median of the rounds' shares.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt_burn::kernels::{bandwidth, cpu};
use bit_ttt_burn::model::random::random_packed_model;
use bit_ttt_burn::{BitLlama, BitLlamaConfig, ModelState};
use burn::backend::ndarray::NdArrayDevice;
use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::TrainError;

/// The model a benchmark measures.
#[derive(Clone, Debug)]
pub enum BenchModel {
    /// A model of this configuration with random weights, its ternary projections packed
    /// into the benchmark's directory.
    Random(BitLlamaConfig),
    /// A packed model file (`BitLlama::save_packed`, e.g. from `bit-ttt-train export`),
    /// measured where it lies.
    Packed(PathBuf),
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// The model.
    pub model: BenchModel,
    /// A name for the report (the preset or the file).
    pub name: String,
    /// Thread counts of the kernels, one measurement each.
    pub threads: Vec<usize>,
    /// Tokens decoded one at a time (after two warm-up tokens), in up to
    /// [`MAX_ROUNDS`] rounds.
    pub decode_tokens: usize,
    /// Prefill lengths, one measurement each (Burn's batched forward at the first only).
    pub prefill_tokens: Vec<usize>,
    /// Context depths to decode at (none: no depth measurement).
    pub contexts: Vec<usize>,
    /// Size of the array the read-bandwidth test sums.
    pub bandwidth_bytes: usize,
    /// Also decode with the f32 head stored 8 bits a weight
    /// ([`CpuDecoder::with_int8_head`]), its rounds alternating with the f32 head's.
    pub int8_head: bool,
}

/// The fused decoder with its head 8 bits a weight, measured in rounds alternating with the
/// f32 head's.
#[derive(Clone, Debug, Serialize)]
pub struct Int8HeadResult {
    /// Tokens per second decoding one token at a time.
    pub decode_tokens_per_s: f64,
    /// Its tokens per second over the f32 head's, both measured in alternating rounds.
    pub speedup: f64,
    /// Bytes of parameters one step reads.
    pub bytes_per_token: usize,
    /// `tokens/s × bytes_per_token / read bandwidth`, the median over the rounds.
    pub bandwidth_share: f64,
    /// Largest difference between its logits and the f32 head's after the same tokens,
    /// relative to the largest logit: the effect of the head's rounding.
    pub logit_diff: f64,
}

/// One prefill length of one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct PrefillResult {
    /// Tokens read at once.
    pub tokens: usize,
    /// Tokens per second of the fused prefill ([`CpuDecoder::read`]), the best of
    /// [`PREFILL_ROUNDS`].
    pub tokens_per_s: f64,
    /// Tokens per second of the kernels alone running the same products in the same calls
    /// ([`CpuDecoder::run_products`]), the best of as many rounds, alternated with the
    /// prefill's.
    pub kernel_tokens_per_s: f64,
    /// `tokens_per_s / kernel_tokens_per_s`: the share of the prefill's time the products
    /// take.
    pub share_of_kernel: f64,
}

/// Decoding at one context depth, one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct DepthResult {
    /// Tokens of context before the measured ones.
    pub context: usize,
    /// Tokens per second decoding one at a time after it.
    pub tokens_per_s: f64,
    /// The time per token relative to that at the first depth measured.
    pub time_ratio_to_first: f64,
}

/// Rounds of each prefill measurement (prefill and kernels alternated).
pub const PREFILL_ROUNDS: usize = 2;

/// Tokens of a context depth that are read before the state is stretched to it
/// ([`CpuDecoder::stretch_state`]); the rest are stretched.
pub const CONTEXT_READ: usize = 512;

/// One row of the report: one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// The model's name.
    pub preset: String,
    /// The mixer.
    pub mixer: String,
    /// Kernel threads.
    pub threads: usize,
    /// Tokens per second decoding one token at a time with the fused [`CpuDecoder`].
    pub decode_tokens_per_s: f64,
    /// Tokens per second decoding one token at a time through Burn's op-by-op forward.
    pub burn_decode_tokens_per_s: f64,
    /// Tokens per second of the kernels alone running a decode step's products (every
    /// block's projections for one token, [`CpuDecoder::run_products`]; the head left out),
    /// the best of two rounds of `decode_tokens`: what the rest of a step (norms, the mixers'
    /// heads, the head, the joins) leaves of the kernels' speed.
    pub kernel_decode_tokens_per_s: f64,
    /// Largest difference between the two decoders' logits after the same tokens, relative
    /// to the largest logit (a check that the fused decoder computes the same model).
    pub fused_vs_burn_logit_diff: f64,
    /// Tokens per second of Burn's batched forward (the dual form) reading the first prefill
    /// length at once.
    pub burn_prefill_tokens_per_s: f64,
    /// The fused prefill at each length.
    pub prefill: Vec<PrefillResult>,
    /// Decoding at each context depth.
    pub depths: Vec<DepthResult>,
    /// Bytes of parameters one decode step reads ([`CpuDecoder::weight_bytes_per_token`]: the
    /// packed projections, the f32 rest a step reads (norms, the TTT layers' η gate and inner
    /// norms) and one embedding row).
    pub bytes_per_token: usize,
    /// Bytes of recurrent state a decode step reads, the mean over the measured tokens
    /// ([`CpuDecoder::state_bytes_read`]: a TTT layer's `W_start` and the mini-batch's gradient
    /// terms so far; an attention layer's KV cache).
    pub state_bytes_per_token: f64,
    /// The machine's read bandwidth with `threads` threads, GB/s: the median of the rounds'.
    pub read_gbytes_per_s: f64,
    /// `tokens/s × bytes_per_token / read bandwidth` of the fused decoder: the median over the
    /// rounds, each against the read pass just before it.
    pub bandwidth_share: f64,
    /// The same with the state's bytes added to the parameters': the share of the bandwidth
    /// a step that must read both could use at most.
    pub bandwidth_share_with_state: f64,
    /// Every round's fused decode tokens/s and read bandwidth (GB/s), in order.
    pub rounds: Vec<(f64, f64)>,
    /// With [`BenchSettings::int8_head`] and an f32 head: the same decode with the head 8
    /// bits a weight.
    pub int8_head: Option<Int8HeadResult>,
}

/// The most rounds a fused decode measurement is split into (at least 8 tokens each).
pub const MAX_ROUNDS: usize = 4;

/// The median of `values` (the mean of the middle two for an even count); `NaN` for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Builds the model, packs it into `dir/model.packed.safetensors` and maps it back (or maps
/// the given packed file; `dir` is then not used), and measures every thread count.
/// `progress` receives one line per phase.
///
/// # Errors
/// [`TrainError::InvalidSetting`] for zero tokens or threads, or an invalid model
/// configuration; [`TrainError::Model`] if writing or mapping the packed file fails (a
/// missing, corrupt or truncated file).
pub fn run(
    settings: &BenchSettings,
    dir: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchResult>, TrainError> {
    if settings.decode_tokens == 0
        || settings.prefill_tokens.is_empty()
        || settings.prefill_tokens.contains(&0)
    {
        return Err(TrainError::InvalidSetting(
            "bench: --decode-tokens and every --prefill length must be at least 1".into(),
        ));
    }
    if settings.threads.is_empty() || settings.threads.contains(&0) {
        return Err(TrainError::InvalidSetting(
            "bench: --threads must list thread counts of at least 1".into(),
        ));
    }

    let device = Default::default();
    let started = Instant::now();
    let (model, config) = match &settings.model {
        BenchModel::Random(config) => {
            config
                .validate()
                .map_err(|e| TrainError::InvalidSetting(format!("bench: {e}")))?;
            // Drawn directly in the packed form: seconds even for 7b or 70b shapes (Burn's
            // random init of f32 latent weights, then packing, takes minutes at 1b).
            let packed = random_packed_model::<NdArray>(config, 0, &device)?;
            let path = dir.join("model.packed.safetensors");
            packed.save_packed(config, &path)?;
            drop(packed);
            let loaded = BitLlama::<NdArray>::load_packed(&path, &device)?;
            progress(&format!(
                "{} model packed, written to {} and memory-mapped in {:.1} s",
                settings.name,
                path.display(),
                started.elapsed().as_secs_f64(),
            ));
            loaded
        }
        BenchModel::Packed(path) => {
            let loaded = BitLlama::<NdArray>::load_packed(path, &device)?;
            progress(&format!(
                "{} memory-mapped in {:.2} s",
                path.display(),
                started.elapsed().as_secs_f64(),
            ));
            loaded
        }
    };
    progress(&format!(
        "d_model {}, {} layers, {} heads, FFN {}, vocabulary {}, {} mixer, {} head",
        config.d_model,
        config.n_layers,
        config.n_heads,
        config.d_ffn,
        config.vocab_size,
        config.mixer.name(),
        if config.ternary_head {
            "ternary"
        } else {
            "f32"
        }
    ));

    let vocab = config.vocab_size;
    let token_ids = |n: usize, offset: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i + offset) * 7919 % vocab) as u32)
            .collect()
    };
    let warm_up = token_ids(2, 0);
    let decode = token_ids(settings.decode_tokens, 2);
    let n_rounds = (settings.decode_tokens / 8).clamp(1, MAX_ROUNDS);
    let round_tokens = settings.decode_tokens.div_ceil(n_rounds);
    let read_array: Vec<u64> = (0..settings.bandwidth_bytes / 8)
        .map(|i| i as u64)
        .collect();
    let mut results = Vec::new();
    for &threads in &settings.threads {
        let decoder = CpuDecoder::new(&model, threads)?;
        let mut int8 = if settings.int8_head && !config.ternary_head {
            let int8 = CpuDecoder::new(&model, threads)?.with_int8_head()?;
            let state = int8.new_state();
            Some((int8, state))
        } else {
            None
        };
        let bytes_per_token = decoder.weight_bytes_per_token();
        // The state bytes each measured step reads, by its position after the warm-up.
        let state_bytes: Vec<f64> = (0..settings.decode_tokens)
            .map(|i| decoder.state_bytes_read(warm_up.len() + i) as f64)
            .collect();
        let mut fused_state = decoder.new_state();
        // The first pass faults the array's pages in.
        black_box(bandwidth::read_pass(&read_array, threads));
        decoder.read(&warm_up, &mut fused_state)?;
        if let Some((int8, state)) = int8.as_mut() {
            int8.read(&warm_up, state)?;
        }
        let mut rounds = Vec::with_capacity(n_rounds);
        let (mut fused_s, mut fused_logits) = (0.0, Vec::new());
        let (mut int8_rounds, mut int8_s, mut int8_logits) = (Vec::new(), 0.0, Vec::new());
        for tokens in decode.chunks(round_tokens) {
            // The best of two passes, right before the round: the ceiling in these minutes.
            let read = bandwidth::best_read_bytes_per_second(&read_array, threads, 2);
            let started = Instant::now();
            // One token at a time: `read` of several tokens would be a prefill.
            for &t in tokens {
                fused_logits = decoder.step(t, &mut fused_state)?;
            }
            let round_s = started.elapsed().as_secs_f64();
            fused_s += round_s;
            rounds.push((tokens.len() as f64 / round_s, read / 1e9));
            // The int8 head's round right after, against the same read pass.
            if let Some((int8, state)) = int8.as_mut() {
                let started = Instant::now();
                for &t in tokens {
                    int8_logits = int8.step(t, state)?;
                }
                let round_s = started.elapsed().as_secs_f64();
                int8_s += round_s;
                int8_rounds.push((tokens.len() as f64 / round_s, read / 1e9));
            }
        }
        let int8_head = int8.as_ref().map(|(int8, _)| {
            let largest = fused_logits.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
            let diff = fused_logits
                .iter()
                .zip(&int8_logits)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            let bytes = int8.weight_bytes_per_token();
            let tps = settings.decode_tokens as f64 / int8_s;
            Int8HeadResult {
                decode_tokens_per_s: tps,
                speedup: tps / (settings.decode_tokens as f64 / fused_s),
                bytes_per_token: bytes,
                bandwidth_share: median(
                    int8_rounds
                        .iter()
                        .map(|&(tps, read)| tps * bytes as f64 / (read * 1e9))
                        .collect(),
                ),
                logit_diff: f64::from(diff / largest),
            }
        });

        // Burn inside the kernels' pool, as its docs advise: small products split too.
        let (burn_logits, burn_s, prefill_s) = cpu::install(threads, || {
            let mut state = model.new_state();
            step(&model, &warm_up, &mut state, &device);
            let started = Instant::now();
            let mut logits = Vec::new();
            for &t in &decode {
                logits = step(&model, &[t], &mut state, &device);
            }
            let decode_s = started.elapsed().as_secs_f64();

            let prompt = token_ids(settings.prefill_tokens[0], 100);
            let started = Instant::now();
            step(&model, &prompt, &mut model.new_state(), &device);
            (logits, decode_s, started.elapsed().as_secs_f64())
        });
        let mut kernel_decode_s = f64::INFINITY;
        for _ in 0..2 {
            let started = Instant::now();
            for _ in 0..settings.decode_tokens {
                decoder.run_products(1);
            }
            kernel_decode_s = kernel_decode_s.min(started.elapsed().as_secs_f64());
        }
        let prefill = settings
            .prefill_tokens
            .iter()
            .map(|&n| measure_prefill(&decoder, &token_ids(n, 100)))
            .collect::<Result<Vec<_>, _>>()?;
        let depths = measure_depths(
            &decoder,
            &settings.contexts,
            config.mini_batch_size,
            &token_ids(settings.decode_tokens, 7),
            &token_ids,
        )?;
        let largest = burn_logits.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        let logit_diff = fused_logits
            .iter()
            .zip(&burn_logits)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / largest;

        let decode_tps = settings.decode_tokens as f64 / fused_s;
        let share = |state: &dyn Fn(usize) -> f64| {
            median(
                rounds
                    .iter()
                    .enumerate()
                    .map(|(i, &(tps, read))| {
                        tps * (bytes_per_token as f64 + state(i)) / (read * 1e9)
                    })
                    .collect(),
            )
        };
        // Per round, the mean state bytes its steps read.
        let round_state: Vec<f64> = state_bytes
            .chunks(round_tokens)
            .map(|c| c.iter().sum::<f64>() / c.len() as f64)
            .collect();
        let (bandwidth_share, bandwidth_share_with_state) =
            (share(&|_| 0.0), share(&|i| round_state[i]));
        let state_bytes_per_token = state_bytes.iter().sum::<f64>() / state_bytes.len() as f64;
        let result = BenchResult {
            preset: settings.name.clone(),
            mixer: config.mixer.name().to_string(),
            threads,
            decode_tokens_per_s: decode_tps,
            burn_decode_tokens_per_s: settings.decode_tokens as f64 / burn_s,
            kernel_decode_tokens_per_s: settings.decode_tokens as f64 / kernel_decode_s,
            fused_vs_burn_logit_diff: f64::from(logit_diff),
            burn_prefill_tokens_per_s: settings.prefill_tokens[0] as f64 / prefill_s,
            prefill,
            depths,
            bytes_per_token,
            state_bytes_per_token,
            read_gbytes_per_s: median(rounds.iter().map(|r| r.1).collect()),
            bandwidth_share,
            bandwidth_share_with_state,
            rounds,
            int8_head,
        };
        progress(&format!(
            "{threads} thread(s): decode {:.1} tokens/s fused ({:.2} of the read bandwidth for \
             {:.1} MB of parameters per token, {:.2} with the {:.1} MB of state a step reads; \
             rounds {}), {:.1} through Burn ops, {:.1} the kernels alone; prefill {} (Burn: {:.1} tokens/s); {}read \
             bandwidth {:.1} GB/s; fused vs Burn logits differ by {:.1e} of the largest{}",
            result.decode_tokens_per_s,
            result.bandwidth_share,
            result.bytes_per_token as f64 / 1e6,
            result.bandwidth_share_with_state,
            result.state_bytes_per_token / 1e6,
            result
                .rounds
                .iter()
                .map(|(tps, read)| format!("{tps:.1} tok/s at {read:.1} GB/s"))
                .collect::<Vec<_>>()
                .join(", "),
            result.burn_decode_tokens_per_s,
            result.kernel_decode_tokens_per_s,
            result
                .prefill
                .iter()
                .map(|p| format!(
                    "{} tokens at {:.1} tokens/s ({:.2} of the kernels' {:.1})",
                    p.tokens, p.tokens_per_s, p.share_of_kernel, p.kernel_tokens_per_s
                ))
                .collect::<Vec<_>>()
                .join(", "),
            result.burn_prefill_tokens_per_s,
            result
                .depths
                .iter()
                .map(|d| format!(
                    "decode at context {}: {:.1} tokens/s ({:.2}× the time per token); ",
                    d.context, d.tokens_per_s, d.time_ratio_to_first
                ))
                .collect::<String>(),
            result.read_gbytes_per_s,
            result.fused_vs_burn_logit_diff,
            result.int8_head.as_ref().map_or(String::new(), |h| format!(
                "; int8 head: decode {:.1} tokens/s ({:.2}× the f32 head's, {:.2} of the read \
                 bandwidth for {:.1} MB per token), logits differ from the f32 head's by {:.1e} \
                 of the largest",
                h.decode_tokens_per_s,
                h.speedup,
                h.bandwidth_share,
                h.bytes_per_token as f64 / 1e6,
                h.logit_diff
            ))
        ));
        results.push(result);
    }
    Ok(results)
}

/// The fused prefill of `prompt` against the kernels alone running its products, alternated,
/// [`PREFILL_ROUNDS`] rounds each; the best round of each.
fn measure_prefill(decoder: &CpuDecoder, prompt: &[u32]) -> Result<PrefillResult, TrainError> {
    let (mut prefill_s, mut kernel_s) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..PREFILL_ROUNDS {
        let started = Instant::now();
        decoder.run_products(prompt.len());
        kernel_s = kernel_s.min(started.elapsed().as_secs_f64());
        let mut state = decoder.new_state();
        let started = Instant::now();
        black_box(decoder.read(prompt, &mut state)?);
        prefill_s = prefill_s.min(started.elapsed().as_secs_f64());
    }
    Ok(PrefillResult {
        tokens: prompt.len(),
        tokens_per_s: prompt.len() as f64 / prefill_s,
        kernel_tokens_per_s: prompt.len() as f64 / kernel_s,
        share_of_kernel: kernel_s / prefill_s,
    })
}

/// Decoding `decode` one token at a time after each of `contexts` tokens of context: up to
/// [`CONTEXT_READ`] tokens (plus `(context − 512) mod mini_batch`, so that the rest is whole
/// TTT mini-batches of `mini_batch`) are read by the fused prefill, and the state is then
/// stretched to the depth ([`CpuDecoder::stretch_state`]: a KV cache of that many rows, a TTT
/// state of that position; a step reads what it would after reading them all). The best of
/// two rounds, each from a copy of that state; only the decode is timed.
pub(crate) fn measure_depths(
    decoder: &CpuDecoder,
    contexts: &[usize],
    mini_batch: usize,
    decode: &[u32],
    token_ids: &dyn Fn(usize, usize) -> Vec<u32>,
) -> Result<Vec<DepthResult>, TrainError> {
    let mut results: Vec<DepthResult> = Vec::with_capacity(contexts.len());
    for &context in contexts {
        let read = if context <= CONTEXT_READ {
            context
        } else {
            CONTEXT_READ + (context - CONTEXT_READ) % mini_batch.max(1)
        };
        let mut state = decoder.new_state();
        if read > 0 {
            decoder.read(&token_ids(read, 1000), &mut state)?;
        }
        if context > read {
            state = decoder.stretch_state(&state, context)?;
        }
        let mut best_s = f64::INFINITY;
        for _ in 0..2 {
            let mut round = state.clone();
            let started = Instant::now();
            for &t in decode {
                black_box(decoder.step(t, &mut round)?);
            }
            best_s = best_s.min(started.elapsed().as_secs_f64());
        }
        let tokens_per_s = decode.len() as f64 / best_s;
        let first = results.first().map_or(tokens_per_s, |r| r.tokens_per_s);
        results.push(DepthResult {
            context,
            tokens_per_s,
            time_ratio_to_first: first / tokens_per_s,
        });
    }
    Ok(results)
}

/// Reads `tokens` after what `state` has read and returns the last position's logits, so the
/// whole forward pass (down to the head) is computed.
fn step(
    model: &BitLlama<NdArray>,
    tokens: &[u32],
    state: &mut ModelState<NdArray>,
    device: &NdArrayDevice,
) -> Vec<f32> {
    let input = Tensor::<NdArray, 2, Int>::from_data(
        TensorData::new(
            tokens.iter().map(|&t| i64::from(t)).collect(),
            [1, tokens.len()],
        ),
        device,
    );
    // [1, seq, vocab] -> the last position
    let logits = model
        .forward_with_state(input, state)
        .expect("the bench's own state fits its model");
    let [_, seq, vocab] = logits.dims();
    logits
        .slice([0..1, seq - 1..seq, 0..vocab])
        .into_data()
        .to_vec::<f32>()
        .expect("logits are f32")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_model_is_measured_for_each_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let config = BitLlamaConfig::tiny(64).with_ternary_head(true);
        let settings = BenchSettings {
            model: BenchModel::Random(config),
            name: "tiny".into(),
            threads: vec![1, 2],
            decode_tokens: 17,
            prefill_tokens: vec![5, 9],
            contexts: vec![0, 11],
            bandwidth_bytes: 1 << 20,
            int8_head: true,
        };
        let mut lines = 0;
        let results = run(&settings, dir.path(), |_| lines += 1).unwrap();
        assert_eq!(lines, 4);
        assert_eq!(results.len(), 2);
        // tiny: 2 blocks of d_model 64, d_ffn 128, TTT-Linear (q, k, v, o and the gate when
        // configured) and a ternary head of 64 x 64; every packed row of 64 columns is one
        // 32-byte block, plus one f32 scale per projection and one embedding row.
        let (model, _) = BitLlama::<NdArray>::load_packed(
            &dir.path().join("model.packed.safetensors"),
            &Default::default(),
        )
        .unwrap();
        let packed_and_row: usize = model
            .projections()
            .iter()
            .map(|(_, p)| match p {
                bit_ttt_burn::Projection::Packed(l) => l.weight.view().rows() * 32 + 4,
                _ => panic!("every projection of a fully ternary model is packed"),
            })
            .sum::<usize>()
            + 64 * 4;
        // Counted by hand, not by the decoder the bench asks: beyond the packed blocks and the
        // embedding row, a step reads two RMSNorm scales per block (2 · 64) and the final one
        // (64); a TTT layer (4 heads of 16, mini-batch 4) also its inner LayerNorm
        // (2 · 4 · 16), the η gate (4 · 64 + 4), `token_eta` (4), the RoPE tables of a
        // mini-batch (2 · 4 · 8) and its post-norm scale and shift (2 · 64): 584 values.
        let extra_values = 2 * (2 * 64 + 584) + 64;
        let expected = packed_and_row + 4 * extra_values;
        // The state a TTT-Linear step reads per layer: W1 (4 · 16 · 16), b1 and b1's gradient
        // sum (4 · 16 each), and per earlier token of the mini-batch 16 + 16 values per head;
        // 2 layers of f32.
        let state_at = |position: usize| (2 * 4 * (1024 + 128 + 4 * 32 * (position % 4))) as f64;
        // Two warm-up tokens, then 17 measured in rounds of 9 and 8.
        let state_bytes: Vec<f64> = (2..19).map(state_at).collect();
        let round_state = [
            state_bytes[..9].iter().sum::<f64>() / 9.0,
            state_bytes[9..].iter().sum::<f64>() / 8.0,
        ];
        let mean_state = state_bytes.iter().sum::<f64>() / 17.0;
        for r in &results {
            assert!(r.int8_head.is_none(), "a ternary head stays ternary");
            assert_eq!(r.bytes_per_token, expected);
            assert!((r.state_bytes_per_token - mean_state).abs() < 1e-6 * mean_state);
            assert!(r.decode_tokens_per_s.is_finite() && r.decode_tokens_per_s > 0.0);
            assert!(r.burn_prefill_tokens_per_s.is_finite() && r.burn_prefill_tokens_per_s > 0.0);
            assert_eq!(
                r.prefill.iter().map(|p| p.tokens).collect::<Vec<_>>(),
                [5, 9]
            );
            for p in &r.prefill {
                assert!(p.tokens_per_s > 0.0 && p.kernel_tokens_per_s > 0.0, "{p:?}");
                let share = p.tokens_per_s / p.kernel_tokens_per_s;
                assert!((p.share_of_kernel - share).abs() < 1e-9 * share, "{p:?}");
            }
            assert_eq!(
                r.depths.iter().map(|d| d.context).collect::<Vec<_>>(),
                [0, 11]
            );
            assert_eq!(r.depths[0].time_ratio_to_first, 1.0);
            let ratio = r.depths[0].tokens_per_s / r.depths[1].tokens_per_s;
            assert!((r.depths[1].time_ratio_to_first - ratio).abs() < 1e-9 * ratio);
            assert!(r.read_gbytes_per_s > 0.0);
            assert!(r.burn_decode_tokens_per_s.is_finite() && r.burn_decode_tokens_per_s > 0.0);
            // Both decoders run the same model (random latent weights: an int8 boundary flip
            // between them is possible in principle, and moves logits by 1e-3 to 1e-2).
            assert!(r.fused_vs_burn_logit_diff < 5e-2, "{r:?}");
            // 17 tokens: two rounds of 9 and 8, each with its own read pass.
            assert_eq!(r.rounds.len(), 2, "{r:?}");
            assert!(r.rounds.iter().all(|&(tps, read)| tps > 0.0 && read > 0.0));
            let shares: Vec<f64> = r
                .rounds
                .iter()
                .map(|&(tps, read)| tps * expected as f64 / (read * 1e9))
                .collect();
            assert!((r.bandwidth_share - (shares[0] + shares[1]) / 2.0).abs() < 1e-12);
            let with_state: Vec<f64> = r
                .rounds
                .iter()
                .zip(round_state)
                .map(|(&(tps, read), state)| tps * (expected as f64 + state) / (read * 1e9))
                .collect();
            assert!(
                (r.bandwidth_share_with_state - (with_state[0] + with_state[1]) / 2.0).abs()
                    < 1e-12
            );
        }

        // The file just written, measured where it lies: the same model.
        let path = dir.path().join("model.packed.safetensors");
        let again = BenchSettings {
            model: BenchModel::Packed(path.clone()),
            threads: vec![1],
            ..settings
        };
        let other_dir = tempfile::tempdir().unwrap();
        let results = run(&again, other_dir.path(), |_| ()).unwrap();
        assert_eq!(results[0].bytes_per_token, expected);
        assert_eq!(std::fs::read_dir(other_dir.path()).unwrap().count(), 0);

        // A truncated file is an error, and the file is left as it was.
        let bytes = std::fs::read(&path).unwrap();
        let truncated = other_dir.path().join("short.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let short = BenchSettings {
            model: BenchModel::Packed(truncated.clone()),
            ..again.clone()
        };
        assert!(matches!(
            run(&short, other_dir.path(), |_| ()),
            Err(TrainError::Model(_))
        ));
        assert_eq!(std::fs::read(&truncated).unwrap(), bytes[..bytes.len() / 2]);
        let missing = BenchSettings {
            model: BenchModel::Packed(other_dir.path().join("none.safetensors")),
            ..again
        };
        assert!(matches!(
            run(&missing, other_dir.path(), |_| ()),
            Err(TrainError::Model(_))
        ));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    /// An f32 head measured also 8 bits a weight: a quarter of its bytes (plus a scale per
    /// row), its logits within the rounding of the f32 head's.
    #[test]
    fn the_int8_head_reads_a_quarter_of_the_head_and_moves_the_logits_a_little() {
        let dir = tempfile::tempdir().unwrap();
        let settings = BenchSettings {
            model: BenchModel::Random(BitLlamaConfig::tiny(64).with_ternary_head(false)),
            name: "tiny".into(),
            threads: vec![1],
            decode_tokens: 9,
            prefill_tokens: vec![5],
            contexts: vec![],
            bandwidth_bytes: 1 << 20,
            int8_head: true,
        };
        let results = run(&settings, dir.path(), |_| ()).unwrap();
        let r = &results[0];
        let h = r
            .int8_head
            .as_ref()
            .expect("an f32 head is measured 8 bits a weight too");
        // The head is [64 vocabulary rows, 64]: 64 · 64 · 4 f32 bytes become 64 · 64 codes and
        // 64 f32 scales.
        assert_eq!(
            r.bytes_per_token - h.bytes_per_token,
            64 * 64 * 4 - (64 * 64 + 64 * 4)
        );
        assert!(h.decode_tokens_per_s > 0.0 && h.speedup > 0.0, "{h:?}");
        assert!(h.logit_diff > 0.0 && h.logit_diff < 3e-2, "{h:?}");
    }

    #[test]
    fn zero_threads_or_tokens_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let settings = BenchSettings {
            model: BenchModel::Random(BitLlamaConfig::tiny(64)),
            name: "tiny".into(),
            threads: vec![0],
            decode_tokens: 3,
            prefill_tokens: vec![5],
            contexts: vec![],
            bandwidth_bytes: 1 << 20,
            int8_head: false,
        };
        assert!(matches!(
            run(&settings, dir.path(), |_| ()),
            Err(TrainError::InvalidSetting(_))
        ));
        let settings = BenchSettings {
            threads: vec![1],
            decode_tokens: 0,
            ..settings
        };
        assert!(matches!(
            run(&settings, dir.path(), |_| ()),
            Err(TrainError::InvalidSetting(_))
        ));
    }
}
