//! `bench`: see [`bit_ttt_train::bench`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use bit_ttt_burn::MixerKind;
use clap::Args;

use super::{parse_mixer, preset, Exit};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model preset: tiny, 125m, 350m, 760m, 1.3b, 1b (fully ternary: d_model 2048, 24 layers,
    /// FFN 5632, ternary head).
    #[arg(long, default_value = "1b")]
    preset: String,
    /// Mixer: ttt_linear, ttt_mlp or attention.
    #[arg(long, default_value = "ttt_linear", value_parser = parse_mixer)]
    mixer: MixerKind,
    /// Vocabulary size of the random model.
    #[arg(long, default_value_t = 32_000)]
    vocab_size: usize,
    /// Kernel thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Tokens decoded one at a time per measurement.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Length of the prefill.
    #[arg(long, default_value_t = 128)]
    prefill_tokens: usize,
    /// Size of the read-bandwidth test array, in MiB.
    #[arg(long, default_value_t = 512)]
    bandwidth_mib: usize,
    /// Directory for the packed model file (default: a temporary directory, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measure this packed model file (`export`'s output, or `--dir`'s file of an earlier run)
    /// instead of a random model; not combined with --preset, --mixer, --vocab-size or --dir.
    #[arg(long, conflicts_with_all = ["preset", "mixer", "vocab_size", "dir"])]
    packed: Option<PathBuf>,
}

/// `bench`: see [`bit_ttt_train::bench`].
pub fn run(args: BenchArgs) -> Result<Exit> {
    use bit_ttt_train::bench::{self, BenchModel, BenchSettings};
    let (model, name) = match &args.packed {
        Some(path) => (BenchModel::Packed(path.clone()), path.display().to_string()),
        None => (
            BenchModel::Random(preset(&args.preset, args.vocab_size)?.with_mixer(args.mixer)),
            format!("random {}", args.preset),
        ),
    };
    let temp;
    let dir = match (&args.dir, &args.packed) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        // A packed file is measured where it lies: nothing is written, no directory needed.
        (None, Some(_)) => PathBuf::new(),
        (None, None) => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let settings = BenchSettings {
        model,
        name: name.clone(),
        threads: args.threads.clone(),
        decode_tokens: args.decode_tokens,
        prefill_tokens: args.prefill_tokens,
        bandwidth_bytes: args.bandwidth_mib << 20,
    };
    println!(
        "bench: {name}, ndarray backend, kernel {:?}",
        bit_ttt_burn::kernels::cpu::kernel_choice().resolve().ok(),
    );
    let results = bench::run(&settings, &dir, |line| println!("  {line}"))?;
    println!();
    println!(
        "| threads | decode tok/s (fused) | share of read bandwidth | with state | decode tok/s (Burn ops) | prefill tok/s ({} tokens) | MB/token | state MB/token | read GB/s | decode GB/s |",
        args.prefill_tokens
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.threads,
            r.decode_tokens_per_s,
            r.bandwidth_share,
            r.bandwidth_share_with_state,
            r.burn_decode_tokens_per_s,
            r.prefill_tokens_per_s,
            r.bytes_per_token as f64 / 1e6,
            r.state_bytes_per_token / 1e6,
            r.read_gbytes_per_s,
            r.decode_tokens_per_s * r.bytes_per_token as f64 / 1e9,
        );
    }
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(Exit::Ok)
}
