//! Decode speed of a model split between a GPU backend and the CPU, per split, measured and
//! predicted.
//!
//! The model is random and packed, drawn directly in its 2-bit form
//! ([`bit_ttt_burn::model::random`]), so a 70B-shaped model is ready in seconds and never
//! written to disk; or a packed file, memory-mapped. For every split `N` the first `N` blocks
//! are built (or loaded) on the GPU and the rest run on the fused CPU decoder, and decoding
//! one token at a time is timed. The prediction for the split is the time each side needs to
//! read its bytes per token (weights and state) at the bandwidth measured on that side in the
//! same run, plus the crossing (one hidden state up and one down) when both sides work:
//!
//! ```text
//! t(N) = gpu_bytes(N) / gpu_bandwidth + cpu_bytes(N) / cpu_bandwidth + crossing
//! ```
//!
//! A measured rate close to the predicted one says each side runs at its bandwidth; a gap says
//! how much goes to something else (kernel launches on a small GPU part, the TTT step).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt_burn::hybrid::{load_gpu_part, plan, GpuLayers, HybridDecoder, HybridPlan};
use bit_ttt_burn::kernels::bandwidth;
use bit_ttt_burn::model::random::{blocks_of, random_head, random_packed_model};
use bit_ttt_burn::{BitLlama, BitLlamaConfig, TernaryBackend};
use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use crate::TrainError;

/// The model a split benchmark measures.
#[derive(Clone, Debug)]
pub enum SplitModel {
    /// A random packed model of this shape drawn from `seed` (nothing written).
    Random {
        /// Its shape.
        config: BitLlamaConfig,
        /// Its weights' seed.
        seed: u64,
    },
    /// A packed model file, memory-mapped on the CPU side, its blocks loaded on the GPU.
    Packed(PathBuf),
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct SplitBenchSettings {
    /// The model.
    pub model: SplitModel,
    /// A name for the report.
    pub name: String,
    /// The splits, in order.
    pub splits: Vec<GpuLayers>,
    /// Threads of the CPU side (`0`: the kernels' default).
    pub threads: usize,
    /// Tokens decoded one at a time per split (after two warm-up tokens).
    pub decode_tokens: usize,
    /// Context the plan keeps room for (KV caches).
    pub context: usize,
    /// Bytes of the CPU read-bandwidth test array and of the GPU copy test.
    pub bandwidth_bytes: usize,
}

/// One split's row.
#[derive(Clone, Debug, Serialize)]
pub struct SplitBenchResult {
    /// The model's name.
    pub model: String,
    /// Blocks on the GPU.
    pub n_gpu_layers: usize,
    /// Blocks in the model.
    pub n_layers: usize,
    /// The head on the GPU.
    pub head_on_gpu: bool,
    /// Bytes the GPU side reads per token (its blocks' weights and state, the head's).
    pub gpu_bytes_per_token: u64,
    /// Bytes the CPU side reads per token (its blocks, the embedding row, the head's).
    pub cpu_bytes_per_token: u64,
    /// Decode tokens/s measured.
    pub tokens_per_s: f64,
    /// Decode tokens/s predicted from the bytes and the bandwidths (see the module docs).
    pub predicted_tokens_per_s: f64,
    /// measured / predicted.
    pub measured_over_predicted: f64,
    /// The GPU's bandwidth, GB/s: a device elementwise op's bytes read and written.
    pub gpu_gbytes_per_s: f64,
    /// The CPU's read bandwidth, GB/s, with the decoder's threads.
    pub cpu_gbytes_per_s: f64,
    /// What crosses between the sides per token (a hidden state up and one down, or the
    /// logits down when the head is on the GPU), microseconds; 0 with no GPU block.
    pub crossing_us: f64,
    /// The largest difference between this split's logits and the CPU-only decode's after the
    /// same tokens, relative to the largest logit (int8 code-boundary flips allow ~1e-2).
    pub logit_diff_vs_cpu: f64,
}

/// Measures every split on `device` (backend `G`). `progress` receives one line per phase.
///
/// # Errors
/// [`TrainError::InvalidSetting`] for no splits or tokens, a split larger than the model, an
/// invalid configuration; [`TrainError::Model`] from loading or building the model.
pub fn run<G: TernaryBackend>(
    settings: &SplitBenchSettings,
    device: &G::Device,
    mut progress: impl FnMut(&str),
) -> Result<Vec<SplitBenchResult>, TrainError> {
    if settings.splits.is_empty() || settings.decode_tokens == 0 {
        return Err(TrainError::InvalidSetting(
            "bench: --n-gpu-layers needs at least one split and --decode-tokens at least 1".into(),
        ));
    }
    let started = Instant::now();
    let host = Default::default();
    let model = match &settings.model {
        SplitModel::Random { config, seed } => {
            random_packed_model::<NdArray>(config, *seed, &host)?
        }
        SplitModel::Packed(path) => BitLlama::<NdArray>::load_packed(path, &host)?.0,
    };
    let reference = CpuDecoder::new(&model, settings.threads)?;
    let n_layers = reference.blocks().len();
    progress(&format!(
        "{}: {} blocks, d_model {}, vocabulary {}, {:.2} GB per token on the CPU alone, ready in {:.1} s",
        settings.name,
        n_layers,
        reference.d_model(),
        reference.vocab_size(),
        reference.weight_bytes_per_token() as f64 / 1e9,
        started.elapsed().as_secs_f64()
    ));
    let plans = settings
        .splits
        .iter()
        .map(|&s| Ok(plan(&reference, s, settings.context)?))
        .collect::<Result<Vec<HybridPlan>, TrainError>>()?;

    let cpu_bandwidth = cpu_read_bandwidth(settings.bandwidth_bytes, reference.threads());
    let gpu_bandwidth = gpu_bandwidth::<G>(settings.bandwidth_bytes, device)?;
    // Up: a hidden state; down: a hidden state, or the logits when the head is on the GPU.
    let crossing_hidden = crossing_seconds::<G>(reference.d_model(), device)?;
    let crossing_logits = crossing_seconds::<G>(reference.vocab_size(), device)?;
    progress(&format!(
        "bandwidth: CPU {:.1} GB/s read ({} threads), GPU {:.1} GB/s (read + write); a hidden state up and down {:.1} µs, the logits {:.1} µs",
        cpu_bandwidth / 1e9,
        reference.threads(),
        gpu_bandwidth / 1e9,
        crossing_hidden * 1e6,
        crossing_logits * 1e6
    ));

    let vocab = reference.vocab_size();
    let tokens: Vec<u32> = (0..settings.decode_tokens + 2)
        .map(|i| ((i * 7919 + 11) % vocab) as u32)
        .collect();
    // The CPU-only decode's logits after the last token: what each split must reproduce.
    let expected = reference.read(&tokens, &mut reference.new_state())?;

    let mut results = Vec::new();
    for plan in plans {
        let n = plan.n_gpu_layers;
        let hybrid = match &settings.model {
            SplitModel::Random { config, seed } => {
                let cpu = CpuDecoder::new(&model, settings.threads)?;
                let blocks = blocks_of::<G>(config, 0..n, *seed, device)?;
                let head = match plan.head_on_gpu {
                    true => Some(random_head::<G>(config, *seed, device)?),
                    false => None,
                };
                HybridDecoder::new(cpu, blocks, head, device)?
            }
            // The file's blocks loaded on the device (the head with them if the plan says).
            SplitModel::Packed(path) => {
                let cpu = CpuDecoder::new(&model, settings.threads)?;
                let (blocks, head) = load_gpu_part::<G>(path, plan, device)?;
                HybridDecoder::new(cpu, blocks, head, device)?
            }
        };
        let mut state = hybrid.new_state();
        hybrid.read(&tokens[..2], &mut state)?;
        let timed = Instant::now();
        let mut logits = Vec::new();
        for &t in &tokens[2..] {
            logits = hybrid.read(&[t], &mut state)?;
        }
        let seconds = timed.elapsed().as_secs_f64();
        let largest = expected.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        let diff = logits
            .iter()
            .zip(&expected)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / largest;

        // Bytes each side reads per token, state at the middle of the measured tokens.
        let position = 2 + settings.decode_tokens / 2;
        let block_bytes = |b: &bit_ttt_burn::cpu_decode::CpuBlock| {
            (b.weight_bytes() + b.state_bytes_read(position)) as u64
        };
        let head_bytes = reference.head_bytes() as u64;
        let gpu_bytes = reference.blocks()[..n].iter().map(block_bytes).sum::<u64>()
            + if plan.head_on_gpu { head_bytes } else { 0 };
        let cpu_bytes = reference.blocks()[n..].iter().map(block_bytes).sum::<u64>()
            + (reference.d_model() * 4) as u64
            + if plan.head_on_gpu { 0 } else { head_bytes };
        let crossing = match (n, plan.head_on_gpu) {
            (0, _) => 0.0,
            // The hidden state up, the logits down: half of each round trip.
            (_, true) => (crossing_hidden + crossing_logits) / 2.0,
            (_, false) => crossing_hidden,
        };
        let predicted_s =
            gpu_bytes as f64 / gpu_bandwidth + cpu_bytes as f64 / cpu_bandwidth + crossing;
        let tokens_per_s = settings.decode_tokens as f64 / seconds;
        let result = SplitBenchResult {
            model: settings.name.clone(),
            n_gpu_layers: n,
            n_layers,
            head_on_gpu: plan.head_on_gpu,
            gpu_bytes_per_token: gpu_bytes,
            cpu_bytes_per_token: cpu_bytes,
            tokens_per_s,
            predicted_tokens_per_s: 1.0 / predicted_s,
            measured_over_predicted: tokens_per_s * predicted_s,
            gpu_gbytes_per_s: gpu_bandwidth / 1e9,
            cpu_gbytes_per_s: cpu_bandwidth / 1e9,
            crossing_us: crossing * 1e6,
            logit_diff_vs_cpu: f64::from(diff),
        };
        progress(&format!(
            "N={n}: {:.2} tok/s measured, {:.2} predicted ({:.2} GB on the GPU, {:.2} GB on the CPU per token); logits within {:.1e} of the CPU's",
            result.tokens_per_s,
            result.predicted_tokens_per_s,
            gpu_bytes as f64 / 1e9,
            cpu_bytes as f64 / 1e9,
            result.logit_diff_vs_cpu
        ));
        results.push(result);
    }
    Ok(results)
}

/// The CPU's read bandwidth with `threads` threads, bytes/s: the best of three passes.
fn cpu_read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let array: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    black_box(bandwidth::read_pass(&array, threads));
    bandwidth::best_read_bytes_per_second(&array, threads, 3)
}

/// The largest buffer the device bandwidth test allocates: wgpu's default limit on one
/// buffer is 256 MiB, and some drivers (lavapipe) refuse even that.
const GPU_TEST_MAX_BYTES: usize = 64 << 20;

/// The device's bandwidth, bytes/s: a chain of elementwise ops over `bytes` of f32 (at most
/// [`GPU_TEST_MAX_BYTES`]), each reading and writing every value once, timed as a whole so
/// that launch latency weighs little; the best of three rounds after a warm-up.
fn gpu_bandwidth<G: TernaryBackend>(bytes: usize, device: &G::Device) -> Result<f64, TrainError> {
    const OPS: usize = 16;
    let n = bytes.clamp(1 << 20, GPU_TEST_MAX_BYTES) / 4;
    let x = Tensor::<G, 1>::from_data(TensorData::new(vec![1.0f32; n], [n]), device);
    let sync = || G::sync(device).map_err(|e| TrainError::InvalidSetting(format!("{e:?}")));
    let mut best = 0.0f64;
    for round in 0..4 {
        sync()?;
        let started = Instant::now();
        let mut y = x.clone();
        for _ in 0..OPS {
            y = y.add_scalar(1.0);
        }
        sync()?;
        let seconds = started.elapsed().as_secs_f64();
        drop(y);
        if round > 0 {
            best = best.max((OPS * 2 * 4 * n) as f64 / seconds);
        }
    }
    Ok(best)
}

/// `len` f32 values up to the device and back, seconds: the best of 20.
fn crossing_seconds<G: TernaryBackend>(len: usize, device: &G::Device) -> Result<f64, TrainError> {
    let hidden = vec![0.5f32; len];
    let mut best = f64::INFINITY;
    for _ in 0..21 {
        let started = Instant::now();
        let x = Tensor::<G, 1>::from_data(TensorData::new(hidden.clone(), [len]), device);
        let back: Vec<f32> = x
            .into_data()
            .into_vec()
            .map_err(|e| TrainError::InvalidSetting(format!("{e:?}")))?;
        black_box(back);
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With Burn's ndarray backend standing in for the GPU: every split is measured, its bytes
    /// add up to the whole model's, and its logits are the CPU-only decode's.
    #[test]
    fn every_split_is_measured_predicted_and_checked() {
        let config = BitLlamaConfig::tiny(64);
        let settings = SplitBenchSettings {
            model: SplitModel::Random { config, seed: 3 },
            name: "tiny".into(),
            splits: vec![
                GpuLayers::Count(0),
                GpuLayers::Count(1),
                GpuLayers::Count(2),
                GpuLayers::Auto { budget_bytes: 0 },
            ],
            threads: 1,
            decode_tokens: 3,
            context: 16,
            bandwidth_bytes: 1 << 20,
        };
        let mut lines = 0;
        let results = run::<NdArray>(&settings, &Default::default(), |_| lines += 1).unwrap();
        assert_eq!(lines, 2 + results.len());
        let n: Vec<_> = results.iter().map(|r| r.n_gpu_layers).collect();
        assert_eq!(n, [0, 1, 2, 0]);
        assert!(results[2].head_on_gpu && !results[1].head_on_gpu);
        let total = results[0].cpu_bytes_per_token;
        for r in &results {
            // Every byte is read on one side or the other.
            assert_eq!(
                r.gpu_bytes_per_token + r.cpu_bytes_per_token,
                total,
                "{r:?}"
            );
            assert!(
                r.tokens_per_s > 0.0 && r.predicted_tokens_per_s > 0.0,
                "{r:?}"
            );
            assert!(r.logit_diff_vs_cpu < 1e-4, "{r:?}");
            assert_eq!(r.crossing_us > 0.0, r.n_gpu_layers > 0, "{r:?}");
        }
        assert_eq!(results[0].gpu_bytes_per_token, 0);
        assert!(results[1].gpu_bytes_per_token > 0);
    }
}
