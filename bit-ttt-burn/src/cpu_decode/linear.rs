//! The projections of the fused decoder: packed ternary (the CPU kernels, reading the weights
//! where they lie) or f32.

use std::cell::OnceCell;

use bit_ttt_kernels::cpu::{self, CpuOptions, QuantizedActivations};
use burn::tensor::backend::Backend;

use rayon::prelude::*;

use super::math::{add_vec_mat, axpy};
use super::values;
use crate::{ActivationPrecision, BitTttError, PackedBitLinear, Projection, TernaryWeights};

/// Below this many f32 weights a projection stays on one thread (splitting costs more).
const MIN_PARALLEL_F32: usize = 1 << 16;

/// One projection of a token, `y = x Wᵀ (+ b)`.
#[derive(Debug)]
pub(crate) enum DecodeLinear {
    /// 2-bit ternary weights (owned, or inside a memory-mapped file).
    Ternary {
        /// The packed weights.
        weights: TernaryWeights,
        /// Int8 or f32 activations.
        precision: ActivationPrecision,
        /// `[d_output]`.
        bias: Option<Vec<f32>>,
    },
    /// Full-precision weights in Burn's `Linear` orientation.
    Float {
        /// `[d_input, d_output]`, row-major.
        weight: Vec<f32>,
        /// Output features.
        d_output: usize,
        /// `[d_output]`.
        bias: Option<Vec<f32>>,
    },
}

/// A token's input to one or more projections, with its int8 quantization made once and shared
/// by every ternary projection that reads it (Q, K, V and the gate read the same input).
pub(crate) struct Input<'a> {
    x: &'a [f32],
    quantized: OnceCell<(f32, QuantizedActivations)>,
}

impl<'a> Input<'a> {
    /// The input `x`, `[d_input]`.
    pub fn new(x: &'a [f32]) -> Self {
        Self {
            x,
            quantized: OnceCell::new(),
        }
    }

    /// `x` quantized with `eps` (made on first use; a projection with another eps, which no
    /// model of this crate has, quantizes afresh).
    fn quantized(&self, eps: f32) -> std::borrow::Cow<'_, QuantizedActivations> {
        let (cached_eps, q) = self.quantized.get_or_init(|| {
            (
                eps,
                QuantizedActivations::quantize(self.x, self.x.len(), eps),
            )
        });
        if *cached_eps == eps {
            std::borrow::Cow::Borrowed(q)
        } else {
            std::borrow::Cow::Owned(QuantizedActivations::quantize(self.x, self.x.len(), eps))
        }
    }
}

impl DecodeLinear {
    /// The decode form of a model's projection: ternary ones are packed on the way (a packed
    /// one shares its weights, a memory-mapped file stays mapped).
    pub fn from_projection<B: Backend>(projection: &Projection<B>) -> Result<Self, BitTttError> {
        let bias = |b: &Option<burn::module::Param<burn::tensor::Tensor<B, 1>>>| {
            b.as_ref().map(|b| values(b.val())).transpose()
        };
        Ok(match projection {
            Projection::Ternary(layer) => {
                Self::from_packed(&PackedBitLinear::from_bit_linear(layer)?)?
            }
            Projection::Packed(layer) => Self::from_packed(layer)?,
            Projection::Float(layer) => DecodeLinear::Float {
                d_output: layer.weight.dims()[1],
                weight: values(layer.weight.val())?,
                bias: bias(&layer.bias)?,
            },
        })
    }

    fn from_packed<B: Backend>(layer: &PackedBitLinear<B>) -> Result<Self, BitTttError> {
        Ok(DecodeLinear::Ternary {
            weights: layer.weight.clone(),
            precision: if layer.quantize_activations {
                ActivationPrecision::Int8 {
                    eps: layer.eps as f32,
                }
            } else {
                ActivationPrecision::F32
            },
            bias: layer.bias.as_ref().map(|b| values(b.val())).transpose()?,
        })
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        match self {
            DecodeLinear::Ternary { weights, .. } => weights.view().cols(),
            DecodeLinear::Float {
                weight, d_output, ..
            } => weight.len() / d_output.max(&1),
        }
    }

    /// Checks the projection maps `d_input` features to `d_output`.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] naming `what` and both shapes.
    pub fn check_shape(
        &self,
        d_input: usize,
        d_output: usize,
        what: &str,
    ) -> Result<(), BitTttError> {
        if (self.d_input(), self.d_output()) == (d_input, d_output) {
            return Ok(());
        }
        Err(BitTttError::InvalidInput(format!(
            "{what} maps {} to {} features, the model needs {d_input} to {d_output}",
            self.d_input(),
            self.d_output()
        )))
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        match self {
            DecodeLinear::Ternary { weights, .. } => weights.view().rows(),
            DecodeLinear::Float { d_output, .. } => *d_output,
        }
    }

    /// `out = input Wᵀ (+ b)`, the ternary product split over `threads` threads.
    ///
    /// # Shapes
    /// - input: `[d_input]`, out: `[d_output]`
    pub fn forward(&self, input: &Input<'_>, out: &mut [f32], threads: usize) {
        let options = CpuOptions {
            kernel: None,
            threads: Some(threads),
        };
        let bias = match self {
            DecodeLinear::Ternary {
                weights,
                precision,
                bias,
            } => {
                let view = weights.view();
                let done = match precision {
                    ActivationPrecision::Int8 { eps } => {
                        cpu::gemm_i8_with(view, &input.quantized(*eps), out, options)
                    }
                    ActivationPrecision::F32 => cpu::gemm_f32_with(view, input.x, 1, out, options),
                };
                done.expect("the global kernel choice was checked by set_kernel_choice");
                bias
            }
            DecodeLinear::Float {
                weight,
                bias,
                d_output,
            } => {
                if threads > 1 && weight.len() >= MIN_PARALLEL_F32 {
                    // Column chunks on the current pool; each element sums the rows in the
                    // same order as the one-thread loop, so the result is the same.
                    let chunk = d_output.div_ceil(threads * 4).max(16);
                    out.par_chunks_mut(chunk).enumerate().for_each(|(c, part)| {
                        let columns = c * chunk..c * chunk + part.len();
                        part.fill(0.0);
                        for (xr, row) in input.x.iter().zip(weight.chunks_exact(*d_output)) {
                            axpy(*xr, &row[columns.clone()], part);
                        }
                    });
                } else {
                    out.fill(0.0);
                    add_vec_mat(input.x, weight, out);
                }
                bias
            }
        };
        if let Some(bias) = bias {
            for (o, b) in out.iter_mut().zip(bias) {
                *o += b;
            }
        }
    }
}
