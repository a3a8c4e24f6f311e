//! `study`: see [`crate::study`].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::demo::{demo_model, demo_settings, DEMO_VOCAB, MOBY_DICK};
use super::{format_count, Exit, ThreadsArg};
use crate::data;
use crate::device::DeviceKind;
use crate::study::{self, EvalText, StudySettings};
use crate::tokenizer::Tokenizer;
use bit_ttt_burn::model::files::TOKENIZER_FILE;

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct StudyArgs {
    /// The study's directory: one run per model, study.md, study.json and the plots.
    #[arg(long, default_value = "runs/study")]
    out: PathBuf,
    /// Text to train on instead of the bundled Moby Dick (its last 10% is the validation split).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Other text to score every model on (out of domain), each file on its own.
    #[arg(long, num_args = 1..)]
    eval_data: Vec<PathBuf>,
    /// Training time of the slowest model in minutes; the tokens that buys are every model's
    /// budget (with the default the study should take under an hour on 2 cores: a 2-minute
    /// study took 11.7 minutes there).
    #[arg(long, default_value_t = 8.0)]
    minutes_per_model: f64,
    /// Vocabulary of the byte-level BPE trained on the data.
    #[arg(long, default_value_t = DEMO_VOCAB)]
    vocab_size: usize,
    /// Tokens per training window [default: the demo's].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Windows per batch [default: the demo's tokens per step over --seq-len].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Window length of the by-position evaluation.
    #[arg(long, default_value_t = 1024)]
    long_window: usize,
    /// Contexts (tokens already read) at which decode time per token is measured.
    #[arg(long, value_delimiter = ',', default_value = "1024,16384")]
    decode_context: Vec<usize>,
    #[command(flatten)]
    threads: ThreadsArg,
}

/// The longest context the study decodes at (a KV cache of the demo's width holds 4 KiB per
/// token).
const MAX_DECODE_CONTEXT: usize = 262_144;

/// `study`: the six models trained and compared.
pub fn run(args: StudyArgs) -> Result<Exit> {
    let threads = args.threads.resolve(DeviceKind::Ndarray)?;
    // Checked before anything is trained or written.
    if !(args.minutes_per_model > 0.0 && args.minutes_per_model.is_finite()) {
        bail!("--minutes-per-model must be a positive number");
    }
    if args.seq_len == Some(0) || args.batch_size == Some(0) {
        bail!("--seq-len and --batch-size must be at least 1");
    }
    let seq_len = args.seq_len.unwrap_or(demo_settings(1).seq_len);
    if args.long_window < seq_len {
        bail!(
            "--long-window {} is shorter than the training windows ({seq_len} tokens)",
            args.long_window
        );
    }
    let texts = if args.data.is_empty() {
        vec![MOBY_DICK.to_string()]
    } else {
        data::read_texts(&args.data)?
    };
    if let Some(&c) = args
        .decode_context
        .iter()
        .find(|&&c| c > MAX_DECODE_CONTEXT)
    {
        bail!("--decode-context {c} is above the study's {MAX_DECODE_CONTEXT} tokens");
    }
    let eval_files = args
        .eval_data
        .iter()
        .map(|p| data::read_text(p))
        .collect::<Result<Vec<_>, _>>()?;
    let tokenizer = Tokenizer::train(&texts, args.vocab_size)?;
    let split = data::tokenize_and_split(&tokenizer, &texts, 0.1)?;
    data::check_length(&split, args.long_window)?;
    let valid_bytes = tokenizer.decode(&split.valid)?.len();
    let mut eval_texts = Vec::new();
    for (path, text) in args.eval_data.iter().zip(eval_files) {
        let tokens = tokenizer.encode(&text)?;
        if tokens.len() < 2 {
            bail!("{}: fewer than 2 tokens", path.display());
        }
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        eval_texts.push(EvalText {
            name,
            tokens,
            bytes: text.len(),
        });
    }
    // Everything is checked: now the directory is written.
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    tokenizer.save(&args.out.join(TOKENIZER_FILE))?;
    let mut train = demo_settings(1);
    let tokens_per_step = train.batch_size * train.seq_len;
    if let Some(seq_len) = args.seq_len {
        train.seq_len = seq_len;
    }
    train.batch_size = match args.batch_size {
        Some(b) => b,
        None => (tokens_per_step / train.seq_len.max(1)).max(1),
    };
    let settings = StudySettings {
        out: args.out.clone(),
        base: demo_model,
        vocab_size: tokenizer.vocab_size(),
        train,
        minutes_per_model: args.minutes_per_model,
        long_window: args.long_window,
        decode_contexts: args.decode_context.clone(),
        valid_bytes,
        eval_texts,
        threads,
    };
    eprintln!(
        "study: 3 mixers × {{f32, ternary}} on {} training tokens, {} threads, {} minutes for the slowest model",
        format_count(split.train.len()),
        threads,
        args.minutes_per_model
    );
    let report = study::run(&settings, &split, |line| eprintln!("  {line}"))?;
    println!("{}", study::markdown(&report));
    println!(
        "wall time {:.0} s; table {}, plots {} and {}",
        report.wall_s,
        args.out.join(study::TABLE_FILE).display(),
        args.out.join(study::CURVES_FILE).display(),
        args.out.join(study::POSITION_FILE).display()
    );
    Ok(Exit::Ok)
}
