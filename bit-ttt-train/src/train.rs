//! The training loop: AdamW with warm-up + cosine, gradient clipping, periodic evaluation,
//! atomic checkpoints, exact resume, divergence detection and Ctrl-C handling.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bit_ttt_burn::{BitLlama, BitLlamaConfig, TernaryBackend};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainerState};
use crate::data::Split;
use crate::distributed::{self, AllReduce};
use crate::evaluation::{batch_gradients, evaluate};
use crate::metrics::{self, MetricRow, Reference};
use crate::rng::SplitMix64;
use crate::schedule::Schedule;
use crate::TrainError;

/// How to train (everything but the model's shape and the data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Updates of the whole run.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine.
    pub min_lr: f64,
    /// Updates of linear warm-up.
    pub warmup_steps: usize,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW (decoupled) weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Evaluate on the validation split every this many updates (0: only at the end).
    pub eval_every: usize,
    /// Batches of the validation split to use for the periodic evaluations (0: all of it).
    pub eval_batches: usize,
    /// Write a checkpoint every this many updates (0: only at the end and on Ctrl-C).
    pub checkpoint_every: usize,
    /// Checkpoints to keep.
    pub keep_checkpoints: usize,
    /// Seed of the weights and of the batch sampler.
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            seq_len: 128,
            batch_size: 16,
            steps: 1000,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.01,
            grad_clip: Some(1.0),
            eval_every: 100,
            eval_batches: 8,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            seed: 42,
        }
    }
}

impl TrainSettings {
    /// Checks the values are usable.
    ///
    /// # Errors
    /// [`TrainError::InvalidSetting`] naming the first bad value.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::InvalidSetting(m));
        if self.seq_len == 0 || self.batch_size == 0 || self.steps == 0 {
            return bad("--seq-len, --batch-size and --steps must be at least 1".into());
        }
        let rates_ok =
            self.lr.is_finite() && self.lr > 0.0 && self.min_lr.is_finite() && self.min_lr >= 0.0;
        if !rates_ok {
            return bad(format!(
                "learning rates must be finite and positive (--lr {}, --min-lr {})",
                self.lr, self.min_lr
            ));
        }
        for (name, b) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if let Some(c) = self.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("--grad-clip must be > 0, got {c}"));
            }
        }
        Ok(())
    }

    /// The settings of `self` (given to a resumed run) that differ from `run` (the run's
    /// own), each named by its command-line flag.
    pub fn changes_from(&self, run: &TrainSettings) -> Vec<SettingChange> {
        // Destructured, so that a new setting cannot be forgotten here.
        let TrainSettings {
            seq_len,
            batch_size,
            steps,
            lr,
            min_lr,
            warmup_steps,
            beta1,
            beta2,
            weight_decay,
            grad_clip,
            eval_every,
            eval_batches,
            checkpoint_every,
            keep_checkpoints,
            seed,
        } = self;
        let clip = |c: &Option<f64>| c.unwrap_or(0.0);
        let mut changes = Vec::new();
        let mut check = |flag, given: String, had: String, extendable| {
            if given != had {
                changes.push(SettingChange {
                    flag,
                    given,
                    run: had,
                    extendable,
                });
            }
        };
        // The schedule, the optimizer's hyper-parameters and the cadence can change mid-run.
        check("--steps", steps.to_string(), run.steps.to_string(), true);
        check("--lr", lr.to_string(), run.lr.to_string(), true);
        check("--min-lr", min_lr.to_string(), run.min_lr.to_string(), true);
        check(
            "--warmup-steps",
            warmup_steps.to_string(),
            run.warmup_steps.to_string(),
            true,
        );
        check("--beta1", beta1.to_string(), run.beta1.to_string(), true);
        check("--beta2", beta2.to_string(), run.beta2.to_string(), true);
        check(
            "--weight-decay",
            weight_decay.to_string(),
            run.weight_decay.to_string(),
            true,
        );
        check(
            "--grad-clip",
            clip(grad_clip).to_string(),
            clip(&run.grad_clip).to_string(),
            true,
        );
        check(
            "--eval-every",
            eval_every.to_string(),
            run.eval_every.to_string(),
            true,
        );
        check(
            "--eval-batches",
            eval_batches.to_string(),
            run.eval_batches.to_string(),
            true,
        );
        check(
            "--checkpoint-every",
            checkpoint_every.to_string(),
            run.checkpoint_every.to_string(),
            true,
        );
        check(
            "--keep-checkpoints",
            keep_checkpoints.to_string(),
            run.keep_checkpoints.to_string(),
            true,
        );
        // These shape the batches and the data order that the saved RNG continues.
        check(
            "--seq-len",
            seq_len.to_string(),
            run.seq_len.to_string(),
            false,
        );
        check(
            "--batch-size",
            batch_size.to_string(),
            run.batch_size.to_string(),
            false,
        );
        check("--seed", seed.to_string(), run.seed.to_string(), false);
        changes
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            peak_lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
        }
    }
}

/// A setting given to a resumed run that differs from the run's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingChange {
    /// The command-line flag of the setting, e.g. `--lr`.
    pub flag: &'static str,
    /// The value given now.
    pub given: String,
    /// The run's value.
    pub run: String,
    /// Whether [`TrainJob::extend`] applies it (schedule, optimizer, cadence); the others
    /// (model shape, batch shape, seed) no resume can change.
    pub extendable: bool,
}

/// The fields of `given` (a model shape given to a resumed run) that differ from `run`, named
/// by the command-line flag that sets them. None of them can change on resume.
pub fn model_changes(given: &BitLlamaConfig, run: &BitLlamaConfig) -> Vec<SettingChange> {
    // Destructured, so that a new field cannot be forgotten here.
    let BitLlamaConfig {
        vocab_size,
        d_model,
        n_layers,
        n_heads,
        d_ffn,
        mixer,
        ternary,
        ternary_head,
        mini_batch_size,
        ttt_base_lr,
        rope_theta,
        norm_eps,
        n_kv_heads,
        ffn_activation,
        sub_norms,
        bos_token_id,
        eos_token_ids,
    } = given;
    let fields: [(&'static str, String, String); 17] = [
        // The vocabulary comes from the tokenizer.
        (
            "--vocab-size",
            vocab_size.to_string(),
            run.vocab_size.to_string(),
        ),
        ("--d-model", d_model.to_string(), run.d_model.to_string()),
        ("--n-layers", n_layers.to_string(), run.n_layers.to_string()),
        ("--n-heads", n_heads.to_string(), run.n_heads.to_string()),
        ("--d-ffn", d_ffn.to_string(), run.d_ffn.to_string()),
        (
            "--mixer",
            mixer.name().to_string(),
            run.mixer.name().to_string(),
        ),
        ("--ternary", ternary.to_string(), run.ternary.to_string()),
        (
            "--mini-batch-size",
            mini_batch_size.to_string(),
            run.mini_batch_size.to_string(),
        ),
        // Only a --config file sets these.
        (
            "--config ternary_head",
            ternary_head.to_string(),
            run.ternary_head.to_string(),
        ),
        (
            "--config ttt_base_lr",
            format!("{ttt_base_lr:?}"),
            format!("{:?}", run.ttt_base_lr),
        ),
        (
            "--config rope_theta",
            rope_theta.to_string(),
            run.rope_theta.to_string(),
        ),
        (
            "--config norm_eps",
            norm_eps.to_string(),
            run.norm_eps.to_string(),
        ),
        (
            "--config n_kv_heads",
            format!("{n_kv_heads:?}"),
            format!("{:?}", run.n_kv_heads),
        ),
        (
            "--config ffn_activation",
            format!("{ffn_activation:?}"),
            format!("{:?}", run.ffn_activation),
        ),
        (
            "--config sub_norms",
            format!("{sub_norms:?}"),
            format!("{:?}", run.sub_norms),
        ),
        (
            "--config bos_token_id",
            format!("{bos_token_id:?}"),
            format!("{:?}", run.bos_token_id),
        ),
        (
            "--config eos_token_ids",
            format!("{eos_token_ids:?}"),
            format!("{:?}", run.eos_token_ids),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(flag, given, run)| SettingChange {
            flag,
            given,
            run,
            extendable: false,
        })
        .collect()
}

/// How to show progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// An indicatif bar on stderr (step, loss, tokens/s, learning rate, ETA).
    Bar,
    /// A plain line on stderr every this many steps (for logs).
    Lines(usize),
    /// Nothing.
    Quiet,
}

/// One training run.
#[derive(Debug, Clone)]
pub struct TrainJob<'a> {
    /// The run directory (checkpoints, metrics, plot, final model).
    pub run_dir: &'a Path,
    /// The model's shape. On resume it must be the checkpoint's.
    pub model: BitLlamaConfig,
    /// The settings. On resume they must be the checkpoint's, except that with
    /// [`extend`](Self::extend) the schedule, optimizer and cadence settings may differ.
    pub settings: TrainSettings,
    /// The tokens.
    pub data: &'a Split,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// On resume, apply the settings that differ from the run's and that a run can change
    /// midway (steps, learning rates, warm-up, AdamW's betas and weight decay, clipping,
    /// evaluation and checkpoint cadence, checkpoints kept). Without it any difference is a
    /// [`TrainError::ResumeMismatch`], so that nothing given is silently ignored.
    pub extend: bool,
    /// Stop after this update, with a checkpoint, as Ctrl-C would (for time-boxed runs).
    pub stop_at: Option<usize>,
    /// Set from outside (Ctrl-C) to stop after the current update, with a checkpoint.
    pub stop_flag: Option<Arc<AtomicBool>>,
    /// Progress display.
    pub progress: ProgressMode,
    /// Reference lines for the loss plot (e.g. the baselines).
    pub references: Vec<Reference>,
    /// Compute threads of a training step and of the evaluations (each thread runs its share
    /// of the batch; [`crate::evaluation::default_threads`] on the CPU, 1 on a GPU). The trained
    /// weights depend on it through floating-point rounding only.
    pub threads: usize,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All steps done.
    Finished,
    /// Stopped at `stop_at`.
    Stopped,
    /// Stopped by the stop flag (Ctrl-C).
    Interrupted,
}

/// What a run leaves behind.
#[derive(Debug)]
pub struct TrainReport<B: Backend> {
    /// The trained model, without autodiff.
    pub model: BitLlama<B>,
    /// Its shape.
    pub config: BitLlamaConfig,
    /// The final state (step, metrics, …).
    pub state: TrainerState,
    /// How the run ended.
    pub outcome: Outcome,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Validation cross-entropy of the final model on the whole validation split (only when
    /// the run finished).
    pub final_val_loss: Option<f64>,
    /// Seconds per step spent in the group's all-reduce (in a group, over this session's
    /// steps).
    pub all_reduce_s_per_step: Option<f64>,
}

/// Serializes seeding the backend and initializing the weights: the NdArray backend's RNG is
/// global, and concurrent initializations would otherwise interleave their draws.
pub(crate) static INIT_LOCK: Mutex<()> = Mutex::new(());

/// FNV-1a over the token streams.
pub fn fingerprint(split: &Split) -> u64 {
    split
        .train
        .iter()
        .chain([&u32::MAX])
        .chain(&split.valid)
        .fold(distributed::FNV_OFFSET, |h, t| {
            distributed::fnv(h, &t.to_le_bytes())
        })
}

/// Rows `rows` of a batch of `batch` random windows of `seq_len + 1` tokens,
/// `[rows.len(), seq_len + 1]`. The generator advances by the whole batch, so every process of
/// a group draws the same batch and keeps its own rows.
fn sample_batch<B: Backend>(
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    rows: Range<usize>,
    rng: &mut SplitMix64,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let starts = tokens.len() - seq_len; // windows [s, s + seq_len] with s < starts
    let mut ids = Vec::with_capacity(rows.len() * (seq_len + 1));
    for row in 0..batch {
        let s = rng.below(starts);
        if rows.contains(&row) {
            ids.extend(tokens[s..=s + seq_len].iter().map(|&t| t as i64));
        }
    }
    Tensor::from_data(TensorData::new(ids, [rows.len(), seq_len + 1]), device)
}

/// Whether every parameter is finite.
struct FiniteCheck {
    finite: bool,
}

impl<B: Backend> ModuleVisitor<B> for FiniteCheck {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.finite {
            let sum: f64 = param.val().abs().sum().into_scalar().elem();
            self.finite = sum.is_finite();
        }
    }
}

/// Reads every parameter, which initializes the lazily initialized ones.
pub(crate) struct Materialize;

impl<B: Backend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

fn weights_finite<B: Backend, M: Module<B>>(model: &M) -> bool {
    let mut check = FiniteCheck { finite: true };
    model.visit(&mut check);
    check.finite
}

/// Bytes a parameter costs in training: the f32 weight, its gradient and AdamW's two moments.
const TRAINING_BYTES_PER_PARAMETER: u64 = 16;

/// The machine's physical memory (`MemTotal` of `/proc/meminfo`); `None` where that cannot be
/// read (then no bound is applied beyond the config's own).
pub fn physical_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Refuses a model whose training state alone (weights, gradients and AdamW moments in f32,
/// plus one more set of gradients for each of the `parts` a batch is split into beyond the
/// first, see [`batch_gradients`], and with ternary weights split in parts the step's shared
/// straight-through offsets, one f32 per weight) would not fit `memory` bytes: an allocation
/// failure would abort the process instead of reporting an error.
///
/// # Errors
/// [`TrainError::InvalidSetting`] with the sizes.
pub fn check_fits_memory(
    config: &BitLlamaConfig,
    memory: Option<u64>,
    parts: usize,
) -> Result<(), TrainError> {
    let (Some(memory), Some(weights)) = (memory, config.matrix_weights()) else {
        return Ok(());
    };
    let parts = parts.max(1) as u64;
    let shared_codes = if config.ternary && parts > 1 { 4 } else { 0 };
    let per_parameter = TRAINING_BYTES_PER_PARAMETER
        .saturating_add(4u64.saturating_mul(parts - 1))
        .saturating_add(shared_codes);
    let needed = weights.saturating_mul(per_parameter);
    if needed > memory {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(TrainError::InvalidSetting(format!(
            "model: at least {weights} parameters; to train it needs about {:.1} GiB (f32 weights, gradients and AdamW moments, a set of gradients per extra thread, and the shared ternary offsets when split), more than this machine's {:.1} GiB; fewer --threads or a smaller model",
            gib(needed),
            gib(memory)
        )));
    }
    Ok(())
}

/// Trains a model as `job` says, on backend `B` (an autodiff backend).
///
/// # Errors
/// Bad settings, data too short, a missing or unreadable checkpoint on resume, a resume on
/// other data, divergence ([`TrainError::Diverged`]), or I/O errors.
pub fn train<B>(
    job: TrainJob<'_>,
    device: &B::Device,
) -> Result<TrainReport<B::InnerBackend>, TrainError>
where
    B: AutodiffBackend + TernaryBackend,
    B::InnerBackend: TernaryBackend,
{
    train_in_group::<B>(job, device, None)
}

/// Trains as [`train`] does, as one process of a data-parallel `group` when one is given:
/// each process computes the gradients of its `settings.batch_size` rows of every step's
/// batch (of `batch_size × processes` windows), the group averages them before clipping and
/// AdamW, so all hold the same weights; rank 0 alone writes checkpoints and outputs (the other
/// ranks only read the run directory, on resume). The weights' fingerprints are compared over
/// the group at the start and at every evaluation and checkpoint (the last step's included).
///
/// # Errors
/// As [`train`], and the group's [`TrainError::Distributed`] errors (a process that stopped or
/// cannot be reached, processes holding different data, models or weights).
pub fn train_in_group<B>(
    job: TrainJob<'_>,
    device: &B::Device,
    mut group: Option<&mut dyn AllReduce>,
) -> Result<TrainReport<B::InnerBackend>, TrainError>
where
    B: AutodiffBackend + TernaryBackend,
    B::InnerBackend: TernaryBackend,
{
    let run_dir = job.run_dir;
    let (rank, processes) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.processes()));
    let writer = rank == 0;
    // Held until the run returns: checkpoints and outputs have one writer.
    let _lock = if writer {
        std::fs::create_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
        Some(checkpoint::RunLock::acquire(run_dir)?)
    } else {
        None
    };
    let data_fingerprint = fingerprint(job.data);

    // A fresh start or the state of the latest checkpoint.
    let (resume_from, mut state) = if job.resume {
        let dir = checkpoint::latest(run_dir)?;
        let mut state = checkpoint::load_state(&dir)?;
        if state.data_fingerprint != data_fingerprint {
            return Err(TrainError::InvalidSetting(format!(
                "cannot resume {}: the data (files or tokenizer) differ from the run's",
                run_dir.display()
            )));
        }
        let mut changes = model_changes(&job.model, &state.model);
        changes.extend(job.settings.changes_from(&state.settings));
        let (applied, refused): (Vec<_>, Vec<_>) = changes
            .into_iter()
            .partition(|c| job.extend && c.extendable);
        if !refused.is_empty() {
            return Err(TrainError::ResumeMismatch {
                run_dir: run_dir.to_path_buf(),
                changes: refused,
            });
        }
        if !applied.is_empty() {
            job.settings.validate()?;
            if job.settings.steps < state.step {
                return Err(TrainError::InvalidSetting(format!(
                    "--steps {} is fewer than the {} steps the run has done",
                    job.settings.steps, state.step
                )));
            }
            // Saved with the next checkpoint, so a later resume continues the extended run.
            state.settings = job.settings.clone();
        }
        (Some(dir), state)
    } else {
        (
            None,
            TrainerState {
                step: 0,
                rng: SplitMix64::new(job.settings.seed ^ 0x5EED_DA7A),
                settings: job.settings.clone(),
                model: job.model.clone(),
                tokens_seen: 0,
                elapsed_s: 0.0,
                data_fingerprint,
                metrics: Vec::new(),
                processes,
            },
        )
    };
    if state.processes != processes {
        return Err(TrainError::InvalidSetting(format!(
            "{} was trained by {} process(es); resume it with as many (--processes {} or --launch-local {}): the data order depends on it",
            run_dir.display(),
            state.processes,
            state.processes,
            state.processes
        )));
    }
    let settings = state.settings.clone();
    let config = state.model.clone();
    settings.validate()?;
    config
        .validate()
        .map_err(|m| TrainError::InvalidSetting(format!("model: {m}")))?;
    crate::data::check_length(job.data, settings.seq_len)?;
    if let Some(&bad) = job
        .data
        .train
        .iter()
        .chain(&job.data.valid)
        .find(|&&t| t as usize >= config.vocab_size)
    {
        return Err(TrainError::InvalidSetting(format!(
            "token id {bad} does not fit the model's vocabulary of {}",
            config.vocab_size
        )));
    }

    check_fits_memory(
        &config,
        physical_memory_bytes(),
        job.threads.min(settings.batch_size),
    )?;

    let model = {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        B::seed(device, settings.seed);
        let model = config.init::<B>(device);
        // Burn draws a parameter's initial values when it is first read: drawn here, in
        // visiting order and under the lock, the weights depend on the seed alone, not on what
        // reads them first (the forward pass alone, or a group's fingerprint check).
        model.visit(&mut Materialize);
        model
    };
    let mut optim = AdamWConfig::new()
        .with_beta_1(settings.beta1 as f32)
        .with_beta_2(settings.beta2 as f32)
        .with_epsilon(1e-8)
        .with_weight_decay(settings.weight_decay as f32)
        .with_grad_clipping(
            settings
                .grad_clip
                .map(|c| GradientClippingConfig::Norm(c as f32)),
        )
        .init::<B, BitLlama<B>>();
    let mut model = model;
    let mut last_checkpoint = None;
    if let Some(dir) = &resume_from {
        let (m, o) = checkpoint::load_tensors(dir, model, optim, device)?;
        model = m;
        optim = o;
        last_checkpoint = Some(dir.clone());
    }
    if let Some(group) = group.as_deref_mut() {
        // Same data, model and settings everywhere, then the same weights.
        let setup = serde_json::to_vec(&(&config, &settings, state.step, job.stop_at))
            .map_err(|e| TrainError::InvalidSetting(format!("settings: {e}")))?;
        let setup = distributed::fnv(
            distributed::fnv(distributed::FNV_OFFSET, &data_fingerprint.to_le_bytes()),
            &setup,
        );
        distributed::check_same(
            group,
            setup,
            "data, tokenizer, model, settings or step",
            "start every process with the same --data, --tokenizer (or vocabulary), model and training flags, and on --resume the same run directory contents",
        )?;
        check_weights(group, &model, state.step)?;
    }

    let schedule = settings.schedule();
    let end = job
        .stop_at
        .map_or(settings.steps, |s| s.min(settings.steps));
    let progress = match job.progress {
        ProgressMode::Bar => {
            let bar = ProgressBar::new(settings.steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos:>5}/{len} {msg} [{elapsed_precise}, ETA {eta}]",
                )
                .expect("a valid template")
                .progress_chars("##-"),
            );
            bar.set_position(state.step as u64);
            bar.reset_eta();
            Some(bar)
        }
        _ => None,
    };
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let step_at_start = state.step;
    let global_batch = settings.batch_size.checked_mul(processes).ok_or_else(|| {
        TrainError::InvalidSetting("--batch-size × --processes is too large".into())
    })?;
    let tokens_per_step = (global_batch * settings.seq_len) as u64;
    // Evaluations use the whole batch: a group evaluates the windows one process would
    // (every process evaluates: the weights are the same, and nobody waits for rank 0).
    let own_rows = rank * settings.batch_size..(rank + 1) * settings.batch_size;
    // Time spent in the group's all-reduce in this session.
    let mut all_reduce_s = 0.0f64;
    let plot_title = format!(
        "{} ({}, d_model {}, {} layers)",
        run_dir
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy()),
        config.mixer.name(),
        config.d_model,
        config.n_layers
    );
    let val_label = if settings.eval_batches == 0 {
        "validation".to_string()
    } else {
        format!(
            "validation (first {} batches; last point: all)",
            settings.eval_batches
        )
    };
    let write_outputs = |state: &TrainerState| -> Result<(), TrainError> {
        metrics::write_csv(&run_dir.join(metrics::METRICS_FILE), &state.metrics)?;
        metrics::plot_loss(
            &run_dir.join(metrics::PLOT_FILE),
            &state.metrics,
            &job.references,
            &plot_title,
            &val_label,
        )
    };

    let mut outcome = Outcome::Finished;
    while state.step < settings.steps {
        if state.step >= end {
            outcome = Outcome::Stopped;
            break;
        }
        let lr = schedule.lr(state.step);
        let batch = sample_batch::<B>(
            &job.data.train,
            settings.seq_len,
            global_batch,
            own_rows.clone(),
            &mut state.rng,
            device,
        );
        let (mut loss_value, mut grads) = batch_gradients(&model, batch, job.threads);
        let mut interrupted = job
            .stop_flag
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        if let Some(group) = group.as_deref_mut() {
            // The whole batch's gradient, loss and stop vote, the same in every process.
            let reduce_started = Instant::now();
            let averaged =
                distributed::average_gradients(&model, grads, loss_value, interrupted, group)?;
            all_reduce_s += reduce_started.elapsed().as_secs_f64();
            grads = averaged.grads;
            loss_value = averaged.loss;
            interrupted = averaged.stop;
        }
        let step = state.step + 1;
        if !loss_value.is_finite() {
            if let Some(bar) = &progress {
                bar.abandon();
            }
            return Err(TrainError::Diverged {
                step,
                what: format!("the loss is {loss_value}"),
                last_checkpoint,
            });
        }
        model = optim.step(lr, model, grads);
        state.step = step;
        state.tokens_seen += tokens_per_step;
        let run_time = started.elapsed().as_secs_f64();
        state.elapsed_s = elapsed_before + run_time;
        let tokens_per_s =
            ((state.step - step_at_start) as u64 * tokens_per_step) as f64 / run_time.max(1e-9);

        let eval_now =
            settings.eval_every > 0 && step % settings.eval_every == 0 && step < settings.steps;
        let val_loss = eval_now.then(|| {
            evaluate(
                &model.valid(),
                &job.data.valid,
                settings.seq_len,
                global_batch,
                settings.eval_batches,
                job.threads,
            )
        });
        state.metrics.push(MetricRow {
            step,
            lr,
            train_loss: loss_value,
            val_loss,
            tokens_per_s,
            elapsed_s: state.elapsed_s,
        });
        let message = format!(
            "loss {loss_value:.3}{} | {tokens_per_s:.0} tok/s | lr {lr:.2e}",
            val_loss
                .map(|v| format!(" (val {v:.3})"))
                .unwrap_or_default()
        );
        match (&progress, job.progress) {
            (Some(bar), _) => {
                bar.set_position(step as u64);
                bar.set_message(message);
            }
            (None, ProgressMode::Lines(every))
                if every > 0 && (step % every == 0 || step == 1 || val_loss.is_some()) =>
            {
                eprintln!("step {step:>6}/{} | {message}", settings.steps);
            }
            _ => {}
        }

        if group.is_none() {
            // Alone, a Ctrl-C during the evaluation stops after this step already; a group
            // stops where its vote says, the same step everywhere.
            interrupted |= job
                .stop_flag
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst));
        }
        let periodic = settings.checkpoint_every > 0 && step % settings.checkpoint_every == 0;
        let save_now = periodic || interrupted || step == end;
        // The weights are checked at every evaluation too: a NaN weight that does not yet
        // reach the loss must not train on unseen until the next checkpoint.
        let bad = if (save_now || eval_now) && !weights_finite(&model) {
            Some("the weights are no longer finite".to_string())
        } else {
            val_loss
                .filter(|v| !v.is_finite())
                .map(|v| format!("the validation loss is {v}"))
        };
        if let Some(what) = bad {
            if let Some(bar) = &progress {
                bar.abandon();
            }
            return Err(TrainError::Diverged {
                step,
                what,
                last_checkpoint,
            });
        }
        if let Some(group) = group.as_deref_mut() {
            if eval_now || save_now {
                check_weights(group, &model, step)?;
            }
        }
        if !writer {
            // Checkpoints and outputs are rank 0's.
        } else if save_now {
            last_checkpoint = Some(checkpoint::save(
                run_dir,
                &model,
                &optim,
                &state,
                settings.keep_checkpoints,
            )?);
            write_outputs(&state)?;
        } else if val_loss.is_some() {
            write_outputs(&state)?;
        }
        if interrupted {
            outcome = Outcome::Interrupted;
            break;
        }
    }
    if let Some(bar) = &progress {
        bar.finish();
    }

    let model = model.valid();
    let mut final_val_loss = None;
    if outcome == Outcome::Finished {
        let v = evaluate(
            &model,
            &job.data.valid,
            settings.seq_len,
            global_batch,
            0,
            job.threads,
        );
        if !v.is_finite() {
            return Err(TrainError::Diverged {
                step: state.step,
                what: format!("the final validation loss is {v}"),
                last_checkpoint,
            });
        }
        final_val_loss = Some(v);
        if let Some(last) = state.metrics.last_mut() {
            last.val_loss = Some(v);
        }
        // The last step's checkpoint compared the weights already.
        if writer {
            model.save(&config, run_dir)?;
            write_outputs(&state)?;
        }
    }
    let steps_here = state.step - step_at_start;
    Ok(TrainReport {
        model,
        config,
        state,
        outcome,
        last_checkpoint,
        final_val_loss,
        all_reduce_s_per_step: (steps_here > 0 && processes > 1)
            .then(|| all_reduce_s / steps_here as f64),
    })
}

/// Compares the weights' fingerprints over the group (after `step` updates).
fn check_weights<B: Backend, M: Module<B>>(
    group: &mut dyn AllReduce,
    model: &M,
    step: usize,
) -> Result<(), TrainError> {
    let hash = distributed::weights_fingerprint(model);
    distributed::check_same(
        group,
        hash,
        &format!("weights after step {step}"),
        "the run cannot continue; report it with the command lines used",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_check_counts_threads_and_shared_ternary_offsets() {
        let config = BitLlamaConfig::ttt_125m(256);
        let weights = config.matrix_weights().unwrap();
        // One part: 16 bytes a weight; two: a second gradient set, and for ternary weights
        // the shared offsets.
        let fits = |config: &BitLlamaConfig, bytes: u64, parts| {
            check_fits_memory(config, Some(weights * bytes), parts).is_ok()
        };
        let f32_config = config.clone().with_ternary(false);
        assert!(fits(&config, 16, 1) && !fits(&config, 15, 1));
        assert!(fits(&f32_config, 20, 2) && !fits(&f32_config, 19, 2));
        assert!(fits(&config, 24, 2) && !fits(&config, 23, 2));
        assert!(fits(&config, 28, 3) && !fits(&config, 27, 3));
        assert!(
            check_fits_memory(&config, None, 8).is_ok(),
            "unknown memory"
        );
    }
}
