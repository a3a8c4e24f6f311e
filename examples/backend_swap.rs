//! One model, one input, several backends: the same BitLlama (saved once, loaded on each
//! backend) reads the same tokens on `ndarray`, `wgpu` and, when built with the `cuda` feature,
//! `cuda`. Prints each backend's largest logit difference to `ndarray`, how often the next-token
//! argmax agrees, and the time of a forward pass; first for the training form (latent f32
//! weights, ternarized in every forward), then for the packed inference file, whose 2-bit
//! weights each backend makes resident once at load (`TernaryBackend::upload_ternary`).
//!
//! ```text
//! cargo run --release --example backend_swap                    # ndarray and wgpu
//! cargo run --release --example backend_swap --features cuda    # and cuda
//! cargo run --release --example backend_swap -- attention 256   # mixer, number of tokens
//! ```
//!
//! The code that differs between backends is one type parameter: `run_on::<Wgpu>(...)`.
//!
//! Why the ternary model's logits do not agree to the last bit: each backend sums in its own
//! order, so an activation that lands within a rounding error of an int8 boundary (`x * s` near
//! `k + 0.5`) can get the neighbouring code on one backend. That is one step of 1/127 of the
//! row's absmax in one input of one projection; it moves the logits by far more than float
//! rounding does, yet the argmax rarely changes. With `--ternary false` as the third argument
//! the model uses f32 projections and the difference is float rounding only.

use std::path::Path;
use std::time::Instant;

use bit_ttt::bit_ttt_burn::sampling::argmax;
use bit_ttt::bit_ttt_burn::{BitLlama, BitLlamaConfig, MixerKind, TernaryBackend};
use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::NdArray;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The packed inference file, beside the model directory's files.
const PACKED_FILE: &str = "model.packed.safetensors";

/// Which file a backend loads.
#[derive(Clone, Copy)]
enum Form {
    /// `model.safetensors`: latent f32 weights, ternarized in every forward.
    Training,
    /// The packed file: 2-bit weights, resident on the device from the load on.
    Packed,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The logits and the forward time of one backend.
struct Outcome {
    logits: Vec<f32>,
    /// Median wall time of a forward pass, in seconds.
    seconds: f64,
}

fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mixer: MixerKind = args.next().as_deref().unwrap_or("ttt_linear").parse()?;
    let n_tokens: usize = args.next().map_or(Ok(128), |n| n.parse())?;
    let ternary: bool = args.next().map_or(Ok(true), |t| t.parse())?;
    if n_tokens == 0 {
        return Err("the number of tokens must be at least 1".into());
    }

    // A small model with random weights, saved once so every backend loads the same numbers.
    let config = BitLlamaConfig::new(2048, 256, 4, 4, 688)
        .with_mixer(mixer)
        .with_ternary(ternary);
    let dir = std::env::temp_dir().join(format!("bit-ttt-backend-swap-{}", std::process::id()));
    let cpu = Default::default();
    <NdArray as Backend>::seed(&cpu, 0);
    let model = config.init::<NdArray>(&cpu);
    model.save(&config, &dir)?;
    model.save_packed(&config, &dir.join(PACKED_FILE))?;
    println!(
        "BitLlama: {} mixer, {} projections, d_model {}, {} layers, {} parameters; one sequence of {n_tokens} tokens",
        mixer.name(),
        if ternary { "ternary" } else { "f32" },
        config.d_model,
        config.n_layers,
        model.num_params()
    );
    let tokens: Vec<i64> = (0..n_tokens)
        .map(|i| ((i * 7919 + 13) % config.vocab_size) as i64)
        .collect();

    let result = [Form::Training, Form::Packed]
        .into_iter()
        .try_for_each(|form| compare_backends(&dir, form, &tokens, config.vocab_size));
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn compare_backends(dir: &Path, form: Form, tokens: &[i64], vocab: usize) -> Result<(), Error> {
    println!(
        "{}",
        match form {
            Form::Training => "training form (model.safetensors):",
            Form::Packed => "packed file (model.packed.safetensors, weights resident per backend):",
        }
    );
    let reference = run_on::<NdArray>(dir, form, tokens, &Default::default())?;
    let mut rows = vec![("ndarray", Ok(reference.seconds), 0.0, 1.0)];

    match wgpu_adapter_works() {
        true => {
            let got = run_on::<Wgpu>(dir, form, tokens, &WgpuDevice::default())?;
            let (diff, agree) = compare(&reference.logits, &got.logits, vocab);
            rows.push(("wgpu", Ok(got.seconds), diff, agree));
        }
        false => rows.push(("wgpu", Err("no adapter"), f32::NAN, f64::NAN)),
    }

    #[cfg(feature = "cuda")]
    {
        use burn::backend::cuda::{Cuda, CudaDevice};
        let got = run_on::<Cuda>(dir, form, tokens, &CudaDevice::default())?;
        let (diff, agree) = compare(&reference.logits, &got.logits, vocab);
        rows.push(("cuda", Ok(got.seconds), diff, agree));
    }
    #[cfg(not(feature = "cuda"))]
    rows.push((
        "cuda",
        Err("not built (--features cuda)"),
        f32::NAN,
        f64::NAN,
    ));

    println!(
        "{:<8} {:>14} {:>12} {:>24} {:>16}",
        "backend", "forward (ms)", "tokens/s", "max |logit - ndarray|", "argmax agrees"
    );
    for (name, seconds, diff, agree) in rows {
        match seconds {
            Ok(s) => println!(
                "{name:<8} {:>14.1} {:>12.0} {diff:>24.3e} {:>15.1}%",
                s * 1e3,
                tokens.len() as f64 / s,
                agree * 100.0
            ),
            Err(why) => println!("{name:<8} skipped: {why}"),
        }
    }
    Ok(())
}

/// Loads the saved model in `form` on backend `B`, runs one warm-up forward pass and three
/// timed ones.
fn run_on<B: TernaryBackend>(
    dir: &Path,
    form: Form,
    tokens: &[i64],
    device: &B::Device,
) -> Result<Outcome, Error> {
    let (model, _) = match form {
        Form::Training => BitLlama::<B>::load(dir, device)?,
        Form::Packed => BitLlama::<B>::load_packed(&dir.join(PACKED_FILE), device)?,
    };
    let forward = || {
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.to_vec(), [1, tokens.len()]),
            device,
        );
        // [1, seq, vocab]
        model.forward(input).into_data().convert::<f32>()
    };
    let logits = forward().into_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let started = Instant::now();
            // into_data waits for the device, so the time includes the whole computation.
            let _ = forward();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Ok(Outcome {
        logits,
        seconds: times[1],
    })
}

/// Largest absolute difference, and the share of positions whose argmax is the same.
fn compare(reference: &[f32], got: &[f32], vocab: usize) -> (f32, f64) {
    let diff = reference
        .iter()
        .zip(got)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let positions = reference.len() / vocab;
    let same = reference
        .chunks(vocab)
        .zip(got.chunks(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    (diff, same as f64 / positions as f64)
}

/// Whether wgpu finds an adapter: Burn panics on the first use of a device without one, so ask
/// in a thread and turn the panic into `false`.
fn wgpu_adapter_works() -> bool {
    std::thread::spawn(|| {
        let device = WgpuDevice::default();
        Tensor::<Wgpu, 1>::ones([1], &device).into_data();
    })
    .join()
    .is_ok()
}
