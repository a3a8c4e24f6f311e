//! `TernaryBackend` for Burn's CubeCL backends (`Wgpu`, `Cuda`, and any `CubeBackend<R, …>`):
//! the weights live on the device in the kernels crate's word-major layout and every packed
//! projection runs the CubeCL kernels of `bit_ttt_kernels::cube` there, with no host round trip.
//!
//! Burn's `wgpu` and `cuda` features (as this workspace enables them, without `fusion`) make
//! `Wgpu` and `Cuda` plain `CubeBackend`s, so this one impl covers both.

use bit_ttt_kernels::cube::{self, CubeTernary};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::{check_input_shape, ActivationPrecision, TernaryBackend};
use crate::{BitTttError, TernaryWeights};

impl<R, F, I, BT> TernaryBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    /// The device copy of the words (the host form is not kept: a packed file's mapping can be
    /// dropped once the weights are uploaded).
    type PackedWeights = CubeTernary;

    fn upload_ternary(
        weights: &TernaryWeights,
        device: &Self::Device,
    ) -> Result<CubeTernary, BitTttError> {
        let client = R::client(device);
        Ok(CubeTernary::upload(&client, weights.view()))
    }

    fn ternary_linear(
        input: CubeTensor<R>,
        weight: &CubeTernary,
        precision: ActivationPrecision,
    ) -> CubeTensor<R> {
        let dtype = input.dtype;
        // The kernels read f32 rows in order: a view or another float type is laid out first.
        let mut input = into_contiguous(input);
        if dtype != DType::F32 {
            input = cast(input, DType::F32);
        }
        let &[tokens, d_input] = input.meta.shape().as_slice() else {
            panic!(
                "ternary_linear: input of shape {:?} is not 2-d",
                input.meta.shape()
            )
        };
        check_input_shape(tokens, d_input, weight.rows(), weight.cols());
        let client = input.client.clone();
        let device = input.device.clone();
        if tokens == 0 {
            return empty_device_dtype(client, device, Shape::new([0, weight.rows()]), dtype);
        }
        let x_len = tokens * d_input;
        let prepared = match precision {
            ActivationPrecision::Int8 { eps } => {
                cube::quantize_i8(&client, input.handle, x_len, tokens, weight, eps)
            }
            ActivationPrecision::F32 => cube::pad_f32(&client, input.handle, x_len, tokens, weight),
        }
        .expect("the input shape was checked against the weights");
        let output = cube::ternary_matmul(&client, weight, &prepared)
            .expect("the activations were prepared for these weights");
        let output = CubeTensor::new_contiguous(
            client,
            device,
            Shape::new([tokens, weight.rows()]),
            output,
            DType::F32,
        );
        if dtype != DType::F32 {
            cast(output, dtype)
        } else {
            output
        }
    }
}
