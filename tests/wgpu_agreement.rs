//! The same layer and input on `ndarray` and on `wgpu` (on CI: lavapipe) give the same outputs.

mod common;

use bit_ttt::bit_ttt_burn::{BitLinear, BitLinearConfig, BitLlama, TernaryBackend};
use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::NdArray;
use burn::module::Param;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// The same layer on another backend: same latent weights, bias and settings.
fn to_backend<B1: Backend, B2: Backend>(
    layer: &BitLinear<B1>,
    device: &B2::Device,
) -> BitLinear<B2> {
    BitLinear {
        weight: Param::from_tensor(Tensor::from_data(layer.weight.val().into_data(), device)),
        bias: layer
            .bias
            .as_ref()
            .map(|b| Param::from_tensor(Tensor::from_data(b.val().into_data(), device))),
        quantize_activations: layer.quantize_activations,
        eps: layer.eps,
    }
}

/// A tiny deterministic generator (64-bit LCG), so the test never depends on a backend's RNG.
struct Lcg(u64);

impl Lcg {
    /// Uniform in [0, 1).
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Latent weights whose ratios `|w| / gamma` stay far from the rounding boundary 0.5: half are
/// near 0 (|w| <= 0.05) and half near 1 (0.9..1.1), so gamma is about 0.5 and every ratio is
/// below 0.15 or above 1.5. Random weights put some ratio next to 0.5 now and then, and two
/// backends whose float arithmetic differs in the last bit may then round it to different
/// ternary codes: a one-code difference, not a disagreement between the backends.
fn weights_away_from_ties(rows: usize, cols: usize, rng: &mut Lcg) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| {
            let sign = if rng.next() < 0.5 { -1.0 } else { 1.0 };
            let magnitude = if i % 2 == 0 {
                0.05 * rng.next()
            } else {
                0.9 + 0.2 * rng.next()
            };
            sign * magnitude
        })
        .collect()
}

/// Activations whose int8 codes are unambiguous: each row holds one element of absolute value
/// exactly `127 * f` (so the scale is `1 / f`) and others `(k + u) * f` with an integer
/// `|k| <= 120` and `|u| <= 0.25`, a quarter code away from every rounding boundary.
fn activations_away_from_ties(tokens: usize, cols: usize, rng: &mut Lcg) -> Vec<f32> {
    let mut x = Vec::with_capacity(tokens * cols);
    for t in 0..tokens {
        let f = 0.01 * (t + 1) as f32;
        let peak = (t * 7) % cols;
        for c in 0..cols {
            let code = if c == peak {
                if t % 2 == 0 {
                    127.0
                } else {
                    -127.0
                }
            } else {
                let k = (rng.next() * 241.0).floor() - 120.0;
                let u = 0.5 * rng.next() - 0.25;
                k + u
            };
            x.push(code * f);
        }
    }
    x
}

#[test]
fn bit_linear_ndarray_and_wgpu_agree() {
    if !common::wgpu_available("bit_linear_ndarray_and_wgpu_agree") {
        return;
    }
    let cpu = Default::default();
    let gpu = WgpuDevice::default();
    let (d_input, d_output) = (67, 29);
    let mut rng = Lcg(2024);
    for quantize_activations in [true, false] {
        let mut layer = BitLinearConfig::new(d_input, d_output)
            .with_bias(true)
            .with_quantize_activations(quantize_activations)
            .init::<NdArray>(&cpu);
        let weight = weights_away_from_ties(d_output, d_input, &mut rng);
        layer.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(weight, [d_output, d_input]),
            &cpu,
        ));
        let x = Tensor::<NdArray, 3>::from_data(
            TensorData::new(
                activations_away_from_ties(2 * 5, d_input, &mut rng),
                [2, 5, d_input],
            ),
            &cpu,
        );

        let expected = layer
            .forward(x.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let layer_gpu = to_backend::<NdArray, Wgpu>(&layer, &gpu);
        let x_gpu = Tensor::<Wgpu, 3>::from_data(x.into_data(), &gpu);
        let got = layer_gpu
            .forward(x_gpu)
            .into_data()
            .to_vec::<f32>()
            .unwrap();

        let diff = common::max_abs_diff(&got, &expected);
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "ndarray and wgpu differ by {diff} (largest output {scale}, quantize_activations = {quantize_activations})"
        );
    }
}

/// The logits of the model saved in `dir`, loaded on backend `B`, for one sequence.
fn logits<B: TernaryBackend>(
    dir: &std::path::Path,
    tokens: &[i64],
    device: &B::Device,
) -> Vec<f32> {
    let (model, _) = BitLlama::<B>::load(dir, device).unwrap();
    let input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.to_vec(), [1, tokens.len()]), device);
    model.forward(input).into_data().to_vec::<f32>().unwrap()
}

/// A whole model (tiny, f32 projections so that only float rounding can differ) loaded from the
/// same files on both backends gives the same logits, for every mixer.
#[test]
fn bit_llama_ndarray_and_wgpu_agree() {
    use bit_ttt::bit_ttt_burn::{BitLlamaConfig, MixerKind};

    if !common::wgpu_available("bit_llama_ndarray_and_wgpu_agree") {
        return;
    }
    let cpu = Default::default();
    let gpu = WgpuDevice::default();
    let tokens: Vec<i64> = (0..21).map(|i| (i * 13 + 5) % 40).collect();
    for mixer in [
        MixerKind::TttLinear,
        MixerKind::TttMlp,
        MixerKind::Attention,
    ] {
        let config = BitLlamaConfig::tiny(40)
            .with_mixer(mixer)
            .with_ternary(false);
        let dir = tempfile::tempdir().unwrap();
        config
            .init::<NdArray>(&cpu)
            .save(&config, dir.path())
            .unwrap();

        let expected = logits::<NdArray>(dir.path(), &tokens, &cpu);
        let got = logits::<Wgpu>(dir.path(), &tokens, &gpu);

        let diff = common::max_abs_diff(&got, &expected);
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{}: ndarray and wgpu logits differ by {diff} (largest {scale})",
            mixer.name()
        );
    }
}

/// The packed file on wgpu: every projection's 2-bit weights are made resident on the device at
/// load (`TernaryBackend::upload_ternary`), the forward gives ndarray's logits, and a context
/// read by the fused CPU decoder and saved as a `.soul` file continues on wgpu.
///
/// Tolerance: the projections quantize their activations to int8, and an activation within a
/// float rounding of a code boundary can take the neighbouring code on one backend (see
/// `examples/backend_swap.rs`), a step of 1/127 of a row's absmax that moves the logits by up
/// to about 1e-2 of the largest; 5e-2 allows for that and still catches a wrong weight, state
/// or position (those move them by the order of the logits themselves).
#[test]
fn packed_file_and_fused_state_continue_on_wgpu() {
    use bit_ttt::bit_ttt_burn::cpu_decode::CpuDecoder;
    use bit_ttt::bit_ttt_burn::{BitLlamaConfig, Projection};

    if !common::wgpu_available("packed_file_and_fused_state_continue_on_wgpu") {
        return;
    }
    let cpu = Default::default();
    let gpu = WgpuDevice::default();
    let config = BitLlamaConfig::tiny(40).with_ternary_head(true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.packed.safetensors");
    config
        .init::<NdArray>(&cpu)
        .save_packed(&config, &path)
        .unwrap();
    let (on_cpu, _) = BitLlama::<NdArray>::load_packed(&path, &cpu).unwrap();
    let (on_gpu, _) = BitLlama::<Wgpu>::load_packed(&path, &gpu).unwrap();
    let packed: Vec<_> = on_gpu
        .projections()
        .into_iter()
        .filter_map(|(name, p)| match p {
            Projection::Packed(layer) => Some((name, layer)),
            _ => None,
        })
        .collect();
    assert!(!packed.is_empty());
    for (name, layer) in &packed {
        assert!(layer.weight.is_resident_on(&gpu), "{name} is not resident");
    }

    let close = |got: &[f32], expected: &[f32], what: &str| {
        let diff = common::max_abs_diff(got, expected);
        let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert!(
            diff <= 5e-2 * scale,
            "{what}: wgpu and CPU logits differ by {diff} (largest {scale})"
        );
    };
    let tokens: Vec<u32> = (0..13).map(|i| (i * 7 + 3) % 40).collect();
    let forward = |model_tokens: &[u32]| -> (Vec<f32>, Vec<f32>) {
        let ids: Vec<i64> = model_tokens.iter().map(|&t| i64::from(t)).collect();
        let cpu_logits = on_cpu
            .forward(Tensor::<NdArray, 2, Int>::from_data(
                TensorData::new(ids.clone(), [1, ids.len()]),
                &cpu,
            ))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let gpu_logits = on_gpu
            .forward(Tensor::<Wgpu, 2, Int>::from_data(
                TensorData::new(ids.clone(), [1, ids.len()]),
                &gpu,
            ))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        (gpu_logits, cpu_logits)
    };
    let (gpu_logits, cpu_logits) = forward(&tokens);
    close(&gpu_logits, &cpu_logits, "packed forward");

    // Read a context with the fused CPU decoder, save it, continue on wgpu.
    let decoder = CpuDecoder::new(&on_cpu, 1).unwrap();
    let mut fused = decoder.new_state();
    decoder.read(&tokens[..10], &mut fused).unwrap();
    let soul = dir.path().join("context.soul");
    decoder.save_state(&fused, &soul).unwrap();
    let mut on_device = on_gpu.load_state(&soul).unwrap();
    assert_eq!(on_device.position, 10);
    for &token in &tokens[10..] {
        let expected = decoder.step(token, &mut fused).unwrap();
        let got = on_gpu.read(&[token], &mut on_device).unwrap();
        close(&got, &expected, "continued on wgpu");
    }
}

/// The packed product through `TernaryBackend` on wgpu (the CubeCL kernels, weights resident
/// on the device) and on ndarray (the CPU kernels): bit for bit with int8 activations (the same
/// codes, exact integer sums, the same final expression), within the rounding of a sum in f32;
/// odd shapes, a transposed input, and no tokens at all.
#[test]
fn packed_products_on_wgpu_equal_the_cpu_kernels() {
    use bit_ttt::bit_ttt_burn::kernels::PackedTernary;
    use bit_ttt::bit_ttt_burn::{ActivationPrecision, TernaryWeights};
    use burn::tensor::TensorPrimitive;

    if !common::wgpu_available("packed_products_on_wgpu_equal_the_cpu_kernels") {
        return;
    }
    fn product<B: TernaryBackend>(
        x: Tensor<B, 2>,
        w: &TernaryWeights,
        precision: ActivationPrecision,
    ) -> Vec<f32> {
        let resident = B::upload_ternary(w, &x.device()).unwrap();
        let y = B::ternary_linear(x.into_primitive().tensor(), &resident, precision);
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y))
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    }
    let (cpu, gpu) = (Default::default(), WgpuDevice::default());
    let mut rng = Lcg(11);
    for (rows, cols, tokens) in [
        (1, 1, 1),
        (3, 127, 2),
        (600, 129, 5),
        (7, 4097, 33),
        (64, 128, 0),
    ] {
        let values: Vec<i8> = (0..rows * cols)
            .map(|_| (rng.next() * 2.999) as i8 - 1)
            .collect();
        let w = TernaryWeights::owned(PackedTernary::pack(&values, rows, cols, 0.41).unwrap());
        let x: Vec<f32> = (0..tokens * cols).map(|_| 4.0 * rng.next() - 2.0).collect();
        let data = TensorData::new(x, [tokens, cols]);
        for precision in [
            ActivationPrecision::Int8 { eps: 1e-5 },
            ActivationPrecision::F32,
        ] {
            let expected = product(
                Tensor::<NdArray, 2>::from_data(data.clone(), &cpu),
                &w,
                precision,
            );
            let got = product(
                Tensor::<Wgpu, 2>::from_data(data.clone(), &gpu),
                &w,
                precision,
            );
            assert_eq!(got.len(), tokens * rows);
            if let ActivationPrecision::Int8 { .. } = precision {
                assert_eq!(got, expected, "{rows}x{cols}, {tokens} tokens, int8");
            } else {
                let diff = common::max_abs_diff(&got, &expected);
                assert!(
                    diff <= 1e-4 * cols as f32,
                    "{rows}x{cols}, {tokens} tokens, f32: {diff}"
                );
            }
        }
        if tokens > 1 {
            // Stored [cols, tokens] and transposed: the device reads it in logical order.
            let xt = Tensor::<Wgpu, 2>::from_data(data.clone(), &gpu)
                .transpose()
                .into_data();
            let view = Tensor::<Wgpu, 2>::from_data(xt, &gpu).transpose();
            let precision = ActivationPrecision::Int8 { eps: 1e-5 };
            let expected = product(
                Tensor::<NdArray, 2>::from_data(data.clone(), &cpu),
                &w,
                precision,
            );
            assert_eq!(
                product(view, &w, precision),
                expected,
                "{rows}x{cols} transposed"
            );
        }
    }
}
