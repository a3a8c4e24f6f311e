//! `eval`: cross-entropy and perplexity of a model on text files.

use std::path::PathBuf;
use std::time::Instant;

use crate::{data, train, with_backend};
use anyhow::{bail, Result};
use bit_ttt_burn::hybrid::HybridDecoder;
use bit_ttt_burn::BitLlama;
use clap::Args;

use super::{find_tokenizer, format_count, report_split, DeviceArgs, Exit, SplitArgs};

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
    /// Windows per batch (a split model, --n-gpu-layers, reads one window at a time).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    split: SplitArgs,
}

/// `eval`: cross-entropy and perplexity of a model on text files.
pub fn run(args: EvalArgs) -> Result<Exit> {
    let device = args.device.device.check()?;
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
    if args.seq_len == 0 || args.batch_size == 0 {
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
        let started;
        let ce = match split {
            Some(layers) => {
                let hybrid =
                    HybridDecoder::<B>::open(&args.model, layers, args.split.context, &dev, 0)?;
                report_split(&hybrid.plan(), hybrid.cpu().blocks().len(), device);
                check_vocab(hybrid.vocab_size())?;
                started = Instant::now();
                evaluate_split(&hybrid, &tokens, args.seq_len)?
            }
            None => {
                let (model, _config) = BitLlama::<B>::open(&args.model, &dev)?;
                check_vocab(model.vocab_size())?;
                started = Instant::now();
                train::evaluate(&model, &tokens, args.seq_len, args.batch_size, 0)
            }
        };
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

/// [`train::evaluate`]'s windows (every `seq_len` tokens, each from no context, the last one
/// shorter) scored by a split model one window at a time: its GPU blocks read a window at
/// once, its CPU blocks with the fused prefill.
fn evaluate_split<B: bit_ttt_burn::TernaryBackend>(
    hybrid: &HybridDecoder<B>,
    tokens: &[u32],
    seq_len: usize,
) -> Result<f64> {
    let vocab = hybrid.vocab_size();
    let (mut total, mut count) = (0.0f64, 0usize);
    for start in (0..tokens.len() - 1).step_by(seq_len) {
        let n = seq_len.min(tokens.len() - 1 - start);
        let logits = hybrid.read_all(&tokens[start..start + n], &mut hybrid.new_state())?;
        for (row, &target) in logits
            .chunks_exact(vocab)
            .zip(&tokens[start + 1..=start + n])
        {
            // -log softmax(row)[target], in f64.
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            total += max + sum.ln() - row[target as usize] as f64;
            count += 1;
        }
    }
    Ok(total / count as f64)
}
