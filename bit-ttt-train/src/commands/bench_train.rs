//! `bench-train`: see [`crate::train_bench`].

use anyhow::{bail, Result};
use bit_ttt_burn::{BitLlamaConfig, MixerKind};
use clap::Args;

use super::demo::{demo_model, demo_settings, DEMO_VOCAB};
use super::{parse_mixer, Exit};
use crate::train_bench::{self, TrainBenchModel, TrainBenchResult, TrainBenchSettings};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Models, comma-separated: demo (the demo's model and batch, 4 × 256 tokens) and 125m
    /// (the 125m preset, 4 × 128 tokens); both with the demo's vocabulary of 2,048.
    #[arg(long, value_delimiter = ',', default_value = "demo,125m")]
    models: Vec<String>,
    /// Compute threads to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed training steps per measurement (after one untimed step; more while under 4 s).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Rounds: every configuration is measured once per round; the table shows the best.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Mixer of the models (default: ttt_linear).
    #[arg(long, value_parser = parse_mixer)]
    mixer: Option<MixerKind>,
}

/// A model by name.
fn bench_model(name: &str, mixer: MixerKind) -> Result<TrainBenchModel> {
    let (config, batch_size, seq_len) = match name {
        "demo" => {
            let settings = demo_settings(1);
            (
                demo_model(DEMO_VOCAB, mixer),
                settings.batch_size,
                settings.seq_len,
            )
        }
        "125m" => (
            BitLlamaConfig::ttt_125m(DEMO_VOCAB).with_mixer(mixer),
            4,
            128,
        ),
        other => bail!("unknown --models entry {other:?}: demo or 125m"),
    };
    Ok(TrainBenchModel {
        name: name.to_string(),
        config,
        batch_size,
        seq_len,
    })
}

/// `bench-train`: tokens/s of training steps by model, precision and thread count.
pub fn run(args: BenchTrainArgs) -> Result<Exit> {
    let mixer = args.mixer.unwrap_or(MixerKind::TttLinear);
    let models = args
        .models
        .iter()
        .map(|m| bench_model(m, mixer))
        .collect::<Result<Vec<_>>>()?;
    let settings = TrainBenchSettings {
        models,
        threads: args.threads.clone(),
        steps: args.steps,
        rounds: args.rounds,
    };
    eprintln!(
        "bench-train: {} mixer, ndarray backend, {} timed steps after one untimed, {} round(s), threads {:?}",
        mixer.name(),
        args.steps,
        args.rounds,
        args.threads
    );
    let results = train_bench::run(&settings, |r| {
        eprintln!(
            "  {} {} {} thread(s): {:.1} tokens/s",
            r.model,
            precision(r),
            r.threads,
            r.rounds.last().copied().unwrap_or(0.0)
        );
    })?;
    print_table(&results);
    for r in &results {
        println!("bench-train {}", serde_json::to_string(r)?);
    }
    Ok(Exit::Ok)
}

fn precision(r: &TrainBenchResult) -> &'static str {
    if r.ternary {
        "ternary"
    } else {
        "f32"
    }
}

/// The table: tokens/s, the speed-up over the fewest threads, and ternary over f32.
fn print_table(results: &[TrainBenchResult]) {
    println!("| model | parameters | weights | threads | batch | tokens/s | × fewest threads | ternary ÷ f32 |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in results {
        let base = results
            .iter()
            .filter(|o| o.model == r.model && o.ternary == r.ternary)
            .min_by_key(|o| o.threads)
            .map_or(f64::NAN, |o| o.tokens_per_s);
        let ratio = if r.ternary {
            results
                .iter()
                .find(|o| o.model == r.model && !o.ternary && o.threads == r.threads)
                .map_or("-".to_string(), |f| {
                    format!("{:.2}", r.tokens_per_s / f.tokens_per_s)
                })
        } else {
            "-".to_string()
        };
        println!(
            "| {} | {} | {} | {} | {} × {} | {:.1} | {:.2} | {} |",
            r.model,
            super::format_count(r.parameters),
            precision(r),
            r.threads,
            r.batch[0],
            r.batch[1],
            r.tokens_per_s,
            r.tokens_per_s / base,
            ratio
        );
    }
}
