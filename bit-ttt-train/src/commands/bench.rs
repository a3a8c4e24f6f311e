//! `bench`: see [`crate::bench`].

use std::path::PathBuf;

use crate::device::DeviceKind;
use crate::with_backend;
use anyhow::{bail, Context, Result};
use bit_ttt_burn::hybrid::GpuLayers;
use bit_ttt_burn::{BitLlamaConfig, MixerKind};
use clap::Args;

use super::{parse_bytes, parse_gpu_layers, parse_mixer, preset, DeviceArgs, Exit, GpuLayersArg};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model preset: tiny, 125m, 350m, 760m, 1.3b, 1b (fully ternary: d_model 2048, 24 layers,
    /// FFN 5632, ternary head), 7b (d_model 4096, 32 layers, FFN 11008), 70b (d_model 8192,
    /// 80 layers, FFN 28672, vocabulary 128,256) or bitnet-2b (microsoft/bitnet-b1.58-2B-4T's
    /// shape: d_model 2560, 30 layers, 20 heads on 5 key/value heads, FFN 6912, squared ReLU,
    /// sub-norms, f32 head, vocabulary 128,256). Random packed weights, drawn directly.
    #[arg(long, default_value = "1b")]
    preset: String,
    /// Mixer: ttt_linear, ttt_mlp or attention (default: ttt_linear; attention, the only one
    /// it has, for bitnet-2b).
    #[arg(long, value_parser = parse_mixer)]
    mixer: Option<MixerKind>,
    /// Vocabulary size of the random model (default 32,000; 128,256 for 70b and bitnet-2b).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Kernel thread counts to measure, comma-separated (default 1,2; with --n-gpu-layers one
    /// count, default all cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Tokens decoded one at a time per measurement.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Prefill lengths to measure, comma-separated (default 128): the fused prefill against
    /// the kernels alone running its products (and Burn's batched forward at the first length).
    #[arg(long = "prefill", alias = "prefill-tokens", value_delimiter = ',')]
    prefill: Vec<usize>,
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
    /// Measure the model split between --device (wgpu or cuda) and the CPU instead: the
    /// numbers of blocks on the GPU, comma-separated (`auto`: as many as fit --gpu-memory).
    /// Prints measured and predicted tokens/s per split. The random model is not written.
    #[arg(long, value_delimiter = ',', value_name = "N|auto,...", value_parser = parse_gpu_layers)]
    n_gpu_layers: Vec<GpuLayersArg>,
    /// Device memory for `--n-gpu-layers auto`, e.g. 8GiB.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    gpu_memory: Option<u64>,
    /// Context depths to decode at, comma-separated, e.g. 0,1024,16384 (up to 512 tokens, plus
    /// what keeps the rest whole TTT mini-batches, are read; the state is then stretched to
    /// the depth: a KV cache of that many rows, a TTT state at that position). With
    /// --n-gpu-layers: one number, the tokens of context a split keeps room for (default 4096).
    #[arg(long, value_delimiter = ',')]
    context: Vec<usize>,
    /// Also decode with the f32 head stored 8 bits a weight (a scale per vocabulary row), in
    /// rounds alternating with the f32 head's: its speed and how far its logits move.
    #[arg(long)]
    int8_head: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// A preset by name, with the benchmark's larger shapes (7b, 70b, bitnet-2b) besides the
/// trainable ones, and `mixer` if given.
fn bench_preset(
    name: &str,
    vocab: Option<usize>,
    mixer: Option<MixerKind>,
) -> Result<BitLlamaConfig> {
    let config = match name {
        "7b" => BitLlamaConfig::new(vocab.unwrap_or(32_000), 4096, 32, 32, 11008),
        "70b" => BitLlamaConfig::new(vocab.unwrap_or(128_256), 8192, 80, 64, 28672),
        "bitnet-2b" => BitLlamaConfig::bitnet_2b(vocab.unwrap_or(128_256)),
        _ => preset(name, vocab.unwrap_or(32_000))?,
    };
    let config = match mixer {
        Some(mixer) => config.with_mixer(mixer),
        None => config,
    };
    if let Err(problem) = config.validate() {
        bail!("--preset {name}: {problem}");
    }
    Ok(config)
}

/// `bench`: see [`crate::bench`].
pub fn run(args: BenchArgs) -> Result<Exit> {
    use crate::bench::{self, BenchModel, BenchSettings};
    if !args.n_gpu_layers.is_empty() {
        return run_split(args);
    }
    if args.device.device != DeviceKind::Ndarray || args.gpu_memory.is_some() {
        bail!("bench measures the CPU decoder; --device and --gpu-memory go with --n-gpu-layers");
    }
    let (model, name) = match &args.packed {
        Some(path) => (BenchModel::Packed(path.clone()), path.display().to_string()),
        None => (
            BenchModel::Random(bench_preset(&args.preset, args.vocab_size, args.mixer)?),
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
    let threads = if args.threads.is_empty() {
        vec![1, 2]
    } else {
        args.threads.clone()
    };
    let prefill = if args.prefill.is_empty() {
        vec![128]
    } else {
        args.prefill.clone()
    };
    let settings = BenchSettings {
        model,
        name: name.clone(),
        threads,
        decode_tokens: args.decode_tokens,
        prefill_tokens: prefill.clone(),
        contexts: args.context.clone(),
        bandwidth_bytes: args.bandwidth_mib << 20,
        int8_head: args.int8_head,
    };
    println!(
        "bench: {name}, ndarray backend, kernel {:?}",
        bit_ttt_burn::kernels::cpu::kernel_choice().resolve().ok(),
    );
    let results = bench::run(&settings, &dir, |line| println!("  {line}"))?;
    println!();
    println!(
        "| threads | decode tok/s (fused) | share of read bandwidth | with state | kernels alone tok/s | decode tok/s (Burn ops) | prefill tok/s (Burn, {} tokens) | MB/token | state MB/token | read GB/s | decode GB/s |",
        prefill[0]
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.threads,
            r.decode_tokens_per_s,
            r.bandwidth_share,
            r.bandwidth_share_with_state,
            r.kernel_decode_tokens_per_s,
            r.burn_decode_tokens_per_s,
            r.burn_prefill_tokens_per_s,
            r.bytes_per_token as f64 / 1e6,
            r.state_bytes_per_token / 1e6,
            r.read_gbytes_per_s,
            r.decode_tokens_per_s * r.bytes_per_token as f64 / 1e9,
        );
    }
    println!();
    println!("| threads | prefill tokens | fused prefill tok/s | kernels alone tok/s | share of the kernels' rate |");
    println!("|---|---|---|---|---|");
    for r in &results {
        for p in &r.prefill {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.2} |",
                r.threads, p.tokens, p.tokens_per_s, p.kernel_tokens_per_s, p.share_of_kernel
            );
        }
    }
    if results.iter().any(|r| r.int8_head.is_some()) {
        println!();
        println!("| threads | head | decode tok/s | share of read bandwidth | MB/token | logits vs f32 head |");
        println!("|---|---|---|---|---|---|");
        for r in &results {
            println!(
                "| {} | f32 | {:.1} | {:.2} | {:.1} | - |",
                r.threads,
                r.decode_tokens_per_s,
                r.bandwidth_share,
                r.bytes_per_token as f64 / 1e6
            );
            if let Some(h) = &r.int8_head {
                println!(
                    "| {} | int8 | {:.1} ({:.2}×) | {:.2} | {:.1} | {:.1e} of the largest |",
                    r.threads,
                    h.decode_tokens_per_s,
                    h.speedup,
                    h.bandwidth_share,
                    h.bytes_per_token as f64 / 1e6,
                    h.logit_diff
                );
            }
        }
    }
    if !args.context.is_empty() {
        println!();
        println!(
            "| threads | context | decode tok/s | time per token vs context {} |",
            args.context[0]
        );
        println!("|---|---|---|---|");
        for r in &results {
            for d in &r.depths {
                println!(
                    "| {} | {} | {:.1} | {:.2} |",
                    r.threads, d.context, d.tokens_per_s, d.time_ratio_to_first
                );
            }
        }
    }
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(Exit::Ok)
}

/// `bench --n-gpu-layers`: see [`crate::hybrid_bench`].
fn run_split(args: BenchArgs) -> Result<Exit> {
    use crate::hybrid_bench::{self, SplitBenchSettings, SplitModel};
    let device = args.device.device.check()?;
    if device == DeviceKind::Ndarray {
        bail!("--n-gpu-layers splits a model between a GPU and the CPU: add --device wgpu or --device cuda");
    }
    if args.dir.is_some() {
        bail!("--n-gpu-layers measures the random model in memory: --dir does not apply");
    }
    if !args.prefill.is_empty() {
        bail!("--n-gpu-layers measures decode: --prefill does not apply");
    }
    let splits = args
        .n_gpu_layers
        .iter()
        .map(|&arg| match (arg, args.gpu_memory) {
            (GpuLayersArg::Count(n), _) => Ok(GpuLayers::Count(n)),
            (GpuLayersArg::Auto, Some(budget_bytes)) => Ok(GpuLayers::Auto { budget_bytes }),
            (GpuLayersArg::Auto, None) => Ok(GpuLayers::Auto {
                budget_bytes: super::auto_budget(device)?,
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    let (model, name) = match &args.packed {
        Some(path) => (SplitModel::Packed(path.clone()), path.display().to_string()),
        None => (
            SplitModel::Random {
                config: bench_preset(&args.preset, args.vocab_size, args.mixer)?,
                seed: 0,
            },
            format!("random {}", args.preset),
        ),
    };
    let threads = match args.threads[..] {
        [] => 0,
        [n] => n,
        _ => bail!("--n-gpu-layers measures one thread count: give --threads one number"),
    };
    let context = match args.context[..] {
        [] => 4096,
        [n] => n,
        _ => bail!("--n-gpu-layers keeps room for one context: give --context one number"),
    };
    if args.gpu_memory.is_some() && !args.n_gpu_layers.contains(&GpuLayersArg::Auto) {
        bail!("--gpu-memory only applies with --n-gpu-layers auto");
    }
    let settings = SplitBenchSettings {
        model,
        name: name.clone(),
        splits,
        threads,
        decode_tokens: args.decode_tokens,
        context,
        bandwidth_bytes: args.bandwidth_mib << 20,
    };
    println!(
        "bench: {name} split between {} and the CPU ({} threads)",
        device.name(),
        if threads == 0 {
            "all".to_string()
        } else {
            threads.to_string()
        }
    );
    let results = with_backend!(device, |B, dev| {
        hybrid_bench::run::<B>(&settings, &dev, |line| println!("  {line}"))
    })?;
    println!();
    println!("| GPU blocks | head | GB/token GPU | GB/token CPU | tok/s measured | tok/s predicted | measured/predicted |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {}/{} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} |",
            r.n_gpu_layers,
            r.n_layers,
            if r.head_on_gpu { "GPU" } else { "CPU" },
            r.gpu_bytes_per_token as f64 / 1e9,
            r.cpu_bytes_per_token as f64 / 1e9,
            r.tokens_per_s,
            r.predicted_tokens_per_s,
            r.measured_over_predicted
        );
    }
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(Exit::Ok)
}
