//! `.soul` files: the state of a model after reading a context, saved to disk and restored later,
//! so a long document is read once and generation resumes from it.
//!
//! A `.soul` file is a safetensors file. For a TTT layer `i` it holds the fast weights at the
//! start of the current mini-batch, `layers.{i}.state.{k}`, and the accumulated step of the
//! unfinished mini-batch, `layers.{i}.grads.{k}` (`[batch, heads, rows, cols]` each; `k` counts
//! the inner model's tensors: W1, b1 for TTT-Linear, W1, b1, W2, b2 for TTT-MLP). For an
//! attention layer it holds `layers.{i}.keys` and `layers.{i}.values` (the KV cache; that file
//! grows with the context, a TTT one does not). The metadata holds `format = bit-ttt-soul`,
//! `version = 1`, the number of tokens read (`position`), and per TTT layer its position in the
//! stream (`layers.{i}.seq_len_offset`) and mini-batch size.
//!
//! Restoring checks that the file fits the model (layer count, kinds, shapes, element types;
//! keys and values `[batch, n_heads, position, d_model / n_heads]` each) and that its counters
//! agree (`position` equals every TTT layer's `seq_len_offset` and every attention layer's
//! `kv_len`), so a restored state cannot make the next forward panic. It gives exactly the
//! state that was saved, so the logits that follow are those of the uninterrupted run.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::attention::KvCache;
use crate::files::{read_file, write_atomic};
use crate::model::{BitLlama, Mixer, MixerState, ModelState};
use crate::ttt::TttCache;
use crate::BitTttError;

const FORMAT: &str = "bit-ttt-soul";
const VERSION: &str = "1";

impl<B: Backend> ModelState<B> {
    /// Writes this state to a `.soul` file, atomically.
    ///
    /// # Errors
    /// [`BitTttError::Io`], or [`BitTttError::Data`] if a tensor cannot be read as f32.
    pub fn save(&self, path: &Path) -> Result<(), BitTttError> {
        let mut metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("position".to_string(), self.position.to_string()),
        ]);
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut push = |name: String, t: &Tensor<B, 4>| -> Result<(), BitTttError> {
            let values: Vec<f32> = t.to_data().convert::<f32>().into_vec()?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((name, t.dims().to_vec(), bytes));
            Ok(())
        };
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                MixerState::Ttt(cache) => {
                    metadata.insert(
                        format!("layers.{i}.seq_len_offset"),
                        cache.seq_len_offset().to_string(),
                    );
                    metadata.insert(
                        format!("layers.{i}.mini_batch_size"),
                        cache.mini_batch_size().to_string(),
                    );
                    for (k, t) in cache.state().iter().enumerate() {
                        push(format!("layers.{i}.state.{k}"), t)?;
                    }
                    for (k, t) in cache.grads().iter().enumerate() {
                        push(format!("layers.{i}.grads.{k}"), t)?;
                    }
                }
                MixerState::Attention(kv) => {
                    metadata.insert(format!("layers.{i}.kv_len"), kv.len().to_string());
                    if let (Some(keys), Some(values)) = (&kv.keys, &kv.values) {
                        push(format!("layers.{i}.keys"), keys)?;
                        push(format!("layers.{i}.values"), values)?;
                    }
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                let view =
                    TensorView::new(Dtype::F32, shape.clone(), bytes).expect("consistent tensor");
                (name.clone(), view)
            })
            .collect();
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| BitTttError::InvalidInput(format!("serializing the state: {e}")))?;
        write_atomic(path, &bytes)
    }
}

impl<B: Backend> BitLlama<B> {
    /// Restores a state saved by [`ModelState::save`] for this model.
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::CorruptFile`] if the
    /// file does not parse, is not a `.soul` file, does not fit this model (naming the tensor or
    /// field: a KV cache of another head count or head size, keys and values of different
    /// lengths), or its `position` disagrees with a layer's `seq_len_offset` or `kv_len`.
    pub fn load_state(&self, path: &Path) -> Result<ModelState<B>, BitTttError> {
        let bytes = read_file(path)?;
        let corrupt = |reason: String| BitTttError::CorruptFile {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| -> Result<usize, BitTttError> {
            metadata
                .get(key)
                .ok_or_else(|| corrupt(format!("metadata {key:?} is missing")))?
                .parse()
                .map_err(|_| corrupt(format!("metadata {key:?} is not a number")))
        };
        if metadata.get("format").map(String::as_str) != Some(FORMAT)
            || metadata.get("version").map(String::as_str) != Some(VERSION)
        {
            return Err(corrupt(format!("not a {FORMAT} version {VERSION} file")));
        }
        let device = self.embedding.weight.device();
        // A tensor of the file, checked against the shape the model needs (when one is given).
        let tensor =
            |name: String, expected: Option<[usize; 4]>| -> Result<Tensor<B, 4>, BitTttError> {
                let view = file
                    .tensor(&name)
                    .map_err(|_| corrupt(format!("tensor {name:?} is missing")))?;
                if view.dtype() != Dtype::F32 {
                    return Err(corrupt(format!(
                        "tensor {name:?} is {:?}, expected F32",
                        view.dtype()
                    )));
                }
                let shape: [usize; 4] = view.shape().try_into().map_err(|_| {
                    corrupt(format!(
                        "tensor {name:?} has shape {:?}, expected 4 dimensions",
                        view.shape()
                    ))
                })?;
                if let Some(expected) = expected {
                    if shape != expected {
                        return Err(corrupt(format!(
                            "tensor {name:?} has shape {shape:?}, the model expects {expected:?}"
                        )));
                    }
                }
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(Tensor::from_data(TensorData::new(values, shape), &device))
            };

        let position = field("position")?;
        let batch = self.batch_of(&file, &corrupt)?;
        let d_model = self.embedding.weight.dims()[1];
        let mut layers = Vec::with_capacity(self.blocks.len());
        let mut expected_names = 0;
        for (i, block) in self.blocks.iter().enumerate() {
            layers.push(match &block.mixer {
                Mixer::Ttt(ttt) => {
                    let cache = ttt.new_cache(batch);
                    let load = |kind: &str, like: &[Tensor<B, 4>]| {
                        like.iter()
                            .enumerate()
                            .map(|(k, t)| tensor(format!("layers.{i}.{kind}.{k}"), Some(t.dims())))
                            .collect::<Result<Vec<_>, _>>()
                    };
                    let state = load("state", cache.state())?;
                    let grads = load("grads", cache.grads())?;
                    expected_names += state.len() + grads.len();
                    let offset = field(&format!("layers.{i}.seq_len_offset"))?;
                    // Every forward advances the position and each layer's offset by the same
                    // count, so a difference means an edited or mixed-up file; the offset picks
                    // the RoPE and step-size positions, the model's position would disagree.
                    if offset != position {
                        return Err(corrupt(format!(
                            "layer {i}: seq_len_offset {offset} but position {position}"
                        )));
                    }
                    let mini_batch = field(&format!("layers.{i}.mini_batch_size"))?;
                    if mini_batch != cache.mini_batch_size() {
                        return Err(corrupt(format!(
                            "layer {i} was saved with mini-batch size {mini_batch}, the model uses {}",
                            cache.mini_batch_size()
                        )));
                    }
                    MixerState::Ttt(TttCache::from_parts(state, grads, offset, mini_batch)?)
                }
                Mixer::Attention(attention) => {
                    let kv_len = field(&format!("layers.{i}.kv_len"))?;
                    // The cache holds one key and value per token read; any other count would
                    // put the next token's RoPE and causal mask at the wrong position.
                    if kv_len != position {
                        return Err(corrupt(format!(
                            "layer {i}: kv_len {kv_len} but position {position}"
                        )));
                    }
                    if kv_len == 0 {
                        MixerState::Attention(KvCache::default())
                    } else {
                        expected_names += 2;
                        // The next forward concatenates new keys of this shape to the cached
                        // ones along the token axis: another batch, head count or head size,
                        // or values of another length than the keys, would panic there.
                        let heads = attention.num_heads;
                        let expected = [batch, heads, kv_len, d_model / heads];
                        let keys = tensor(format!("layers.{i}.keys"), Some(expected))?;
                        let values = tensor(format!("layers.{i}.values"), Some(expected))?;
                        MixerState::Attention(KvCache {
                            keys: Some(keys),
                            values: Some(values),
                        })
                    }
                }
            });
        }
        if file.len() != expected_names {
            let mut names: Vec<&str> = file.names();
            names.sort();
            return Err(corrupt(format!(
                "the file holds {} tensors, this model's state has {expected_names} ({names:?})",
                file.len()
            )));
        }
        Ok(ModelState { layers, position })
    }

    /// The batch size a `.soul` file was saved with (dimension 0 of any tensor; 1 if none).
    fn batch_of(
        &self,
        file: &SafeTensors<'_>,
        corrupt: &dyn Fn(String) -> BitTttError,
    ) -> Result<usize, BitTttError> {
        match file.tensors().first() {
            None => Ok(1),
            Some((name, view)) => view
                .shape()
                .first()
                .copied()
                .filter(|&b| b > 0)
                .ok_or_else(|| corrupt(format!("tensor {name:?} has no batch dimension"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{load_error_leaves_file, rewrite, rewrite_with_metadata};
    use crate::{BitLlamaConfig, MixerKind};
    use burn::backend::NdArray;

    type B = NdArray;

    fn resumes_exactly(mixer: MixerKind) {
        let device = Default::default();
        let model = BitLlamaConfig::tiny(30)
            .with_mixer(mixer)
            .init::<B>(&device);
        let context: Vec<u32> = (0..23).map(|i| (i * 7 % 30) as u32).collect();
        let continuation = [4u32, 9, 1];

        // Uninterrupted: read the context, then the continuation.
        let mut state = model.new_state();
        model.read(&context, &mut state).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("context.soul");
        state.save(&path).unwrap();
        let expected: Vec<Vec<f32>> = continuation
            .iter()
            .map(|&t| model.read(&[t], &mut state).unwrap())
            .collect();

        // Restored from the file.
        let mut restored = model.load_state(&path).unwrap();
        assert_eq!(restored.position, context.len());
        let got: Vec<Vec<f32>> = continuation
            .iter()
            .map(|&t| model.read(&[t], &mut restored).unwrap())
            .collect();
        assert_eq!(got, expected, "restored logits differ ({mixer:?})");
    }

    #[test]
    fn restoring_a_ttt_state_gives_the_uninterrupted_logits() {
        resumes_exactly(MixerKind::TttLinear);
        resumes_exactly(MixerKind::TttMlp);
    }

    #[test]
    fn restoring_a_kv_cache_gives_the_uninterrupted_logits() {
        resumes_exactly(MixerKind::Attention);
    }

    #[test]
    fn a_state_of_another_model_or_a_broken_file_is_an_error() {
        let device = Default::default();
        let model = BitLlamaConfig::tiny(30).init::<B>(&device);
        let mut state = model.new_state();
        model.read(&[1, 2, 3], &mut state).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.soul");
        state.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();

        let wider = BitLlamaConfig {
            d_model: 32,
            n_heads: 2,
            ..BitLlamaConfig::tiny(30)
        }
        .init::<B>(&device);
        let err = wider.load_state(&path).unwrap_err();
        assert!(err.to_string().contains("the model expects"), "{err}");

        let mlp = BitLlamaConfig::tiny(30)
            .with_mixer(MixerKind::TttMlp)
            .init::<B>(&device);
        assert!(matches!(
            mlp.load_state(&path),
            Err(BitTttError::CorruptFile { .. })
        ));

        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            model.load_state(&path),
            Err(BitTttError::CorruptFile { .. })
        ));
        assert!(matches!(
            model.load_state(&dir.path().join("none.soul")),
            Err(BitTttError::MissingFile(_))
        ));
    }

    #[test]
    fn a_kv_cache_that_does_not_fit_the_model_is_an_error_and_the_file_stays() {
        let device = Default::default();
        let attention = || BitLlamaConfig::tiny(30).with_mixer(MixerKind::Attention);
        let model = attention().init::<B>(&device);
        let mut state = model.new_state();
        model.read(&[1, 2, 3], &mut state).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.soul");
        state.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(model.load_state(&path).unwrap().position, 3);

        // The same width in 2 heads of 32 instead of 4 of 16: keys [1, 4, 3, 16] would reach a
        // forward that concatenates them with new keys [1, 2, 1, 32] and panics.
        let two_heads = BitLlamaConfig {
            n_heads: 2,
            ..attention()
        }
        .init::<B>(&device);
        let err = load_error_leaves_file(&path, &bytes, |p| two_heads.load_state(p));
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("layers.0.keys") && reason.contains("the model expects [1, 2, 3, 32]")),
            "{err}"
        );

        // Hand-edited: values of two tokens beside keys of three.
        let short_values = rewrite(&bytes, |t| {
            let entry = t.iter_mut().find(|e| e.0 == "layers.1.values").unwrap();
            entry.2[2] = 2;
            entry.3.truncate(entry.3.len() / 3 * 2);
        });
        let err = load_error_leaves_file(&path, &short_values, |p| model.load_state(p));
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("layers.1.values")),
            "{err}"
        );

        // Hand-edited: a position the cache does not hold (the next token's RoPE would be off).
        let later = rewrite_with_metadata(&bytes, |_, metadata| {
            metadata.insert("position".into(), "4".into());
        });
        let err = load_error_leaves_file(&path, &later, |p| model.load_state(p));
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("layer 0: kv_len 3 but position 4")),
            "{err}"
        );
    }

    #[test]
    fn a_ttt_state_whose_position_disagrees_with_its_layers_is_an_error() {
        let device = Default::default();
        let model = BitLlamaConfig::tiny(30).init::<B>(&device);
        let mut state = model.new_state();
        model.read(&[1, 2, 3, 4, 5], &mut state).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ttt.soul");
        state.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(model.load_state(&path).unwrap().position, 5);

        let edited_fails = |key: &str, value: &str| {
            let edited = rewrite_with_metadata(&bytes, |_, metadata| {
                metadata.insert(key.into(), value.into());
            });
            load_error_leaves_file(&path, &edited, |p| model.load_state(p))
        };
        let err = edited_fails("position", "6");
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("layer 0: seq_len_offset 5 but position 6")),
            "{err}"
        );
        let err = edited_fails("layers.1.seq_len_offset", "4");
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("layer 1: seq_len_offset 4 but position 5")),
            "{err}"
        );
    }
}
