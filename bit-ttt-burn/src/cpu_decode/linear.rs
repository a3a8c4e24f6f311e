//! The parts every block of the fused decoder is made of: its projections, packed ternary (the
//! CPU kernels, reading the weights where they lie) or f32; parameters copied out of Burn
//! tensors; RMSNorms; heads and rows spread over the kernels' threads. The mixers' CPU forms
//! (`mixer/*/decode.rs`) build on these, as [`CpuBlock`](super::CpuBlock) does.

use std::cell::OnceCell;
use std::mem::size_of;

use bit_ttt_kernels::cpu::{self, rms_norm, CpuOptions, Int8Rows, QuantizedActivations};
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use crate::{ActivationPrecision, BitTttError, PackedBitLinear, Projection, TernaryWeights};

/// All of a tensor's values as f32, row-major.
pub(crate) fn values<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
) -> Result<Vec<f32>, BitTttError> {
    Ok(tensor.into_data().convert::<f32>().into_vec::<f32>()?)
}

/// Runs `f` on every item: on the current rayon pool (the kernels' pool inside
/// [`bit_ttt_kernels::cpu::install`]) when `threads > 1`, else in order on this thread.
pub(crate) fn for_each_head<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) + Sync + Send) {
    if threads > 1 {
        items.into_par_iter().for_each(f);
    } else {
        items.into_iter().for_each(f);
    }
}

/// An RMSNorm's scale and epsilon.
#[derive(Debug)]
pub(crate) struct Norm {
    gamma: Vec<f32>,
    eps: f32,
}

impl Norm {
    pub(crate) fn new<B: Backend>(norm: &burn::nn::RmsNorm<B>) -> Result<Self, BitTttError> {
        Ok(Self {
            gamma: values(norm.gamma.val())?,
            eps: norm.epsilon as f32,
        })
    }

    /// Bytes of its scale.
    pub(crate) fn size_bytes(&self) -> usize {
        self.gamma.len() * size_of::<f32>()
    }

    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        rms_norm(x, &self.gamma, self.eps, &mut out);
        out
    }

    /// The norm of every row of `x` (`[tokens, d]`), rows spread over `threads` threads (see
    /// [`for_each_row`]).
    pub(crate) fn forward_rows(&self, x: &[f32], threads: usize) -> Vec<f32> {
        let d = self.gamma.len();
        let mut out = vec![0.0; x.len()];
        for_each_row(x, &mut out, d, threads, |x, o| {
            rms_norm(x, &self.gamma, self.eps, o)
        });
        out
    }
}

/// `f(x[t], out[t])` for every row `t` of `x` and `out` (`[tokens, d]` each): with several
/// rows and `threads > 1` on the current rayon pool (the kernels' inside `cpu::install`), else
/// in order. Each row's result is its own, so it is the same either way.
pub(crate) fn for_each_row(
    x: &[f32],
    out: &mut [f32],
    d: usize,
    threads: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync + Send,
) {
    use rayon::prelude::*;
    if d == 0 {
        return;
    }
    if x.len() > d && threads > 1 {
        x.par_chunks_exact(d)
            .zip(out.par_chunks_exact_mut(d))
            .for_each(|(x, o)| f(x, o));
    } else {
        for (x, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            f(x, o);
        }
    }
}

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
    /// Full-precision weights stored 8 bits each with a scale per output row (see
    /// [`Int8Rows`]), made from a [`Float`](Self::Float) one by [`to_int8`](Self::to_int8).
    Int8 {
        /// `[d_output, d_input]` codes and `[d_output]` scales.
        weight: Int8Rows,
        /// `[d_output]`.
        bias: Option<Vec<f32>>,
    },
}

/// The input of one or more projections (one token, or the tokens of a prefill), with its
/// int8 quantization made once and shared by every ternary projection that reads it (Q, K, V
/// and the gate read the same input).
pub(crate) struct Input<'a> {
    /// `[tokens, d_input]`, row-major.
    x: &'a [f32],
    /// `d_input`.
    cols: usize,
    quantized: OnceCell<(f32, QuantizedActivations)>,
}

impl<'a> Input<'a> {
    /// One token's input `x`, `[d_input]`.
    pub fn new(x: &'a [f32]) -> Self {
        Self::tokens(x, x.len())
    }

    /// The inputs of `x.len() / cols` tokens, `[tokens, cols]` row-major.
    pub fn tokens(x: &'a [f32], cols: usize) -> Self {
        debug_assert!(x.len().is_multiple_of(cols.max(1)));
        Self {
            x,
            cols,
            quantized: OnceCell::new(),
        }
    }

    /// The number of tokens.
    fn len(&self) -> usize {
        self.x.len().checked_div(self.cols).unwrap_or(0)
    }

    /// `x` quantized with `eps` (made on first use; a projection with another eps, which no
    /// model of this crate has, quantizes afresh).
    fn quantized(&self, eps: f32) -> std::borrow::Cow<'_, QuantizedActivations> {
        let (cached_eps, q) = self
            .quantized
            .get_or_init(|| (eps, QuantizedActivations::quantize(self.x, self.cols, eps)));
        if *cached_eps == eps {
            std::borrow::Cow::Borrowed(q)
        } else {
            std::borrow::Cow::Owned(QuantizedActivations::quantize(self.x, self.cols, eps))
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
            weights: layer.weight.host().clone(),
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

    /// This projection with 8-bit weights if it is a full-precision one (`None` otherwise).
    ///
    /// # Errors
    /// [`BitTttError::Kernel`] if a weight is not finite.
    pub fn to_int8(&self) -> Result<Option<Self>, BitTttError> {
        let DecodeLinear::Float {
            weight,
            d_output,
            bias,
        } = self
        else {
            return Ok(None);
        };
        let d_input = weight.len() / d_output.max(&1);
        Ok(Some(DecodeLinear::Int8 {
            weight: Int8Rows::quantize_columns(weight, d_input, *d_output)?,
            bias: bias.clone(),
        }))
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        match self {
            DecodeLinear::Ternary { weights, .. } => weights.view().cols(),
            DecodeLinear::Int8 { weight, .. } => weight.cols(),
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
        let bias = match self {
            DecodeLinear::Ternary { bias, .. }
            | DecodeLinear::Float { bias, .. }
            | DecodeLinear::Int8 { bias, .. } => bias,
        };
        if let Some(b) = bias.as_ref().filter(|b| b.len() != self.d_output()) {
            return Err(BitTttError::InvalidInput(format!(
                "{what} has a bias of {} values for {} outputs",
                b.len(),
                self.d_output()
            )));
        }
        if (self.d_input(), self.d_output()) == (d_input, d_output) {
            return Ok(());
        }
        Err(BitTttError::InvalidInput(format!(
            "{what} maps {} to {} features, the model needs {d_input} to {d_output}",
            self.d_input(),
            self.d_output()
        )))
    }

    /// Bytes of parameters one product reads: the packed blocks and scale (or the f32 weights)
    /// and the bias.
    pub fn weight_bytes(&self) -> usize {
        let f32_bytes = |n: usize| n * std::mem::size_of::<f32>();
        match self {
            DecodeLinear::Ternary { weights, bias, .. } => {
                weights.view().size_in_bytes() + f32_bytes(1 + bias.as_ref().map_or(0, Vec::len))
            }
            DecodeLinear::Float { weight, bias, .. } => {
                f32_bytes(weight.len() + bias.as_ref().map_or(0, Vec::len))
            }
            DecodeLinear::Int8 { weight, bias } => {
                weight.size_in_bytes() + f32_bytes(bias.as_ref().map_or(0, Vec::len))
            }
        }
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        match self {
            DecodeLinear::Ternary { weights, .. } => weights.view().rows(),
            DecodeLinear::Float { d_output, .. } => *d_output,
            DecodeLinear::Int8 { weight, .. } => weight.rows(),
        }
    }

    /// `outs[i] = input Wᵢᵀ (+ bᵢ)` for projections that read the same input. Ternary
    /// projections with int8 activations run as one kernel call (one parallel region, the input
    /// prepared once); the outputs are the same as [`forward`](Self::forward) of each.
    ///
    /// # Shapes
    /// - input: `[tokens, d_input]`, `outs[i]`: `[tokens, d_output of projections[i]]`
    pub fn forward_many(
        projections: &[&DecodeLinear],
        input: &Input<'_>,
        outs: &mut [&mut [f32]],
        threads: usize,
    ) {
        assert_eq!(
            projections.len(),
            outs.len(),
            "one output per projection: {} projections, {} outputs",
            projections.len(),
            outs.len()
        );
        // The int8 ternary projections sharing the first one's eps go together.
        let shared_eps = projections.iter().find_map(|p| p.int8_eps());
        let joint = |p: &DecodeLinear| shared_eps.is_some() && p.int8_eps() == shared_eps;
        let mut views = Vec::with_capacity(projections.len());
        let mut joint_outs = Vec::with_capacity(projections.len());
        for (p, out) in projections.iter().zip(outs.iter_mut()) {
            if joint(p) {
                if let DecodeLinear::Ternary { weights, .. } = p {
                    views.push(weights.view());
                    joint_outs.push(&mut **out);
                }
            } else {
                p.forward(input, out, threads);
            }
        }
        if let Some(eps) = shared_eps {
            cpu::gemm_i8_many_with(
                &views,
                &input.quantized(eps),
                &mut joint_outs,
                CpuOptions {
                    kernel: None,
                    threads: Some(threads),
                },
            )
            .expect("the global kernel choice was checked by set_kernel_choice");
        }
        for (p, out) in projections.iter().zip(outs.iter_mut()) {
            if let (true, DecodeLinear::Ternary { bias: Some(b), .. }) = (joint(p), *p) {
                add_bias(out, b);
            }
        }
    }

    /// The activation eps of a ternary projection with int8 activations.
    fn int8_eps(&self) -> Option<f32> {
        match self {
            DecodeLinear::Ternary {
                precision: ActivationPrecision::Int8 { eps },
                ..
            } => Some(*eps),
            _ => None,
        }
    }

    /// `out = input Wᵀ (+ b)`, the ternary product split over `threads` threads. Each token's
    /// output is the same, bit for bit, whether it comes alone or with others (the int8 sums
    /// are exact, and every token's float work is its own).
    ///
    /// # Shapes
    /// - input: `[tokens, d_input]`, out: `[tokens, d_output]`
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
                    ActivationPrecision::F32 => {
                        cpu::gemm_f32_with(view, input.x, input.len(), out, options)
                    }
                };
                done.expect("the global kernel choice was checked by set_kernel_choice");
                bias
            }
            DecodeLinear::Float {
                weight,
                bias,
                d_output,
            } => {
                for (x, y) in input
                    .x
                    .chunks_exact(input.cols.max(1))
                    .zip(out.chunks_exact_mut((*d_output).max(1)))
                {
                    cpu::gemv_f32_dense(x, weight, y, threads);
                }
                bias
            }
            DecodeLinear::Int8 { weight, bias } => {
                for (x, y) in input
                    .x
                    .chunks_exact(weight.cols().max(1))
                    .zip(out.chunks_exact_mut(weight.rows().max(1)))
                {
                    weight.gemv(x, y, threads);
                }
                bias
            }
        };
        if let Some(bias) = bias {
            add_bias(out, bias);
        }
    }
}

/// Adds `bias` (`[d_output]`) to every token's row of `out` (`[tokens, d_output]`).
fn add_bias(out: &mut [f32], bias: &[f32]) {
    for row in out.chunks_exact_mut(bias.len().max(1)) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use bit_ttt_kernels::PackedTernary;

    use super::*;

    fn ternary(
        values: &[i8],
        rows: usize,
        cols: usize,
        scale: f32,
        eps: Option<f32>,
    ) -> DecodeLinear {
        DecodeLinear::Ternary {
            weights: TernaryWeights::owned(PackedTernary::pack(values, rows, cols, scale).unwrap()),
            precision: match eps {
                Some(eps) => ActivationPrecision::Int8 { eps },
                None => ActivationPrecision::F32,
            },
            bias: Some((0..rows).map(|r| r as f32 * 0.25 - 0.5).collect()),
        }
    }

    /// Joint int8 projections (with biases), one with another eps, one with f32 activations and
    /// one f32 matrix in one call: each output equals its own `forward`, bit for bit.
    #[test]
    fn forward_many_equals_forward_of_each() {
        let cols = 5;
        let x = [0.9, -1.3, 0.2, 2.5, -0.05];
        let w = |rows: usize, seed: usize| -> Vec<i8> {
            (0..rows * cols)
                .map(|i| ((i * 7 + seed) % 3) as i8 - 1)
                .collect()
        };
        let projections = [
            ternary(&w(3, 0), 3, cols, 0.5, Some(1e-5)),
            ternary(&w(4, 1), 4, cols, 1.5, None),
            ternary(&w(2, 2), 2, cols, 0.7, Some(1e-5)),
            ternary(&w(3, 1), 3, cols, 0.7, Some(1e-2)),
            DecodeLinear::Float {
                weight: (0..cols * 2).map(|i| i as f32 * 0.1 - 0.4).collect(),
                d_output: 2,
                bias: None,
            },
        ];
        for threads in [1, 2] {
            let want: Vec<Vec<f32>> = projections
                .iter()
                .map(|p| {
                    let mut y = vec![0.0; p.d_output()];
                    p.forward(&Input::new(&x), &mut y, threads);
                    y
                })
                .collect();
            let mut got: Vec<Vec<f32>> = want.iter().map(|w| vec![f32::NAN; w.len()]).collect();
            let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|g| &mut g[..]).collect();
            let refs: Vec<&DecodeLinear> = projections.iter().collect();
            DecodeLinear::forward_many(&refs, &Input::new(&x), &mut outs, threads);
            assert_eq!(got, want, "threads {threads}");
            // A hand check of the first output: int8 codes of x, ternary dot, scale, bias.
            let s = 127.0 / 2.5;
            let codes: Vec<f32> = x.iter().map(|v| (v * s).round()).collect();
            let dot: f32 = w(3, 0)[..cols]
                .iter()
                .zip(&codes)
                .map(|(&w, c)| w as f32 * c)
                .sum();
            assert!(
                (got[0][0] - (dot * 0.5 / s - 0.5)).abs() < 1e-5,
                "{}",
                got[0][0]
            );
        }
    }
}
