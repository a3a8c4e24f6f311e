//! `TernaryBackend`: the packed ternary linear map as a Burn backend extension.
//!
//! Burn adds an op to backends with a trait over [`Backend`] (the pattern of Burn's
//! `custom-cubecl-kernel` example): code that needs the op asks for `B: TernaryBackend`, and each
//! backend supplies its kernel. Which kernel runs is therefore decided by where the tensor
//! lives, at compile time:
//!
//! | backend | kernel |
//! |---------|--------|
//! | `NdArray` | the CPU kernels of `bit-ttt-kernels` (AVX2 or scalar, rayon), reading an f32 input array in place (an f64 one is converted) |
//! | `Autodiff<B>` | `B`'s kernel; the packed layer is inference-only, so no gradient is recorded |
//! | `Wgpu`, `Cuda` (any `CubeBackend<R, …>`) | the CubeCL kernels of `bit_ttt_kernels::cube` on the device: the input is quantized there, the weights stay resident in a word-major layout, two launches per product |
//! | your backend | [`ternary_linear_on_host`]: the input is read back to the host, the same CPU kernels run there, the output goes back to the device |
//!
//! The weights a kernel reads are the backend's own [`TernaryBackend::PackedWeights`], made
//! resident once per layer by [`TernaryBackend::upload_ternary`]: on `NdArray` the host bytes
//! themselves (owned, or a memory-mapped packed file read in place), so nothing is copied; on a
//! CubeCL backend a device buffer.
//! A backend of your own gets the fallback by keeping the host form:
//!
//! ```ignore
//! impl TernaryBackend for MyBackend {
//!     type PackedWeights = TernaryWeights;
//!     fn upload_ternary(w: &TernaryWeights, _: &Self::Device) -> Result<TernaryWeights, BitTttError> {
//!         Ok(w.clone()) // a cheap handle: owned weights are shared, mapped ones stay mapped
//!     }
//!     fn ternary_linear(x: FloatTensor<Self>, w: &TernaryWeights, p: ActivationPrecision) -> FloatTensor<Self> {
//!         ternary_linear_on_host::<Self>(x, w.view(), p)
//!     }
//! }
//! ```

use bit_ttt_kernels::cpu::{self, QuantizedActivations};
use bit_ttt_kernels::TernaryView;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::{BitTttError, TernaryWeights};

/// How a packed ternary layer treats its input activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActivationPrecision {
    /// Int8 per token, `s = 127 / max(|x|, eps)` (W1.58A8).
    Int8 {
        /// Lower bound of the absmax, so an all-zero row stays finite.
        eps: f32,
    },
    /// Kept in f32 (W1.58A16).
    F32,
}

/// A Burn backend that can multiply activations by packed ternary weights.
///
/// The weights are made resident once ([`upload_ternary`](Self::upload_ternary), at load or
/// when a layer is packed) in the form the backend computes with
/// ([`PackedWeights`](Self::PackedWeights)); every [`ternary_linear`](Self::ternary_linear)
/// call then reads them there. A backend without kernels of its own keeps the host form
/// ([`TernaryWeights`]) and calls [`ternary_linear_on_host`].
pub trait TernaryBackend: Backend {
    /// Packed ternary weights where this backend computes: a zero-copy host handle on the CPU
    /// (owned or memory-mapped bytes), a device buffer on a GPU backend with kernels.
    type PackedWeights: Clone + std::fmt::Debug + Send + Sync + 'static;

    /// Makes `weights` resident on `device`: called once per layer, not per call.
    ///
    /// # Errors
    /// [`BitTttError`] when the weights cannot be placed there.
    fn upload_ternary(
        weights: &TernaryWeights,
        device: &Self::Device,
    ) -> Result<Self::PackedWeights, BitTttError>;

    /// `input · (gamma · W)ᵀ` for packed ternary `W` (`[d_output, d_input]`, scale `gamma`),
    /// with the activations quantized as `precision` says.
    ///
    /// # Shapes
    /// - input: `[tokens, d_input]`
    /// - output: `[tokens, d_output]`
    ///
    /// # Panics
    /// If the input's width is not the weights' `d_input` (a programmer error: the packed
    /// layer checks it first).
    fn ternary_linear(
        input: FloatTensor<Self>,
        weight: &Self::PackedWeights,
        precision: ActivationPrecision,
    ) -> FloatTensor<Self>;

    /// Training's straight-through offset of a latent weight in one fused pass, where the
    /// backend has one: `(offset, 1/gamma)` with `offset = codes − weight · (1/gamma)` and
    /// `codes = clamp(round(weight / gamma), -1, 1)`, `gamma` a `[1]` tensor (see
    /// [`TernaryWeightCodes`](crate::quantize::TernaryWeightCodes)). `None` (the default)
    /// lets the caller compute it op by op.
    ///
    /// # Shapes
    /// - weight, offset: `[d_output, d_input]`
    fn ternary_ste_offset(
        _weight: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, f32)> {
        None
    }
}

/// The CPU computation every path shares: `x` holds `tokens` rows of `weight.cols()` values.
fn ternary_linear_cpu(
    x: &[f32],
    tokens: usize,
    weight: TernaryView<'_>,
    precision: ActivationPrecision,
) -> Vec<f32> {
    let mut y = vec![0.0f32; tokens * weight.rows()];
    match precision {
        ActivationPrecision::Int8 { eps } => {
            let xq = QuantizedActivations::quantize(x, weight.cols(), eps);
            cpu::gemm_i8(weight, &xq, &mut y);
        }
        ActivationPrecision::F32 => cpu::gemm_f32(weight, x, tokens, &mut y),
    }
    y
}

/// Panics (a programmer error) when the input's width is not the weights' `d_input`.
fn check_input_shape(tokens: usize, d_input: usize, rows: usize, cols: usize) {
    assert_eq!(
        d_input, cols,
        "ternary_linear: input [{tokens}, {d_input}] does not match weights [{rows}, {cols}]"
    );
}

/// The fallback of a backend without ternary kernels: the input is read back to the host, the
/// CPU kernels of `bit-ttt-kernels` run there, and the output goes back to the device.
///
/// # Panics
/// If the input's width is not the weights' `d_input` (a programmer error).
pub fn ternary_linear_on_host<B: Backend>(
    input: FloatTensor<B>,
    weight: TernaryView<'_>,
    precision: ActivationPrecision,
) -> FloatTensor<B> {
    let input = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(input));
    let device = input.device();
    let [tokens, d_input] = input.dims();
    check_input_shape(tokens, d_input, weight.rows(), weight.cols());
    let x: Vec<f32> = input
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("converted tensor data holds f32");
    let y = ternary_linear_cpu(&x, tokens, weight, precision);
    Tensor::<B, 2>::from_data(TensorData::new(y, [tokens, weight.rows()]), &device)
        .into_primitive()
        .tensor()
}

#[cfg(feature = "ndarray")]
mod ndarray_kernel {
    use super::*;
    use burn::backend::ndarray::{NdArray, NdArrayTensor};

    /// The native path: an f32 input array is read where it lies.
    fn ternary_linear_ndarray<B: Backend<FloatTensorPrimitive = NdArrayTensor>>(
        input: NdArrayTensor,
        weight: TernaryView<'_>,
        precision: ActivationPrecision,
    ) -> NdArrayTensor {
        let NdArrayTensor::F32(storage) = &input else {
            return ternary_linear_on_host::<B>(input, weight, precision);
        };
        let x = storage.view();
        let &[tokens, d_input] = x.shape() else {
            panic!("ternary_linear: input of shape {:?} is not 2-d", x.shape())
        };
        check_input_shape(tokens, d_input, weight.rows(), weight.cols());
        let y = match x.as_slice() {
            Some(x) => ternary_linear_cpu(x, tokens, weight, precision),
            // Not in row-major order (a transposed view): gather it once.
            None => {
                let x: Vec<f32> = x.iter().copied().collect();
                ternary_linear_cpu(&x, tokens, weight, precision)
            }
        };
        NdArrayTensor::from_data(
            TensorData::new(y, [tokens, weight.rows()]).convert::<B::FloatElem>(),
        )
    }

    /// The fused straight-through offset of an f32 weight (other element types: op by op).
    fn ternary_ste_offset_ndarray(
        weight: NdArrayTensor,
        gamma: NdArrayTensor,
    ) -> Option<(NdArrayTensor, f32)> {
        let (NdArrayTensor::F32(weight), NdArrayTensor::F32(gamma)) = (&weight, &gamma) else {
            return None;
        };
        let gamma = *gamma.view().iter().next()?;
        let inv_gamma = 1.0 / gamma;
        let weight = weight.view();
        let shape = weight.shape().to_vec();
        let mut offset = vec![0.0f32; weight.len()];
        match weight.as_slice() {
            Some(w) => cpu::ternary_ste_offset(w, gamma, inv_gamma, &mut offset),
            // Not in row-major order: gathered once.
            None => {
                let w: Vec<f32> = weight.iter().copied().collect();
                cpu::ternary_ste_offset(&w, gamma, inv_gamma, &mut offset)
            }
        }
        Some((
            NdArrayTensor::from_data(TensorData::new(offset, shape)),
            inv_gamma,
        ))
    }

    // `NdArray`'s own bounds name a private type, so the impls name its element types.
    macro_rules! impl_for_ndarray {
        ($($float:ty, $int:ty);*) => {$(
            impl TernaryBackend for NdArray<$float, $int> {
                /// The host bytes themselves: the kernels read them where they lie.
                type PackedWeights = TernaryWeights;

                fn upload_ternary(
                    weights: &TernaryWeights,
                    _device: &Self::Device,
                ) -> Result<TernaryWeights, BitTttError> {
                    Ok(weights.clone())
                }

                fn ternary_linear(
                    input: NdArrayTensor,
                    weight: &TernaryWeights,
                    precision: ActivationPrecision,
                ) -> NdArrayTensor {
                    ternary_linear_ndarray::<Self>(input, weight.view(), precision)
                }

                fn ternary_ste_offset(
                    weight: NdArrayTensor,
                    gamma: NdArrayTensor,
                ) -> Option<(NdArrayTensor, f32)> {
                    ternary_ste_offset_ndarray(weight, gamma)
                }
            }
        )*};
    }
    impl_for_ndarray!(f32, i64; f32, i32; f64, i64; f64, i32);
}

/// Inference through an autodiff backend: the inner backend's kernel, outside the graph.
impl<B: TernaryBackend> TernaryBackend for Autodiff<B> {
    type PackedWeights = B::PackedWeights;

    fn upload_ternary(
        weights: &TernaryWeights,
        device: &Self::Device,
    ) -> Result<Self::PackedWeights, BitTttError> {
        B::upload_ternary(weights, device)
    }

    fn ternary_linear(
        input: FloatTensor<Self>,
        weight: &Self::PackedWeights,
        precision: ActivationPrecision,
    ) -> FloatTensor<Self> {
        let output = B::ternary_linear(Self::inner(input), weight, precision);
        Self::from_inner(output)
    }

    /// The inner backend's, on the inner tensors: the offset is a constant of the graph.
    fn ternary_ste_offset(
        weight: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, f32)> {
        let (offset, inv_gamma) = B::ternary_ste_offset(Self::inner(weight), Self::inner(gamma))?;
        Some((Self::from_inner(offset), inv_gamma))
    }
}

/// Burn's CubeCL backends (`Wgpu`, `Cuda`): the CubeCL kernels on device-resident weights.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use bit_ttt_kernels::PackedTernary;
    use burn::backend::NdArray;

    /// Weights `[[1, 0, -1], [-1, 1, 1]]` with gamma 0.5; input rows `[1, 2, 3]`, `[0, -1, 2]`.
    /// In f32: row 0 -> 0.5 * [1 - 3, -1 + 2 + 3] = [-1, 2]; row 1 -> 0.5 * [-2, 1] = [-1, 0.5].
    fn example() -> (TernaryWeights, Vec<f32>) {
        let weight = PackedTernary::pack(&[1, 0, -1, -1, 1, 1], 2, 3, 0.5).unwrap();
        (
            TernaryWeights::owned(weight),
            vec![1.0, 2.0, 3.0, 0.0, -1.0, 2.0],
        )
    }

    fn run<B: TernaryBackend>(
        x: &[f32],
        weight: &TernaryWeights,
        precision: ActivationPrecision,
    ) -> Vec<f32> {
        let device = Default::default();
        let input = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [2, 3]), &device);
        let resident = B::upload_ternary(weight, &device).unwrap();
        let output = B::ternary_linear(input.into_primitive().tensor(), &resident, precision);
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(output))
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    }

    #[test]
    fn hand_computed_f32_activations() {
        let (weight, x) = example();
        let expected = [-1.0, 2.0, -1.0, 0.5];
        let native = run::<NdArray>(&x, &weight, ActivationPrecision::F32);
        assert_eq!(native, expected);
        let through_autodiff = run::<Autodiff<NdArray>>(&x, &weight, ActivationPrecision::F32);
        assert_eq!(through_autodiff, expected);
        let f64_fallback = run::<NdArray<f64>>(&x, &weight, ActivationPrecision::F32);
        assert_eq!(f64_fallback, expected);
    }

    #[test]
    fn hand_computed_int8_activations() {
        // Row 0: absmax 3, s = 127/3, codes [42.33 -> 42, 84.67 -> 85, 127];
        //   sums [42 - 127, -42 + 85 + 127] = [-85, 170], times gamma / s = 0.5 * 3 / 127.
        // Row 1: absmax 2, s = 63.5, codes [0, -63.5 -> -64, 127] (round half to even);
        //   sums [-127, -64 + 127] = [-127, 63], times 0.5 * 2 / 127.
        let (weight, x) = example();
        let expected = [
            -85.0 * 1.5 / 127.0,
            170.0 * 1.5 / 127.0,
            -127.0 / 127.0,
            63.0 / 127.0,
        ];
        let precision = ActivationPrecision::Int8 { eps: 1e-5 };
        for (name, got) in [
            ("ndarray", run::<NdArray>(&x, &weight, precision)),
            ("autodiff", run::<Autodiff<NdArray>>(&x, &weight, precision)),
            ("f64", run::<NdArray<f64>>(&x, &weight, precision)),
        ] {
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() <= 1e-6, "{name}: {got:?} vs {expected:?}");
            }
        }
    }

    #[test]
    fn a_transposed_input_is_read_in_logical_order() {
        let (weight, x) = example();
        let device = Default::default();
        // Stored as [3, 2] and transposed: the [2, 3] view is not row-major in memory.
        let transposed: Vec<f32> = (0..3).flat_map(|c| [x[c], x[3 + c]]).collect();
        let input = Tensor::<NdArray, 2>::from_data(TensorData::new(transposed, [3, 2]), &device)
            .transpose();
        let output = <NdArray as TernaryBackend>::ternary_linear(
            input.into_primitive().tensor(),
            &weight,
            ActivationPrecision::F32,
        );
        let got = Tensor::<NdArray, 2>::from_primitive(TensorPrimitive::Float(output))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(got, [-1.0, 2.0, -1.0, 0.5]);
    }
}
