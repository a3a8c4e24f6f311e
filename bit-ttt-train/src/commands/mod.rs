//! The command line: its subcommands, one file each (its clap arguments and its `run`), and
//! what they share: how a command ends, progress and Ctrl-C handling, finding a tokenizer,
//! sampling settings and streaming generated text.
//!
//! It is part of the library so that other front ends run the same code with the same
//! arguments: the binary calls [`main`], the Python module's `train()` calls [`parse`] and
//! [`execute`] with its own stop flag. Like a binary's code, it reports errors with `anyhow`
//! (with the typed [`TrainError`](crate::TrainError) inside where there is one).

pub mod bench;
pub mod bench_train;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod export;
pub mod generate;
pub mod group;
pub mod info;
pub mod study;
pub mod tokenizer;
pub mod train;

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::device::DeviceKind;
use crate::tokenizer::{TextStream, Tokenizer};
use crate::train::ProgressMode;
use anyhow::{bail, Context, Result};
use bit_ttt_burn::hybrid::{GpuLayers, HybridPlan};
use bit_ttt_burn::{BitLlamaConfig, GenerationConfig, MixerKind, SamplingConfig};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use bench::BenchArgs;
use bench_train::BenchTrainArgs;
use convert::ConvertArgs;
use demo::DemoArgs;
use eval::EvalArgs;
use export::ExportArgs;
use generate::GenerateArgs;
use study::StudyArgs;
use tokenizer::TokenizerArgs;
use train::TrainArgs;

/// Train, evaluate and run ternary (BitNet b1.58) language models with Test-Time-Training
/// mixers. Start with `bit-ttt-train demo`.
#[derive(Parser, Debug)]
#[command(name = "bit-ttt-train", version, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
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
    /// Convert a Hugging Face BitNet b1.58 checkpoint (BitNetForCausalLM) into a packed file.
    Convert(ConvertArgs),
    /// Measure CPU decode (fused and through Burn ops) and prefill of a packed random-weight
    /// model against the machine's read bandwidth.
    Bench(BenchArgs),
    /// Measure training throughput (tokens/s of forward, backward and AdamW) of the demo's
    /// model and 125m, ternary and f32, by thread count.
    BenchTrain(BenchTrainArgs),
    /// Attention, TTT-Linear and TTT-MLP, each f32 and ternary, trained with one token budget
    /// at matched parameter counts and compared (loss, loss by position, decode time by
    /// context): a table and plots.
    Study(StudyArgs),
    /// Print the compiled-in backends and versions.
    Info,
}

/// Parses a command line (`argv[0]` is the program's name) into the command and the matches
/// (which `train --resume` needs to tell typed flags from defaults).
///
/// # Errors
/// clap's error for a bad command line (and for `--help` and `--version`, whose text it
/// holds): `e.exit()` prints it as the binary does.
pub fn parse<I, T>(argv: I) -> Result<(Cli, clap::ArgMatches), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok((cli, matches))
}

/// The kinds of [`parse`]'s errors (to tell `--help` from a mistake).
pub use clap::error::ErrorKind as ClapErrorKind;

/// What stops training early (after the current step, with a checkpoint).
#[derive(Debug, Clone)]
pub enum StopOn {
    /// Ctrl-C (the process's SIGINT handler is taken over; a second Ctrl-C quits at once).
    CtrlC,
    /// This flag, set by the caller (e.g. from its own signal handling).
    Flag(Arc<AtomicBool>),
}

/// Runs a parsed command.
///
/// # Errors
/// The command's error, with its context.
pub fn execute(cli: Cli, matches: &clap::ArgMatches, stop: &StopOn) -> Result<Exit> {
    let sub_matches = matches.subcommand().map(|(_, m)| m);
    match cli.command {
        Command::Demo(args) => demo::run(args, stop),
        Command::Tokenizer(args) => tokenizer::run(args),
        Command::Train(args) => train::run(*args, sub_matches, stop),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => export::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::Study(args) => study::run(args),
        Command::Info => {
            info::run();
            Ok(Exit::Ok)
        }
    }
}

/// The binary's `main`: parses the process's arguments, runs the command, prints an error
/// as `error: …` and returns the exit code (1 for errors, 130 after Ctrl-C, 2 for a bad
/// command line).
pub fn main() -> std::process::ExitCode {
    let (cli, matches) = parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    match execute(cli, &matches, &StopOn::CtrlC) {
        Ok(Exit::Ok) => std::process::ExitCode::SUCCESS,
        Ok(Exit::Interrupted) => std::process::ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How a command ended, besides errors.
pub enum Exit {
    /// Done.
    Ok,
    /// Stopped by Ctrl-C after saving a checkpoint (exit code 130).
    Interrupted,
}

/// Which backend to run on.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Backend: ndarray (CPU), wgpu or cuda (the latter two need the cargo feature of that name).
    #[arg(long, value_enum, default_value = "ndarray")]
    pub device: DeviceKind,
}

/// CPU compute threads of training and evaluation: `--threads`.
#[derive(Args, Debug, Clone)]
pub struct ThreadsArg {
    /// Compute threads on the CPU (ndarray): each computes its share of a batch's rows (at most
    /// one thread per row), Burn's operations being single-threaded [default:
    /// RAYON_NUM_THREADS, else one per CPU; 1 on a GPU]. The trained weights depend on it
    /// through floating-point rounding only. A split model (--n-gpu-layers) ignores it.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ThreadsArg {
    /// The thread count for `device`.
    ///
    /// # Errors
    /// `--threads 0`.
    pub fn resolve(&self, device: DeviceKind) -> Result<usize> {
        match (self.threads, device) {
            (Some(0), _) => bail!("--threads must be at least 1"),
            (Some(n), _) => Ok(n),
            (None, DeviceKind::Ndarray) => Ok(crate::evaluation::default_threads()),
            (None, _) => Ok(1),
        }
    }
}

/// A model split between the GPU and the CPU: `--n-gpu-layers`, `--gpu-memory`, `--context`.
#[derive(Args, Debug, Clone)]
pub struct SplitArgs {
    /// Run the first N blocks on --device (wgpu or cuda) and the rest on the fused CPU decoder
    /// (AVX2, the packed file read in place): a count, or `auto` for as many as fit
    /// --gpu-memory. Without it the whole model runs on --device.
    #[arg(long, value_name = "N|auto", value_parser = parse_gpu_layers)]
    pub n_gpu_layers: Option<GpuLayersArg>,
    /// Device memory the model's GPU part may take with `--n-gpu-layers auto`: e.g. 8GiB,
    /// 512MiB, 2GB. Without it, auto plans with 90% of the memory the device reports free
    /// (CUDA; wgpu cannot report it, so give it there).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub gpu_memory: Option<u64>,
    /// Tokens of context the GPU part keeps room for (a KV cache grows with it; a TTT
    /// state does not).
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
}

/// `--n-gpu-layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuLayersArg {
    /// A count.
    Count(usize),
    /// As many as fit `--gpu-memory`.
    Auto,
}

fn parse_gpu_layers(s: &str) -> Result<GpuLayersArg, String> {
    if s == "auto" {
        return Ok(GpuLayersArg::Auto);
    }
    s.parse()
        .map(GpuLayersArg::Count)
        .map_err(|_| format!("{s:?} is neither a number of blocks nor `auto`"))
}

/// A byte count with an optional unit: `8GiB`, `512MiB`, `64KiB`, `2GB`, `1000MB`, `123`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 8GiB"))?;
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

impl SplitArgs {
    /// The split asked for, if any, checked against the device.
    ///
    /// # Errors
    /// A split on the CPU backend, or `auto` without `--gpu-memory` on a device that cannot
    /// report its free memory.
    pub fn layers(&self, device: DeviceKind) -> Result<Option<GpuLayers>> {
        let Some(arg) = self.n_gpu_layers else {
            if self.gpu_memory.is_some() {
                bail!("--gpu-memory only applies with --n-gpu-layers auto");
            }
            return Ok(None);
        };
        if device == DeviceKind::Ndarray {
            bail!("--n-gpu-layers splits a model between a GPU and the CPU: add --device wgpu or --device cuda");
        }
        Ok(Some(match (arg, self.gpu_memory) {
            (GpuLayersArg::Count(n), None) => GpuLayers::Count(n),
            (GpuLayersArg::Count(_), Some(_)) => {
                bail!("--gpu-memory only applies with --n-gpu-layers auto")
            }
            (GpuLayersArg::Auto, Some(budget_bytes)) => GpuLayers::Auto { budget_bytes },
            (GpuLayersArg::Auto, None) => GpuLayers::Auto {
                budget_bytes: auto_budget(device)?,
            },
        }))
    }
}

/// The budget of `--n-gpu-layers auto` without `--gpu-memory`: a share of the memory the
/// device reports free (said on stderr).
///
/// # Errors
/// A device that cannot report it (wgpu), or no device.
pub fn auto_budget(device: DeviceKind) -> Result<u64> {
    let free = device.free_memory()?;
    let budget = (free as f64 * crate::device::FREE_MEMORY_SHARE) as u64;
    eprintln!(
        "auto: {:.2} GB free on {}, planning with {:.2} GB",
        free as f64 / 1e9,
        device.name(),
        budget as f64 / 1e9
    );
    Ok(budget)
}

/// Says on stderr where a split model runs.
fn report_split(plan: &HybridPlan, n_layers: usize, device: DeviceKind) {
    eprintln!(
        "split: blocks 0..{} on {} ({:.1} MB), {} on the CPU; head on {}",
        plan.n_gpu_layers,
        device.name(),
        plan.gpu_bytes as f64 / 1e6,
        if plan.n_gpu_layers == n_layers {
            "none".to_string()
        } else {
            format!("blocks {}..{n_layers}", plan.n_gpu_layers)
        },
        if plan.head_on_gpu {
            device.name()
        } else {
            "the CPU"
        }
    );
}

/// `--mixer`'s parser.
pub fn parse_mixer(s: &str) -> Result<MixerKind, String> {
    s.parse()
}

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressArg {
    /// A progress bar.
    Bar,
    /// A line every 50 steps.
    Lines,
    /// Nothing.
    Quiet,
}

fn progress_mode(arg: Option<ProgressArg>) -> ProgressMode {
    match arg {
        Some(ProgressArg::Bar) => ProgressMode::Bar,
        Some(ProgressArg::Lines) => ProgressMode::Lines(50),
        Some(ProgressArg::Quiet) => ProgressMode::Quiet,
        None if std::io::stderr().is_terminal() => ProgressMode::Bar,
        None => ProgressMode::Lines(50),
    }
}

/// The flag that stops training after the current step (with a checkpoint): the caller's, or
/// one Ctrl-C sets (a second Ctrl-C quits at once).
fn stop_flag(stop: &StopOn) -> Arc<AtomicBool> {
    if let StopOn::Flag(flag) = stop {
        return flag.clone();
    }
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: quitting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)"
        );
    });
    if let Err(e) = installed {
        eprintln!("warning: cannot catch Ctrl-C ({e}); an interrupted run resumes from its last periodic checkpoint");
    }
    flag
}

/// The tokenizer: `explicit`, else the one next to `model` ([`Tokenizer::find`]).
fn find_tokenizer(explicit: Option<&Path>, model: &Path) -> Result<Tokenizer> {
    Tokenizer::find(explicit, model).map_err(|e| match e {
        // The command line names its flag.
        crate::TrainError::NoTokenizerFor(_) => {
            anyhow::anyhow!(
                "{}",
                e.to_string()
                    .replace("a tokenizer file", "--tokenizer FILE")
            )
        }
        e => e.into(),
    })
}

fn format_count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A model preset by name, or an error listing the names.
fn preset(name: &str, vocab: usize) -> Result<BitLlamaConfig> {
    BitLlamaConfig::preset(name, vocab).with_context(|| {
        format!("unknown preset {name:?}: expected tiny, 125m, 350m, 760m, 1.3b, 1b or bitnet-2b")
    })
}

fn sampling(temperature: f64, top_k: usize, top_p: f64, seed: u64) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_k: (top_k > 0).then_some(top_k),
        // 1 means no cut; anything else, NaN and values above 1 included, is checked.
        top_p: (top_p != 1.0).then_some(top_p),
        seed,
    }
}

/// A way to generate, `generate(prompt, config, on_token)`: a model's own
/// [`BitLlama::generate`](bit_ttt_burn::BitLlama::generate) or a
/// [`Decoder`](bit_ttt_burn::inference::Decoder)'s.
type Generate<'a> = dyn FnMut(
        &[u32],
        &GenerationConfig,
        &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Vec<u32>, bit_ttt_burn::BitTttError>
    + 'a;

/// The tokens a model's config names around a text: BOS goes before the prompt (imported
/// checkpoints were trained with it; ours have none), EOS ends a generation.
#[derive(Debug, Clone, Default)]
struct SpecialTokens {
    bos: Option<u32>,
    eos: Vec<u32>,
}

impl SpecialTokens {
    fn of(config: &bit_ttt_burn::BitLlamaConfig) -> Self {
        Self {
            bos: config.bos_token_id,
            eos: config.eos_token_ids.clone().unwrap_or_default(),
        }
    }
}

/// Generates after `prompt` with `generate`, printing the text as it comes; returns the whole
/// text.
fn generate_text(
    generate: &mut Generate<'_>,
    tokenizer: &Tokenizer,
    special: SpecialTokens,
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingConfig,
    indent: &str,
) -> Result<String> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(bos) = special.bos.filter(|&bos| ids.first() != Some(&bos)) {
        ids.insert(0, bos);
    }
    let config = GenerationConfig {
        max_new_tokens: max_tokens,
        sampling,
        stop_tokens: tokenizer
            .end_of_text()
            .into_iter()
            .chain(special.eos)
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    let mut text = prompt.to_string();
    write!(
        out,
        "{indent}{}",
        prompt.replace('\n', &format!("\n{indent}"))
    )?;
    let mut stream = TextStream::default();
    let mut failure = None;
    generate(&ids, &config, &mut |id| match stream.push(tokenizer, id) {
        Ok(piece) => {
            text.push_str(&piece);
            let _ = write!(out, "{}", piece.replace('\n', &format!("\n{indent}")));
            let _ = out.flush();
            ControlFlow::Continue(())
        }
        Err(e) => {
            failure = Some(e);
            ControlFlow::Break(())
        }
    })?;
    if let Some(e) = failure {
        writeln!(out)?;
        return Err(e.into());
    }
    // A last token that ended inside a character.
    let rest = stream.finish(tokenizer)?;
    text.push_str(&rest);
    writeln!(out, "{}", rest.replace('\n', &format!("\n{indent}")))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5 KiB"), Ok(1536));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("300kb"), Ok(300_000));
        assert_eq!(parse_bytes("123"), Ok(123));
        assert!(parse_bytes("8 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("-1GiB").is_err());
        assert!(parse_bytes("1e30TiB").is_err());
        assert!(parse_bytes("99999999999TiB")
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(parse_gpu_layers("auto"), Ok(GpuLayersArg::Auto));
        assert_eq!(parse_gpu_layers("12"), Ok(GpuLayersArg::Count(12)));
        assert!(parse_gpu_layers("-1").is_err());
    }
}
