//! `bench-train`: tokens per second of training steps (forward, backward, AdamW) on Burn's
//! ndarray backend, by model, precision (ternary QAT or f32) and thread count, measured in
//! alternating rounds so that a drift of the machine's speed hits every configuration alike.

use std::time::Instant;

use bit_ttt_burn::{BitLlama, BitLlamaConfig};
use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::evaluation::batch_gradients;
use crate::rng::SplitMix64;
use crate::train::Materialize;
use crate::TrainError;

type Ad = Autodiff<NdArray>;

/// One model to measure.
#[derive(Debug, Clone)]
pub struct TrainBenchModel {
    /// Its name in the table.
    pub name: String,
    /// Its shape (ternary or not is set per measurement).
    pub config: BitLlamaConfig,
    /// Windows per step.
    pub batch_size: usize,
    /// Tokens per window.
    pub seq_len: usize,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainBenchSettings {
    /// The models.
    pub models: Vec<TrainBenchModel>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Timed steps per measurement (after one untimed step; more while under 4 s).
    pub steps: usize,
    /// Rounds: each configuration is measured once per round, the rounds alternate.
    pub rounds: usize,
}

/// The measurement of one configuration (the best of its rounds).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchResult {
    /// Model name.
    pub model: String,
    /// Parameters.
    pub parameters: usize,
    /// Ternary (QAT) projections, or f32.
    pub ternary: bool,
    /// Compute threads.
    pub threads: usize,
    /// Windows × tokens per step.
    pub batch: [usize; 2],
    /// Training tokens per second, the best round.
    pub tokens_per_s: f64,
    /// Every round's tokens per second.
    pub rounds: Vec<f64>,
}

/// Random windows `[batch, seq_len + 1]` of token ids below `vocab`.
fn random_windows(
    rng: &mut SplitMix64,
    vocab: usize,
    batch: usize,
    seq_len: usize,
) -> Tensor<Ad, 2, Int> {
    let ids: Vec<i64> = (0..batch * (seq_len + 1))
        .map(|_| rng.below(vocab) as i64)
        .collect();
    Tensor::from_data(
        TensorData::new(ids, [batch, seq_len + 1]),
        &Default::default(),
    )
}

/// The least time a measurement of the benchmark runs for.
const MIN_SECONDS: f64 = 4.0;

/// Tokens per second of `steps` training steps (or more, for at least `min_seconds`) of `config` after one untimed step.
pub(crate) fn measure(
    config: &BitLlamaConfig,
    batch: usize,
    seq_len: usize,
    threads: usize,
    steps: usize,
    min_seconds: f64,
) -> f64 {
    let device = Default::default();
    let mut model: BitLlama<Ad> = config.init(&device);
    model.visit(&mut Materialize);
    let mut optim = AdamWConfig::new().init::<Ad, BitLlama<Ad>>();
    let mut rng = SplitMix64::new(1);
    let mut step = |model: BitLlama<Ad>| {
        let windows = random_windows(&mut rng, config.vocab_size, batch, seq_len);
        let (_loss, grads) = batch_gradients(&model, windows, threads);
        optim.step(1e-3, model, grads)
    };
    model = step(model);
    // At least `steps` steps and at least `min_seconds`: a small model's steps are short.
    let started = Instant::now();
    let mut done = 0;
    while done < steps || started.elapsed().as_secs_f64() < min_seconds {
        model = step(model);
        done += 1;
    }
    (done * batch * seq_len) as f64 / started.elapsed().as_secs_f64()
}

/// Runs the benchmark; `report` sees every round's measurement as it is made.
///
/// # Errors
/// [`TrainError::InvalidSetting`] for no models, threads, steps or rounds, a zero thread count
/// or an invalid model.
pub fn run(
    settings: &TrainBenchSettings,
    mut report: impl FnMut(&TrainBenchResult),
) -> Result<Vec<TrainBenchResult>, TrainError> {
    if settings.models.is_empty()
        || settings.threads.is_empty()
        || settings.threads.contains(&0)
        || settings.steps == 0
        || settings.rounds == 0
    {
        return Err(TrainError::InvalidSetting(
            "bench-train needs models, thread counts of at least 1, steps and rounds".into(),
        ));
    }
    // Every configuration once per round, rounds one after the other.
    let mut results: Vec<(BitLlamaConfig, TrainBenchResult)> = Vec::new();
    for model in &settings.models {
        for ternary in [true, false] {
            let config = model.config.clone().with_ternary(ternary);
            config
                .validate()
                .map_err(|m| TrainError::InvalidSetting(format!("{}: {m}", model.name)))?;
            let parameters = config.init::<NdArray>(&Default::default()).num_params();
            for &threads in &settings.threads {
                let result = TrainBenchResult {
                    model: model.name.clone(),
                    parameters,
                    ternary,
                    threads,
                    batch: [model.batch_size, model.seq_len],
                    tokens_per_s: 0.0,
                    rounds: Vec::new(),
                };
                results.push((config.clone(), result));
            }
        }
    }
    for _ in 0..settings.rounds {
        for (config, result) in &mut results {
            let [batch, seq_len] = result.batch;
            let tokens_per_s = measure(
                config,
                batch,
                seq_len,
                result.threads,
                settings.steps,
                MIN_SECONDS,
            );
            result.rounds.push(tokens_per_s);
            result.tokens_per_s = result.tokens_per_s.max(tokens_per_s);
            report(result);
        }
    }
    let results = results.into_iter().map(|(_, r)| r).collect();
    Ok(results)
}
