//! Loader fuzzing: every file the engine reads, mutated many ways, must give a typed error or
//! a model (state, tokenizer, …) that then works, never a panic, an abort or a hang.
//!
//! Each [`Target`] starts from small valid files written by the engine itself, applies one to
//! three random mutations per case (bit flips, truncation, overwritten bytes, a safetensors
//! length prefix or a JSON number replaced by an extreme value such as a huge shape, NaN or
//! infinity written over float data, cut or duplicated chunks), loads the result the way the
//! command line does, and, where loading succeeds, uses what it loaded once (a forward pass, a
//! decode step, an encode and decode, a training step). Panics are caught and counted with the case number,
//! which reproduces the case with the same seed. `cargo test` runs a bounded number of cases
//! per target (`tests/fuzz.rs`); `cargo run --release -p bit-ttt-train --example fuzz_loaders
//! -- --cases 1000000` is the long run.

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt_burn::model::files::{CONFIG_FILE, WEIGHTS_FILE};
use bit_ttt_burn::{BitLlama, BitLlamaConfig, BitTttError, MixerKind};
use burn::backend::{Autodiff, NdArray};

use crate::data::Split;
use crate::rng::SplitMix64;
use crate::tokenizer::Tokenizer;
use crate::train::{self, ProgressMode, TrainJob, TrainSettings};
use crate::TrainError;

type B = NdArray;

/// A loader under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `config.json` of a model directory (loaded with its valid weights).
    Config,
    /// `model.safetensors` of a model directory (loaded with its valid config).
    Model,
    /// A packed model file (`*.packed.safetensors`, memory-mapped), then the fused decoder.
    Packed,
    /// A `.soul` state file, restored into the fused decoder and the Burn model.
    Soul,
    /// A `tokenizer.json`.
    Tokenizer,
    /// A run's checkpoints (`latest`, `trainer_state.json`, the `.mpk` records, the model
    /// directory), resumed for one training step.
    Checkpoint,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 6] = [
        Target::Config,
        Target::Model,
        Target::Packed,
        Target::Soul,
        Target::Tokenizer,
        Target::Checkpoint,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Config => "config",
            Target::Model => "model",
            Target::Packed => "packed",
            Target::Soul => "soul",
            Target::Tokenizer => "tokenizer",
            Target::Checkpoint => "checkpoint",
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown fuzz target {s:?}: expected config, model, packed, soul or tokenizer"
                )
            })
    }
}

/// What a run of one target found.
#[derive(Debug, Clone)]
pub struct FuzzReport {
    /// The loader.
    pub target: Target,
    /// Mutated inputs tried.
    pub cases: u64,
    /// Inputs that loaded (and then worked).
    pub accepted: u64,
    /// Inputs refused with a typed error.
    pub rejected: u64,
    /// Panics: `(case number, message)`, the first 20.
    pub panics: Vec<(u64, String)>,
    /// Number of panics in all.
    pub panic_count: u64,
    /// The slowest case (a hang would show here, as a run that does not end).
    pub slowest_case: Duration,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl std::fmt::Display for FuzzReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<9} {:>9} cases: {:>9} accepted, {:>9} typed errors, {} panics; slowest case {:.1} ms; {:.1} s ({:.0} cases/s)",
            self.target.name(),
            self.cases,
            self.accepted,
            self.rejected,
            self.panic_count,
            self.slowest_case.as_secs_f64() * 1e3,
            self.elapsed.as_secs_f64(),
            self.cases as f64 / self.elapsed.as_secs_f64().max(1e-9)
        )
    }
}

/// The shape of the models fuzzed: small enough for thousands of loads a second, with two
/// blocks and a TTT mini-batch of 2, so a state crosses mini-batch boundaries.
fn fuzz_config(mixer: MixerKind) -> BitLlamaConfig {
    BitLlamaConfig::new(16, 8, 2, 2, 8)
        .with_mini_batch_size(2)
        .with_mixer(mixer)
        .with_ternary_head(true)
}

const MIXERS: [MixerKind; 3] = [
    MixerKind::TttLinear,
    MixerKind::TttMlp,
    MixerKind::Attention,
];

/// A model, its fused decoder, and the `.soul` files each wrote after reading 5 tokens.
type SoulSeed = (BitLlama<B>, CpuDecoder, Vec<u8>, Vec<u8>);

/// Valid files of one target to mutate, and what loading needs besides.
enum Seeds {
    /// Per mixer: the bytes of `config.json` and of `model.safetensors`.
    ModelDirs(Vec<(Vec<u8>, Vec<u8>)>),
    /// Per mixer: a packed file.
    Packed(Vec<Vec<u8>>),
    /// Per mixer: the model, its fused decoder and a `.soul` file of each after 5 tokens.
    Souls(Vec<SoulSeed>),
    /// A tokenizer file.
    Tokenizer(Vec<u8>),
    /// A run directory after two steps with a checkpoint at each: every file (path relative to
    /// the run directory, bytes), and the job that made it.
    Run {
        files: Vec<(PathBuf, Vec<u8>)>,
        settings: TrainSettings,
        split: Split,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::io(path, e)
}

fn seeds(target: Target, dir: &Path) -> Result<Seeds, TrainError> {
    let device = Default::default();
    let read = |p: &Path| fs::read(p).map_err(io(p));
    Ok(match target {
        Target::Config | Target::Model => {
            let mut dirs = Vec::new();
            for mixer in MIXERS {
                let config = fuzz_config(mixer);
                let model_dir = dir.join(format!("seed-{}", mixer.name()));
                config.init::<B>(&device).save(&config, &model_dir)?;
                dirs.push((
                    read(&model_dir.join(CONFIG_FILE))?,
                    read(&model_dir.join(WEIGHTS_FILE))?,
                ));
            }
            Seeds::ModelDirs(dirs)
        }
        Target::Packed => {
            let mut files = Vec::new();
            for mixer in MIXERS {
                let config = fuzz_config(mixer);
                let path = dir.join(format!("seed-{}.packed.safetensors", mixer.name()));
                config.init::<B>(&device).save_packed(&config, &path)?;
                files.push(read(&path)?);
            }
            Seeds::Packed(files)
        }
        Target::Soul => {
            let mut souls = Vec::new();
            for mixer in MIXERS {
                let config = fuzz_config(mixer);
                let model = config.init::<B>(&device).into_packed()?;
                let decoder = CpuDecoder::new(&model, 1)?;
                let mut fused = decoder.new_state();
                decoder.read(&[1, 2, 3, 4, 5], &mut fused)?;
                let fused_path = dir.join(format!("seed-{}-fused.soul", mixer.name()));
                decoder.save_state(&fused, &fused_path)?;
                let mut state = model.new_state();
                model.read(&[1, 2, 3, 4, 5], &mut state)?;
                let burn_path = dir.join(format!("seed-{}-burn.soul", mixer.name()));
                state.save(&burn_path)?;
                souls.push((model, decoder, read(&fused_path)?, read(&burn_path)?));
            }
            Seeds::Souls(souls)
        }
        Target::Checkpoint => {
            let run_dir = dir.join("seed-run");
            let settings = checkpoint_settings();
            // A fixed stream of 300 tokens of the fuzz vocabulary (16).
            let mut rng = SplitMix64::new(5);
            let tokens: Vec<u32> = (0..300).map(|_| rng.below(16) as u32).collect();
            let split = Split {
                train: tokens[..240].to_vec(),
                valid: tokens[240..].to_vec(),
            };
            train::train::<Autodiff<B>>(
                checkpoint_job(&run_dir, &settings, &split, false),
                &device,
            )?;
            let mut files = Vec::new();
            collect_files(&run_dir, &run_dir, &mut files)?;
            Seeds::Run {
                files,
                settings,
                split,
            }
        }
        Target::Tokenizer => {
            let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little \
                or no money in my purse, and nothing particular to interest me on shore, I thought I \
                would sail about a little and see the watery part of the world. 鯨 whale.\n";
            let tokenizer = Tokenizer::train(&[text.repeat(20)], 300)?;
            let path = dir.join("seed-tokenizer.json");
            tokenizer.save(&path)?;
            Seeds::Tokenizer(read(&path)?)
        }
    })
}

/// The checkpoint target's training: 2 steps of 2 × 8 tokens, a checkpoint after each, of 4
/// steps in all (so a resume trains one more).
fn checkpoint_settings() -> TrainSettings {
    TrainSettings {
        seq_len: 8,
        batch_size: 2,
        steps: 4,
        warmup_steps: 1,
        eval_every: 1,
        eval_batches: 1,
        checkpoint_every: 1,
        keep_checkpoints: 2,
        ..TrainSettings::default()
    }
}

fn checkpoint_job<'a>(
    run_dir: &'a Path,
    settings: &TrainSettings,
    split: &'a Split,
    resume: bool,
) -> TrainJob<'a> {
    TrainJob {
        run_dir,
        model: fuzz_config(MixerKind::TttLinear),
        settings: settings.clone(),
        data: split,
        resume,
        extend: false,
        // The seed run stops after 2 steps; a resume trains step 3 on what it loaded.
        stop_at: Some(if resume { 3 } else { 2 }),
        stop_flag: None,
        progress: ProgressMode::Quiet,
        references: Vec::new(),
        threads: 1,
    }
}

/// Every file under `dir`, with its path relative to `root`.
fn collect_files(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<(), TrainError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_files(root, &path, files)?;
        } else {
            let bytes = fs::read(&path).map_err(io(&path))?;
            let relative = path.strip_prefix(root).expect("under root").to_path_buf();
            files.push((relative, bytes));
        }
    }
    Ok(())
}

/// Whether a file is safetensors (a length prefix and a JSON header) or JSON.
#[derive(Debug, Clone, Copy)]
pub enum Format {
    /// An 8-byte little-endian header length, a JSON header, then raw tensor data.
    Safetensors,
    /// JSON text.
    Json,
    /// Other binary data (MessagePack records, plain text like `latest`).
    Binary,
}

/// Values that break parsers and allocators when they replace a number.
const EXTREME_NUMBERS: [&str; 12] = [
    "0",
    "1",
    "-1",
    "3",
    "65535",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999999",
    "1e308",
    "-0.0",
    "0.5",
    "NaN",
];

/// One to three random mutations of `bytes`.
pub fn mutate(bytes: &[u8], format: Format, rng: &mut SplitMix64) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..1 + rng.below(3) {
        mutate_once(&mut out, format, rng);
    }
    out
}

fn mutate_once(out: &mut Vec<u8>, format: Format, rng: &mut SplitMix64) {
    if out.is_empty() {
        out.push(rng.next_u64() as u8);
        return;
    }
    let len = out.len();
    match rng.below(8) {
        // Bit flips.
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
        }
        // Truncation.
        1 => out.truncate(rng.below(len)),
        // Bytes overwritten with boundary values.
        2 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(len);
                out[i] = [0x00, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][rng.below(7)];
            }
        }
        // A length field: safetensors' header length, or a JSON number.
        3 | 4 => match format {
            Format::Safetensors if rng.below(3) == 0 && len >= 8 => {
                let header = u64::from_le_bytes(out[..8].try_into().expect("8 bytes"));
                let value = match rng.below(5) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => header.wrapping_add(1 + rng.below(16) as u64),
                    3 => header.wrapping_sub(1 + rng.below(16) as u64),
                    _ => rng.next_u64(),
                };
                out[..8].copy_from_slice(&value.to_le_bytes());
            }
            Format::Binary => {
                // A 4-byte field somewhere set to an extreme length.
                if len >= 4 {
                    let i = rng.below(len - 3);
                    let value = [0u32, u32::MAX, 1 << 31, 0x7fff_ffff][rng.below(4)];
                    out[i..i + 4].copy_from_slice(&value.to_be_bytes());
                }
            }
            _ => replace_number(out, format, rng),
        },
        // NaN or infinity over float data (4-byte aligned, anywhere past the header).
        5 => {
            let start = header_end(out, format);
            if start + 4 <= len {
                let i = start + rng.below((len - start) / 4) * 4;
                let value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX][rng.below(4)];
                out[i..i + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
        // A chunk cut out.
        6 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            out.drain(i..i + n);
        }
        // A chunk repeated.
        _ => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let chunk: Vec<u8> = out[i..i + n].to_vec();
            let at = rng.below(len + 1);
            out.splice(at..at, chunk);
        }
    }
}

/// Where float data may start: after a safetensors header, anywhere in JSON.
fn header_end(bytes: &[u8], format: Format) -> usize {
    match format {
        Format::Json | Format::Binary => 0,
        Format::Safetensors => bytes
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .and_then(|n| usize::try_from(n).ok())
            .map_or(0, |n| n.saturating_add(8).min(bytes.len())),
    }
}

/// Replaces one run of ASCII digits in the JSON part (a shape, an offset, a config field) by
/// an extreme value.
fn replace_number(out: &mut Vec<u8>, format: Format, rng: &mut SplitMix64) {
    let (start, end) = match format {
        Format::Json | Format::Binary => (0, out.len()),
        Format::Safetensors => (8.min(out.len()), header_end(out, format)),
    };
    let runs: Vec<(usize, usize)> = {
        let mut runs = Vec::new();
        let mut i = start;
        while i < end {
            if out[i].is_ascii_digit() {
                let j = (i..end).find(|&j| !out[j].is_ascii_digit()).unwrap_or(end);
                runs.push((i, j));
                i = j;
            } else {
                i += 1;
            }
        }
        runs
    };
    if runs.is_empty() {
        return;
    }
    let (i, j) = runs[rng.below(runs.len())];
    let value = EXTREME_NUMBERS[rng.below(EXTREME_NUMBERS.len())].as_bytes();
    out.splice(i..j, value.iter().copied());
    // A safetensors header that changed length keeps its prefix consistent half the time,
    // so the parser gets past the prefix to the header.
    if let Format::Safetensors = format {
        if rng.below(2) == 0 && out.len() >= 8 {
            let header = u64::from_le_bytes(out[..8].try_into().expect("8 bytes"));
            let grown = header as i128 + value.len() as i128 - (j - i) as i128;
            if let Ok(grown) = u64::try_from(grown) {
                out[..8].copy_from_slice(&grown.to_le_bytes());
            }
        }
    }
}

thread_local! {
    /// The message of the last panic on this thread, kept by [`quiet_panics`]'s hook.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Name of the thread the cases run in: its panics are recorded, not printed.
const FUZZ_THREAD: &str = "bit-ttt-fuzz";

fn quiet_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(FUZZ_THREAD) {
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{message}{location}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `cases` mutated inputs of `target`, case `i` drawn from `seed` and `i`, with scratch
/// files under `dir`.
///
/// # Errors
/// Only for the harness itself: the valid seed files cannot be made or scratch files written.
pub fn run(target: Target, cases: u64, seed: u64, dir: &Path) -> Result<FuzzReport, TrainError> {
    quiet_panics();
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name(FUZZ_THREAD.into())
        .spawn(move || run_cases(target, cases, seed, &dir))
        .map_err(|e| TrainError::InvalidSetting(format!("cannot start the fuzz thread: {e}")))?
        .join()
        .unwrap_or_else(|_| {
            Err(TrainError::InvalidSetting(
                "the fuzz harness itself panicked".into(),
            ))
        })
}

fn run_cases(target: Target, cases: u64, seed: u64, dir: &Path) -> Result<FuzzReport, TrainError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let seeds = seeds(target, dir)?;
    let started = Instant::now();
    let mut report = FuzzReport {
        target,
        cases: 0,
        accepted: 0,
        rejected: 0,
        panics: Vec::new(),
        panic_count: 0,
        slowest_case: Duration::ZERO,
        elapsed: Duration::ZERO,
    };
    let case_dir = dir.join("case");
    fs::create_dir_all(&case_dir).map_err(io(&case_dir))?;
    for case in 0..cases {
        let mut rng = SplitMix64::new(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            one_case(&seeds, target, &case_dir, &mut rng)
        }));
        report.slowest_case = report.slowest_case.max(t.elapsed());
        report.cases += 1;
        match outcome {
            Ok(Ok(Ok(()))) => report.accepted += 1,
            Ok(Ok(Err(_))) => report.rejected += 1,
            Ok(Err(harness)) => return Err(harness),
            Err(_) => {
                report.panic_count += 1;
                let message = LAST_PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_default();
                if report.panics.len() < 20 {
                    report.panics.push((case, message));
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Writes a file the loader then reads; an error here is the harness's, not the loader's.
fn write(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    fs::write(path, bytes).map_err(io(path))
}

/// One case: `Ok(Ok(()))` loaded and worked, `Ok(Err(_))` a typed error of the loader or of
/// the first use of what it loaded, `Err(_)` a failure of the harness.
fn one_case(
    seeds: &Seeds,
    target: Target,
    dir: &Path,
    rng: &mut SplitMix64,
) -> Result<Result<(), String>, TrainError> {
    let device = Default::default();
    let loaded = |r: Result<(), BitTttError>| r.map_err(|e| e.to_string());
    Ok(match seeds {
        Seeds::ModelDirs(dirs) => {
            let (config, weights) = &dirs[rng.below(dirs.len())];
            let (config, weights) = match target {
                Target::Config => (mutate(config, Format::Json, rng), weights.clone()),
                _ => (config.clone(), mutate(weights, Format::Safetensors, rng)),
            };
            write(&dir.join(CONFIG_FILE), &config)?;
            write(&dir.join(WEIGHTS_FILE), &weights)?;
            loaded((|| {
                let (model, _) = BitLlama::<B>::load(dir, &device)?;
                model.read(&[1, 2, 3], &mut model.new_state())?;
                Ok(())
            })())
        }
        Seeds::Packed(files) => {
            let bytes = mutate(&files[rng.below(files.len())], Format::Safetensors, rng);
            // A new name each case: a file is never rewritten while a map of it lives.
            let path: PathBuf = dir.join(format!("case-{}.packed.safetensors", rng.next_u64()));
            write(&path, &bytes)?;
            let result = loaded((|| {
                let (model, _) = BitLlama::<B>::load_packed(&path, &device)?;
                let decoder = CpuDecoder::new(&model, 1)?;
                decoder.read(&[1, 2, 3], &mut decoder.new_state())?;
                Ok(())
            })());
            let _ = fs::remove_file(&path);
            result
        }
        Seeds::Souls(souls) => {
            let (model, decoder, fused, burn) = &souls[rng.below(souls.len())];
            let fused_file = rng.below(2) == 0;
            let bytes = mutate(
                if fused_file { fused } else { burn },
                Format::Safetensors,
                rng,
            );
            let path = dir.join("case.soul");
            write(&path, &bytes)?;
            loaded((|| {
                if fused_file {
                    let mut state = decoder.load_state(&path)?;
                    decoder.step(1, &mut state)?;
                } else {
                    let mut state = model.load_state(&path)?;
                    model.read(&[1], &mut state)?;
                }
                Ok(())
            })())
        }
        Seeds::Run {
            files,
            settings,
            split,
        } => {
            let run_dir = dir.join("run");
            if run_dir.exists() {
                fs::remove_dir_all(&run_dir).map_err(io(&run_dir))?;
            }
            // The files a resume reads: `latest` and the checkpoint it names.
            let candidates: Vec<usize> = (0..files.len())
                .filter(|&i| {
                    let name = files[i].0.to_string_lossy();
                    name == "checkpoints/latest" || name.starts_with("checkpoints/step-000002/")
                })
                .collect();
            let target = candidates[rng.below(candidates.len())];
            for (i, (relative, bytes)) in files.iter().enumerate() {
                let path = run_dir.join(relative);
                let parent = path.parent().expect("a file in a directory");
                fs::create_dir_all(parent).map_err(io(parent))?;
                if i == target {
                    let name = relative.to_string_lossy();
                    let format = if name.ends_with(".json") {
                        Format::Json
                    } else if name.ends_with(".safetensors") {
                        Format::Safetensors
                    } else {
                        Format::Binary
                    };
                    write(&path, &mutate(bytes, format, rng))?;
                } else {
                    write(&path, bytes)?;
                }
            }
            train::train::<Autodiff<B>>(checkpoint_job(&run_dir, settings, split, true), &device)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Seeds::Tokenizer(file) => {
            let bytes = mutate(file, Format::Json, rng);
            let path = dir.join("tokenizer.json");
            write(&path, &bytes)?;
            (|| -> Result<(), TrainError> {
                let tokenizer = Tokenizer::load(&path)?;
                let ids = tokenizer.encode("Call me Ishmael. 鯨 whale, 1851.")?;
                tokenizer.decode(&ids)?;
                tokenizer.decode(&[0, 1, 299, 300, u32::MAX])?;
                Ok(())
            })()
            .map_err(|e| e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_the_input_and_are_reproducible() {
        let bytes: Vec<u8> = (0..200u8).collect();
        let mut changed = 0;
        for case in 0..200 {
            let a = mutate(&bytes, Format::Json, &mut SplitMix64::new(case));
            let b = mutate(&bytes, Format::Json, &mut SplitMix64::new(case));
            assert_eq!(a, b, "case {case}");
            changed += usize::from(a != bytes);
        }
        // A bit flipped twice or a repeated chunk that equals its neighbours can give the
        // input back; almost every case must differ.
        assert!(changed > 190, "{changed} of 200 changed");
    }

    #[test]
    fn a_number_in_json_becomes_an_extreme_value() {
        let json = br#"{"d_model": 64}"#;
        let mut seen = std::collections::BTreeSet::new();
        for case in 0..200 {
            let mut out = json.to_vec();
            replace_number(&mut out, Format::Json, &mut SplitMix64::new(case));
            seen.insert(String::from_utf8(out).unwrap());
        }
        assert!(
            seen.contains(r#"{"d_model": 18446744073709551615}"#),
            "{seen:?}"
        );
        assert!(seen.contains(r#"{"d_model": NaN}"#), "{seen:?}");
        assert_eq!(seen.len(), EXTREME_NUMBERS.len());
    }
}
