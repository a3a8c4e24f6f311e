//! `bit-ttt-train`: the command line of bit-ttt.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use bit_ttt_burn::MixerKind;
use bit_ttt_train::device::DeviceKind;
use clap::{Args, Parser, Subcommand};

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

/// Which backend to run on.
#[derive(Args, Debug, Clone)]
struct DeviceArgs {
    /// Backend: ndarray (CPU), wgpu or cuda (the latter two need the cargo feature of that name).
    #[arg(long, value_enum, default_value = "ndarray")]
    device: DeviceKind,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Run directory (tokenizer, checkpoints, metrics, plot, final model).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Text to train on instead of the bundled Moby Dick.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Sequence mixer of the model.
    #[arg(long, default_value = "ttt_linear", value_parser = parse_mixer)]
    mixer: MixerKind,
    /// Tokenizer vocabulary size.
    #[arg(long, default_value_t = commands::DEMO_VOCAB)]
    vocab_size: usize,
    /// Training steps.
    #[arg(long, default_value_t = commands::DEMO_STEPS)]
    steps: usize,
    /// Continue an interrupted demo from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Tokens to generate after the prompt.
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// The sample's prompt.
    #[arg(long, default_value = "Call me Ishmael")]
    prompt: String,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Debug)]
struct TokenizerArgs {
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

#[derive(Args, Debug)]
struct TrainArgs {
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
    /// Continue from the latest checkpoint in --out (model, optimizer, schedule, data position, RNG).
    #[arg(long)]
    resume: bool,
    /// Stop after this step with a checkpoint, as Ctrl-C would (resume later with --resume).
    #[arg(long)]
    stop_at: Option<usize>,
    /// Seed of the weights and of the batch order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Progress: bar (default on a terminal), lines (default otherwise) or quiet.
    #[arg(long, value_enum)]
    progress: Option<commands::ProgressArg>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json), e.g. a run directory
    /// or one of its checkpoints.
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text files to score (all of their tokens).
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// tokenizer.json (default: the model directory's, or its run directory's).
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

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// tokenizer.json (default: the model directory's, or its run directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches p (1: all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Output file (default: MODEL/model.packed.safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchArgs {
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

fn parse_mixer(s: &str) -> Result<MixerKind, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => commands::demo(args),
        Command::Tokenizer(args) => commands::tokenizer(args),
        Command::Train(args) => commands::train(*args),
        Command::Eval(args) => commands::eval(args),
        Command::Generate(args) => commands::generate(args),
        Command::Export(args) => commands::export(args),
        Command::Bench(args) => commands::bench(args),
        Command::Info => {
            commands::info();
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
