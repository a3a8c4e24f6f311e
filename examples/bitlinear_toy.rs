//! Trains the same small MLP twice on a toy regression task — once with ternary `BitLinear`
//! layers (W1.58A8), once with f32 `Linear` layers — and prints both losses side by side.
//!
//! ```text
//! cargo run --release --example bitlinear_toy
//! ```
//!
//! The task: regress the outputs of a fixed random "teacher" MLP (32 → 64 → 8, tanh) from
//! Gaussian inputs. Both students have the same shape (32 → 128 → 8, GELU) and the same optimizer.

use bit_ttt::bit_ttt_burn::{BitLinear, BitLinearConfig, TernaryBackend};
use burn::backend::ndarray::NdArrayDevice;
use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{gelu, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

type B = Autodiff<NdArray>;

const D_IN: usize = 32;
const D_HIDDEN: usize = 128;
const D_OUT: usize = 8;
const BATCH: usize = 256;
const STEPS: usize = 400;

/// A two-layer MLP with ternary projections.
#[derive(Module, Debug)]
struct TernaryMlp<B: Backend> {
    up: BitLinear<B>,
    down: BitLinear<B>,
}

/// The same MLP in full precision.
#[derive(Module, Debug)]
struct FloatMlp<B: Backend> {
    up: Linear<B>,
    down: Linear<B>,
}

/// What the training loop needs of a student.
trait Student<B: Backend>: Module<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
}

impl<B: TernaryBackend> Student<B> for TernaryMlp<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down.forward(gelu(self.up.forward(x)))
    }
}

impl<B: Backend> Student<B> for FloatMlp<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down.forward(gelu(self.up.forward(x)))
    }
}

/// The fixed teacher the students imitate.
struct Teacher<B: Backend> {
    w1: Tensor<B, 2>,
    w2: Tensor<B, 2>,
}

impl<B: Backend> Teacher<B> {
    fn new(device: &B::Device) -> Self {
        let w1 = Tensor::random(
            [D_IN, 64],
            Distribution::Normal(0.0, 1.0 / (D_IN as f64).sqrt()),
            device,
        );
        let w2 = Tensor::random([64, D_OUT], Distribution::Normal(0.0, 1.0 / 8.0), device);
        Self { w1, w2 }
    }

    fn batch(&self, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let x = Tensor::random([BATCH, D_IN], Distribution::Normal(0.0, 1.0), device);
        let y = tanh(x.clone().matmul(self.w1.clone())).matmul(self.w2.clone());
        (x, y)
    }
}

/// Trains `model` with Adam and returns the loss every 50 steps and the final held-out loss.
fn train<M>(mut model: M, teacher: &Teacher<B>, device: &NdArrayDevice) -> (Vec<f32>, f32)
where
    M: Student<B> + AutodiffModule<B>,
    M::InnerModule: Student<NdArray>,
{
    let mut optim = AdamConfig::new().init::<B, M>();
    let mut curve = Vec::new();
    for step in 0..STEPS {
        let (x, y) = teacher.batch(device);
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        if step % 50 == 0 {
            curve.push(loss.clone().into_scalar());
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    <B as Backend>::seed(device, 1234);
    let (x, y) = teacher.batch(device);
    let held_out = (model.valid().forward(x.inner()) - y.inner())
        .powi_scalar(2)
        .mean();
    (curve, held_out.into_scalar())
}

fn main() {
    let device = Default::default();
    <B as Backend>::seed(&device, 42);
    let teacher = Teacher::<B>::new(&device);
    // Both students start from the same seed so that only the layer type differs.
    <B as Backend>::seed(&device, 7);
    let ternary = TernaryMlp {
        up: BitLinearConfig::new(D_IN, D_HIDDEN)
            .with_bias(true)
            .init(&device),
        down: BitLinearConfig::new(D_HIDDEN, D_OUT)
            .with_bias(true)
            .init(&device),
    };
    <B as Backend>::seed(&device, 7);
    let float = FloatMlp {
        up: LinearConfig::new(D_IN, D_HIDDEN).init(&device),
        down: LinearConfig::new(D_HIDDEN, D_OUT).init(&device),
    };
    let baseline = {
        let (_, y) = teacher.batch(&device);
        y.powi_scalar(2).mean().into_scalar()
    };

    println!("toy regression: teacher MLP {D_IN}->64->{D_OUT}, students {D_IN}->{D_HIDDEN}->{D_OUT}, batch {BATCH}, {STEPS} Adam steps");
    println!("mean-squared error of predicting 0: {baseline:.5}");
    let (ternary_curve, ternary_final) = train(ternary, &teacher, &device);
    <B as Backend>::seed(&device, 99);
    let (float_curve, float_final) = train(float, &teacher, &device);

    println!(
        "{:>6}  {:>14}  {:>14}",
        "step", "BitLinear MSE", "f32 Linear MSE"
    );
    for (i, (t, f)) in ternary_curve.iter().zip(&float_curve).enumerate() {
        println!("{:>6}  {t:>14.5}  {f:>14.5}", i * 50);
    }
    println!("held-out MSE: BitLinear (W1.58A8) {ternary_final:.5}, f32 Linear {float_final:.5}");
}
