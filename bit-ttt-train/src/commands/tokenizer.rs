//! `tokenizer`: trains a byte-level BPE on text files and writes `tokenizer.json`.

use std::path::PathBuf;
use std::time::Instant;

use crate::data;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use clap::Args;

use super::{format_count, Exit};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct TokenizerArgs {
    /// UTF-8 text files to learn merges from.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Vocabulary size (at least 257: the 256 bytes and <|endoftext|>).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Output file.
    #[arg(long, default_value = "tokenizer.json")]
    out: PathBuf,
}

/// Trains the tokenizer and reports its compression.
pub fn run(args: TokenizerArgs) -> Result<Exit> {
    let texts = data::read_texts(&args.data)?;
    let started = Instant::now();
    let tokenizer = Tokenizer::train(&texts, args.vocab_size)?;
    tokenizer.save(&args.out)?;
    let bytes: usize = texts.iter().map(String::len).sum();
    let tokens: usize = texts
        .iter()
        .map(|t| tokenizer.encode(t).map(|ids| ids.len()))
        .sum::<Result<usize, _>>()?;
    println!(
        "trained a byte-level BPE of {} tokens in {:.1} s: {} bytes -> {} tokens ({:.2} bytes/token)",
        tokenizer.vocab_size(),
        started.elapsed().as_secs_f64(),
        format_count(bytes),
        format_count(tokens),
        bytes as f64 / tokens.max(1) as f64
    );
    println!("wrote {}", args.out.display());
    Ok(Exit::Ok)
}
