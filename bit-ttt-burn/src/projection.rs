//! `Projection`: one linear map that is either ternary ([`BitLinear`]) or full precision.
//!
//! Models use it for every projection so that a single `ternary` switch compares ternary and
//! f32 models with the same code.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::{BitLinear, BitLinearConfig, BitTttError, PackedBitLinear, TernaryBackend};

/// Configuration of a [`Projection`].
#[derive(Config, Debug)]
pub struct ProjectionConfig {
    /// The size of the input features.
    pub d_input: usize,
    /// The size of the output features.
    pub d_output: usize,
    /// Ternary weights (BitLinear, W1.58A8) when true, an f32 `Linear` when false.
    #[config(default = true)]
    pub ternary: bool,
    /// Whether the projection adds a bias.
    #[config(default = false)]
    pub bias: bool,
}

/// A linear projection, ternary or full precision.
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    /// Ternary weights, int8 activations.
    Ternary(BitLinear<B>),
    /// Plain f32 weights.
    Float(Linear<B>),
    /// Ternary weights packed 2 bits each, for inference (see [`PackedBitLinear`]).
    Packed(PackedBitLinear<B>),
}

impl ProjectionConfig {
    /// Initializes a new [`Projection`] on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Projection<B> {
        if self.ternary {
            Projection::Ternary(
                BitLinearConfig::new(self.d_input, self.d_output)
                    .with_bias(self.bias)
                    .init(device),
            )
        } else {
            Projection::Float(
                LinearConfig::new(self.d_input, self.d_output)
                    .with_bias(self.bias)
                    .init(device),
            )
        }
    }
}

impl<B: TernaryBackend> Projection<B> {
    /// Applies the projection.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Projection::Ternary(layer) => layer.forward(input),
            Projection::Float(layer) => layer.forward(input),
            Projection::Packed(layer) => layer.forward(input),
        }
    }
}

impl<B: Backend> Projection<B> {
    /// The inference form: a ternary projection packed 2 bits a weight; others unchanged.
    ///
    /// # Errors
    /// [`BitTttError::Kernel`] if the latent weights hold NaN or infinity.
    pub fn into_packed(self) -> Result<Self, BitTttError> {
        Ok(match self {
            Projection::Ternary(layer) => {
                Projection::Packed(PackedBitLinear::from_bit_linear(&layer)?)
            }
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn both_kinds_map_shapes() {
        let device = Default::default();
        for ternary in [true, false] {
            let p = ProjectionConfig::new(5, 3)
                .with_ternary(ternary)
                .init::<NdArray>(&device);
            assert_eq!(matches!(p, Projection::Ternary(_)), ternary);
            let y = p.forward(Tensor::<NdArray, 3>::ones([2, 4, 5], &device));
            assert_eq!(y.dims(), [2, 4, 3]);
        }
    }
}
