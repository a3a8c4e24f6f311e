//! The same layer and input on `ndarray` and on `wgpu` (on CI: lavapipe) give the same outputs.

mod common;

use bit_ttt::bit_ttt_burn::{BitLinear, BitLinearConfig};
use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::NdArray;
use burn::module::Param;
use burn::tensor::{backend::Backend, Distribution, Tensor};

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

#[test]
fn bit_linear_ndarray_and_wgpu_agree() {
    if !common::wgpu_available("bit_linear_ndarray_and_wgpu_agree") {
        return;
    }
    let cpu = Default::default();
    let gpu = WgpuDevice::default();
    for quantize_activations in [true, false] {
        let layer = BitLinearConfig::new(67, 29)
            .with_bias(true)
            .with_quantize_activations(quantize_activations)
            .init::<NdArray>(&cpu);
        let x = Tensor::<NdArray, 3>::random([2, 5, 67], Distribution::Normal(0.0, 1.0), &cpu);

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
        assert!(
            diff < 1e-4,
            "ndarray and wgpu differ by {diff} (quantize_activations = {quantize_activations})"
        );
    }
}
