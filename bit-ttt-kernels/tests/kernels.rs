//! Every CPU kernel against the scalar reference, on odd shapes, single- and multi-threaded.

use bit_ttt_kernels::cpu::{
    self, available_kernels, reference, CpuOptions, KernelChoice, QuantizedActivations,
};
use bit_ttt_kernels::{KernelError, PackedTernary};

const ROWS: [usize; 4] = [1, 3, 17, 33];
const COLS: [usize; 5] = [1, 31, 127, 1000, 4097];
const BATCH: [usize; 3] = [1, 2, 7];
const THREADS: [usize; 3] = [1, 2, 3];

/// A tiny deterministic PRNG (PCG-style LCG output), enough for test data.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn ternary(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| (self.next() % 3) as i8 - 1).collect()
    }

    /// int8 codes over the whole range, extremes included.
    fn codes(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.next() as u8 as i8).collect()
    }

    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }
}

fn activations(rng: &mut Lcg, tokens: usize, cols: usize) -> QuantizedActivations {
    QuantizedActivations {
        tokens,
        cols,
        values: rng.codes(tokens * cols),
        scales: (0..tokens).map(|t| 1.0 + t as f32 * 0.37).collect(),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn i8_kernels_equal_the_reference_exactly() {
    let mut rng = Lcg(42);
    let kernels = available_kernels();
    let mut checked = 0;
    for &rows in &ROWS {
        for &cols in &COLS {
            let w = PackedTernary::pack(&rng.ternary(rows * cols), rows, cols, 0.731).unwrap();
            for &tokens in &BATCH {
                let x = activations(&mut rng, tokens, cols);
                let mut want = vec![0.0; tokens * rows];
                reference::gemm_i8(&w, &x, &mut want);
                for &kernel in &kernels {
                    for &threads in &THREADS {
                        let mut got = vec![f32::NAN; tokens * rows];
                        cpu::gemm_i8_with(&w, &x, &mut got, CpuOptions::new(kernel, threads))
                            .unwrap();
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{kernel:?} threads={threads} rows={rows} cols={cols} batch={tokens}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 60 * kernels.len() * THREADS.len());
    if cpu::avx2_under_test("the i8 GEMM") {
        assert!(kernels.contains(&KernelChoice::Avx2), "{kernels:?}");
    }
}

/// Sizes large enough for the thread pool to split the rows, and the worst cases of the 16-bit
/// accumulation: all weights +1 or -1 against all activations -128 or +127.
#[test]
fn i8_kernels_on_large_and_extreme_inputs() {
    let simd = cpu::avx2_under_test("the i8 GEMM on large inputs");
    assert_eq!(available_kernels().contains(&KernelChoice::Avx2), simd);
    let mut rng = Lcg(7);
    let cases: Vec<(usize, usize, Vec<i8>, Vec<i8>)> = vec![
        (257, 4097, rng.ternary(257 * 4097), rng.codes(9 * 4097)),
        (1031, 1000, rng.ternary(1031 * 1000), rng.codes(9 * 1000)),
        (64, 2048, vec![1; 64 * 2048], vec![-128; 9 * 2048]),
        (64, 2048, vec![-1; 64 * 2048], vec![-128; 9 * 2048]),
        (64, 2048, vec![1; 64 * 2048], vec![127; 9 * 2048]),
        (37, 3000, vec![-1; 37 * 3000], vec![127; 9 * 3000]),
    ];
    for (rows, cols, wv, xv) in cases {
        let w = PackedTernary::pack(&wv, rows, cols, 1.5).unwrap();
        // Nine tokens (prefill) and the first one alone (decode).
        for tokens in [9, 1] {
            let x = QuantizedActivations {
                tokens,
                cols,
                values: xv[..tokens * cols].to_vec(),
                scales: (0..tokens).map(|t| 3.0 + t as f32).collect(),
            };
            let mut want = vec![0.0; tokens * rows];
            reference::gemm_i8(&w, &x, &mut want);
            for kernel in available_kernels() {
                for threads in [1, 2, 3] {
                    let mut got = vec![f32::NAN; tokens * rows];
                    let opts = CpuOptions::new(kernel, threads);
                    cpu::gemm_i8_with(&w, &x, &mut got, opts).unwrap();
                    let what = format!("{kernel:?} {rows}x{cols} b{tokens} t{threads}");
                    assert_eq!(bits(&got), bits(&want), "{what}");
                }
            }
        }
    }
}

#[test]
fn f32_kernels_match_the_reference_to_rounding() {
    let simd = cpu::avx2_under_test("the f32 GEMM");
    assert_eq!(available_kernels().contains(&KernelChoice::Avx2), simd);
    let mut rng = Lcg(3);
    for &rows in &ROWS {
        for &cols in &COLS {
            let w = PackedTernary::pack(&rng.ternary(rows * cols), rows, cols, 0.25).unwrap();
            for &tokens in &BATCH {
                let x = rng.f32s(tokens * cols);
                let mut want = vec![0.0; tokens * rows];
                reference::gemm_f32(&w, &x, tokens, &mut want);
                for kernel in available_kernels() {
                    for &threads in &THREADS {
                        let mut got = vec![f32::NAN; tokens * rows];
                        let opts = CpuOptions::new(kernel, threads);
                        cpu::gemm_f32_with(&w, &x, tokens, &mut got, opts).unwrap();
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            // |error| <= n·eps·Σ|w·x| (·gamma); Σ|x| <= cols here.
                            let tol = 0.25 * cols as f32 * 1e-6 * 4.0 + 1e-6;
                            assert!(
                                (g - e).abs() <= tol,
                                "{kernel:?} t{threads} {rows}x{cols} b{tokens} [{i}]: {g} vs {e}"
                            );
                        }
                        if kernel == KernelChoice::Reference {
                            assert_eq!(bits(&got), bits(&want));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn default_entry_points_use_the_global_settings() {
    let mut rng = Lcg(11);
    let (rows, cols, tokens) = (33, 1000, 2);
    let w = PackedTernary::pack(&rng.ternary(rows * cols), rows, cols, 0.5).unwrap();
    let x = activations(&mut rng, tokens, cols);
    let mut want = vec![0.0; tokens * rows];
    reference::gemm_i8(&w, &x, &mut want);
    let mut got = vec![0.0; tokens * rows];
    cpu::gemm_i8(w.view(), &x, &mut got);
    assert_eq!(bits(&got), bits(&want));

    assert!(cpu::num_threads() >= 1);
    assert_eq!(cpu::kernel_choice(), KernelChoice::Auto);
    let auto = KernelChoice::Auto.resolve().unwrap();
    assert!(available_kernels().contains(&auto));
    if !KernelChoice::Avx2.is_available() {
        assert_eq!(
            cpu::set_kernel_choice(KernelChoice::Avx2),
            Err(KernelError::KernelUnavailable("AVX2"))
        );
        let err = cpu::gemm_i8_with(&w, &x, &mut got, CpuOptions::new(KernelChoice::Avx2, 1));
        assert_eq!(err, Err(KernelError::KernelUnavailable("AVX2")));
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_is_detected_where_the_cpu_has_it() {
    let has = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    assert_eq!(KernelChoice::Avx2.is_available(), has);
    assert_eq!(available_kernels().contains(&KernelChoice::Avx2), has);
}

/// Calls from a worker of the pool split smaller products than calls from outside it.
#[test]
fn products_inside_the_pool_equal_the_reference() {
    let mut rng = Lcg(13);
    for (rows, cols, tokens) in [(257, 1000, 1), (100, 640, 1), (33, 4097, 2), (64, 300, 7)] {
        let w = PackedTernary::pack(&rng.ternary(rows * cols), rows, cols, 0.3).unwrap();
        let x = activations(&mut rng, tokens, cols);
        let mut want = vec![0.0; tokens * rows];
        reference::gemm_i8(&w, &x, &mut want);
        for kernel in available_kernels() {
            for threads in [2, 3] {
                let got = cpu::install(threads, || {
                    let mut got = vec![f32::NAN; tokens * rows];
                    cpu::gemm_i8_with(&w, &x, &mut got, CpuOptions::new(kernel, threads)).unwrap();
                    got
                });
                let what = format!("{kernel:?} t{threads} {rows}x{cols} b{tokens}");
                assert_eq!(bits(&got), bits(&want), "{what}");
            }
        }
    }
}

/// Several matrices with the same activations in one call: each output is the reference's,
/// whether the call runs on one thread, from outside the pool or from a worker of it.
#[test]
fn many_products_in_one_call_equal_the_reference() {
    let mut rng = Lcg(29);
    let cols = 4097;
    let scales = [0.3, 1.7, 0.05, 2.0];
    let mats: Vec<PackedTernary> = [5, 600, 33, 1]
        .iter()
        .zip(scales)
        .map(|(&rows, scale)| {
            PackedTernary::pack(&rng.ternary(rows * cols), rows, cols, scale).unwrap()
        })
        .collect();
    let views: Vec<_> = mats.iter().map(|m| m.view()).collect();
    for tokens in [1, 3] {
        let x = activations(&mut rng, tokens, cols);
        let want: Vec<Vec<f32>> = mats
            .iter()
            .map(|w| {
                let mut want = vec![0.0; tokens * w.view().rows()];
                reference::gemm_i8(w, &x, &mut want);
                want
            })
            .collect();
        for kernel in available_kernels() {
            for threads in THREADS {
                for in_pool in [false, true] {
                    let run = || {
                        let mut got: Vec<Vec<f32>> =
                            want.iter().map(|w| vec![f32::NAN; w.len()]).collect();
                        let mut outs: Vec<&mut [f32]> =
                            got.iter_mut().map(|g| &mut g[..]).collect();
                        let options = CpuOptions::new(kernel, threads);
                        cpu::gemm_i8_many_with(&views, &x, &mut outs, options).unwrap();
                        got
                    };
                    let got = if in_pool {
                        cpu::install(threads, run)
                    } else {
                        run()
                    };
                    for (m, (g, w)) in got.iter().zip(&want).enumerate() {
                        let what = format!("{kernel:?} t{threads} pool={in_pool} b{tokens} m{m}");
                        assert_eq!(bits(g), bits(w), "{what}");
                    }
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "one output per matrix: 2 matrices, 1 outputs")]
fn many_products_need_one_output_per_matrix() {
    let w = PackedTernary::pack(&[1, 0, -1], 1, 3, 1.0).unwrap();
    let x = QuantizedActivations::quantize(&[0.5, -1.0, 2.0], 3, 1e-5);
    let mut out = [0.0f32];
    let _ = cpu::gemm_i8_many_with(
        &[w.view(), w.view()],
        &x,
        &mut [&mut out],
        CpuOptions::default(),
    );
}
