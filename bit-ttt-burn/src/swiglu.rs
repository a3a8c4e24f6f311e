//! `SwiGlu`: the gated feed-forward network of Llama-style blocks (SiLU), and BitNet b1.58's
//! variant (squared ReLU, an RMSNorm on the hidden before the down projection).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{activation::relu, activation::silu, backend::Backend, Tensor};

use crate::model::FfnActivation;
use crate::{Projection, ProjectionConfig, TernaryBackend};

/// Configuration of a [`SwiGlu`] feed-forward network.
#[derive(Config, Debug)]
pub struct SwiGluConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width.
    pub d_ffn: usize,
    /// Ternary projections (BitLinear) or f32.
    #[config(default = true)]
    pub ternary: bool,
    /// The gate's activation.
    #[config(default = "FfnActivation::Silu")]
    pub activation: FfnActivation,
    /// An RMSNorm of the hidden `act(gate) ⊙ up` before `down_proj` (BitNet's `ffn_sub_norm`).
    #[config(default = false)]
    pub sub_norm: bool,
    /// The sub-norm's epsilon.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
}

/// `down(act(gate(x)) ⊙ up(x))`, with `act` SiLU or squared ReLU, and optionally
/// `down(RMSNorm(act(gate(x)) ⊙ up(x)))`.
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    /// `d_model → d_ffn`, through the activation.
    pub gate_proj: Projection<B>,
    /// `d_model → d_ffn`.
    pub up_proj: Projection<B>,
    /// `d_ffn → d_model`.
    pub down_proj: Projection<B>,
    /// The hidden's RMSNorm (`ffn_sub_norm`), if the model has one.
    pub sub_norm: Option<RmsNorm<B>>,
    /// The gate's activation.
    #[module(skip)]
    pub activation: FfnActivation,
}

impl SwiGluConfig {
    /// Initializes a new [`SwiGlu`] on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> SwiGlu<B> {
        let proj = |d_in, d_out| {
            ProjectionConfig::new(d_in, d_out)
                .with_ternary(self.ternary)
                .init(device)
        };
        SwiGlu {
            gate_proj: proj(self.d_model, self.d_ffn),
            up_proj: proj(self.d_model, self.d_ffn),
            down_proj: proj(self.d_ffn, self.d_model),
            sub_norm: self.sub_norm.then(|| {
                RmsNormConfig::new(self.d_ffn)
                    .with_epsilon(self.norm_eps)
                    .init(device)
            }),
            activation: self.activation,
        }
    }
}

impl<B: Backend> SwiGlu<B> {
    /// The projections with their names inside the network, in file order.
    pub fn projections(&self) -> Vec<(&'static str, &Projection<B>)> {
        vec![
            ("gate_proj", &self.gate_proj),
            ("up_proj", &self.up_proj),
            ("down_proj", &self.down_proj),
        ]
    }

    /// As [`projections`](Self::projections), mutable.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Projection<B>)> {
        vec![
            ("gate_proj", &mut self.gate_proj),
            ("up_proj", &mut self.up_proj),
            ("down_proj", &mut self.down_proj),
        ]
    }
}

impl<B: TernaryBackend> SwiGlu<B> {
    /// Applies the network.
    ///
    /// # Shapes
    /// - x: `[..., d_model]`; returns `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gate = self.gate_proj.forward(x.clone());
        let gate = match self.activation {
            FfnActivation::Silu => silu(gate),
            FfnActivation::Relu2 => relu(gate).powi_scalar(2),
        };
        let hidden = gate.mul(self.up_proj.forward(x)); // [..., d_ffn]
        let hidden = match &self.sub_norm {
            Some(norm) => norm.forward(hidden),
            None => hidden,
        };
        self.down_proj.forward(hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Projection;
    use burn::backend::NdArray;
    use burn::module::Param;

    #[test]
    fn forward_by_hand_with_f32_projections() {
        let device = Default::default();
        let mut ffn = SwiGluConfig::new(2, 1)
            .with_ternary(false)
            .init::<NdArray>(&device);
        let set = |p: &mut Projection<NdArray>, w: [[f32; 1]; 2]| {
            if let Projection::Float(linear) = p {
                linear.weight = Param::from_tensor(Tensor::from_floats(w, &device));
                linear.bias = None;
            }
        };
        // Linear weights are [d_in, d_out]: gate = x0, up = x1.
        set(&mut ffn.gate_proj, [[1.0], [0.0]]);
        set(&mut ffn.up_proj, [[0.0], [1.0]]);
        if let Projection::Float(linear) = &mut ffn.down_proj {
            linear.weight = Param::from_tensor(Tensor::from_floats([[2.0, -1.0]], &device));
            linear.bias = None;
        }
        let y = ffn
            .forward(Tensor::<NdArray, 2>::from_floats([[1.0, 3.0]], &device))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        // silu(1) · 3 = 3 / (1 + e^-1); down = [2h, -h].
        let h = 3.0 / (1.0 + (-1.0f32).exp());
        assert!(
            (y[0] - 2.0 * h).abs() < 1e-5 && (y[1] + h).abs() < 1e-5,
            "{y:?}"
        );
    }

    #[test]
    fn squared_relu_and_sub_norm_by_hand() {
        let device = Default::default();
        let mut ffn = SwiGluConfig::new(2, 2)
            .with_ternary(false)
            .with_activation(FfnActivation::Relu2)
            .with_sub_norm(true)
            .with_norm_eps(1e-12)
            .init::<NdArray>(&device);
        let set = |p: &mut Projection<NdArray>, w: [[f32; 2]; 2]| {
            if let Projection::Float(linear) = p {
                linear.weight = Param::from_tensor(Tensor::from_floats(w, &device));
                linear.bias = None;
            }
        };
        // gate = (x0, -x0), up = (x1, x1), down = identity.
        set(&mut ffn.gate_proj, [[1.0, -1.0], [0.0, 0.0]]);
        set(&mut ffn.up_proj, [[0.0, 0.0], [1.0, 1.0]]);
        set(&mut ffn.down_proj, [[1.0, 0.0], [0.0, 1.0]]);
        let y = ffn
            .forward(Tensor::<NdArray, 2>::from_floats([[2.0, 3.0]], &device))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        // hidden = (relu(2)² · 3, relu(-2)² · 3) = (12, 0); RMS = 12 / sqrt(2).
        let expected = [2f32.sqrt(), 0.0];
        assert!(
            (y[0] - expected[0]).abs() < 1e-5 && y[1].abs() < 1e-6,
            "{y:?}"
        );
    }
}
