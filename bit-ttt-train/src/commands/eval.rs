//! `eval`: cross-entropy and perplexity of a model on text files.

use std::path::PathBuf;
use std::time::Instant;

use crate::evaluation::{self, Evaluation, POSITION_EDGES};
use crate::{data, with_backend};
use anyhow::{bail, Result};
use bit_ttt_burn::hybrid::HybridDecoder;
use bit_ttt_burn::BitLlama;
use clap::Args;

use super::{find_tokenizer, format_count, report_split, DeviceArgs, Exit, SplitArgs, ThreadsArg};

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
    /// Tokens per evaluation window (each window starts without context); several,
    /// comma-separated, evaluate at each (e.g. 64,256,1024: how the model uses more context).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    seq_len: Vec<usize>,
    /// Windows per batch (a split model, --n-gpu-layers, reads one window at a time).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    threads: ThreadsArg,
    #[command(flatten)]
    split: SplitArgs,
}

/// `eval`: cross-entropy and perplexity of a model on text files.
pub fn run(args: EvalArgs) -> Result<Exit> {
    let device = args.device.device.check()?;
    let threads = args.threads.resolve(device)?;
    let split = args.split.layers(device)?;
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
    if args.seq_len.contains(&0) || args.batch_size == 0 {
        bail!("--seq-len and --batch-size must be at least 1");
    }
    let bytes: usize = texts.iter().map(String::len).sum();
    with_backend!(device, |B, dev| {
        let check_vocab = |model_vocab: usize| {
            if tokenizer.vocab_size() > model_vocab {
                bail!(
                    "the tokenizer has {} tokens but the model only {model_vocab}: wrong tokenizer?",
                    tokenizer.vocab_size(),
                );
            }
            Ok(())
        };
        // Either engine scores every window length in turn.
        let mut score: Box<dyn FnMut(usize) -> Result<Evaluation>> = match split {
            Some(layers) => {
                let hybrid =
                    HybridDecoder::<B>::open(&args.model, layers, args.split.context, &dev, 0)?;
                report_split(&hybrid.plan(), hybrid.cpu().blocks().len(), device);
                check_vocab(hybrid.vocab_size())?;
                Box::new(move |seq_len| evaluate_split(&hybrid, &tokens, seq_len))
            }
            None => {
                let (model, _config) = BitLlama::<B>::open(&args.model, &dev)?;
                check_vocab(model.vocab_size())?;
                let (tokens, batch_size) = (&tokens, args.batch_size);
                Box::new(move |seq_len| {
                    Ok(evaluation::evaluate_positions(
                        &model, tokens, seq_len, batch_size, 0, threads,
                    ))
                })
            }
        };
        for &seq_len in &args.seq_len {
            let started = Instant::now();
            let result = score(seq_len)?;
            let ce = result.mean();
            println!(
                "{} tokens ({} bytes), windows of {seq_len}: cross-entropy {ce:.4} nats/token, perplexity {:.2}, {:.3} bits/byte ({:.1} s)",
                format_count(result.tokens() + 1),
                format_count(bytes),
                ce.exp(),
                ce * result.tokens() as f64 / (bytes as f64 * std::f64::consts::LN_2),
                started.elapsed().as_secs_f64()
            );
            println!("  by position in the window: {}", format_buckets(&result));
        }
        Ok(Exit::Ok)
    })
}

/// `0–16: 4.812 | 16–64: 4.701 | …`, nats/token by position bucket ([`POSITION_EDGES`]).
fn format_buckets(result: &Evaluation) -> String {
    result
        .buckets(&POSITION_EDGES)
        .iter()
        .map(|b| format!("{}: {:.3}", b.label(), b.mean))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// [`evaluation::evaluate`]'s windows (every `seq_len` tokens, each from no context, the last one
/// shorter) scored by a split model one window at a time: its GPU blocks read a window at
/// once, its CPU blocks with the fused prefill.
fn evaluate_split<B: bit_ttt_burn::TernaryBackend>(
    hybrid: &HybridDecoder<B>,
    tokens: &[u32],
    seq_len: usize,
) -> Result<Evaluation> {
    let vocab = hybrid.vocab_size();
    let mut result = Evaluation::default();
    for start in (0..tokens.len() - 1).step_by(seq_len) {
        let n = seq_len.min(tokens.len() - 1 - start);
        let logits = hybrid.read_all(&tokens[start..start + n], &mut hybrid.new_state())?;
        for (position, (row, &target)) in logits
            .chunks_exact(vocab)
            .zip(&tokens[start + 1..=start + n])
            .enumerate()
        {
            // -log softmax(row)[target], in f64.
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            result.add(position, max + sum.ln() - row[target as usize] as f64);
        }
    }
    Ok(result)
}
