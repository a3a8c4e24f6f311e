//! Test helpers for the model: reproducible parameters, rewriting a safetensors file tensor by
//! tensor (to build broken files from good ones), and checking that a failed load leaves its
//! file as it was.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{ModuleMapper, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::BitTttError;

/// Replaces every randomly initialized parameter with values of a fixed sequence (uniform in
/// `±1/sqrt(last dim)`), leaving constant ones (norm scales, zero biases) as they are. The
/// backend's seed cannot make a model reproducible here: tests run in parallel threads and
/// share its generator.
pub(crate) struct Deterministic(pub u64);

impl<B: Backend> ModuleMapper<B> for Deterministic {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let old: Vec<f32> = tensor.to_data().convert::<f32>().into_vec().unwrap();
        if old.iter().all(|v| *v == old[0]) {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let scale = 1.0 / (dims[D - 1] as f32).sqrt();
        let new: Vec<f32> = old
            .iter()
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        let tensor = Tensor::from_data(TensorData::new(new, dims), &tensor.device());
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// One tensor of a safetensors file, owned: name, element type, shape, little-endian bytes.
pub(crate) type TensorEntry = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rewrites the safetensors file `bytes` with `edit` applied to its tensors; the metadata is
/// kept (the packed and `.soul` loaders read theirs).
pub(crate) fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut Vec<TensorEntry>)) -> Vec<u8> {
    rewrite_with_metadata(bytes, |tensors, _| edit(tensors))
}

/// Rewrites the safetensors file `bytes` with `edit` applied to its tensors and its metadata.
pub(crate) fn rewrite_with_metadata(
    bytes: &[u8],
    edit: impl FnOnce(&mut Vec<TensorEntry>, &mut HashMap<String, String>),
) -> Vec<u8> {
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: Vec<TensorEntry> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors, &mut metadata);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    // A file without metadata stays without (no empty `__metadata__` entry).
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(views, metadata).unwrap()
}

/// Writes `bytes` to `path`, loads it with `load`, and returns the error, after checking that
/// the failed load left the file byte for byte as written.
///
/// # Panics
/// If `load` succeeds or the file changed.
pub(crate) fn load_error_leaves_file<T>(
    path: &Path,
    bytes: &[u8],
    load: impl FnOnce(&Path) -> Result<T, BitTttError>,
) -> BitTttError {
    std::fs::write(path, bytes).unwrap();
    let Err(err) = load(path) else {
        panic!("loading {} succeeded", path.display());
    };
    // Not assert_eq!: its message would print both files' bytes.
    assert!(
        std::fs::read(path).unwrap() == bytes,
        "the failed load changed {} ({err})",
        path.display()
    );
    err
}
