//! Packed ternary GEMV/GEMM against the machine's read bandwidth and f32 GEMV, in one run.
//!
//! `cargo run --release -p bit-ttt-kernels --example gemv_bench`
//!
//! Shapes are `rows x cols` = `out x in` (the packed layout's orientation). "DRAM" shapes rotate
//! over enough copies of the matrix (>= 256 MiB in all) that every call reads its weights from
//! memory, as a decoder does when it walks through its layers; the "cache" shape reuses one
//! matrix (256 KiB packed, it stays in L2). Every number is the median over repeated rounds.
//! For each shape and thread count, the read-bandwidth pass, the ternary GEMV and the plain f32
//! GEMV run in alternating rounds, so their ratios compare the same machine conditions.
//! The human table comes first; the last lines are one JSON object per shape and thread count.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bit_ttt_kernels::bandwidth;
use bit_ttt_kernels::cpu::{self, CpuOptions, KernelChoice, QuantizedActivations};
use bit_ttt_kernels::PackedTernary;
use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

const MIB: usize = 1 << 20;
/// Working set of the DRAM measurements, well above the 32 MiB L3.
const DRAM_SET: usize = 256 * MIB;
/// Each measurement runs rounds for at least this long.
const MIN_TIME: Duration = Duration::from_millis(500);
const MIN_ROUNDS: usize = 5;
const THREADS: [usize; 2] = [1, 2];

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }
}

/// Runs `round` (which does `work` units) until `MIN_TIME` and `MIN_ROUNDS` are reached, after
/// one warm-up round, and returns the median units per second.
fn measure(work: f64, mut round: impl FnMut()) -> f64 {
    round();
    let start = Instant::now();
    let mut rates = Vec::new();
    while rates.len() < MIN_ROUNDS || start.elapsed() < MIN_TIME {
        let t = Instant::now();
        round();
        rates.push(work / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// Like [`measure`] for several workloads run in alternating rounds, so that all of them see
/// the same conditions (on a shared machine other processes change the bandwidth over time).
fn measure_interleaved(tasks: &mut [(f64, &mut dyn FnMut())]) -> Vec<f64> {
    for (_, round) in tasks.iter_mut() {
        round();
    }
    let start = Instant::now();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    while rates[0].len() < MIN_ROUNDS || start.elapsed() < MIN_TIME * tasks.len() as u32 {
        for ((work, round), r) in tasks.iter_mut().zip(&mut rates) {
            let t = Instant::now();
            round();
            r.push(*work / t.elapsed().as_secs_f64());
        }
    }
    rates
        .into_iter()
        .map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        })
        .collect()
}

/// One pass of the read-bandwidth test (see [`bit_ttt_kernels::bandwidth`]).
fn read_pass(data: &[u64], threads: usize) {
    black_box(bandwidth::read_pass(data, threads));
}

/// The plain f32 loop: 16 independent lanes, so the compiler vectorizes it.
fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for i in 0..16 {
            acc[i] += a[i] * b[i];
        }
    }
    let tail: f32 = wr.iter().zip(xr).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

fn gemv_f32_loop(w: &[f32], x: &[f32], y: &mut [f32], pool: &rayon::ThreadPool) {
    let cols = x.len();
    let chunk = y.len().div_ceil(pool.current_num_threads() * 4).max(1);
    pool.install(|| {
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, ys)| {
            for (i, y) in ys.iter_mut().enumerate() {
                let r = c * chunk + i;
                *y = dot_f32(&w[r * cols..(r + 1) * cols], x);
            }
        });
    });
}

/// Copies needed for a working set of at least `DRAM_SET` (one for the in-cache shape).
fn copies(bytes: usize, dram: bool) -> usize {
    if dram {
        DRAM_SET.div_ceil(bytes).max(2)
    } else {
        1
    }
}

/// Blocks of [`op_mix`] per call: about 2 ms.
const MIX_BLOCKS: u64 = 1 << 20;

/// The decode kernel's vector instructions for `blocks` blocks of 128 weights, without its
/// loads: per block one shift, four ands, four `vpmaddubsw` and four adds, all independent, so
/// they run at the core's throughput for that mix. Its rate, measured in the same rounds as the
/// kernel, is the most any kernel with these 13 instructions per block can reach in those
/// minutes (on a shared host another tenant can take part of the core's vector pipes).
#[cfg(target_arch = "x86_64")]
fn op_mix(blocks: u64) {
    if !is_x86_feature_detected!("avx2") {
        return;
    }
    // SAFETY: AVX2 is present (checked above); the block touches only the named registers
    // and the counter.
    unsafe {
        std::arch::asm!(
            "2:",
            "vpsrlw ymm12, ymm14, 4",
            "vpand ymm8, ymm14, ymm15",
            "vpand ymm9, ymm12, ymm15",
            "vpand ymm10, ymm14, ymm13",
            "vpand ymm11, ymm12, ymm13",
            "vpmaddubsw ymm0, ymm8, ymm15",
            "vpmaddubsw ymm1, ymm9, ymm15",
            "vpmaddubsw ymm2, ymm10, ymm15",
            "vpmaddubsw ymm3, ymm11, ymm15",
            "vpaddw ymm4, ymm0, ymm14",
            "vpaddw ymm5, ymm1, ymm14",
            "vpaddw ymm6, ymm2, ymm14",
            "vpaddw ymm7, ymm3, ymm14",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) blocks.max(1) => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _,
            options(nostack, nomem),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn op_mix(_blocks: u64) {}

/// The core clock in GHz: a chain of dependent adds runs at one add per cycle. The best of five
/// runs of 2^24 adds.
#[cfg(target_arch = "x86_64")]
fn core_ghz() -> f64 {
    const ADDS: u64 = 1 << 24;
    (0..5)
        .map(|_| {
            let started = Instant::now();
            let mut x = 0u64;
            for _ in 0..ADDS / 8 {
                // SAFETY: register arithmetic only.
                unsafe {
                    std::arch::asm!(
                        "add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1",
                        "add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1",
                        inout(reg) x,
                        options(nostack, nomem),
                    );
                }
            }
            black_box(x);
            ADDS as f64 / started.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

#[cfg(not(target_arch = "x86_64"))]
fn core_ghz() -> f64 {
    f64::NAN
}

#[derive(Clone)]
struct Row {
    shape: String,
    rows: usize,
    cols: usize,
    tokens: usize,
    source: &'static str,
    threads: usize,
    ternary_gw: f64,
    ternary_pool_gw: f64,
    ternary_gb: f64,
    read_gb: f64,
    f32_loop_gw: f64,
    f32_burn_gw: f64,
    /// In cache only: [`op_mix`]'s rate per core in the same rounds, as G weights/s.
    mix_gw_per_core: f64,
}

impl Row {
    fn f32_gw(&self) -> f64 {
        self.f32_loop_gw.max(self.f32_burn_gw)
    }
}

fn main() {
    let kernel = KernelChoice::Auto.resolve().expect("auto always resolves");
    println!("# bit-ttt-kernels gemv_bench");
    println!(
        "kernel: {kernel:?}, CPUs: {}, every number is the median of rounds of >= {} ms in all",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        MIN_TIME.as_millis()
    );
    println!("load average at start: {}", loadavg());
    let pools: Vec<rayon::ThreadPool> = THREADS.iter().map(|&t| pool(t)).collect();
    let mut rng = Lcg(0x5eed);

    // 1. Read bandwidth.
    let data: Vec<u64> = (0..512 * MIB / 8).map(|i| i as u64 ^ 0x9e37).collect();
    let data_bytes = std::mem::size_of_val(data.as_slice()) as f64;
    let read: Vec<f64> = THREADS
        .iter()
        .map(|&t| measure(data_bytes, || read_pass(&data, t)) / 1e9)
        .collect();
    println!("\n## read bandwidth (sum over a 512 MiB array)");
    for (t, r) in THREADS.iter().zip(&read) {
        println!("{t} thread(s): {r:.2} GB/s");
    }

    let device = Default::default();
    let shapes: [(usize, usize, bool); 4] = [
        (2048, 2048, true),
        (4096, 4096, true),
        (4096, 11008, true),
        (1024, 1024, false),
    ];
    let mut results: Vec<Row> = Vec::new();
    for &(rows, cols, dram) in &shapes {
        let shape = format!("{rows}x{cols}");
        let weights = (rows * cols) as f64;
        let x_f32 = rng.f32s(cols);

        // 2a. f32, the plain loop, over `[rows, cols]` row-major copies.
        let w_f32 = rng.f32s(rows * cols);
        let n_f32 = copies(rows * cols * 4, dram);
        let f32_set: Vec<Vec<f32>> = (0..n_f32).map(|_| w_f32.clone()).collect();
        drop(w_f32);
        let mut y = vec![0.0f32; rows];
        let mut y_f32 = vec![0.0f32; rows];

        // 2b. f32, Burn's ndarray matmul `x[1, in] @ W[in, out]` (Burn's Linear orientation),
        // with Burn's own threading.
        let burn_set: Vec<Tensor<NdArray, 2>> = (0..n_f32)
            .map(|_| {
                Tensor::from_data(
                    TensorData::new(rng.f32s(rows * cols), [cols, rows]),
                    &device,
                )
            })
            .collect();
        let x_burn =
            Tensor::<NdArray, 2>::from_data(TensorData::new(x_f32.clone(), [1, cols]), &device);
        let f32_burn = measure(weights * n_f32 as f64, || {
            for w in &burn_set {
                black_box(x_burn.clone().matmul(w.clone()));
            }
        }) / 1e9;
        drop(burn_set);

        // 3. Packed ternary GEMV, W1.58A8, the dispatching entry point.
        let values: Vec<i8> = (0..rows * cols)
            .map(|_| (rng.next() % 3) as i8 - 1)
            .collect();
        let packed = PackedTernary::pack(&values, rows, cols, 0.05).expect("pack");
        drop(values);
        let bytes = packed.size_in_bytes();
        let n_t = copies(bytes, dram);
        let set: Vec<PackedTernary> = (0..n_t).map(|_| packed.clone()).collect();
        let xq = QuantizedActivations::quantize(&x_f32, cols, 1e-5);
        for (ti, &threads) in THREADS.iter().enumerate() {
            let opts = CpuOptions::new(KernelChoice::Auto, threads);
            // In cache, a round repeats the call so that the cache misses after the read pass
            // of the previous round are a negligible part of it.
            let (reps_t, reps_f) = if dram { (1, 1) } else { (400, 20) };
            let mut round = || {
                for _ in 0..reps_t {
                    for w in &set {
                        cpu::gemm_i8_with(w, &xq, &mut y, opts).expect("kernel");
                    }
                }
                black_box(&y);
            };
            let p = &pools[ti];
            let mut f32_round = || {
                for _ in 0..reps_f {
                    for w in &f32_set {
                        gemv_f32_loop(w, &x_f32, &mut y_f32, p);
                    }
                }
                black_box(&y_f32);
            };
            // Read bandwidth, ternary and f32 GEMV in alternating rounds; each ternary call
            // from this (non-pool) thread, as a naive caller makes it.
            // In cache, the kernel's instruction mix alone on every thread runs in the same rounds.
            let mix_weights = (MIX_BLOCKS * threads as u64 * 128) as f64;
            let mut mix_round = || {
                p.broadcast(|_| op_mix(MIX_BLOCKS));
            };
            let mut read_round = || read_pass(&data, threads);
            let mut tasks: Vec<(f64, &mut dyn FnMut())> = vec![
                (data_bytes, &mut read_round),
                (weights * (n_t * reps_t) as f64, &mut round),
                (weights * (n_f32 * reps_f) as f64, &mut f32_round),
            ];
            if !dram {
                tasks.push((mix_weights, &mut mix_round));
            }
            let rates = measure_interleaved(&mut tasks);
            let mix_gw_per_core = rates.get(3).map_or(0.0, |r| r / 1e9 / threads as f64);
            let (read_gb, gw, f32_loop) = (rates[0] / 1e9, rates[1] / 1e9, rates[2] / 1e9);
            // The calls made from a worker of the pool (`cpu::install`), as a decode loop should.
            let gw_pool = cpu::install(threads, || {
                measure(weights * (n_t * reps_t) as f64, &mut round)
            }) / 1e9;
            results.push(Row {
                shape: shape.clone(),
                rows,
                cols,
                tokens: 1,
                source: if dram { "dram" } else { "cache" },
                threads,
                ternary_gw: gw,
                ternary_pool_gw: gw_pool,
                ternary_gb: gw * bytes as f64 / weights,
                read_gb,
                f32_loop_gw: f32_loop,
                f32_burn_gw: f32_burn,
                mix_gw_per_core,
            });
        }
        drop(f32_set);
        drop(set);
        if !dram {
            let opts = CpuOptions::new(KernelChoice::Reference, 1);
            let gw = measure(weights, || {
                cpu::gemm_i8_with(&packed, &xq, &mut y, opts).expect("kernel");
                black_box(&y);
            }) / 1e9;
            println!("\n(scalar reference kernel, {shape}, 1 thread: {gw:.2} G weights/s)");
        }
    }

    // GEMM: 128 tokens (prefill) on 4096x4096, weights in L3.
    let (rows, cols, tokens) = (4096, 4096, 128);
    let values: Vec<i8> = (0..rows * cols)
        .map(|_| (rng.next() % 3) as i8 - 1)
        .collect();
    let packed = PackedTernary::pack(&values, rows, cols, 0.05).expect("pack");
    let x = rng.f32s(tokens * cols);
    let xq = QuantizedActivations::quantize(&x, cols, 1e-5);
    let mut y = vec![0.0f32; tokens * rows];
    let work = (rows * cols * tokens) as f64;
    let w_burn = Tensor::<NdArray, 2>::from_data(
        TensorData::new(rng.f32s(rows * cols), [cols, rows]),
        &device,
    );
    let x_burn = Tensor::<NdArray, 2>::from_data(TensorData::new(x, [tokens, cols]), &device);
    let f32_burn = measure(work, || {
        black_box(x_burn.clone().matmul(w_burn.clone()));
    }) / 1e9;
    for (ti, &threads) in THREADS.iter().enumerate() {
        let opts = CpuOptions::new(KernelChoice::Auto, threads);
        let mut round = || {
            cpu::gemm_i8_with(&packed, &xq, &mut y, opts).expect("kernel");
            black_box(&y);
        };
        let gw = measure(work, &mut round) / 1e9;
        let gw_pool = cpu::install(threads, || measure(work, &mut round)) / 1e9;
        results.push(Row {
            shape: format!("{rows}x{cols}"),
            rows,
            cols,
            tokens,
            source: "gemm",
            threads,
            ternary_gw: gw,
            ternary_pool_gw: gw_pool,
            ternary_gb: gw * packed.size_in_bytes() as f64 / (rows * cols) as f64,
            read_gb: read[ti],
            f32_loop_gw: 0.0,
            f32_burn_gw: f32_burn,
            mix_gw_per_core: 0.0,
        });
    }

    // The human table.
    println!(
        "\n## packed ternary W1.58A8 vs f32 (G weights/s = 1e9 weights, times tokens, per second)"
    );
    println!(
        "| shape | tokens | data | threads | ternary Gw/s | in pool Gw/s | ternary GB/s | read GB/s | ternary/read | f32 loop Gw/s | f32 Burn Gw/s | ternary/f32 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let f32_loop = if r.f32_loop_gw > 0.0 {
            format!("{:.2}", r.f32_loop_gw)
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.1} |",
            r.shape,
            r.tokens,
            r.source,
            r.threads,
            r.ternary_gw,
            r.ternary_pool_gw,
            r.ternary_gb,
            r.read_gb,
            r.ternary_gb / r.read_gb,
            f32_loop,
            r.f32_burn_gw,
            r.ternary_gw / r.f32_gw()
        );
    }

    println!("\n## targets");
    for r in &results {
        match r.source {
            "dram" => println!(
                "{} t{}: ternary/read {:.2} (target >= 0.85: {}), ternary/f32 {:.1} (target >= 14: {})",
                r.shape,
                r.threads,
                r.ternary_gb / r.read_gb,
                pass(r.ternary_gb / r.read_gb >= 0.85),
                r.ternary_gw / r.f32_gw(),
                pass(r.ternary_gw / r.f32_gw() >= 14.0)
            ),
            "cache" => println!(
                "{} t{} in cache: {:.1} G weights/s per core (target >= 100: {}), ternary/f32 {:.1}; \
                 its 13 vector instructions per 128 weights alone: {:.1} per core in the same rounds \
                 (kernel at {:.2} of that)",
                r.shape,
                r.threads,
                r.ternary_gw / r.threads as f64,
                pass(r.ternary_gw / r.threads as f64 >= 100.0),
                r.ternary_gw / r.f32_gw(),
                r.mix_gw_per_core,
                r.ternary_gw / r.threads as f64 / r.mix_gw_per_core
            ),
            _ => {}
        }
    }
    let ghz = core_ghz();
    println!(
        "core clock now: {ghz:.2} GHz (dependent adds); 13 instructions on 4 vector pipes take at \
         least 3.25 cycles, so at this clock no such kernel exceeds {:.0} G weights/s per core",
        128.0 / 3.25 * ghz
    );
    println!("(f32 = the faster of the plain loop at the same thread count and Burn's matmul)");
    println!("(ternary Gw/s: each call made from the main thread; in pool: the same calls made");
    println!(" inside cpu::install, from a worker of the kernel's pool)");
    println!("load average at end: {}\n", loadavg());

    for r in &results {
        println!(
            "{{\"shape\":\"{}\",\"rows\":{},\"cols\":{},\"tokens\":{},\"data\":\"{}\",\"threads\":{},\
             \"kernel\":\"{:?}\",\"ternary_gweights_per_s\":{:.3},\"ternary_in_pool_gweights_per_s\":{:.3},\"ternary_gbytes_per_s\":{:.3},\
             \"read_gbytes_per_s\":{:.3},\"f32_gweights_per_s\":{:.3},\"f32_loop_gweights_per_s\":{:.3},\
             \"f32_burn_gweights_per_s\":{:.3},\"op_mix_gweights_per_core\":{:.3}}}",
            r.shape,
            r.rows,
            r.cols,
            r.tokens,
            r.source,
            r.threads,
            kernel,
            r.ternary_gw,
            r.ternary_pool_gw,
            r.ternary_gb,
            r.read_gb,
            r.f32_gw(),
            r.f32_loop_gw,
            r.f32_burn_gw,
            r.mix_gw_per_core
        );
    }
}

/// The first three fields of /proc/loadavg (other processes on the machine skew the numbers).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}
