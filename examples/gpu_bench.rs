//! The GPU half measured on one device, in one run: the CubeCL ternary kernels against the CPU
//! reference, their GEMV bandwidth beside a plain copy kernel's, and decode tokens/s of a model
//! with packed weights beside the same model's f32 Burn path. Prints one JSON line per result
//! and a table at the end; exits with status 1 when a kernel disagrees with the CPU.
//!
//! ```text
//! cargo run --release --example gpu_bench -- wgpu --quick        # small shapes (lavapipe)
//! cargo run --release --example gpu_bench --features cuda -- cuda # the full run (an NVIDIA GPU)
//! ```
//!
//! - **kernels**: int8 quantization and the packed product on the device against
//!   `bit_ttt_kernels::cpu` (codes, scales and outputs bit for bit) over odd shapes.
//! - **gemv**: one token times a packed matrix (the product kernel alone, activations prepared
//!   once), in GB/s of packed weights read, next to a copy kernel moving the same bytes
//!   (read + write) in the same run; the rounds alternate the two and the best of each counts.
//! - **decode**: tokens/s of `BitLlama::read` one token at a time, packed weights resident on
//!   the device against the training form (latent f32 weights ternarized on every step).
//!   The packed products launch 2 kernels each (prepare the activations, multiply); the line
//!   says how many per token.

use std::time::Instant;

use bit_ttt::bit_ttt_burn::kernels::cpu::{reference, QuantizedActivations};
use bit_ttt::bit_ttt_burn::kernels::cube::cubecl::prelude::{ComputeClient, Runtime};
use bit_ttt::bit_ttt_burn::kernels::cube::{self, CubeActivations, CubeTernary};
use bit_ttt::bit_ttt_burn::kernels::PackedTernary;
use bit_ttt::bit_ttt_burn::{BitLlama, BitLlamaConfig, Projection, TernaryBackend};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// How big the run is.
#[derive(Clone, Copy)]
struct Plan {
    quick: bool,
}

impl Plan {
    /// GEMV shapes, `(d_in, d_out)`: the packed matrix is `[d_out, d_in]`.
    fn gemv_shapes(self) -> Vec<(usize, usize)> {
        if self.quick {
            vec![(256, 512), (1000, 300)]
        } else {
            vec![(2560, 6912), (4096, 11008), (8192, 8192)]
        }
    }

    fn gemv_iters(self) -> usize {
        if self.quick {
            3
        } else {
            200
        }
    }

    fn presets(self) -> Vec<&'static str> {
        if self.quick {
            vec!["tiny"]
        } else {
            vec!["125m", "1b"]
        }
    }

    fn decode_tokens(self) -> usize {
        if self.quick {
            4
        } else {
            48
        }
    }
}

fn run() -> Result<bool, Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = args.first().map(String::as_str).unwrap_or("wgpu");
    let plan = Plan {
        quick: args.iter().any(|a| a == "--quick"),
    };
    match backend {
        "wgpu" => {
            use burn::backend::wgpu::{Wgpu, WgpuDevice, WgpuRuntime};
            let device = WgpuDevice::default();
            run_on::<WgpuRuntime, Wgpu>("wgpu", &device, &device, plan)
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use bit_ttt::bit_ttt_burn::kernels::cube::cubecl::cuda::CudaRuntime;
            use burn::backend::cuda::{Cuda, CudaDevice};
            let device = CudaDevice::default();
            run_on::<CudaRuntime, Cuda>("cuda", &device, &device, plan)
        }
        other => Err(format!(
            "unknown backend {other:?}: wgpu{}",
            if cfg!(feature = "cuda") {
                " or cuda"
            } else {
                " (cuda needs --features cuda)"
            }
        )
        .into()),
    }
}

/// One line of the final table.
struct Row {
    what: String,
    value: String,
    reference: String,
    ratio: f64,
}

fn run_on<R: Runtime, B: TernaryBackend>(
    name: &str,
    device: &R::Device,
    burn_device: &B::Device,
    plan: Plan,
) -> Result<bool, Error> {
    let client = R::client(device);
    let mut rows = Vec::new();
    let ok = check_kernels(name, &client, plan)?;
    for (d_in, d_out) in plan.gemv_shapes() {
        rows.push(gemv(name, &client, d_in, d_out, plan)?);
    }
    for preset in plan.presets() {
        rows.push(decode::<B>(name, burn_device, preset, plan)?);
    }
    println!();
    println!("| {name} | result | reference in the same run | ratio |");
    println!("|---|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {:.2} |",
            row.what, row.value, row.reference, row.ratio
        );
    }
    println!("kernels agree with the CPU reference: {ok}");
    Ok(ok)
}

/// A deterministic generator: the run depends on no backend's RNG.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn ternary_matrix(&mut self, rows: usize, cols: usize) -> PackedTernary {
        let values: Vec<i8> = (0..rows * cols)
            .map(|_| (self.next() % 3) as i8 - 1)
            .collect();
        PackedTernary::pack(&values, rows, cols, 0.37).expect("ternary values")
    }

    fn activations(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() % 2_000_000) as f32 / 500_000.0 - 2.0)
            .collect()
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Quantization and product on the device against the CPU, bit for bit, over odd shapes.
fn check_kernels<R: Runtime>(
    name: &str,
    client: &ComputeClient<R>,
    plan: Plan,
) -> Result<bool, Error> {
    let (row_counts, col_counts, token_counts): (&[usize], &[usize], &[usize]) = if plan.quick {
        (&[1, 3], &[1, 129], &[1, 5])
    } else {
        (&[1, 3, 600], &[1, 127, 128, 129, 4097], &[1, 2, 5, 33])
    };
    let mut rng = Lcg(7);
    let (mut cases, mut mismatches) = (0usize, 0usize);
    let started = Instant::now();
    for &rows in row_counts {
        for &cols in col_counts {
            let w = rng.ternary_matrix(rows, cols);
            let device_w = CubeTernary::upload(client, w.view());
            for &tokens in token_counts {
                let x = rng.activations(tokens * cols);
                let handle = client.create_from_slice(&f32_bytes(&x));
                let prepared = cube::quantize_i8(client, handle, x.len(), tokens, &device_w, 1e-5)?;
                let on_device = prepared.read_back(client)?;
                let got =
                    cube::read_f32(client, cube::ternary_matmul(client, &device_w, &prepared)?)?;
                let q = QuantizedActivations::quantize(&x, cols, 1e-5);
                let mut expected = vec![0.0f32; tokens * rows];
                reference::gemm_i8(&w, &q, &mut expected);
                let codes_differ = (0..tokens).any(|t| {
                    on_device.scales[t].to_bits() != q.scales[t].to_bits()
                        || q.row(t).iter().enumerate().any(|(c, &code)| {
                            on_device.values[t * on_device.cols_padded + c] != f64::from(code)
                        })
                });
                let outputs_differ = got
                    .iter()
                    .zip(&expected)
                    .any(|(g, e)| g.to_bits() != e.to_bits());
                cases += 1;
                if codes_differ || outputs_differ {
                    mismatches += 1;
                    eprintln!(
                        "MISMATCH {rows}x{cols}, {tokens} tokens: codes differ {codes_differ}, outputs differ {outputs_differ}"
                    );
                }
            }
        }
    }
    // A host-quantized input with scales of 1 makes the output the exact integer sums.
    let w = rng.ternary_matrix(5, 300);
    let device_w = CubeTernary::upload(client, w.view());
    let codes: Vec<i8> = (0..2 * 300).map(|i| [-128, 127, 3, -7][i % 4]).collect();
    let q = QuantizedActivations {
        tokens: 2,
        cols: 300,
        values: codes,
        scales: vec![1.0; 2],
    };
    let prepared = CubeActivations::from_quantized(client, &q, 384)?;
    let got = cube::read_f32(client, cube::ternary_matmul(client, &device_w, &prepared)?)?;
    let mut sums_differ = 0;
    for t in 0..2 {
        for r in 0..5 {
            let exact = reference::dot_i8(w.row_blocks(r), q.row(t)) as f32 * w.scale();
            sums_differ += usize::from(got[t * 5 + r].to_bits() != exact.to_bits());
        }
    }
    cases += 1;
    mismatches += usize::from(sums_differ > 0);
    println!(
        "{{\"section\":\"kernels\",\"backend\":\"{name}\",\"cases\":{cases},\"mismatches\":{mismatches},\"seconds\":{:.2}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(mismatches == 0)
}

/// Waits for every queued kernel of `client`.
fn sync<R: Runtime>(client: &ComputeClient<R>) -> Result<(), Error> {
    futures_lite::future::block_on(client.sync()).map_err(|e| format!("{e:?}").into())
}

/// GEMV GB/s of the product kernel next to the copy kernel's, rounds alternating.
fn gemv<R: Runtime>(
    name: &str,
    client: &ComputeClient<R>,
    d_in: usize,
    d_out: usize,
    plan: Plan,
) -> Result<Row, Error> {
    let mut rng = Lcg(d_in as u64 * 31 + d_out as u64);
    let w = rng.ternary_matrix(d_out, d_in);
    let device_w = CubeTernary::upload(client, w.view());
    let x = rng.activations(d_in);
    let handle = client.create_from_slice(&f32_bytes(&x));
    let prepared = cube::quantize_i8(client, handle.clone(), d_in, 1, &device_w, 1e-5)?;
    let words = device_w.size_in_bytes() / 4;
    let iters = plan.gemv_iters();
    // Warm-up: compiles both kernels and fills the memory pool.
    for _ in 0..2 {
        cube::ternary_matmul(client, &device_w, &prepared)?;
        cube::copy_words(client, device_w.words(), words);
        cube::quantize_i8(client, handle.clone(), d_in, 1, &device_w, 1e-5)?;
    }
    sync(client)?;
    let (mut best_gemv, mut best_copy, mut best_projection) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..iters {
            cube::ternary_matmul(client, &device_w, &prepared)?;
        }
        sync(client)?;
        best_gemv = best_gemv.min(started.elapsed().as_secs_f64() / iters as f64);

        let started = Instant::now();
        for _ in 0..iters {
            cube::copy_words(client, device_w.words(), words);
        }
        sync(client)?;
        best_copy = best_copy.min(started.elapsed().as_secs_f64() / iters as f64);

        // The whole projection as the model runs it: quantize the token, then multiply.
        let started = Instant::now();
        for _ in 0..iters {
            let a = cube::quantize_i8(client, handle.clone(), d_in, 1, &device_w, 1e-5)?;
            cube::ternary_matmul(client, &device_w, &a)?;
        }
        sync(client)?;
        best_projection = best_projection.min(started.elapsed().as_secs_f64() / iters as f64);
    }
    let bytes = device_w.size_in_bytes() as f64;
    let gemv_gbs = bytes / best_gemv / 1e9;
    let copy_gbs = 2.0 * bytes / best_copy / 1e9;
    let ratio = gemv_gbs / copy_gbs;
    println!(
        "{{\"section\":\"gemv\",\"backend\":\"{name}\",\"d_in\":{d_in},\"d_out\":{d_out},\"packed_bytes\":{bytes},\"gemv_us\":{:.2},\"gemv_gbs\":{gemv_gbs:.3},\"copy_us\":{:.2},\"copy_gbs\":{copy_gbs:.3},\"ratio\":{ratio:.3},\"quantize_and_gemv_us\":{:.2}}}",
        best_gemv * 1e6,
        best_copy * 1e6,
        best_projection * 1e6
    );
    Ok(Row {
        what: format!("GEMV {d_in}×{d_out} (packed weights GB/s; copy GB/s)"),
        value: format!("{gemv_gbs:.3}"),
        reference: format!("{copy_gbs:.3}"),
        ratio,
    })
}

/// Decode tokens/s, packed weights against the training form, on one Burn backend.
fn decode<B: TernaryBackend>(
    name: &str,
    device: &B::Device,
    preset: &str,
    plan: Plan,
) -> Result<Row, Error> {
    let vocab = 32_000;
    let config = BitLlamaConfig::preset(preset, vocab)
        .ok_or_else(|| format!("unknown preset {preset}"))?
        .with_ternary(true);
    B::seed(device, 0);
    let model = config.init::<B>(device);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.packed.safetensors");
    model.save_packed(&config, &path)?;
    let f32_tps = decode_tokens_per_s(&model, plan)?;
    drop(model);
    let (packed, _) = BitLlama::<B>::load_packed(&path, device)?;
    let products = packed
        .projections()
        .into_iter()
        .filter(|(_, p)| matches!(p, Projection::Packed(_)))
        .count();
    let packed_tps = decode_tokens_per_s(&packed, plan)?;
    let ratio = packed_tps / f32_tps;
    println!(
        "{{\"section\":\"decode\",\"backend\":\"{name}\",\"preset\":\"{preset}\",\"packed_tokens_per_s\":{packed_tps:.2},\"f32_tokens_per_s\":{f32_tps:.2},\"ratio\":{ratio:.2},\"packed_products_per_token\":{products},\"product_launches_per_token\":{}}}",
        2 * products
    );
    Ok(Row {
        what: format!("decode {preset} (packed tok/s; f32 Burn path tok/s)"),
        value: format!("{packed_tps:.1}"),
        reference: format!("{f32_tps:.1}"),
        ratio,
    })
}

/// Reads a few tokens to warm up (kernel compilation, autotuning), then times one token at a
/// time; `read` returns the logits on the host, so every step is waited for.
fn decode_tokens_per_s<B: TernaryBackend>(model: &BitLlama<B>, plan: Plan) -> Result<f64, Error> {
    let mut state = model.new_state();
    for token in 0..3u32 {
        model.read(&[token], &mut state)?;
    }
    let n = plan.decode_tokens();
    let started = Instant::now();
    for i in 0..n {
        model.read(&[(i as u32 * 7919 + 13) % 32_000], &mut state)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
