//! `eval`: cross-entropy and perplexity of a model on text files.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use bit_ttt_burn::BitLlama;
use bit_ttt_train::{data, train, with_backend};
use clap::Args;

use super::{find_tokenizer, format_count, DeviceArgs, Exit};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json), e.g. a run directory
    /// or one of its checkpoints, or a packed file (`export`'s model.packed.safetensors,
    /// memory-mapped).
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text files to score (all of their tokens).
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// tokenizer.json (default: the model directory's, or its run directory's; for a packed
    /// file, the directory's that holds it).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Tokens per evaluation window (each window starts without context).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

/// `eval`: cross-entropy and perplexity of a model on text files.
pub fn run(args: EvalArgs) -> Result<Exit> {
    let device = args.device.device.check()?;
    let tokenizer = find_tokenizer(args.tokenizer.as_deref(), &args.model)?;
    let texts = data::read_texts(&args.data)?;
    let mut tokens = Vec::new();
    for t in &texts {
        tokens.extend(tokenizer.encode(t)?);
    }
    if tokens.len() < 2 {
        bail!(
            "the data has {} token(s); at least 2 are needed",
            tokens.len()
        );
    }
    if args.seq_len == 0 || args.batch_size == 0 {
        bail!("--seq-len and --batch-size must be at least 1");
    }
    let bytes: usize = texts.iter().map(String::len).sum();
    with_backend!(device, |B, dev| {
        let (model, _config) = BitLlama::<B>::open(&args.model, &dev)?;
        if tokenizer.vocab_size() > model.vocab_size() {
            bail!(
                "the tokenizer has {} tokens but the model only {}: wrong tokenizer?",
                tokenizer.vocab_size(),
                model.vocab_size()
            );
        }
        let started = Instant::now();
        let ce = train::evaluate(&model, &tokens, args.seq_len, args.batch_size, 0);
        let predicted = tokens.len() - 1;
        println!(
            "{} tokens ({} bytes), windows of {}: cross-entropy {ce:.4} nats/token, perplexity {:.2}, {:.3} bits/byte ({:.1} s)",
            format_count(tokens.len()),
            format_count(bytes),
            args.seq_len,
            ce.exp(),
            ce * predicted as f64 / (bytes as f64 * std::f64::consts::LN_2),
            started.elapsed().as_secs_f64()
        );
        Ok(Exit::Ok)
    })
}
