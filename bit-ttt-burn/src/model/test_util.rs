//! Test helpers for the model: reproducible parameters, rewriting a safetensors file tensor by
//! tensor (to build broken files from good ones), and checking that a failed load leaves its
//! file as it was.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::BitTttError;

pub(crate) use super::random::Deterministic;

/// Every mixer's config made by `config`, named by the mixer, and BitNet b1.58's block on
/// attention ("bitnet": half as many key/value heads as query heads, sub-norms, squared
/// ReLU), so that every test over the mixers covers it too.
pub(crate) fn variants(
    config: impl Fn(super::MixerKind) -> super::BitLlamaConfig,
) -> Vec<(String, super::BitLlamaConfig)> {
    use super::MixerKind;
    let mut all: Vec<_> = [
        MixerKind::TttLinear,
        MixerKind::TttMlp,
        MixerKind::Attention,
    ]
    .into_iter()
    .map(|m| (m.name().to_string(), config(m)))
    .collect();
    let attention = config(MixerKind::Attention);
    let kv_heads = attention.n_heads / 2;
    let bitnet = attention
        .with_n_kv_heads(Some(kv_heads))
        .with_ffn_activation(Some(super::FfnActivation::Relu2))
        .with_sub_norms(Some(true));
    all.push(("bitnet".to_string(), bitnet));
    all
}

/// Asserts that two decoders' logits agree within `1e-4` of the largest expected logit (at
/// least 1): float summation order, not a different model.
pub(crate) fn assert_logits_close(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: logit counts differ");
    let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{what}: logits differ by {diff} (largest logit {scale})"
    );
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
