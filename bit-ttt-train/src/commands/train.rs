//! `train`: trains (or resumes) a model in a run directory.

use std::path::PathBuf;

use crate::data;
use crate::distributed::{GroupConfig, TcpGroup};
use crate::metrics::{METRICS_FILE, PLOT_FILE};
use crate::tokenizer::Tokenizer;
use crate::train::{self, Outcome, ProgressMode, TrainJob, TrainSettings};
use crate::{checkpoint, with_backend, TrainError};
use anyhow::{bail, Context, Result};
use bit_ttt_burn::model::files::TOKENIZER_FILE;
use bit_ttt_burn::{BitLlamaConfig, MixerKind, TernaryBackend};
use burn::backend::Autodiff;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::{Deserialize, Serialize};

use super::group::{self, GroupArgs};
use super::{
    format_count, parse_mixer, preset, progress_mode, stop_flag, DeviceArgs, Exit, ProgressArg,
    StopOn, ThreadsArg,
};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run directory: checkpoints/, metrics.csv, loss.png, and at the end the model
    /// (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    out: PathBuf,
    /// UTF-8 text files to train on (the last --valid-fraction of their tokens is the
    /// validation split). On --resume, defaults to the files the run started with.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// An existing tokenizer.json; without it a byte-level BPE of --vocab-size is trained on --data.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size of the tokenizer trained when --tokenizer is not given.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Fraction of the tokens held out for validation (the end of the stream).
    #[arg(long, default_value_t = 0.1)]
    valid_fraction: f64,
    /// Model preset: tiny, 125m, 350m, 760m, 1.3b, 1b (fully ternary, FFN 5632) (the vocabulary comes from the tokenizer).
    #[arg(long, default_value = "tiny", conflicts_with = "config")]
    preset: String,
    /// A model config.json instead of a preset (its vocab_size is replaced by the tokenizer's).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the preset's width.
    #[arg(long)]
    d_model: Option<usize>,
    /// Override the preset's number of blocks.
    #[arg(long)]
    n_layers: Option<usize>,
    /// Override the preset's number of heads.
    #[arg(long)]
    n_heads: Option<usize>,
    /// Override the preset's feed-forward width.
    #[arg(long)]
    d_ffn: Option<usize>,
    /// Override the TTT mini-batch size.
    #[arg(long)]
    mini_batch_size: Option<usize>,
    /// TTT inner-loop base learning rate (eta's scale) [default: the paper's, 1.0 for
    /// TTT-Linear, 0.1 for TTT-MLP].
    #[arg(long)]
    ttt_base_lr: Option<f64>,
    /// Sequence mixer: ttt_linear, ttt_mlp or attention.
    #[arg(long, default_value = "ttt_linear", value_parser = parse_mixer)]
    mixer: MixerKind,
    /// Ternary (BitLinear) projections; --ternary false trains the same model in f32.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ternary: bool,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Training steps (updates).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Learning rate at the end of the cosine decay.
    #[arg(long, default_value_t = 3e-4)]
    min_lr: f64,
    /// Steps of linear warm-up.
    #[arg(long, default_value_t = 50)]
    warmup_steps: usize,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.95)]
    beta2: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip the global gradient norm (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Evaluate on (part of) the validation split every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Validation batches per periodic evaluation (0: all; the final evaluation always uses all).
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// Write a checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 200)]
    checkpoint_every: usize,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Continue from the latest checkpoint in --out (model, optimizer, schedule, data position,
    /// RNG). Settings given with it must equal the run's, unless --extend is given too.
    #[arg(long)]
    resume: bool,
    /// With --resume: apply the schedule settings given that differ from the run's (--steps,
    /// --lr, --min-lr, --warmup-steps, --beta1, --beta2, --weight-decay, --grad-clip,
    /// --eval-every, --eval-batches, --checkpoint-every, --keep-checkpoints). The model, batch
    /// shape and seed never change on resume.
    #[arg(long, requires = "resume")]
    extend: bool,
    /// Stop after this step with a checkpoint, as Ctrl-C would (resume later with --resume).
    #[arg(long)]
    stop_at: Option<usize>,
    /// Seed of the weights and of the batch order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Progress: bar (default on a terminal), lines (default otherwise) or quiet.
    #[arg(long, value_enum)]
    progress: Option<ProgressArg>,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    threads: ThreadsArg,
    #[command(flatten)]
    group: GroupArgs,
}

/// What a run directory remembers of how it was started (for `--resume`).
#[derive(Debug, Serialize, Deserialize)]
struct RunInfo {
    data: Vec<PathBuf>,
    valid_fraction: f64,
}

const RUN_FILE: &str = "run.json";

fn settings_of(args: &TrainArgs) -> TrainSettings {
    TrainSettings {
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        steps: args.steps,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        beta1: args.beta1,
        beta2: args.beta2,
        weight_decay: args.weight_decay,
        grad_clip: (args.grad_clip > 0.0).then_some(args.grad_clip),
        eval_every: args.eval_every,
        eval_batches: args.eval_batches,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints,
        seed: args.seed,
    }
}

/// The settings of a resumed run: the run's own, with the flags typed on the command line
/// (not their defaults) put over them. `train` then refuses the differences, or applies them
/// with `--extend`.
fn resume_settings(
    args: &TrainArgs,
    given: &dyn Fn(&str) -> bool,
    run: &TrainSettings,
) -> TrainSettings {
    let typed = settings_of(args);
    let mut settings = run.clone();
    // The clap ids are the field names of both `TrainArgs` and `TrainSettings`.
    macro_rules! take {
        ($($field:ident),*) => {$(
            if given(stringify!($field)) {
                settings.$field = typed.$field;
            }
        )*};
    }
    take!(
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
        seed
    );
    settings
}

/// The model shape of a resumed run: the run's own, with the model flags typed on the command
/// line put over it (a typed --preset or --config rebuilds it as a fresh run would).
fn resume_model(
    args: &TrainArgs,
    given: &dyn Fn(&str) -> bool,
    run: &BitLlamaConfig,
) -> Result<BitLlamaConfig> {
    if given("preset") || given("config") {
        let mut config = model_config(args, run.vocab_size)?;
        // Defaulted, not typed: keep the run's.
        if !given("mixer") {
            config.mixer = run.mixer;
        }
        if !given("ternary") {
            config.ternary = run.ternary;
        }
        return Ok(config);
    }
    let mut config = run.clone();
    if given("mixer") {
        config.mixer = args.mixer;
    }
    if given("ternary") {
        config.ternary = args.ternary;
    }
    // These have no default: set only when typed.
    for (value, field) in [
        (args.d_model, &mut config.d_model),
        (args.n_layers, &mut config.n_layers),
        (args.n_heads, &mut config.n_heads),
        (args.d_ffn, &mut config.d_ffn),
        (args.mini_batch_size, &mut config.mini_batch_size),
    ] {
        if let Some(v) = value {
            *field = v;
        }
    }
    if args.ttt_base_lr.is_some() {
        config.ttt_base_lr = args.ttt_base_lr;
    }
    Ok(config)
}

fn model_config(args: &TrainArgs, vocab: usize) -> Result<BitLlamaConfig> {
    let mut config = match &args.config {
        Some(path) => BitLlamaConfig::load_json(path)?,
        None => preset(&args.preset, vocab)?,
    };
    config.vocab_size = vocab;
    config.mixer = args.mixer;
    config.ternary = args.ternary;
    if let Some(v) = args.d_model {
        config.d_model = v;
    }
    if let Some(v) = args.n_layers {
        config.n_layers = v;
    }
    if let Some(v) = args.n_heads {
        config.n_heads = v;
    }
    if let Some(v) = args.d_ffn {
        config.d_ffn = v;
    }
    if let Some(v) = args.mini_batch_size {
        config.mini_batch_size = v;
    }
    if args.ttt_base_lr.is_some() {
        config.ttt_base_lr = args.ttt_base_lr;
    }
    config
        .validate()
        .map_err(|m| TrainError::InvalidSetting(format!("model: {m}")))?;
    Ok(config)
}

/// `train`: trains (or resumes) a model in a run directory. `matches` are the subcommand's
/// parsed arguments, which tell the flags typed from the defaulted ones.
pub fn run(args: TrainArgs, matches: Option<&ArgMatches>, stop: &StopOn) -> Result<Exit> {
    let given =
        |id: &str| matches.is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine));
    if let Some(n) = args.group.launch_local {
        let command = TrainArgs::augment_args(clap::Command::new("train"));
        return group::launch_local(n, &command, matches);
    }
    let group = args.group.config()?;
    // Rank 0 (or a process training alone) owns the run directory; the others only read it.
    let writer = group.as_ref().is_none_or(|g| g.rank == 0);
    let device = args.device.device.check()?;
    let threads = args.threads.resolve(device)?;
    let run_dir = args.out.clone();
    if writer && run_dir.is_dir() {
        // Refuse before touching anything if another trainer is at work here; `train` takes
        // the lock again for the run itself.
        drop(checkpoint::RunLock::acquire(&run_dir)?);
    }
    let tokenizer_path = run_dir.join(TOKENIZER_FILE);
    let (data_paths, valid_fraction, tokenizer) = if args.resume {
        // Fail early, before reading data, when there is nothing to resume.
        checkpoint::find_latest(&run_dir)?;
        for (id, flag) in [("tokenizer", "--tokenizer"), ("vocab_size", "--vocab-size")] {
            if given(id) {
                eprintln!("warning: {flag} is ignored with --resume: the run keeps its own {TOKENIZER_FILE}");
            }
        }
        let info: RunInfo = serde_json::from_slice(
            &std::fs::read(run_dir.join(RUN_FILE))
                .with_context(|| format!("reading {}", run_dir.join(RUN_FILE).display()))?,
        )
        .with_context(|| format!("parsing {}", run_dir.join(RUN_FILE).display()))?;
        if given("valid_fraction") && args.valid_fraction != info.valid_fraction {
            bail!(
                "--valid-fraction {} differs from the run's {}; a resumed run cannot change its validation split",
                args.valid_fraction,
                info.valid_fraction
            );
        }
        let paths = if args.data.is_empty() {
            info.data
        } else {
            args.data.clone()
        };
        (
            paths,
            info.valid_fraction,
            Tokenizer::load(&tokenizer_path)?,
        )
    } else {
        // Check the settings before the (slower) tokenizer training.
        settings_of(&args).validate()?;
        model_config(&args, crate::tokenizer::MIN_VOCAB_SIZE)?;
        // Any trace of a run counts, a run whose checkpoints are all broken included: a fresh
        // run must not overwrite its tokenizer or prune its checkpoints.
        let root = checkpoint::checkpoint_root(&run_dir);
        let has_steps = std::fs::read_dir(&root).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
        });
        if writer && (run_dir.join(RUN_FILE).exists() || has_steps) {
            bail!(
                "{} already holds a training run; continue it with --resume, or choose another --out",
                run_dir.display()
            );
        }
        let texts = data::read_texts(&args.data)?;
        let tokenizer = match &args.tokenizer {
            Some(path) => Tokenizer::load(path)?,
            None => {
                eprintln!(
                    "training a byte-level BPE tokenizer of {} tokens on {} file(s)",
                    args.vocab_size,
                    args.data.len()
                );
                Tokenizer::train(&texts, args.vocab_size)?
            }
        };
        (args.data.clone(), args.valid_fraction, tokenizer)
    };
    let texts = data::read_texts(&data_paths)?;
    let split = data::tokenize_and_split(&tokenizer, &texts, valid_fraction)?;
    let (config, settings) = if args.resume {
        // The run's own model and settings, from its latest checkpoint, with what was typed;
        // `train` refuses differences unless --extend allows them.
        let state = checkpoint::load_state(&checkpoint::find_latest(&run_dir)?.dir)?;
        let settings = resume_settings(&args, &given, &state.settings);
        eprintln!(
            "resuming {} at step {} of {}",
            run_dir.display(),
            state.step,
            settings.steps
        );
        (resume_model(&args, &given, &state.model)?, settings)
    } else {
        (
            model_config(&args, tokenizer.vocab_size())?,
            settings_of(&args),
        )
    };
    if !args.resume {
        settings.validate()?;
        data::check_length(&split, settings.seq_len)?;
        train::check_fits_memory(
            &config,
            train::physical_memory_bytes(),
            threads.min(settings.batch_size),
        )?;
    }
    if !args.resume && writer {
        // Only a run that passed every check leaves files: a failed start can be retried.
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        tokenizer.save(&tokenizer_path)?;
        let info = RunInfo {
            data: data_paths.clone(),
            valid_fraction,
        };
        bit_ttt_burn::files::write_atomic(
            &run_dir.join(RUN_FILE),
            &serde_json::to_vec_pretty(&info)?,
        )?;
    }
    eprintln!(
        "data: {} train / {} validation tokens; model: {} {} (d_model {}, {} layers), {}",
        format_count(split.train.len()),
        format_count(split.valid.len()),
        if config.ternary { "ternary" } else { "f32" },
        config.mixer.name(),
        config.d_model,
        config.n_layers,
        device.name()
    );
    let job = TrainJob {
        run_dir: &run_dir,
        model: config,
        settings,
        data: &split,
        resume: args.resume,
        extend: args.extend,
        stop_at: args.stop_at,
        stop_flag: Some(stop_flag(stop)),
        progress: if writer {
            progress_mode(args.progress)
        } else {
            ProgressMode::Quiet
        },
        references: vec![],
        threads,
    };
    match group {
        None => with_backend!(device, |B, dev| run_training::<B>(job, &dev, None)),
        Some(group) => {
            let (rank, processes) = (group.rank, group.processes);
            with_backend!(device, |B, dev| run_training::<B>(job, &dev, Some(group)))
                .with_context(|| format!("rank {rank} of {processes}"))
        }
    }
}

fn run_training<B: TernaryBackend>(
    job: TrainJob<'_>,
    device: &B::Device,
    group: Option<GroupConfig>,
) -> Result<Exit> {
    let run_dir = job.run_dir.to_path_buf();
    let report = match group {
        None => train::train::<Autodiff<B>>(job, device)?,
        Some(config) => {
            let (rank, processes) = (config.rank, config.processes);
            eprintln!(
                "rank {rank} of {processes}: joining the group (coordinator {})",
                config.coordinator
            );
            let mut member = TcpGroup::join(config)?;
            let report = train::train_in_group::<Autodiff<B>>(job, device, Some(&mut member))?;
            if rank != 0 {
                eprintln!(
                    "rank {rank} of {processes}: {} steps done; rank 0 reports and writes the run",
                    report.state.step
                );
                return Ok(if report.outcome == Outcome::Interrupted {
                    Exit::Interrupted
                } else {
                    Exit::Ok
                });
            }
            report
        }
    };
    let state = &report.state;
    if let Some(reduce) = report.all_reduce_s_per_step {
        let step_s = state.metrics.last().map_or(f64::NAN, |m| {
            (state.settings.batch_size * state.processes * state.settings.seq_len) as f64
                / m.tokens_per_s
        });
        println!(
            "group: {} processes, {:.0} tok/s; all-reduce {:.1} ms/step ({:.0}% of a step)",
            state.processes,
            state.metrics.last().map_or(f64::NAN, |m| m.tokens_per_s),
            reduce * 1e3,
            100.0 * reduce / step_s
        );
    }
    let last_train = state.metrics.last().map_or(f64::NAN, |m| m.train_loss);
    match report.outcome {
        Outcome::Finished => {
            let val = report.final_val_loss.unwrap_or(f64::NAN);
            println!(
                "done: {} steps, {} tokens in {:.0} s; last train loss {last_train:.4}, validation {val:.4} nats/token (perplexity {:.2})",
                state.step,
                format_count(state.tokens_seen as usize),
                state.elapsed_s,
                val.exp()
            );
            println!(
                "model: {} ({}, config.json, {TOKENIZER_FILE}); metrics: {}; plot: {}",
                run_dir.display(),
                bit_ttt_burn::model::files::WEIGHTS_FILE,
                run_dir.join(METRICS_FILE).display(),
                run_dir.join(PLOT_FILE).display()
            );
            Ok(Exit::Ok)
        }
        Outcome::Stopped | Outcome::Interrupted => {
            println!(
                "stopped at step {} of {}; checkpoint {}; continue with --resume --out {}",
                state.step,
                state.settings.steps,
                report
                    .last_checkpoint
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string()),
                run_dir.display()
            );
            Ok(if report.outcome == Outcome::Interrupted {
                Exit::Interrupted
            } else {
                Exit::Ok
            })
        }
    }
}
