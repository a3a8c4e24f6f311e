//! `.soul` files of a [`BitLlama`] decoded by Burn: [`ModelState::save`] and
//! [`BitLlama::load_state`]. The format and its checks are in [`crate::soul`]; each mixer
//! converts its own part.

use std::path::Path;

use crate::model::{BitLlama, ModelState};
use crate::soul::{as_file_error, Soul};
use crate::BitTttError;

impl<B: burn::tensor::backend::Backend> ModelState<B> {
    /// This state in the portable form of `.soul` files.
    ///
    /// # Errors
    /// [`BitTttError::Data`] if a tensor cannot be read as f32.
    pub fn to_soul(&self) -> Result<Soul, BitTttError> {
        Ok(Soul {
            position: self.position,
            layers: self
                .layers
                .iter()
                .enumerate()
                .map(|(i, layer)| layer.to_soul(i))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Writes this state to a `.soul` file, atomically.
    ///
    /// # Errors
    /// [`BitTttError::Io`], or [`BitTttError::Data`] if a tensor cannot be read as f32.
    pub fn save(&self, path: &Path) -> Result<(), BitTttError> {
        self.to_soul()?.save(path)
    }
}

impl<B: burn::tensor::backend::Backend> BitLlama<B> {
    /// The state a portable [`Soul`] describes, checked against this model (every tensor and
    /// counter of every block; nothing left over). `total` is the number of tensors the soul
    /// came with, for the message when some are left over.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming the first thing that does not fit.
    pub fn state_from_soul(&self, mut soul: Soul) -> Result<ModelState<B>, BitTttError> {
        let total = soul.check_layer_count(self.blocks.len())?;
        let batch = soul.batch_size()?;
        let device = self.embedding.weight.device();
        let d_model = self.embedding.weight.dims()[1];
        let layers = self
            .blocks
            .iter()
            .zip(&mut soul.layers)
            .map(|(block, layer)| {
                block
                    .mixer
                    .state_from_soul(layer, soul.position, batch, d_model, &device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        soul.check_all_taken(total)?;
        Ok(ModelState {
            layers,
            position: soul.position,
        })
    }

    /// Restores a state saved by [`ModelState::save`] (or by another decoder of this model,
    /// e.g. [`CpuDecoder::save_state`](crate::cpu_decode::CpuDecoder::save_state)).
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::CorruptFile`] if the
    /// file does not parse, is not a `.soul` file, does not fit this model (naming the tensor or
    /// field: a KV cache of another head count or head size, keys and values of different
    /// lengths), or its `position` disagrees with a layer's `seq_len_offset` or `kv_len`.
    pub fn load_state(&self, path: &Path) -> Result<ModelState<B>, BitTttError> {
        let (soul, _) = Soul::load(path, self.blocks.len())?;
        self.state_from_soul(soul).map_err(as_file_error(path))
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
