//! `PackedBitLinear`: the inference-only form of [`BitLinear`], with weights packed 2 bits each.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use bit_ttt_kernels::{BlockTernary, PackedTernary, TernaryView};
use burn::module::{
    AutodiffModule, Content, Devices, EmptyRecord, Module, ModuleDisplay, ModuleDisplayDefault,
    ModuleMapper, ModuleVisitor, Param,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use memmap2::Mmap;

use crate::quantize::ternary_codes;
use crate::{ActivationPrecision, BitLinear, BitTttError, TernaryBackend};

/// Where the packed blocks of a [`PackedBitLinear`] live on the host. Cloning is cheap: owned
/// weights are shared, mapped ones stay mapped.
#[derive(Clone, Debug)]
pub enum TernaryWeights {
    /// In memory, owned (packed from a trained layer).
    Owned(Arc<PackedTernary>),
    /// In a memory-mapped packed model file, read in place (zero copy).
    Mapped {
        /// The mapping, shared by every layer of the file.
        map: Arc<Mmap>,
        /// Byte offset of the first block in the mapping.
        offset: usize,
        /// Rows (output features).
        rows: usize,
        /// Columns (input features).
        cols: usize,
        /// The per-tensor scale `gamma`.
        scale: f32,
    },
}

impl TernaryWeights {
    /// Owned weights.
    pub fn owned(packed: PackedTernary) -> Self {
        TernaryWeights::Owned(Arc::new(packed))
    }

    /// A view the kernels read.
    pub fn view(&self) -> TernaryView<'_> {
        match self {
            TernaryWeights::Owned(packed) => packed.view(),
            TernaryWeights::Mapped {
                map,
                offset,
                rows,
                cols,
                scale,
            } => {
                let len = rows * bit_ttt_kernels::packing::blocks_per_row(*cols) * 32;
                let blocks = BlockTernary::slice_from_bytes(&map[*offset..offset + len])
                    .expect("checked when the file was opened");
                TernaryView::new(blocks, *rows, *cols, *scale)
                    .expect("checked when the file was opened")
            }
        }
    }
}

/// The packed weights of a [`PackedBitLinear`]: the host form ([`TernaryWeights`], which the
/// fused CPU decoder and `save_packed` read) and the backend's resident copy
/// ([`TernaryBackend::PackedWeights`]), made once per device by
/// [`TernaryBackend::upload_ternary`] and shared by clones of the layer.
///
/// A module without parameters to Burn (nothing to train or record): the packed file stores
/// the weights. Moving the layer to another device or backend drops the resident copy; the
/// next forward (or [`upload`](Self::upload)) makes a new one there.
pub struct TernaryParam<B: Backend> {
    host: TernaryWeights,
    /// The device and the backend's `PackedWeights` (type-erased: the struct is generic over
    /// any `Backend`, as Burn's module derive requires, and only `TernaryBackend`s upload).
    resident: Arc<Mutex<Option<Resident<B>>>>,
    _backend: PhantomData<B>,
}

/// A resident copy and the device it lives on.
struct Resident<B: Backend> {
    device: B::Device,
    weights: Arc<dyn Any + Send + Sync>,
}

impl<B: Backend> TernaryParam<B> {
    /// Packed weights with no resident copy yet.
    pub fn new(host: TernaryWeights) -> Self {
        Self {
            host,
            resident: Arc::new(Mutex::new(None)),
            _backend: PhantomData,
        }
    }

    /// The host form.
    pub fn host(&self) -> &TernaryWeights {
        &self.host
    }

    /// A view of the host form, which the CPU kernels read.
    pub fn view(&self) -> TernaryView<'_> {
        self.host.view()
    }

    /// The same host weights without the resident copy (for another device or backend).
    fn detached<B2: Backend>(&self) -> TernaryParam<B2> {
        TernaryParam::new(self.host.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Resident<B>>> {
        // A panic while holding the lock leaves at worst no copy: nothing to recover.
        self.resident.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: TernaryBackend> TernaryParam<B> {
    /// The backend's resident copy on `device`, uploaded now if there is none there.
    ///
    /// # Errors
    /// As [`TernaryBackend::upload_ternary`].
    pub fn upload(&self, device: &B::Device) -> Result<Arc<B::PackedWeights>, BitTttError> {
        let mut resident = self.lock();
        if let Some(r) = resident.as_ref().filter(|r| &r.device == device) {
            if let Ok(weights) = r.weights.clone().downcast::<B::PackedWeights>() {
                return Ok(weights);
            }
        }
        let weights = Arc::new(B::upload_ternary(&self.host, device)?);
        *resident = Some(Resident {
            device: device.clone(),
            weights: weights.clone(),
        });
        Ok(weights)
    }

    /// Whether a resident copy exists on `device`.
    pub fn is_resident_on(&self, device: &B::Device) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|r| &r.device == device && r.weights.is::<B::PackedWeights>())
    }
}

impl<B: Backend> Clone for TernaryParam<B> {
    fn clone(&self) -> Self {
        Self {
            host: self.host.clone(),
            resident: self.resident.clone(),
            _backend: PhantomData,
        }
    }
}

impl<B: Backend> std::fmt::Debug for TernaryParam<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let view = self.host.view();
        f.debug_struct("TernaryParam")
            .field("rows", &view.rows())
            .field("cols", &view.cols())
            .field(
                "mapped",
                &matches!(self.host, TernaryWeights::Mapped { .. }),
            )
            .finish()
    }
}

impl<B: Backend> Module<B> for TernaryParam<B> {
    type Record = EmptyRecord;

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        devices
    }

    fn fork(self, device: &B::Device) -> Self {
        self.to_device(device)
    }

    fn to_device(self, device: &B::Device) -> Self {
        let stays = self.lock().as_ref().is_some_and(|r| &r.device == device);
        if stays {
            self
        } else {
            self.detached()
        }
    }

    fn visit<V: ModuleVisitor<B>>(&self, _visitor: &mut V) {}

    fn map<M: ModuleMapper<B>>(self, _mapper: &mut M) -> Self {
        self
    }

    fn load_record(self, _record: Self::Record) -> Self {
        self
    }

    fn into_record(self) -> Self::Record {
        EmptyRecord::new()
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for TernaryParam<B> {
    type InnerModule = TernaryParam<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        self.detached()
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        module.detached()
    }
}

impl<B: Backend> ModuleDisplayDefault for TernaryParam<B> {
    fn content(&self, content: Content) -> Option<Content> {
        let view = self.host.view();
        content
            .add_formatted(&format!(
                "packed ternary [{}, {}]",
                view.rows(),
                view.cols()
            ))
            .optional()
    }
}

impl<B: Backend> ModuleDisplay for TernaryParam<B> {}

/// A [`BitLinear`] frozen for inference: ternary weights packed 2 bits each, their scale, and
/// the f32 bias.
///
/// Its forward runs the backend's [`TernaryBackend`] kernel (on `NdArray`: the CPU kernels of
/// `bit-ttt-kernels`, AVX2 where the CPU has it, the scalar reference elsewhere) on int8
/// activations, and equals [`BitLinear::forward`] (without
/// gradients) up to float rounding: both see the same ternary codes and the same int8
/// activation codes; only the order of the final multiplications differs.
#[derive(Module, Debug)]
pub struct PackedBitLinear<B: Backend> {
    /// The packed ternary weights, `[d_output, d_input]`: on the host, and resident where the
    /// backend computes.
    pub weight: TernaryParam<B>,
    /// Optional bias, `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Whether activations are quantized to int8 (W1.58A8) or kept in f32 (W1.58A16).
    pub quantize_activations: bool,
    /// Lower bound of the activation absmax.
    pub eps: f64,
}

impl<B: Backend> PackedBitLinear<B> {
    /// Packs a trained layer's weights.
    ///
    /// # Errors
    /// [`BitTttError::Kernel`] if the weights cannot be packed (a non-finite scale: the latent
    /// weights hold NaN or infinity).
    pub fn from_bit_linear(layer: &BitLinear<B>) -> Result<Self, BitTttError> {
        let [d_output, d_input] = layer.weight.dims();
        let (codes, gamma) = ternary_codes(layer.weight.val(), layer.eps);
        let codes: Vec<i8> = codes
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()?
            .into_iter()
            .map(|c| c as i8)
            .collect();
        let gamma = gamma.into_data().convert::<f32>().into_vec::<f32>()?[0];
        let weight = PackedTernary::pack(&codes, d_output, d_input, gamma)?;
        Ok(Self {
            weight: TernaryParam::new(TernaryWeights::owned(weight)),
            // `val()` materialises a lazily initialised bias; cloning the `Param` itself would
            // re-run its initializer and give another bias.
            bias: layer.bias.as_ref().map(|b| Param::from_tensor(b.val())),
            quantize_activations: layer.quantize_activations,
            eps: layer.eps,
        })
    }
}

impl<B: TernaryBackend> PackedBitLinear<B> {
    /// Makes the weights resident on `device` (see [`TernaryParam::upload`]): done at load so
    /// that the first forward does not pay for it, and so an upload error shows there.
    ///
    /// # Errors
    /// As [`TernaryBackend::upload_ternary`].
    pub fn upload(&self, device: &B::Device) -> Result<(), BitTttError> {
        self.weight.upload(device).map(|_| ())
    }

    /// Applies the layer with the packed weights, through the backend's
    /// [`TernaryBackend::ternary_linear`] kernel.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    ///
    /// # Panics
    /// If the last dimension of `input` is not `d_input` (a programmer error), or if the
    /// weights cannot be made resident on the input's device (see [`upload`](Self::upload),
    /// which reports that as an error).
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let in_dims = input.dims();
        let weight = self.weight.view();
        let (d_input, d_output) = (weight.cols(), weight.rows());
        assert_eq!(
            in_dims[D - 1],
            d_input,
            "PackedBitLinear: input shape {in_dims:?} does not end in d_input = {d_input}"
        );
        let tokens = in_dims[..D - 1].iter().product::<usize>();
        // [tokens, d_input]
        let x = input.reshape([tokens, d_input]);
        let precision = if self.quantize_activations {
            ActivationPrecision::Int8 {
                eps: self.eps as f32,
            }
        } else {
            ActivationPrecision::F32
        };
        let resident = match self.weight.upload(&x.device()) {
            Ok(resident) => resident,
            Err(e) => panic!("PackedBitLinear: the weights cannot be made resident: {e}"),
        };
        let y = B::ternary_linear(x.into_primitive().tensor(), &resident, precision);
        // [tokens, d_output] -> [..., d_output]
        let mut out_dims = in_dims;
        out_dims[D - 1] = d_output;
        let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(out_dims);
        match &self.bias {
            Some(bias) => y.add(bias.val().reshape(bias_shape::<D>(d_output))),
            None => y,
        }
    }
}

/// `[1, ..., 1, d_output]`, so the bias broadcasts over every leading dimension.
fn bias_shape<const D: usize>(d_output: usize) -> [usize; D] {
    let mut shape = [1; D];
    shape[D - 1] = d_output;
    shape
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BitLinearConfig;
    use burn::backend::NdArray;
    use burn::module::AutodiffModule;
    use burn::tensor::Distribution;

    type B = NdArray;

    fn assert_close(packed: &[f32], trained: &[f32]) {
        let scale = trained.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (p, t)) in packed.iter().zip(trained).enumerate() {
            assert!(
                (p - t).abs() <= 1e-5 * scale,
                "element {i}: packed {p} vs training-mode {t} (scale {scale})"
            );
        }
    }

    #[test]
    fn packed_forward_equals_training_forward() {
        let device = Default::default();
        for &(d_in, d_out, bias, quantize) in &[
            (37, 11, true, true),
            (128, 5, false, true),
            (200, 3, true, false),
            (1000, 33, false, true),
        ] {
            let layer = BitLinearConfig::new(d_in, d_out)
                .with_bias(bias)
                .with_quantize_activations(quantize)
                .init::<B>(&device);
            let packed = PackedBitLinear::from_bit_linear(&layer).unwrap();
            for tokens in [1, 7] {
                let x = Tensor::<B, 3>::random(
                    [1, tokens, d_in],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                );
                let trained = layer
                    .forward(x.clone())
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap();
                let y = packed.forward(x);
                assert_eq!(y.dims(), [1, tokens, d_out]);
                let y = y.into_data().to_vec::<f32>().unwrap();
                if quantize {
                    // W1.58A8: exact integer sums scaled by the same `gamma / s` on both paths.
                    assert_eq!(y, trained, "{d_in}x{d_out}, {tokens} tokens");
                } else {
                    assert_close(&y, &trained);
                }
            }
        }
    }

    #[test]
    fn weights_are_made_resident_once_per_device_and_dropped_on_a_move() {
        let device = Default::default();
        let layer = BitLinearConfig::new(9, 4).init::<B>(&device);
        let packed = PackedBitLinear::from_bit_linear(&layer).unwrap();
        assert!(!packed.weight.is_resident_on(&device));
        packed.upload(&device).unwrap();
        assert!(packed.weight.is_resident_on(&device));
        let first = packed.weight.upload(&device).unwrap();
        // Uploading again, or through a clone, gives the same copy.
        assert!(Arc::ptr_eq(&first, &packed.weight.upload(&device).unwrap()));
        let clone = packed.clone();
        assert!(Arc::ptr_eq(&first, &clone.weight.upload(&device).unwrap()));
        // To the same device it stays; into an autodiff wrapper and back it is made anew.
        let moved = clone.to_device(&device);
        assert!(moved.weight.is_resident_on(&device));
        let trainable = PackedBitLinear::<burn::backend::Autodiff<B>>::from_inner(packed.clone());
        assert!(!trainable.weight.is_resident_on(&device));
        let valid = trainable.valid();
        assert!(!valid.weight.is_resident_on(&device));
        // A forward uploads on first use and computes as before.
        let x = Tensor::<B, 2>::random([3, 9], Distribution::Normal(0.0, 1.0), &device);
        let y = valid.forward(x.clone()).into_data();
        assert!(valid.weight.is_resident_on(&device));
        assert_eq!(y, packed.forward(x).into_data());
    }

    #[test]
    fn packed_weights_unpack_to_the_codes() {
        let device = Default::default();
        let layer = BitLinearConfig::new(9, 4).init::<B>(&device);
        let packed = PackedBitLinear::from_bit_linear(&layer).unwrap();
        let effective = layer
            .effective_weight()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let TernaryWeights::Owned(weight) = packed.weight.host() else {
            panic!("packing gives owned weights")
        };
        assert_eq!(weight.dequantize(), effective);
    }
}
