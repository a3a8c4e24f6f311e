//! The CubeCL kernels against the CPU reference, on wgpu: Debian's lavapipe (software Vulkan)
//! where there is no GPU, so CI runs them. Odd shapes: cols 1, 127, 128, 129, 4097; rows 1, 3,
//! 600; tokens 1, 2, 5, 33; weight rows of zeros, all-zero tokens, codes at the i8 extremes.

use std::io::Write;

use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::Runtime;

use super::*;
use crate::cpu::{self, reference, QuantizedActivations};
use crate::PackedTernary;

/// The wgpu client, or `None` (said on stderr) when the machine has no adapter, unless
/// `BIT_TTT_REQUIRE_WGPU=1` makes that a failure (as CI sets).
fn client() -> Option<ComputeClient<WgpuRuntime>> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapters =
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    if adapters.is_empty() {
        if std::env::var("BIT_TTT_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
            panic!("BIT_TTT_REQUIRE_WGPU=1 but no wgpu adapter was found (install mesa-vulkan-drivers)");
        }
        // Written to the stderr handle, which the test harness does not capture.
        let _ = writeln!(
            std::io::stderr(),
            "cube kernel test: SKIPPED, no wgpu adapter (install mesa-vulkan-drivers, \
             or set BIT_TTT_REQUIRE_WGPU=1 to fail instead)"
        );
        return None;
    }
    Some(WgpuRuntime::client(&WgpuDevice::default()))
}

/// A small deterministic generator (the tests need no statistical quality).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn ternary(&mut self) -> i8 {
        (self.next() % 3) as i8 - 1
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() % 2_000_000) as f32 / 1_000_000.0 - 1.0
    }
}

/// Ternary weights with row 0 all zeros (when there is more than one row).
fn weights(rows: usize, cols: usize, rng: &mut Lcg) -> PackedTernary {
    let mut values: Vec<i8> = (0..rows * cols).map(|_| rng.ternary()).collect();
    if rows > 1 {
        values[..cols].fill(0);
    }
    PackedTernary::pack(&values, rows, cols, 0.37).unwrap()
}

/// Activations: token 0 all zeros (when there are several), exact ties of the rounding
/// (values k + 0.5 after scaling: absmax 127 makes the scale 1), NaN and infinities elsewhere
/// only where asked.
fn activations(tokens: usize, cols: usize, rng: &mut Lcg) -> Vec<f32> {
    let mut x: Vec<f32> = (0..tokens * cols).map(|_| 3.0 * rng.unit()).collect();
    if tokens > 1 {
        x[..cols].fill(0.0);
    }
    if tokens > 2 {
        // Token 2: absmax 127 (scale 1), so x.5 values are ties: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0.
        let row = &mut x[2 * cols..3 * cols];
        for (c, v) in row.iter_mut().enumerate() {
            *v = [2.5, 3.5, -0.5, -1.5, 126.5, -127.0][c % 6];
        }
        row[0] = 127.0;
    }
    x
}

const COLS: [usize; 5] = [1, 127, 128, 129, 4097];
const TOKENS: [usize; 4] = [1, 2, 5, 33];

#[test]
fn quantization_gives_the_cpu_codes_scales_and_sums() {
    let Some(client) = client() else { return };
    let mut rng = Lcg(1);
    for cols in COLS {
        for tokens in TOKENS {
            let mut x = activations(tokens, cols, &mut rng);
            if tokens == 5 {
                // NaN is skipped by absmax and coded 0; an infinity makes every code 0 or NaN.
                x[3 * cols] = f32::NAN;
                x[4 * cols + cols / 2] = f32::INFINITY;
            }
            let w = CubeTernary::upload(&client, weights(1, cols, &mut rng).view());
            let handle = client.create_from_slice(&f32_bytes(&x));
            let prepared = quantize_i8(&client, handle, x.len(), tokens, &w, 1e-5)
                .unwrap()
                .read_back(&client)
                .unwrap();
            let cpu = QuantizedActivations::quantize(&x, cols, 1e-5);
            for t in 0..tokens {
                let codes = &prepared.values[t * prepared.cols_padded..][..prepared.cols_padded];
                let expected: Vec<f64> = cpu.row(t).iter().map(|&q| f64::from(q)).collect();
                assert_eq!(
                    &codes[..cols],
                    &expected[..],
                    "codes, token {t}, cols {cols}"
                );
                assert!(
                    codes[cols..].iter().all(|&c| c == 0.0),
                    "padding, cols {cols}"
                );
                let sum: i32 = cpu.row(t).iter().map(|&q| i32::from(q)).sum();
                assert_eq!(
                    prepared.sums[t],
                    f64::from(sum),
                    "sum, token {t}, cols {cols}"
                );
                assert_eq!(
                    prepared.scales[t].to_bits(),
                    cpu.scales[t].to_bits(),
                    "scale, token {t}, cols {cols}"
                );
            }
        }
    }
}

/// The integer sums, bit for bit: the CPU's codes with scales of 1 and a weight scale of 1 make
/// the output the exact sum `Σ w · q`, which the reference computes in `i32`.
#[test]
fn integer_sums_equal_the_scalar_reference() {
    let Some(client) = client() else { return };
    let mut rng = Lcg(2);
    for rows in [1, 3, 600] {
        for cols in COLS {
            let values: Vec<i8> = (0..rows * cols).map(|_| rng.ternary()).collect();
            let w = PackedTernary::pack(&values, rows, cols, 1.0).unwrap();
            let device_w = CubeTernary::upload(&client, w.view());
            for tokens in TOKENS {
                // Codes anywhere in i8, the extremes -128 and 127 included.
                let mut codes: Vec<i8> =
                    (0..tokens * cols).map(|_| rng.next() as u8 as i8).collect();
                codes[0] = -128;
                codes[tokens * cols - 1] = 127;
                let x = QuantizedActivations {
                    tokens,
                    cols,
                    values: codes,
                    scales: vec![1.0; tokens],
                };
                let prepared =
                    CubeActivations::from_quantized(&client, &x, device_w.cols_padded()).unwrap();
                let out = ternary_matmul(&client, &device_w, &prepared).unwrap();
                let got = read_f32(&client, out).unwrap();
                for t in 0..tokens {
                    for r in 0..rows {
                        let exact = reference::dot_i8(w.row_blocks(r), x.row(t));
                        assert_eq!(
                            got[t * rows + r],
                            exact as f32,
                            "row {r} token {t} ({rows}x{cols}, {tokens} tokens)"
                        );
                    }
                }
            }
        }
    }
}

/// The whole W1.58A8 path (quantize on the device, multiply): the CPU's outputs bit for bit,
/// since the codes, the integer sums and the final expression `acc · (gamma / s)` are the same.
#[test]
fn int8_product_equals_the_cpu_kernels() {
    let Some(client) = client() else { return };
    let mut rng = Lcg(3);
    for (rows, cols) in [(1, 1), (3, 127), (600, 129), (5, 4097), (64, 128)] {
        let w = weights(rows, cols, &mut rng);
        let device_w = CubeTernary::upload(&client, w.view());
        for tokens in TOKENS {
            let x = activations(tokens, cols, &mut rng);
            let handle = client.create_from_slice(&f32_bytes(&x));
            let prepared = quantize_i8(&client, handle, x.len(), tokens, &device_w, 1e-5).unwrap();
            let got = read_f32(
                &client,
                ternary_matmul(&client, &device_w, &prepared).unwrap(),
            )
            .unwrap();
            let mut expected = vec![0.0f32; tokens * rows];
            reference::gemm_i8(
                &w,
                &QuantizedActivations::quantize(&x, cols, 1e-5),
                &mut expected,
            );
            let mismatches = got
                .iter()
                .zip(&expected)
                .filter(|(g, e)| g.to_bits() != e.to_bits())
                .count();
            assert_eq!(
                mismatches, 0,
                "{rows}x{cols}, {tokens} tokens: {got:?} vs {expected:?}"
            );
        }
    }
}

/// W1.58A16: f32 activations, summed in another order than the CPU's, so equal within a
/// bound on the rounding of a sum of `cols` terms.
#[test]
fn f32_product_agrees_with_the_cpu_kernels() {
    let Some(client) = client() else { return };
    let mut rng = Lcg(4);
    for (rows, cols) in [(1, 1), (3, 127), (600, 129), (5, 4097)] {
        let w = weights(rows, cols, &mut rng);
        let device_w = CubeTernary::upload(&client, w.view());
        for tokens in TOKENS {
            let x = activations(tokens, cols, &mut rng);
            let handle = client.create_from_slice(&f32_bytes(&x));
            let prepared = pad_f32(&client, handle, x.len(), tokens, &device_w).unwrap();
            let got = read_f32(
                &client,
                ternary_matmul(&client, &device_w, &prepared).unwrap(),
            )
            .unwrap();
            let mut expected = vec![0.0f32; tokens * rows];
            cpu::gemm_f32(&w, &x, tokens, &mut expected);
            for t in 0..tokens {
                // |error| <= a few ulps of Σ|x| (both sums) times gamma.
                let abs_sum: f32 = x[t * cols..(t + 1) * cols].iter().map(|v| v.abs()).sum();
                let bound = 4.0 * cols as f32 * f32::EPSILON * abs_sum * w.scale() + 1e-6;
                for r in 0..rows {
                    let (g, e) = (got[t * rows + r], expected[t * rows + r]);
                    assert!(
                        (g - e).abs() <= bound,
                        "row {r} token {t} ({rows}x{cols}): {g} vs {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn mismatched_widths_are_errors() {
    let Some(client) = client() else { return };
    let mut rng = Lcg(5);
    let w = CubeTernary::upload(&client, weights(2, 130, &mut rng).view());
    let x = vec![0.5f32; 2 * 129];
    let handle = client.create_from_slice(&f32_bytes(&x));
    assert!(matches!(
        quantize_i8(&client, handle, x.len(), 2, &w, 1e-5),
        Err(KernelError::LengthMismatch { .. })
    ));
    let narrow = CubeTernary::upload(&client, weights(2, 100, &mut rng).view());
    let wide = CubeTernary::upload(&client, weights(2, 300, &mut rng).view());
    let x = vec![0.5f32; 100];
    let prepared = quantize_i8(
        &client,
        client.create_from_slice(&f32_bytes(&x)),
        100,
        1,
        &narrow,
        1e-5,
    )
    .unwrap();
    assert!(matches!(
        ternary_matmul(&client, &wide, &prepared),
        Err(KernelError::LengthMismatch { .. })
    ));
}

#[test]
fn the_copy_kernel_copies() {
    let Some(client) = client() else { return };
    let words: Vec<u32> = (0..1000u32).map(|i| i.wrapping_mul(2654435761)).collect();
    let handle = client.create_from_slice(&u32_bytes(&words));
    let copy = copy_words(&client, &handle, words.len());
    let back: Vec<u32> = read_i32(&client, copy)
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    assert_eq!(back, words);
}
