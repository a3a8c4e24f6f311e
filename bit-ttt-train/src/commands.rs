//! The subcommands.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bit_ttt_burn::model::files::TOKENIZER_FILE;
use bit_ttt_burn::{
    BitLlama, BitLlamaConfig, GenerationConfig, MixerKind, SamplingConfig, TernaryBackend,
};
use bit_ttt_train::baselines::{self, Baselines};
use bit_ttt_train::data::{self, Split};
use bit_ttt_train::device::DeviceKind;
use bit_ttt_train::metrics::{METRICS_FILE, PLOT_FILE};
use bit_ttt_train::tokenizer::{TextStream, Tokenizer};
use bit_ttt_train::train::{self, Outcome, ProgressMode, TrainJob, TrainSettings};
use bit_ttt_train::{checkpoint, with_backend, TrainError};
use burn::backend::Autodiff;
use serde::{Deserialize, Serialize};

use crate::{BenchArgs, DemoArgs, EvalArgs, ExportArgs, GenerateArgs, TokenizerArgs, TrainArgs};

/// Vocabulary of the demo's tokenizer.
pub const DEMO_VOCAB: usize = 2048;
/// Training steps of the demo.
pub const DEMO_STEPS: usize = 600;

/// The bundled corpus, compiled in so the demo runs from any directory, offline.
const MOBY_DICK: &str = include_str!("../../data/moby_dick.txt");

/// How a command ended, besides errors.
pub enum Exit {
    /// Done.
    Ok,
    /// Stopped by Ctrl-C after saving a checkpoint (exit code 130).
    Interrupted,
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

/// A flag Ctrl-C sets: training stops after the current step and saves a checkpoint. A second
/// Ctrl-C quits at once.
fn ctrl_c_flag() -> Arc<AtomicBool> {
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

/// What a run directory remembers of how it was started (for `--resume`).
#[derive(Debug, Serialize, Deserialize)]
struct RunInfo {
    data: Vec<PathBuf>,
    valid_fraction: f64,
}

const RUN_FILE: &str = "run.json";

fn find_tokenizer(explicit: Option<&Path>, model_dir: &Path) -> Result<Tokenizer> {
    if let Some(path) = explicit {
        return Ok(Tokenizer::load(path)?);
    }
    // A model directory, or a checkpoint inside a run directory (run/checkpoints/step-N).
    let candidates = [
        Some(model_dir.join(TOKENIZER_FILE)),
        model_dir
            .parent()
            .and_then(Path::parent)
            .map(|run| run.join(TOKENIZER_FILE)),
    ];
    for path in candidates.into_iter().flatten() {
        if path.is_file() {
            return Ok(Tokenizer::load(&path)?);
        }
    }
    bail!(
        "no {TOKENIZER_FILE} in {} (or its run directory); pass --tokenizer FILE",
        model_dir.display()
    )
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

/// `info`: prints the compiled-in backends and versions.
pub fn info() {
    println!("bit-ttt-train {}", env!("CARGO_PKG_VERSION"));
    println!("burn 0.21.0");
    let backends: Vec<&str> = [DeviceKind::Ndarray, DeviceKind::Wgpu, DeviceKind::Cuda]
        .into_iter()
        .filter(|d| d.compiled_in())
        .map(DeviceKind::name)
        .collect();
    println!("backends: {}", backends.join(", "));
}

/// `tokenizer`: trains a byte-level BPE on text files and writes `tokenizer.json`.
pub fn tokenizer(args: TokenizerArgs) -> Result<Exit> {
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

fn settings_of(args: &TrainArgs) -> TrainSettings {
    TrainSettings {
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        steps: args.steps,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        beta1: args.beta1,
        beta2: args.beta2,
        weight_decay: args.weight_decay,
        grad_clip: (args.grad_clip > 0.0).then_some(args.grad_clip),
        eval_every: args.eval_every,
        eval_batches: args.eval_batches,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints,
        seed: args.seed,
    }
}

/// A model preset by name, or an error listing the names.
fn preset(name: &str, vocab: usize) -> Result<BitLlamaConfig> {
    BitLlamaConfig::preset(name, vocab).with_context(|| {
        format!("unknown preset {name:?}: expected tiny, 125m, 350m, 760m, 1.3b or 1b")
    })
}

fn model_config(args: &TrainArgs, vocab: usize) -> Result<BitLlamaConfig> {
    let mut config = match &args.config {
        Some(path) => BitLlamaConfig::load_json(path)?,
        None => preset(&args.preset, vocab)?,
    };
    config.vocab_size = vocab;
    config.mixer = args.mixer;
    config.ternary = args.ternary;
    if let Some(v) = args.d_model {
        config.d_model = v;
    }
    if let Some(v) = args.n_layers {
        config.n_layers = v;
    }
    if let Some(v) = args.n_heads {
        config.n_heads = v;
    }
    if let Some(v) = args.d_ffn {
        config.d_ffn = v;
    }
    if let Some(v) = args.mini_batch_size {
        config.mini_batch_size = v;
    }
    config
        .validate()
        .map_err(|m| TrainError::InvalidSetting(format!("model: {m}")))?;
    Ok(config)
}

/// `train`: trains (or resumes) a model in a run directory.
pub fn train(args: TrainArgs) -> Result<Exit> {
    let device = args.device.device.check()?;
    let run_dir = args.out.clone();
    let tokenizer_path = run_dir.join(TOKENIZER_FILE);
    let (data_paths, valid_fraction, tokenizer) = if args.resume {
        // Fail early, before reading data, when there is nothing to resume.
        checkpoint::latest(&run_dir)?;
        let info: RunInfo = serde_json::from_slice(
            &std::fs::read(run_dir.join(RUN_FILE))
                .with_context(|| format!("reading {}", run_dir.join(RUN_FILE).display()))?,
        )
        .with_context(|| format!("parsing {}", run_dir.join(RUN_FILE).display()))?;
        let paths = if args.data.is_empty() {
            info.data
        } else {
            args.data.clone()
        };
        (
            paths,
            info.valid_fraction,
            Tokenizer::load(&tokenizer_path)?,
        )
    } else {
        // Check the settings before the (slower) tokenizer training.
        settings_of(&args).validate()?;
        model_config(&args, bit_ttt_train::tokenizer::MIN_VOCAB_SIZE)?;
        if checkpoint::latest(&run_dir).is_ok() {
            bail!(
                "{} already holds a training run; continue it with --resume, or choose another --out",
                run_dir.display()
            );
        }
        let texts = data::read_texts(&args.data)?;
        let tokenizer = match &args.tokenizer {
            Some(path) => Tokenizer::load(path)?,
            None => {
                eprintln!(
                    "training a byte-level BPE tokenizer of {} tokens on {} file(s)",
                    args.vocab_size,
                    args.data.len()
                );
                Tokenizer::train(&texts, args.vocab_size)?
            }
        };
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        tokenizer.save(&tokenizer_path)?;
        let info = RunInfo {
            data: args.data.clone(),
            valid_fraction: args.valid_fraction,
        };
        bit_ttt_burn::files::write_atomic(
            &run_dir.join(RUN_FILE),
            &serde_json::to_vec_pretty(&info)?,
        )?;
        (args.data.clone(), args.valid_fraction, tokenizer)
    };
    let texts = data::read_texts(&data_paths)?;
    let split = data::tokenize_and_split(&tokenizer, &texts, valid_fraction)?;
    let (config, settings) = if args.resume {
        // The run's own model and settings, from its latest checkpoint.
        let state = checkpoint::load_state(&checkpoint::latest(&run_dir)?)?;
        eprintln!(
            "resuming {} at step {} of {}",
            run_dir.display(),
            state.step,
            state.settings.steps
        );
        (state.model, state.settings)
    } else {
        (
            model_config(&args, tokenizer.vocab_size())?,
            settings_of(&args),
        )
    };
    if !args.resume {
        settings.validate()?;
        data::check_length(&split, settings.seq_len)?;
    }
    eprintln!(
        "data: {} train / {} validation tokens; model: {} {} (d_model {}, {} layers), {}",
        format_count(split.train.len()),
        format_count(split.valid.len()),
        if config.ternary { "ternary" } else { "f32" },
        config.mixer.name(),
        config.d_model,
        config.n_layers,
        device.name()
    );
    let job = TrainJob {
        run_dir: &run_dir,
        model: config,
        settings,
        data: &split,
        resume: args.resume,
        stop_at: args.stop_at,
        stop_flag: Some(ctrl_c_flag()),
        progress: progress_mode(args.progress),
        references: vec![],
    };
    with_backend!(device, |B, dev| run_training::<B>(job, &dev))
}

fn run_training<B: TernaryBackend>(job: TrainJob<'_>, device: &B::Device) -> Result<Exit> {
    let run_dir = job.run_dir.to_path_buf();
    let report = train::train::<Autodiff<B>>(job, device)?;
    let state = &report.state;
    let last_train = state.metrics.last().map_or(f64::NAN, |m| m.train_loss);
    match report.outcome {
        Outcome::Finished => {
            let val = report.final_val_loss.unwrap_or(f64::NAN);
            println!(
                "done: {} steps, {} tokens in {:.0} s; last train loss {last_train:.4}, validation {val:.4} nats/token (perplexity {:.2})",
                state.step,
                format_count(state.tokens_seen as usize),
                state.elapsed_s,
                val.exp()
            );
            println!(
                "model: {} ({}, config.json, {TOKENIZER_FILE}); metrics: {}; plot: {}",
                run_dir.display(),
                bit_ttt_burn::model::files::WEIGHTS_FILE,
                run_dir.join(METRICS_FILE).display(),
                run_dir.join(PLOT_FILE).display()
            );
            Ok(Exit::Ok)
        }
        Outcome::Stopped | Outcome::Interrupted => {
            println!(
                "stopped at step {} of {}; checkpoint {}; continue with --resume --out {}",
                state.step,
                state.settings.steps,
                report
                    .last_checkpoint
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string()),
                run_dir.display()
            );
            Ok(if report.outcome == Outcome::Interrupted {
                Exit::Interrupted
            } else {
                Exit::Ok
            })
        }
    }
}

/// `eval`: cross-entropy and perplexity of a model on text files.
pub fn eval(args: EvalArgs) -> Result<Exit> {
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
        let (model, _config) = BitLlama::<B>::load(&args.model, &dev)?;
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

fn sampling(temperature: f64, top_k: usize, top_p: f64, seed: u64) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_k: (top_k > 0).then_some(top_k),
        top_p: (top_p < 1.0).then_some(top_p),
        seed,
    }
}

/// A way to generate, `generate(prompt, config, on_token)`: a model's own
/// [`BitLlama::generate`] or the fused CPU decoder's.
type Generate<'a> = dyn FnMut(
        &[u32],
        &GenerationConfig,
        &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Vec<u32>, bit_ttt_burn::BitTttError>
    + 'a;

/// Generates after `prompt` with `generate`, printing the text as it comes; returns the whole
/// text.
fn generate_text(
    generate: &mut Generate<'_>,
    tokenizer: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingConfig,
    indent: &str,
) -> Result<String> {
    let ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let config = GenerationConfig {
        max_new_tokens: max_tokens,
        sampling,
        stop_tokens: tokenizer.end_of_text().into_iter().collect(),
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
    writeln!(out)?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    Ok(text)
}

/// `generate`: streams a continuation of a prompt.
pub fn generate(args: GenerateArgs) -> Result<Exit> {
    let device = args.device.device.check()?;
    let tokenizer = find_tokenizer(args.tokenizer.as_deref(), &args.model)?;
    let sampling = sampling(args.temperature, args.top_k, args.top_p, args.seed);
    sampling.validate()?;
    let write = |generate: &mut Generate<'_>| {
        generate_text(
            generate,
            &tokenizer,
            &args.prompt,
            args.max_tokens,
            sampling.clone(),
            "",
        )
        .map(|_| Exit::Ok)
    };
    #[cfg(feature = "ndarray")]
    if device == DeviceKind::Ndarray {
        // On the CPU, decode with the fused decoder (the same logits, without Burn's per-op
        // overhead; see bit_ttt_burn::cpu_decode).
        use bit_ttt_burn::cpu_decode::CpuDecoder;
        let (model, _) =
            BitLlama::<burn::backend::NdArray>::load(&args.model, &Default::default())?;
        let decoder = CpuDecoder::new(&model, 0)?;
        drop(model);
        return write(&mut |ids, config, on_token| {
            decoder.generate(ids, config, &mut decoder.new_state(), on_token)
        });
    }
    with_backend!(device, |B, dev| {
        let (model, _) = BitLlama::<B>::load(&args.model, &dev)?;
        write(&mut |ids, config, on_token| {
            model.generate(ids, config, &mut model.new_state(), on_token)
        })
    })
}

/// File name of the packed inference file `export` writes by default.
pub const PACKED_FILE: &str = "model.packed.safetensors";

/// `export`: writes the packed inference file of a model directory and checks it by reloading.
pub fn export(args: ExportArgs) -> Result<Exit> {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};
    let device = Default::default();
    let (model, config) = BitLlama::<NdArray>::load(&args.model, &device)?;
    let out = args.out.unwrap_or_else(|| args.model.join(PACKED_FILE));
    // Never write the packed file over one of the model's own files.
    let model_files = [
        bit_ttt_burn::model::files::WEIGHTS_FILE,
        bit_ttt_burn::model::files::CONFIG_FILE,
        bit_ttt_burn::model::files::TOKENIZER_FILE,
    ];
    for name in model_files {
        let existing = args.model.join(name);
        if existing.exists()
            && std::fs::canonicalize(&existing).ok() == std::fs::canonicalize(&out).ok()
        {
            bail!(
                "--out {} is the model's own {name}; choose another file",
                out.display()
            );
        }
    }
    let started = Instant::now();
    model.save_packed(&config, &out)?;
    // Load it back and compare the logits on a few tokens.
    let (packed, _) = BitLlama::<NdArray>::load_packed(&out, &device)?;
    let ids: Vec<i64> = (0..16)
        .map(|i| (i * 37 % config.vocab_size) as i64)
        .collect();
    let logits = |m: &BitLlama<NdArray>| -> Result<Vec<f32>> {
        let input =
            Tensor::<NdArray, 2, Int>::from_data(TensorData::new(ids.clone(), [1, 16]), &device);
        m.forward(input)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let diff = logits(&model)?
        .iter()
        .zip(&logits(&packed)?)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
    println!(
        "wrote {} ({} bytes; model.safetensors {} bytes) in {:.1} s; reloaded by memory map, max logit difference {diff:.2e}",
        out.display(),
        format_count(size(&out)),
        format_count(size(&args.model.join(bit_ttt_burn::model::files::WEIGHTS_FILE))),
        started.elapsed().as_secs_f64()
    );
    Ok(Exit::Ok)
}

/// `bench`: see [`bit_ttt_train::bench`].
pub fn bench(args: BenchArgs) -> Result<Exit> {
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

/// The demo's model: 4 blocks of width 128.
fn demo_model(vocab: usize, mixer: MixerKind) -> BitLlamaConfig {
    BitLlamaConfig::new(vocab, 128, 4, 4, 384)
        .with_mixer(mixer)
        .with_mini_batch_size(16)
}

fn demo_settings(steps: usize) -> TrainSettings {
    TrainSettings {
        seq_len: 64,
        batch_size: 16,
        steps,
        lr: 4e-3,
        min_lr: 4e-4,
        warmup_steps: 60,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.01,
        grad_clip: Some(1.0),
        eval_every: 100,
        eval_batches: 8,
        checkpoint_every: 200,
        keep_checkpoints: 2,
        seed: 42,
    }
}

/// `demo`: the main job (tokenizer, baselines, training, evaluation, sample, plot).
pub fn demo(args: DemoArgs) -> Result<Exit> {
    let total = Instant::now();
    let device = args.device.device.check()?;
    let run_dir = args.out.clone();
    let texts = if args.data.is_empty() {
        vec![MOBY_DICK.to_string()]
    } else {
        data::read_texts(&args.data)?
    };
    let corpus = if args.data.is_empty() {
        "Moby Dick (bundled, data/moby_dick.txt)".to_string()
    } else {
        format!("{} file(s)", args.data.len())
    };
    println!(
        "bit-ttt demo: a ternary (BitNet b1.58) {} language model on {corpus}, {} backend",
        args.mixer.name(),
        device.name()
    );
    if !args.resume && run_dir.exists() {
        // A fresh demo replaces the previous one.
        let old = checkpoint::checkpoint_root(&run_dir);
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;

    // 1. Tokenizer.
    let started = Instant::now();
    let tokenizer_path = run_dir.join(TOKENIZER_FILE);
    let tokenizer = if args.resume {
        Tokenizer::load(&tokenizer_path)?
    } else {
        let t = Tokenizer::train(&texts, args.vocab_size)?;
        t.save(&tokenizer_path)?;
        t
    };
    let split = data::tokenize_and_split(&tokenizer, &texts, 0.1)?;
    let bytes: usize = texts.iter().map(String::len).sum();
    let n_tokens = split.train.len() + split.valid.len();
    println!(
        "[1/5] tokenizer: byte-level BPE, vocabulary {} ({:.1} s) -> {}",
        tokenizer.vocab_size(),
        started.elapsed().as_secs_f64(),
        tokenizer_path.display()
    );
    println!(
        "      {} bytes -> {} tokens ({:.2} bytes/token); train split {} tokens, validation split {} (the last 10%)",
        format_count(bytes),
        format_count(n_tokens),
        bytes as f64 / n_tokens as f64,
        format_count(split.train.len()),
        format_count(split.valid.len())
    );

    // 2. Baselines.
    let started = Instant::now();
    let base = baselines::compute(&split.train, &split.valid, tokenizer.vocab_size());
    println!(
        "[2/5] count baselines from the train split ({:.1} s): unigram {:.3}, interpolated bigram {:.3} nats/token (λ = {:.2})",
        started.elapsed().as_secs_f64(),
        base.unigram,
        base.bigram,
        base.lambda
    );

    // 3. Training.
    let config = demo_model(tokenizer.vocab_size(), args.mixer);
    let settings = demo_settings(args.steps);
    println!(
        "[3/5] training: {} blocks, d_model {}, {} heads, d_ffn {}, ternary projections; {} steps of {} x {} tokens, AdamW lr {} warm-up {} + cosine",
        config.n_layers,
        config.d_model,
        config.n_heads,
        config.d_ffn,
        settings.steps,
        settings.batch_size,
        settings.seq_len,
        settings.lr,
        settings.warmup_steps
    );
    let job = TrainJob {
        run_dir: &run_dir,
        model: config,
        settings,
        data: &split,
        resume: args.resume,
        stop_at: None,
        stop_flag: Some(ctrl_c_flag()),
        progress: progress_mode(None),
        references: vec![
            ("unigram".into(), base.unigram),
            ("interpolated bigram".into(), base.bigram),
        ],
    };
    with_backend!(device, |B, dev| demo_rest::<B>(
        job, &dev, &tokenizer, &base, &args, total
    ))
}

fn demo_rest<B: TernaryBackend>(
    job: TrainJob<'_>,
    device: &B::Device,
    tokenizer: &Tokenizer,
    base: &Baselines,
    args: &DemoArgs,
    total: Instant,
) -> Result<Exit> {
    let run_dir = job.run_dir.to_path_buf();
    let split: &Split = job.data;
    let report = train::train::<Autodiff<B>>(job, device)?;
    let state = &report.state;
    if report.outcome != Outcome::Finished {
        println!(
            "stopped at step {}; checkpoint saved; continue with: bit-ttt-train demo --resume --out {}",
            state.step,
            run_dir.display()
        );
        return Ok(Exit::Interrupted);
    }
    let n_params: usize = {
        use burn::module::Module;
        report.model.num_params()
    };
    let throughput = state.metrics.last().map_or(0.0, |m| m.tokens_per_s);
    println!(
        "      {} parameters; {} steps, {} training tokens ({:.1} passes over the train split) in {:.0} s, {:.0} tokens/s",
        format_count(n_params),
        state.step,
        format_count(state.tokens_seen as usize),
        state.tokens_seen as f64 / split.train.len() as f64,
        state.elapsed_s,
        throughput
    );

    // 4. Evaluation.
    let model_ce = report.final_val_loss.expect("a finished run is evaluated");
    println!(
        "[4/5] validation cross-entropy ({} tokens predicted, windows of {} tokens):",
        format_count(split.valid.len() - 1),
        state.settings.seq_len
    );
    println!("      {:<44} {:>12} {:>11}", "", "nats/token", "perplexity");
    let rows = [
        ("unigram, add-one".to_string(), base.unigram),
        (
            format!("interpolated bigram (λ = {:.2})", base.lambda),
            base.bigram,
        ),
        (
            format!("BitLlama, ternary {}", report.config.mixer.name()),
            model_ce,
        ),
    ];
    for (name, ce) in &rows {
        println!("      {name:<44} {ce:>12.3} {:>11.1}", ce.exp());
    }
    if model_ce < base.bigram {
        println!(
            "      the model beats the bigram baseline by {:.3} nats/token",
            base.bigram - model_ce
        );
    } else {
        println!(
            "      the model does NOT beat the bigram baseline ({:.3} nats/token behind)",
            model_ce - base.bigram
        );
    }

    // 5. Sample.
    let sampling = SamplingConfig {
        seed: 0,
        ..SamplingConfig::default()
    };
    println!(
        "[5/5] sample: {} tokens after {:?} (temperature {}, top-k {}, top-p {}, seed {}):",
        args.sample_tokens,
        args.prompt,
        sampling.temperature,
        sampling.top_k.unwrap_or(0),
        sampling.top_p.unwrap_or(1.0),
        sampling.seed
    );
    println!();
    let model = &report.model;
    generate_text(
        &mut |ids, config, on_token| model.generate(ids, config, &mut model.new_state(), on_token),
        tokenizer,
        &args.prompt,
        args.sample_tokens,
        sampling,
        "      ",
    )?;
    println!();
    println!("outputs in {}:", run_dir.display());
    println!("      loss plot  {}", run_dir.join(PLOT_FILE).display());
    println!("      metrics    {}", run_dir.join(METRICS_FILE).display());
    println!(
        "      model      {} (config.json, model.safetensors, tokenizer.json); checkpoints in {}",
        run_dir.display(),
        checkpoint::checkpoint_root(&run_dir).display()
    );
    println!(
        "      try: bit-ttt-train generate --model {} --prompt \"The whale\"",
        run_dir.display()
    );
    println!("total time {:.0} s", total.elapsed().as_secs_f64());
    Ok(Exit::Ok)
}
