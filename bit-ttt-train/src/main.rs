//! `bit-ttt-train`: the command line of bit-ttt.

mod commands;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use commands::{
    bench::BenchArgs, demo::DemoArgs, eval::EvalArgs, export::ExportArgs, generate::GenerateArgs,
    tokenizer::TokenizerArgs, train::TrainArgs,
};

/// Train, evaluate and run ternary (BitNet b1.58) language models with Test-Time-Training
/// mixers. Start with `bit-ttt-train demo`.
#[derive(Parser, Debug)]
#[command(name = "bit-ttt-train", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job: tokenizer, training of a small ternary TTT model on the bundled Moby Dick,
    /// evaluation against unigram and bigram baselines, a generated sample and a loss plot.
    Demo(DemoArgs),
    /// Train a byte-level BPE tokenizer on text files and write tokenizer.json.
    Tokenizer(TokenizerArgs),
    /// Train a model on text files (writes checkpoints, metrics.csv, loss.png and the model).
    Train(Box<TrainArgs>),
    /// Cross-entropy and perplexity of a model on text files.
    Eval(EvalArgs),
    /// Generate text from a prompt (on ndarray with the fused CPU decoder).
    Generate(GenerateArgs),
    /// Write the packed inference file: ternary weights 2 bits each, memory-mapped at load.
    Export(ExportArgs),
    /// Measure CPU decode (fused and through Burn ops) and prefill of a packed random-weight
    /// model against the machine's read bandwidth.
    Bench(BenchArgs),
    /// Print the compiled-in backends and versions.
    Info,
}

fn main() -> ExitCode {
    // Parsed in two steps to keep the matches: `train --resume` needs to know which flags
    // were typed, as opposed to defaulted.
    let matches = Cli::command().get_matches();
    let cli =
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    let sub_matches = matches.subcommand().map(|(_, m)| m);
    let result = match cli.command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Tokenizer(args) => commands::tokenizer::run(args),
        Command::Train(args) => commands::train::run(*args, sub_matches),
        Command::Eval(args) => commands::eval::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Info => {
            commands::info::run();
            Ok(commands::Exit::Ok)
        }
    };
    match result {
        Ok(commands::Exit::Ok) => ExitCode::SUCCESS,
        Ok(commands::Exit::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
