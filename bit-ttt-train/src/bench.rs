//! End-to-end CPU decode benchmark: a packed model with random weights, memory-mapped from its
//! packed file, decoding with the fused [`CpuDecoder`] and with Burn's op-by-op forward on the
//! `ndarray` backend, and prefilling with the latter, against the machine's read bandwidth
//! measured in the same run.
//!
//! Decoding one token reads every weight once, so `tokens/s × bytes/token` cannot exceed the
//! read bandwidth; the share of it a decode reaches says how much time goes elsewhere (kernel
//! compute, the TTT update, per-op overhead).

use std::path::Path;
use std::time::Instant;

use bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt_burn::kernels::{bandwidth, cpu};
use bit_ttt_burn::{BitLlama, BitLlamaConfig, ModelState};
use burn::backend::ndarray::NdArrayDevice;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::TrainError;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// The model (random weights; its ternary projections are packed).
    pub config: BitLlamaConfig,
    /// A name for the report (the preset).
    pub name: String,
    /// Thread counts of the kernels, one measurement each.
    pub threads: Vec<usize>,
    /// Tokens decoded one at a time (after two warm-up tokens).
    pub decode_tokens: usize,
    /// Length of the prefill.
    pub prefill_tokens: usize,
    /// Size of the array the read-bandwidth test sums.
    pub bandwidth_bytes: usize,
}

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
    /// Largest difference between the two decoders' logits after the same tokens, relative
    /// to the largest logit (a check that the fused decoder computes the same model).
    pub fused_vs_burn_logit_diff: f64,
    /// Tokens per second reading `prefill_tokens` tokens at once.
    pub prefill_tokens_per_s: f64,
    /// Length of the prefill.
    pub prefill_tokens: usize,
    /// Weight bytes one decode step reads. The recurrent state is not counted: a TTT-Linear
    /// step also reads its fast weights and reads and writes their gradient sums (about 37 MB
    /// per token at the 1b shape), TTT-MLP eight times that, attention its KV cache.
    pub bytes_per_token: usize,
    /// The machine's read bandwidth with `threads` threads, GB/s.
    pub read_gbytes_per_s: f64,
    /// `decode_tokens_per_s × bytes_per_token / read bandwidth` (fused decoder).
    pub bandwidth_share: f64,
}

/// Builds the model, packs it into `dir/model.packed.safetensors`, maps it back, and measures
/// every thread count. `progress` receives one line per phase.
///
/// # Errors
/// [`TrainError::InvalidSetting`] for zero tokens or threads, or an invalid model
/// configuration; [`TrainError::Model`] if writing or mapping the packed file fails.
pub fn run(
    settings: &BenchSettings,
    dir: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchResult>, TrainError> {
    if settings.decode_tokens == 0 || settings.prefill_tokens == 0 {
        return Err(TrainError::InvalidSetting(
            "bench: --decode-tokens and --prefill-tokens must be at least 1".into(),
        ));
    }
    if settings.threads.is_empty() || settings.threads.contains(&0) {
        return Err(TrainError::InvalidSetting(
            "bench: --threads must list thread counts of at least 1".into(),
        ));
    }
    settings
        .config
        .validate()
        .map_err(|e| TrainError::InvalidSetting(format!("bench: {e}")))?;

    let device = Default::default();
    let started = Instant::now();
    <NdArray as Backend>::seed(&device, 0);
    // Burn initialises parameters lazily, so packing materialises one latent matrix at a time.
    let packed = settings.config.init::<NdArray>(&device).into_packed()?;
    let path = dir.join("model.packed.safetensors");
    packed.save_packed(&settings.config, &path)?;
    drop(packed);
    let (model, _) = BitLlama::<NdArray>::load_packed(&path, &device)?;
    let bytes_per_token = model.weight_bytes_per_token();
    progress(&format!(
        "random {} model packed, written to {} and memory-mapped in {:.1} s; {:.1} MB of weights per decoded token",
        settings.name,
        path.display(),
        started.elapsed().as_secs_f64(),
        bytes_per_token as f64 / 1e6
    ));

    let vocab = settings.config.vocab_size;
    let token_ids = |n: usize, offset: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i + offset) * 7919 % vocab) as u32)
            .collect()
    };
    let warm_up = token_ids(2, 0);
    let decode = token_ids(settings.decode_tokens, 2);
    let mut results = Vec::new();
    for &threads in &settings.threads {
        let read = bandwidth::read_bytes_per_second(settings.bandwidth_bytes, threads, 3);

        let decoder = CpuDecoder::new(&model, threads)?;
        let mut fused_state = decoder.new_state();
        decoder.read(&warm_up, &mut fused_state)?;
        let started = Instant::now();
        let fused_logits = decoder.read(&decode, &mut fused_state)?;
        let fused_s = started.elapsed().as_secs_f64();

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

            let prompt = token_ids(settings.prefill_tokens, 100);
            let started = Instant::now();
            step(&model, &prompt, &mut model.new_state(), &device);
            (logits, decode_s, started.elapsed().as_secs_f64())
        });
        let largest = burn_logits.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        let logit_diff = fused_logits
            .iter()
            .zip(&burn_logits)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / largest;

        let decode_tps = settings.decode_tokens as f64 / fused_s;
        let result = BenchResult {
            preset: settings.name.clone(),
            mixer: settings.config.mixer.name().to_string(),
            threads,
            decode_tokens_per_s: decode_tps,
            burn_decode_tokens_per_s: settings.decode_tokens as f64 / burn_s,
            fused_vs_burn_logit_diff: f64::from(logit_diff),
            prefill_tokens_per_s: settings.prefill_tokens as f64 / prefill_s,
            prefill_tokens: settings.prefill_tokens,
            bytes_per_token,
            read_gbytes_per_s: read / 1e9,
            bandwidth_share: decode_tps * bytes_per_token as f64 / read,
        };
        progress(&format!(
            "{threads} thread(s): decode {:.1} tokens/s fused ({:.2} of the read bandwidth), \
             {:.1} through Burn ops; prefill {:.1} tokens/s; read bandwidth {:.1} GB/s; \
             fused vs Burn logits differ by {:.1e} of the largest",
            result.decode_tokens_per_s,
            result.bandwidth_share,
            result.burn_decode_tokens_per_s,
            result.prefill_tokens_per_s,
            result.read_gbytes_per_s,
            result.fused_vs_burn_logit_diff
        ));
        results.push(result);
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
    let logits = model.forward_with_state(input, state);
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
            config,
            name: "tiny".into(),
            threads: vec![1, 2],
            decode_tokens: 3,
            prefill_tokens: 5,
            bandwidth_bytes: 1 << 20,
        };
        let mut lines = 0;
        let results = run(&settings, dir.path(), |_| lines += 1).unwrap();
        assert_eq!(lines, 3);
        assert_eq!(results.len(), 2);
        // tiny: 2 blocks of d_model 64, d_ffn 128, TTT-Linear (q, k, v, o and the gate when
        // configured) and a ternary head of 64 x 64; every packed row of 64 columns is one
        // 32-byte block, plus one f32 scale per projection and one embedding row.
        let (model, _) = BitLlama::<NdArray>::load_packed(
            &dir.path().join("model.packed.safetensors"),
            &Default::default(),
        )
        .unwrap();
        let expected: usize = model
            .projections()
            .iter()
            .map(|(_, p)| match p {
                bit_ttt_burn::Projection::Packed(l) => l.weight.view().rows() * 32 + 4,
                _ => panic!("every projection of a fully ternary model is packed"),
            })
            .sum::<usize>()
            + 64 * 4;
        for r in &results {
            assert_eq!(r.bytes_per_token, expected);
            assert!(r.decode_tokens_per_s.is_finite() && r.decode_tokens_per_s > 0.0);
            assert!(r.prefill_tokens_per_s.is_finite() && r.prefill_tokens_per_s > 0.0);
            assert!(r.read_gbytes_per_s > 0.0);
            assert!(r.burn_decode_tokens_per_s.is_finite() && r.burn_decode_tokens_per_s > 0.0);
            // Both decoders run the same model (random latent weights: an int8 boundary flip
            // between them is possible in principle, and moves logits by 1e-3 to 1e-2).
            assert!(r.fused_vs_burn_logit_diff < 5e-2, "{r:?}");
        }
    }

    #[test]
    fn zero_threads_or_tokens_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let settings = BenchSettings {
            config: BitLlamaConfig::tiny(64),
            name: "tiny".into(),
            threads: vec![0],
            decode_tokens: 3,
            prefill_tokens: 5,
            bandwidth_bytes: 1 << 20,
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
