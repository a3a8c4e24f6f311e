//! `BitLinear`: a linear layer with ternary weights and int8 activations (BitNet b1.58, W1.58A8).

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::{backend::Backend, module::linear, Tensor};

use crate::quantize::{
    activation_scale, quantize_weight, straight_through, SharedWeightCodes, TernaryWeightCodes,
};
use crate::TernaryBackend;

/// Configuration to create a [`BitLinear`] layer with [`init`](BitLinearConfig::init).
#[derive(Config, Debug)]
pub struct BitLinearConfig {
    /// The size of the input features.
    pub d_input: usize,
    /// The size of the output features.
    pub d_output: usize,
    /// Whether to add a (full-precision) bias after the product.
    #[config(default = false)]
    pub bias: bool,
    /// Quantize activations to int8 per token (W1.58A8). Off gives W1.58A16, for experiments.
    #[config(default = true)]
    pub quantize_activations: bool,
    /// Lower bound of the weight scale and of the activation absmax, so zeros stay finite.
    #[config(default = 1e-5)]
    pub eps: f64,
    /// Initializer of the latent f32 weights.
    #[config(
        default = "Initializer::KaimingUniform{gain: 0.577_350_269_189_625_8, fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

/// A linear layer whose weights are ternary {-1, 0, +1} times a per-tensor scale, and whose
/// activations are quantized to int8 per token.
///
/// The layer keeps latent f32 weights. Its forward quantizes them (absmean) and the input
/// (absmax per token) and trains through the straight-through estimator
/// `v + (q(v) - v).detach()`, so gradients flow as if quantization were the identity.
/// For inference, [`PackedBitLinear`](crate::PackedBitLinear) stores the weights 2 bits each.
///
/// **Normalization.** BitLinear holds no norm: the RMSNorm sits *before* it, in the block
/// (pre-norm, `x + mixer(RMSNorm(x))`), so the norm is shared by the projections that read the
/// same input rather than repeated inside each of them.
///
/// Should be created with [`BitLinearConfig`].
#[derive(Module, Debug)]
pub struct BitLinear<B: Backend> {
    /// Latent weights, `[d_output, d_input]` (the PyTorch orientation, so rows are output features).
    pub weight: Param<Tensor<B, 2>>,
    /// Optional bias, `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Whether activations are quantized to int8.
    pub quantize_activations: bool,
    /// Lower bound of the scales.
    pub eps: f64,
}

impl BitLinearConfig {
    /// Initializes a new [`BitLinear`] on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> BitLinear<B> {
        let weight = self.initializer.init_with(
            [self.d_output, self.d_input],
            Some(self.d_input),
            Some(self.d_output),
            device,
        );
        let bias = self.bias.then(|| {
            self.initializer.init_with(
                [self.d_output],
                Some(self.d_input),
                Some(self.d_output),
                device,
            )
        });
        BitLinear {
            weight,
            bias,
            quantize_activations: self.quantize_activations,
            eps: self.eps,
        }
    }
}

impl<B: TernaryBackend> BitLinear<B> {
    /// Applies the quantized linear transformation, with the straight-through estimator.
    ///
    /// The product is taken between the integer codes (ternary weights, int8 activations, held
    /// as f32) and scaled afterwards by `gamma / s`, exactly as the packed kernels do: sums of
    /// such integers are exact in f32, so this forward and
    /// [`PackedBitLinear`](crate::PackedBitLinear)'s agree to the bit for W1.58A8. The scales are
    /// detached, so the gradients are the straight-through ones of
    /// `x + (q(x) − x).detach()` and `W + (q(W) − W).detach()`.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.val();
        // What the gradient does not flow through is computed on detached tensors: autodiff
        // then neither records those operations nor keeps their inputs for the backward pass.
        // Inside a `SharedWeightCodes` scope the weight was quantized once for all threads.
        let prepared = SharedWeightCodes::<B>::lookup(&self.weight.id)
            .unwrap_or_else(|| TernaryWeightCodes::new(weight.clone(), self.eps));
        let weight_codes = prepared.apply(weight); // [d_output, d_input], values in {-1, 0, 1}
        let gamma = prepared.gamma().reshape([1; D]);
        let output = if self.quantize_activations {
            let scale = activation_scale(input.clone().detach(), self.eps); // [..., 1]
            let input_scaled = input.mul(scale.clone());
            let input_codes = straight_through(
                input_scaled.clone(),
                input_scaled.clone().detach().round().clamp(-128.0, 127.0),
            );
            let acc = linear(input_codes, weight_codes.transpose(), None); // exact integer sums
            acc.mul(gamma.div(scale)) // the kernels' `gamma / s`
        } else {
            linear(input, weight_codes.transpose(), None).mul(gamma)
        };
        match &self.bias {
            Some(bias) => output.add(bias.val().unsqueeze()),
            None => output,
        }
    }
}

impl<B: Backend> BitLinear<B> {
    /// The effective weight the forward multiplies by, `Wq · gamma`, `[d_output, d_input]`.
    pub fn effective_weight(&self) -> Tensor<B, 2> {
        quantize_weight(self.weight.val(), self.eps)
    }

    /// `[d_input, d_output]`.
    pub fn dims(&self) -> [usize; 2] {
        let [d_output, d_input] = self.weight.dims();
        [d_input, d_output]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::TensorData;

    type B = NdArray;

    fn layer(weight: [[f32; 3]; 2], quantize_activations: bool) -> BitLinear<B> {
        let device = Default::default();
        let mut layer = BitLinearConfig::new(3, 2)
            .with_quantize_activations(quantize_activations)
            .init::<B>(&device);
        layer.weight = Param::from_tensor(Tensor::from_floats(weight, &device));
        layer
    }

    #[test]
    fn forward_by_hand() {
        // W = [[0.4, -0.05, -0.3], [0.2, 0.25, -0.6]]: mean|W| = 1.8 / 6 = 0.3.
        // W / 0.3 = [[1.33, -0.17, -1], [0.67, 0.83, -2]] → Wq = [[1, 0, -1], [1, 1, -1]].
        let layer = layer([[0.4, -0.05, -0.3], [0.2, 0.25, -0.6]], true);
        // x = [1.0, 0.5, -0.25]: absmax 1 → s = 127; x·s = [127, 63.5, -31.75] → [127, 64, -32].
        let x = Tensor::<B, 2>::from_floats([[1.0, 0.5, -0.25]], &Default::default());
        let y = layer.forward(x).into_data().to_vec::<f32>().unwrap();
        // y0 = (127 - (-32)) · 0.3 / 127 = 159 · 0.3 / 127; y1 = (127 + 64 + 32) · 0.3 / 127.
        let expected = [159.0 * 0.3 / 127.0, 223.0 * 0.3 / 127.0];
        for (a, e) in y.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{y:?} vs {expected:?}");
        }
    }

    #[test]
    fn forward_without_activation_quantization_by_hand() {
        let layer = layer([[0.4, -0.05, -0.3], [0.2, 0.25, -0.6]], false);
        let x = Tensor::<B, 2>::from_floats([[1.0, 0.5, -0.25]], &Default::default());
        let y = layer.forward(x).into_data().to_vec::<f32>().unwrap();
        // y0 = (1 + 0.25) · 0.3, y1 = (1 + 0.5 + 0.25) · 0.3.
        let expected = [1.25 * 0.3, 1.75 * 0.3];
        for (a, e) in y.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{y:?} vs {expected:?}");
        }
    }

    #[test]
    fn effective_weight_is_ternary_times_gamma() {
        let device = Default::default();
        let layer = BitLinearConfig::new(37, 11).init::<B>(&device);
        let gamma = layer.weight.val().abs().mean().into_scalar();
        let effective = layer
            .effective_weight()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(effective.iter().any(|&v| v != 0.0));
        for v in effective {
            let code = v / gamma;
            assert!(
                code == 0.0 || (code.abs() - 1.0).abs() < 1e-6,
                "{v} is not in {{-1, 0, 1}} · {gamma}"
            );
        }
    }

    #[test]
    fn zeros_stay_finite() {
        let device = Default::default();
        let layer = BitLinearConfig::new(4, 3)
            .with_bias(true)
            .with_initializer(Initializer::Zeros)
            .init::<B>(&device);
        let x = Tensor::<B, 2>::from_floats([[0.0; 4], [1.0, -2.0, 3.0, 0.5]], &device);
        let y = layer.forward(x);
        y.into_data()
            .assert_eq(&TensorData::from([[0.0f32; 3]; 2]), false);

        let layer = BitLinearConfig::new(4, 3).init::<B>(&device);
        let y = layer.forward(Tensor::<B, 2>::zeros([2, 4], &device));
        y.into_data()
            .assert_eq(&TensorData::from([[0.0f32; 3]; 2]), false);
    }

    #[test]
    fn straight_through_gradients_match_explicit_formulas() {
        type A = Autodiff<NdArray>;
        let device = Default::default();
        let (tokens, d_in, d_out) = (5, 7, 4);
        let layer = BitLinearConfig::new(d_in, d_out)
            .with_bias(true)
            .init::<A>(&device);
        let x_values: Vec<f32> = (0..tokens * d_in)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let x =
            Tensor::<A, 2>::from_data(TensorData::new(x_values.clone(), [tokens, d_in]), &device)
                .require_grad();
        // L = Σ c ⊙ y with fixed, distinct coefficients, so dL/dy = c.
        let c_values: Vec<f32> = (0..tokens * d_out)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let c =
            Tensor::<A, 2>::from_data(TensorData::new(c_values.clone(), [tokens, d_out]), &device);
        let loss = layer.forward(x.clone()).mul(c).sum();
        let grads = loss.backward();
        let grad_w = layer
            .weight
            .grad(&grads)
            .unwrap()
            .to_data()
            .to_vec::<f32>()
            .unwrap();
        let grad_x = x.grad(&grads).unwrap().to_data().to_vec::<f32>().unwrap();

        // Explicit STE formulas, computed here in plain Rust:
        // dL/dW[o, i] = Σ_t c[t, o] · xq[t, i],   dL/dx[t, i] = Σ_o c[t, o] · Weff[o, i].
        let xq: Vec<f32> = x_values
            .chunks(d_in)
            .flat_map(|row| {
                let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-5);
                let s = (1.0 / absmax) * 127.0;
                row.iter()
                    .map(move |v| (v * s).round_ties_even().clamp(-128.0, 127.0) / s)
                    .collect::<Vec<_>>()
            })
            .collect();
        let w: Vec<f32> = layer.weight.val().into_data().to_vec().unwrap();
        let gamma = w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32;
        let w_eff: Vec<f32> = w
            .iter()
            .map(|v| (v / gamma).round_ties_even().clamp(-1.0, 1.0) * gamma)
            .collect();
        for o in 0..d_out {
            for i in 0..d_in {
                let expected: f32 = (0..tokens)
                    .map(|t| c_values[t * d_out + o] * xq[t * d_in + i])
                    .sum();
                let got = grad_w[o * d_in + i];
                assert!(
                    (got - expected).abs() < 1e-5,
                    "dL/dW[{o},{i}] = {got}, expected {expected}"
                );
            }
        }
        for t in 0..tokens {
            for i in 0..d_in {
                let expected: f32 = (0..d_out)
                    .map(|o| c_values[t * d_out + o] * w_eff[o * d_in + i])
                    .sum();
                let got = grad_x[t * d_in + i];
                assert!(
                    (got - expected).abs() < 1e-5,
                    "dL/dx[{t},{i}] = {got}, expected {expected}"
                );
            }
        }
    }
}
