//! `study`: attention, TTT-Linear and TTT-MLP, each in f32 and ternary, trained on the same
//! data with the same token budget at (nearly) equal parameter counts, then compared: validation
//! cross-entropy, cross-entropy by position within long windows, the same on other text, and
//! the fused CPU decoder's time per token after 1k and 16k tokens of context.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt_burn::{BitLlama, BitLlamaConfig, MixerKind};
use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use serde::Serialize;

use crate::bench::measure_depths;
use crate::data::Split;
use crate::evaluation::{self, Evaluation, POSITION_EDGES};
use crate::metrics::{self, MetricRow};
use crate::train::{self, Outcome, ProgressMode, TrainJob, TrainSettings};
use crate::train_bench;
use crate::TrainError;

/// File names in the study's directory.
pub const TABLE_FILE: &str = "study.md";
/// The results as JSON.
pub const JSON_FILE: &str = "study.json";
/// Validation loss of the six models against training tokens.
pub const CURVES_FILE: &str = "loss_curves.png";
/// Validation cross-entropy by position within the long windows.
pub const POSITION_FILE: &str = "loss_by_position.png";

/// Text to score besides the validation split.
#[derive(Debug, Clone)]
pub struct EvalText {
    /// Its name in the table (the file name).
    pub name: String,
    /// Its tokens.
    pub tokens: Vec<u32>,
    /// Its size in bytes (for bits/byte).
    pub bytes: usize,
}

/// What the study does.
#[derive(Debug, Clone)]
pub struct StudySettings {
    /// The study's directory: one run directory per model, the table and the plots.
    pub out: PathBuf,
    /// The model of each mixer before matching (the TTT-Linear models keep it; the others get
    /// the feed-forward width that brings them closest to its parameter count).
    pub base: fn(vocab_size: usize, mixer: MixerKind) -> BitLlamaConfig,
    /// The vocabulary size.
    pub vocab_size: usize,
    /// Training windows, batch, schedule and seed (`steps` and `warmup_steps` are set from the
    /// budget).
    pub train: TrainSettings,
    /// Training time of the slowest model, in minutes; the token budget that buys is every
    /// model's.
    pub minutes_per_model: f64,
    /// Window length of the by-position evaluation (several training lengths).
    pub long_window: usize,
    /// Contexts at which decode time per token is measured.
    pub decode_contexts: Vec<usize>,
    /// Bytes of the validation split (for bits/byte).
    pub valid_bytes: usize,
    /// Other text to score.
    pub eval_texts: Vec<EvalText>,
    /// Compute threads of training, evaluation and decode.
    pub threads: usize,
}

/// A model's evaluation on one text.
#[derive(Debug, Clone, Serialize)]
pub struct TextScore {
    /// The text.
    pub name: String,
    /// Cross-entropy, nats/token, in windows of the training length.
    pub nats_per_token: f64,
    /// The same in bits per byte of the text.
    pub bits_per_byte: f64,
    /// Cross-entropy by position bucket ([`POSITION_EDGES`]) in windows of the long length:
    /// (first position, mean).
    pub by_position: Vec<(usize, f64)>,
    /// Cross-entropy in windows of the long length.
    pub long_window_nats_per_token: f64,
}

/// One model of the study.
#[derive(Debug, Clone, Serialize)]
pub struct StudyModel {
    /// `attention-f32`, `ttt_linear-ternary`, ….
    pub name: String,
    /// The mixer.
    pub mixer: String,
    /// Ternary projections.
    pub ternary: bool,
    /// Its feed-forward width (set to match parameter counts).
    pub d_ffn: usize,
    /// Parameters.
    pub parameters: usize,
    /// Training tokens per second measured before the study (sets the budget).
    pub calibration_tokens_per_s: f64,
    /// Training time, seconds.
    pub train_s: f64,
    /// The validation split's scores, then every other text's.
    pub scores: Vec<TextScore>,
    /// Decode time per token after each of the contexts, milliseconds (fused CPU decoder).
    pub decode_ms: Vec<(usize, f64)>,
    /// Validation loss during training: (training tokens, nats/token).
    pub curve: Vec<(u64, f64)>,
}

/// The study's results.
#[derive(Debug, Clone, Serialize)]
pub struct StudyReport {
    /// Steps every model trained.
    pub steps: usize,
    /// Training tokens every model saw.
    pub tokens: u64,
    /// Windows × tokens per step.
    pub batch: [usize; 2],
    /// The long window of the by-position evaluation.
    pub long_window: usize,
    /// The models.
    pub models: Vec<StudyModel>,
    /// The interpolated bigram's scores of the validation split, on the same predictions.
    pub bigram: TextScore,
    /// Wall time of the whole study, seconds.
    pub wall_s: f64,
}

/// The six models: each mixer's `base` in f32 and ternary, the feed-forward width of attention
/// and TTT-MLP chosen (a multiple of 8) to bring their parameter count closest to TTT-Linear's.
///
/// # Errors
/// [`TrainError::InvalidSetting`] if the base shape is invalid.
pub fn matched_models(
    base: impl Fn(MixerKind) -> BitLlamaConfig,
) -> Result<Vec<(String, BitLlamaConfig)>, TrainError> {
    let count = |c: &BitLlamaConfig| c.init::<NdArray>(&Default::default()).num_params();
    for mixer in [
        MixerKind::Attention,
        MixerKind::TttLinear,
        MixerKind::TttMlp,
    ] {
        base(mixer)
            .validate()
            .map_err(|m| TrainError::InvalidSetting(format!("model: {m}")))?;
    }
    let target = count(&base(MixerKind::TttLinear));
    let mut out = Vec::new();
    for mixer in [
        MixerKind::Attention,
        MixerKind::TttLinear,
        MixerKind::TttMlp,
    ] {
        let mut config = base(mixer);
        config
            .validate()
            .map_err(|m| TrainError::InvalidSetting(format!("model: {m}")))?;
        if mixer != MixerKind::TttLinear {
            // Parameters grow linearly with d_ffn: two counts give the slope.
            let at = |d_ffn: usize| {
                let mut c = config.clone();
                c.d_ffn = d_ffn;
                count(&c) as f64
            };
            let (a, b) = (at(8), at(16));
            let per_unit = (b - a) / 8.0;
            let d_ffn = ((target as f64 - a) / per_unit + 8.0) / 8.0;
            config.d_ffn = (d_ffn.round().max(1.0) as usize) * 8;
            let got = count(&config) as f64;
            if (got - target as f64).abs() > 0.05 * target as f64 {
                return Err(TrainError::InvalidSetting(format!(
                    "cannot match the parameter count of TTT-Linear ({target}) with {} by its feed-forward width: {got} at d_ffn {}",
                    mixer.name(),
                    config.d_ffn
                )));
            }
        }
        for ternary in [false, true] {
            let c = config.clone().with_ternary(ternary);
            let precision = if ternary { "ternary" } else { "f32" };
            out.push((format!("{}-{precision}", mixer.name()), c));
        }
    }
    Ok(out)
}

/// Scores `tokens` with `model`: windows of the training length and of the long length.
fn score(
    model: &BitLlama<NdArray>,
    name: &str,
    tokens: &[u32],
    bytes: usize,
    settings: &StudySettings,
) -> TextScore {
    let seq_len = settings.train.seq_len;
    let per_batch = settings.train.batch_size * seq_len;
    let short = evaluation::evaluate_positions(
        model,
        tokens,
        seq_len,
        settings.train.batch_size,
        0,
        settings.threads,
    );
    let long: Evaluation = evaluation::evaluate_positions(
        model,
        tokens,
        settings.long_window,
        (per_batch / settings.long_window).max(1),
        0,
        settings.threads,
    );
    TextScore::new(name, short.mean(), short.tokens(), bytes, &long)
}

impl TextScore {
    /// The scores of a text of `bytes` bytes: `nats` per token over `predictions`, and the
    /// long windows' evaluation.
    fn new(name: &str, nats: f64, predictions: usize, bytes: usize, long: &Evaluation) -> Self {
        TextScore {
            name: name.to_string(),
            nats_per_token: nats,
            bits_per_byte: nats * predictions as f64 / (bytes as f64 * std::f64::consts::LN_2),
            by_position: long
                .buckets(&POSITION_EDGES)
                .iter()
                .map(|b| (b.start, b.mean))
                .collect(),
            long_window_nats_per_token: long.mean(),
        }
    }
}

/// Runs the study on `data`; `progress` gets a line at every stage.
///
/// # Errors
/// Bad settings, data too short for the windows, training errors (divergence included),
/// decoder errors, or I/O errors writing the outputs.
pub fn run(
    settings: &StudySettings,
    data: &Split,
    mut progress: impl FnMut(&str),
) -> Result<StudyReport, TrainError> {
    let started = Instant::now();
    if !(settings.minutes_per_model > 0.0 && settings.minutes_per_model.is_finite()) {
        return Err(TrainError::InvalidSetting(
            "--minutes-per-model must be a positive number".into(),
        ));
    }
    if settings.long_window < settings.train.seq_len || settings.threads == 0 {
        return Err(TrainError::InvalidSetting(
            "the long window must be at least the training length, and threads at least 1".into(),
        ));
    }
    crate::data::check_length(data, settings.long_window)?;
    let models = matched_models(|mixer| (settings.base)(settings.vocab_size, mixer))?;

    // The budget: what the slowest model trains in the time given.
    let mut rates = Vec::with_capacity(models.len());
    for (name, config) in &models {
        let rate = train_bench::measure(
            config,
            settings.train.batch_size,
            settings.train.seq_len,
            settings.threads,
            2,
            2.0,
        );
        progress(&format!("calibration: {name} trains {rate:.0} tokens/s"));
        rates.push(rate);
    }
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let tokens_per_step = settings.train.batch_size * settings.train.seq_len;
    let steps = ((slowest * settings.minutes_per_model * 60.0) / tokens_per_step as f64)
        .floor()
        .max(10.0) as usize;
    let mut train_settings = settings.train.clone();
    train_settings.steps = steps;
    train_settings.warmup_steps = (steps / 10).max(1);
    // Six evaluations, each on the whole validation split (as the final one is): one curve.
    train_settings.eval_every = (steps / 6).max(1);
    train_settings.eval_batches = 0;
    train_settings.checkpoint_every = 0;
    train_settings.validate()?;
    progress(&format!(
        "budget: {steps} steps of {} × {} tokens ({} tokens) for every model",
        settings.train.batch_size,
        settings.train.seq_len,
        steps * tokens_per_step
    ));

    let mut results = Vec::with_capacity(models.len());
    for ((name, config), rate) in models.iter().zip(rates) {
        let run_dir = settings.out.join(name);
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;
        }
        progress(&format!("training {name} ({} parameters)", {
            config.init::<NdArray>(&Default::default()).num_params()
        }));
        let job = TrainJob {
            run_dir: &run_dir,
            model: config.clone(),
            settings: train_settings.clone(),
            data,
            resume: false,
            extend: false,
            stop_at: None,
            stop_flag: None,
            progress: ProgressMode::Quiet,
            references: Vec::new(),
            threads: settings.threads,
        };
        let report = train::train::<Autodiff<NdArray>>(job, &Default::default())?;
        if report.outcome != Outcome::Finished {
            return Err(TrainError::InvalidSetting(format!("{name} did not finish")));
        }
        let model = report.model;
        let mut scores = vec![score(
            &model,
            "validation",
            &data.valid,
            settings.valid_bytes,
            settings,
        )];
        for text in &settings.eval_texts {
            scores.push(score(
                &model,
                &text.name,
                &text.tokens,
                text.bytes,
                settings,
            ));
        }
        let decoder = CpuDecoder::new(&model, settings.threads)?;
        let decode_tokens: Vec<u32> = (0..16).map(|i| data.valid[i % data.valid.len()]).collect();
        let token_ids = |n: usize, offset: usize| -> Vec<u32> {
            (0..n)
                .map(|i| data.train[(offset + i) % data.train.len()])
                .collect()
        };
        let depths = measure_depths(
            &decoder,
            &settings.decode_contexts,
            config.mini_batch_size,
            &decode_tokens,
            &token_ids,
        )?;
        let curve = val_curve(&report.state.metrics, tokens_per_step);
        results.push(StudyModel {
            name: name.clone(),
            mixer: config.mixer.name().to_string(),
            ternary: config.ternary,
            d_ffn: config.d_ffn,
            parameters: model.num_params(),
            calibration_tokens_per_s: rate,
            train_s: report.state.elapsed_s,
            scores,
            decode_ms: depths
                .iter()
                .map(|d| (d.context, 1000.0 / d.tokens_per_s))
                .collect(),
            curve,
        });
        progress(&format!(
            "{name}: validation {:.3} nats/token, trained in {:.0} s",
            results
                .last()
                .map_or(f64::NAN, |m| m.scores[0].nats_per_token),
            report.state.elapsed_s
        ));
    }
    let report = StudyReport {
        bigram: bigram_score(data, settings)?,
        steps,
        tokens: (steps * tokens_per_step) as u64,
        batch: [settings.train.batch_size, settings.train.seq_len],
        long_window: settings.long_window,
        models: results,
        wall_s: started.elapsed().as_secs_f64(),
    };
    write_outputs(&settings.out, &report)?;
    Ok(report)
}

/// The interpolated bigram (fitted on the train split) on the validation split's predictions,
/// placed by position as the models' long windows place them.
fn bigram_score(data: &Split, settings: &StudySettings) -> Result<TextScore, TrainError> {
    let vocab = settings.vocab_size;
    let base = crate::baselines::compute(&data.train, &data.valid, vocab)?;
    let losses =
        crate::baselines::bigram_token_losses(&data.train, &data.valid, vocab, base.lambda);
    let long = Evaluation::of_stream(&losses, settings.long_window);
    Ok(TextScore::new(
        "validation",
        base.bigram,
        losses.len(),
        settings.valid_bytes,
        &long,
    ))
}

/// (training tokens, validation loss) of every evaluation of a run.
fn val_curve(rows: &[MetricRow], tokens_per_step: usize) -> Vec<(u64, f64)> {
    rows.iter()
        .filter_map(|r| r.val_loss.map(|v| ((r.step * tokens_per_step) as u64, v)))
        .collect()
}

/// The markdown table of a report.
pub fn markdown(report: &StudyReport) -> String {
    let mut out = String::new();
    let first = match report.models.first() {
        Some(m) => m,
        None => return out,
    };
    let by_position = &first.scores[0].by_position;
    let buckets: Vec<String> = by_position
        .iter()
        .enumerate()
        .map(|(i, (start, _))| match by_position.get(i + 1) {
            Some((next, _)) => format!("{start}–{next}"),
            None => format!("{start}–{}", report.long_window),
        })
        .collect();
    out.push_str(&format!(
        "Every model: {} steps of {} × {} tokens ({} training tokens), one seed. Cross-entropy in nats/token on the validation split: in windows of the training length, then by position in windows of {} tokens (each window from no context) and their total. The bigram row is the same predictions scored by the interpolated bigram (one token of context at every position): what the text at those positions alone does. Time includes the run's evaluations. Decode: the fused CPU decoder, one token at a time after that many tokens of context (a KV cache of that many rows, a TTT state at that position).\n\n",
        report.steps, report.batch[0], report.batch[1], report.tokens, report.long_window
    ));
    out.push_str("| model | parameters | train s | validation | bits/byte |");
    for b in &buckets {
        out.push_str(&format!(" pos {b} |"));
    }
    out.push_str(&format!(" windows of {} |", report.long_window));
    for (context, _) in &first.decode_ms {
        out.push_str(&format!(" decode ms/token @{context} |"));
    }
    for s in first.scores.iter().skip(1) {
        out.push_str(&format!(" {} | bits/byte |", s.name));
    }
    out.push('\n');
    let columns = 6 + buckets.len() + first.decode_ms.len() + 2 * (first.scores.len() - 1);
    out.push_str(&"|---".repeat(columns));
    out.push_str("|\n");
    let mut row = |name: &str,
                   parameters: String,
                   train_s: String,
                   scores: &[TextScore],
                   decode: &[(usize, f64)]| {
        let v = &scores[0];
        out.push_str(&format!(
            "| {name} | {parameters} | {train_s} | {:.3} | {:.3} |",
            v.nats_per_token, v.bits_per_byte
        ));
        for (_, mean) in &v.by_position {
            out.push_str(&format!(" {mean:.3} |"));
        }
        out.push_str(&format!(" {:.3} |", v.long_window_nats_per_token));
        for (_, ms) in decode {
            out.push_str(&format!(" {ms:.2} |"));
        }
        for _ in decode.len()..first.decode_ms.len() {
            out.push_str(" - |");
        }
        for s in scores.iter().skip(1) {
            out.push_str(&format!(
                " {:.3} | {:.3} |",
                s.nats_per_token, s.bits_per_byte
            ));
        }
        for _ in scores.len()..first.scores.len() {
            out.push_str(" - | - |");
        }
        out.push('\n');
    };
    for m in &report.models {
        row(
            &m.name,
            m.parameters.to_string(),
            format!("{:.0}", m.train_s),
            &m.scores,
            &m.decode_ms,
        );
    }
    row(
        "interpolated bigram",
        "-".into(),
        "-".into(),
        std::slice::from_ref(&report.bigram),
        &[],
    );
    out
}

/// Writes the table, the JSON and the two plots into `dir`.
fn write_outputs(dir: &Path, report: &StudyReport) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    bit_ttt_burn::files::write_atomic(&dir.join(TABLE_FILE), markdown(report).as_bytes())?;
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| TrainError::InvalidSetting(format!("study.json: {e}")))?;
    bit_ttt_burn::files::write_atomic(&dir.join(JSON_FILE), &json)?;
    let curves: Vec<(String, Vec<(f64, f64)>)> = report
        .models
        .iter()
        .map(|m| {
            let points = m.curve.iter().map(|&(t, v)| (t as f64, v)).collect();
            (m.name.clone(), points)
        })
        .collect();
    metrics::plot_lines(
        &dir.join(CURVES_FILE),
        "validation loss (windows of the training length)",
        "training tokens",
        "cross-entropy (nats/token)",
        false,
        &curves,
    )?;
    let by_position: Vec<(String, Vec<(f64, f64)>)> = report
        .models
        .iter()
        .map(|m| {
            let b = &m.scores[0].by_position;
            let points = b
                .iter()
                .enumerate()
                .map(|(i, &(start, mean))| {
                    // Plotted at the bucket's middle position (log scale).
                    let end = b.get(i + 1).map_or(report.long_window, |n| n.0);
                    (((start.max(1) * end) as f64).sqrt(), mean)
                })
                .collect();
            (m.name.clone(), points)
        })
        .collect();
    metrics::plot_lines(
        &dir.join(POSITION_FILE),
        &format!(
            "validation loss by position in windows of {} tokens",
            report.long_window
        ),
        "position in the window",
        "cross-entropy (nats/token)",
        true,
        &by_position,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matched_models_are_within_a_few_percent_of_ttt_linear() {
        let base = |mixer| {
            BitLlamaConfig::new(256, 32, 2, 2, 96)
                .with_mini_batch_size(4)
                .with_mixer(mixer)
        };
        let models = matched_models(base).unwrap();
        assert_eq!(models.len(), 6);
        let count = |c: &BitLlamaConfig| c.init::<NdArray>(&Default::default()).num_params();
        let target = count(&models[2].1);
        assert_eq!(models[2].0, "ttt_linear-f32");
        assert_eq!(models[2].1.d_ffn, 96, "TTT-Linear keeps the base shape");
        for (name, config) in &models {
            let n = count(config) as f64;
            // One step of 8 in d_ffn is 3 × 8 × d_model × layers = 1,536 parameters here.
            assert!(
                (n - target as f64).abs() <= 3.0 * 4.0 * 32.0 * 2.0,
                "{name}: {n} vs {target}"
            );
            assert_eq!(config.d_ffn % 8, 0);
        }
    }
}
