//! `demo`: the main job (tokenizer, baselines, training, evaluation, sample, plot).

use std::path::PathBuf;
use std::time::Instant;

use crate::baselines::{self, Baselines};
use crate::data::{self, Split};
use crate::evaluation::{self, Evaluation, POSITION_EDGES};
use crate::metrics::{METRICS_FILE, PLOT_FILE};
use crate::tokenizer::Tokenizer;
use crate::train::{self, Outcome, TrainJob, TrainSettings};
use crate::{checkpoint, with_backend, TrainError};
use anyhow::{Context, Result};
use bit_ttt_burn::model::files::TOKENIZER_FILE;
use bit_ttt_burn::{BitLlama, BitLlamaConfig, MixerKind, SamplingConfig, TernaryBackend};
use burn::backend::Autodiff;
use clap::Args;

use super::{
    format_count, generate_text, parse_mixer, progress_mode, stop_flag, DeviceArgs, Exit,
    SpecialTokens, StopOn, ThreadsArg,
};

/// Vocabulary of the demo's tokenizer.
pub const DEMO_VOCAB: usize = 2048;
/// Training steps of the demo.
pub const DEMO_STEPS: usize = 600;

/// The bundled corpus, compiled in so the demo runs from any directory, offline.
pub(crate) const MOBY_DICK: &str = include_str!("../../../data/moby_dick.txt");

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Run directory (tokenizer, checkpoints, metrics, plot, final model).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Text to train on instead of the bundled Moby Dick.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Sequence mixer of the model [default: ttt_linear; with --resume, the run's own].
    #[arg(long, value_parser = parse_mixer)]
    mixer: Option<MixerKind>,
    /// Tokenizer vocabulary size.
    #[arg(long, default_value_t = DEMO_VOCAB)]
    vocab_size: usize,
    /// Training steps [default: 600; with --resume, the run's own].
    #[arg(long)]
    steps: Option<usize>,
    /// Continue an interrupted demo from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// With --resume: apply a --steps that differs from the run's (without it, that is an
    /// error).
    #[arg(long, requires = "resume")]
    extend: bool,
    /// Tokens to generate after the prompt.
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// The sample's prompt.
    #[arg(long, default_value = "Call me Ishmael")]
    prompt: String,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    threads: ThreadsArg,
}

/// The demo's model: 4 blocks of width 128. The TTT inner learning rate's scale is 0.1 (the
/// paper's for TTT-MLP; it takes 1.0 for TTT-Linear): with 1.0 this small TTT-Linear model
/// learns to ignore its context (docs/measurements.md, "TTT and context").
pub(crate) fn demo_model(vocab: usize, mixer: MixerKind) -> BitLlamaConfig {
    BitLlamaConfig::new(vocab, 128, 4, 4, 384)
        .with_mixer(mixer)
        .with_mini_batch_size(16)
        .with_ttt_base_lr(Some(0.1))
}

pub(crate) fn demo_settings(steps: usize) -> TrainSettings {
    TrainSettings {
        // 16 inner-loop mini-batches per window: the fast weights learn over the whole window
        // (trained on 64 tokens, the model reads longer windows worse; docs/measurements.md).
        seq_len: 256,
        batch_size: 4,
        steps,
        lr: 4e-3,
        min_lr: 4e-4,
        warmup_steps: 60,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.01,
        grad_clip: Some(1.0),
        eval_every: 100,
        eval_batches: 8,
        checkpoint_every: 200,
        keep_checkpoints: 2,
        seed: 42,
    }
}

/// `demo`: the main job (tokenizer, baselines, training, evaluation, sample, plot).
pub fn run(args: DemoArgs, stop: &StopOn) -> Result<Exit> {
    let total = Instant::now();
    let device = args.device.device.check()?;
    let threads = args.threads.resolve(device)?;
    let run_dir = args.out.clone();
    let texts = if args.data.is_empty() {
        vec![MOBY_DICK.to_string()]
    } else {
        data::read_texts(&args.data)?
    };
    let corpus = if args.data.is_empty() {
        "Moby Dick (bundled, data/moby_dick.txt)".to_string()
    } else {
        format!("{} file(s)", args.data.len())
    };
    // Everything is checked before anything in --out is deleted or written. A resume needs a
    // checkpoint: say so before complaining about a missing tokenizer.
    let latest = if args.resume {
        Some(checkpoint::latest(&run_dir)?)
    } else {
        None
    };
    // On resume, what was not given again is the run's own.
    let saved = latest.as_deref().map(checkpoint::load_state).transpose()?;
    let steps = args
        .steps
        .or(saved.as_ref().map(|s| s.settings.steps))
        .unwrap_or(DEMO_STEPS);
    let mixer = args
        .mixer
        .or(saved.as_ref().map(|s| s.model.mixer))
        .unwrap_or(MixerKind::TttLinear);
    println!(
        "bit-ttt demo: a ternary (BitNet b1.58) {} language model on {corpus}, {} backend",
        mixer.name(),
        device.name()
    );
    let settings = demo_settings(steps);
    settings.validate()?;
    if args.prompt.is_empty() {
        anyhow::bail!("--prompt must not be empty");
    }
    let started = Instant::now();
    let tokenizer_path = run_dir.join(TOKENIZER_FILE);
    let tokenizer = if args.resume {
        Tokenizer::load(&tokenizer_path)?
    } else {
        Tokenizer::train(&texts, args.vocab_size)?
    };
    let split = data::tokenize_and_split(&tokenizer, &texts, 0.1)?;
    data::check_length(&split, settings.seq_len)?;
    let config = demo_model(tokenizer.vocab_size(), mixer);
    config
        .validate()
        .map_err(|m| TrainError::InvalidSetting(format!("model: {m}")))?;

    if !args.resume && run_dir.exists() {
        // A fresh demo replaces the previous one, unless a trainer is using it right now.
        let _in_use = checkpoint::RunLock::acquire(&run_dir)?;
        let old = checkpoint::checkpoint_root(&run_dir);
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if !args.resume {
        tokenizer.save(&tokenizer_path)?;
    }

    // 1. Tokenizer.
    let bytes: usize = texts.iter().map(String::len).sum();
    let n_tokens = split.train.len() + split.valid.len();
    println!(
        "[1/5] tokenizer: byte-level BPE, vocabulary {} ({:.1} s) -> {}",
        tokenizer.vocab_size(),
        started.elapsed().as_secs_f64(),
        tokenizer_path.display()
    );
    println!(
        "      {} bytes -> {} tokens ({:.2} bytes/token); train split {} tokens, validation split {} (the last 10%)",
        format_count(bytes),
        format_count(n_tokens),
        bytes as f64 / n_tokens as f64,
        format_count(split.train.len()),
        format_count(split.valid.len())
    );

    // 2. Baselines.
    let started = Instant::now();
    let base = baselines::compute(&split.train, &split.valid, tokenizer.vocab_size())?;
    println!(
        "[2/5] count baselines from the train split ({:.1} s): unigram {:.3}, interpolated bigram {:.3} nats/token (λ = {:.2})",
        started.elapsed().as_secs_f64(),
        base.unigram,
        base.bigram,
        base.lambda
    );

    // 3. Training.
    println!(
        "[3/5] training: {} blocks, d_model {}, {} heads, d_ffn {}, ternary projections; {} steps of {} x {} tokens, AdamW lr {} warm-up {} + cosine",
        config.n_layers,
        config.d_model,
        config.n_heads,
        config.d_ffn,
        settings.steps,
        settings.batch_size,
        settings.seq_len,
        settings.lr,
        settings.warmup_steps
    );
    let job = TrainJob {
        run_dir: &run_dir,
        model: config,
        settings,
        data: &split,
        resume: args.resume,
        extend: args.extend,
        stop_at: None,
        stop_flag: Some(stop_flag(stop)),
        progress: progress_mode(None),
        references: vec![
            ("unigram".into(), base.unigram),
            ("interpolated bigram".into(), base.bigram),
        ],
        threads,
    };
    with_backend!(device, |B, dev| demo_rest::<B>(
        job, &dev, &tokenizer, &base, &args, total
    ))
}

fn demo_rest<B: TernaryBackend>(
    job: TrainJob<'_>,
    device: &B::Device,
    tokenizer: &Tokenizer,
    base: &Baselines,
    args: &DemoArgs,
    total: Instant,
) -> Result<Exit> {
    let run_dir = job.run_dir.to_path_buf();
    let split: &Split = job.data;
    let threads = job.threads;
    let report = train::train::<Autodiff<B>>(job, device)?;
    let state = &report.state;
    if report.outcome != Outcome::Finished {
        println!(
            "stopped at step {}; checkpoint saved; continue with: bit-ttt-train demo --resume --out {}{}",
            state.step,
            run_dir.display(),
            args.data
                .iter()
                .map(|p| format!(" --data {}", p.display()))
                .collect::<String>()
        );
        return Ok(Exit::Interrupted);
    }
    let n_params: usize = {
        use burn::module::Module;
        report.model.num_params()
    };
    let throughput = state.metrics.last().map_or(0.0, |m| m.tokens_per_s);
    println!(
        "      {} parameters; {} steps, {} training tokens ({:.1} passes over the train split) in {:.0} s, {:.0} tokens/s",
        format_count(n_params),
        state.step,
        format_count(state.tokens_seen as usize),
        state.tokens_seen as f64 / split.train.len() as f64,
        state.elapsed_s,
        throughput
    );

    // 4. Evaluation.
    let model_ce = report.final_val_loss.expect("a finished run is evaluated");
    println!(
        "[4/5] validation cross-entropy ({} tokens predicted, windows of {} tokens):",
        format_count(split.valid.len() - 1),
        state.settings.seq_len
    );
    println!("      {:<44} {:>12} {:>11}", "", "nats/token", "perplexity");
    let rows = [
        ("unigram, add-one".to_string(), base.unigram),
        (
            format!("interpolated bigram (λ = {:.2})", base.lambda),
            base.bigram,
        ),
        (
            format!("BitLlama, ternary {}", report.config.mixer.name()),
            model_ce,
        ),
    ];
    for (name, ce) in &rows {
        println!("      {name:<44} {ce:>12.3} {:>11.1}", ce.exp());
    }
    if model_ce < base.bigram {
        println!(
            "      the model beats the bigram baseline by {:.3} nats/token",
            base.bigram - model_ce
        );
    } else {
        println!(
            "      the model does NOT beat the bigram baseline ({:.3} nats/token behind)",
            model_ce - base.bigram
        );
    }
    by_position(&report.model, split, base, &state.settings, threads)?;

    // 5. Sample.
    let sampling = SamplingConfig {
        seed: 0,
        ..SamplingConfig::default()
    };
    println!(
        "[5/5] sample: {} tokens after {:?} (temperature {}, top-k {}, top-p {}, seed {}):",
        args.sample_tokens,
        args.prompt,
        sampling.temperature,
        sampling.top_k.unwrap_or(0),
        sampling.top_p.unwrap_or(1.0),
        sampling.seed
    );
    println!();
    let model = &report.model;
    generate_text(
        &mut |ids, config, on_token| model.generate(ids, config, &mut model.new_state(), on_token),
        tokenizer,
        SpecialTokens::default(),
        &args.prompt,
        args.sample_tokens,
        sampling,
        "      ",
    )?;
    println!();
    println!("outputs in {}:", run_dir.display());
    println!("      loss plot  {}", run_dir.join(PLOT_FILE).display());
    println!("      metrics    {}", run_dir.join(METRICS_FILE).display());
    println!(
        "      model      {} (config.json, model.safetensors, tokenizer.json); checkpoints in {}",
        run_dir.display(),
        checkpoint::checkpoint_root(&run_dir).display()
    );
    println!(
        "      try: bit-ttt-train generate --model {} --prompt \"The whale\"",
        run_dir.display()
    );
    println!("total time {:.0} s", total.elapsed().as_secs_f64());
    Ok(Exit::Ok)
}

/// How much the model gains from context: the validation cross-entropy by position within
/// windows of the training length and of four times it (the TTT state keeps learning past the
/// length it was trained at, or it does not), beside the bigram's on the same predictions
/// (which sees one token at every position: its row shows what the buckets' text alone does).
fn by_position<B: TernaryBackend>(
    model: &BitLlama<B>,
    split: &Split,
    base: &Baselines,
    settings: &TrainSettings,
    threads: usize,
) -> Result<()> {
    let seq_len = settings.seq_len;
    let tokens_per_batch = settings.batch_size * seq_len;
    let vocab = model.vocab_size();
    let bigram_losses =
        baselines::bigram_token_losses(&split.train, &split.valid, vocab, base.lambda);
    let windows = [seq_len, 4 * seq_len];
    let mut rows: Vec<(String, Evaluation)> = Vec::new();
    for &w in &windows {
        let batch = (tokens_per_batch / w).max(1);
        let result = evaluation::evaluate_positions(model, &split.valid, w, batch, 0, threads);
        rows.push((format!("{w} tokens, model"), result));
        rows.push((
            format!("{w} tokens, bigram"),
            Evaluation::of_stream(&bigram_losses, w),
        ));
    }
    let edges = POSITION_EDGES;
    let names: Vec<String> = rows[rows.len() - 1]
        .1
        .buckets(&edges)
        .iter()
        .map(|b| b.label())
        .collect();
    println!("      by position in the window (nats/token; a window starts with no context):");
    print!("      {:<22}", "window");
    for n in &names {
        print!(" {n:>8}");
    }
    println!(" {:>8}", "all");
    for (name, r) in &rows {
        print!("      {name:<22}");
        let buckets = r.buckets(&edges);
        for i in 0..names.len() {
            match buckets.get(i) {
                Some(b) => print!(" {:>8.3}", b.mean),
                None => print!(" {:>8}", "-"),
            }
        }
        println!(" {:>8.3}", r.mean());
    }
    println!(
        "      windows of {} tokens cost {:+.3} nats/token against windows of {seq_len} (the training length)",
        windows[1],
        rows[2].1.mean() - rows[0].1.mean()
    );
    Ok(())
}
