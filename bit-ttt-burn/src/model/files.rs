//! Model directories: `config.json` + `model.safetensors` (+ `tokenizer.json`, written by the CLI).
//!
//! Tensor names are the module paths without enum variant names, e.g.
//! `embedding.weight`, `blocks.0.mixer_norm.gamma`, `blocks.0.mixer.q_proj.weight`,
//! `blocks.0.ffn.gate_proj.weight`, `norm.gamma`, `lm_head.weight`. BitLinear weights are the
//! latent f32 weights, `[d_output, d_input]`; f32 `Linear` weights are Burn's `[d_input, d_output]`.
//!
//! Loading checks everything before it touches the model: a missing file, a truncated or corrupt
//! file, a tensor of the wrong shape or element type, a missing or unexpected tensor, and a config
//! that does not fit the weights are each a typed [`BitTttError`], never a panic.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};

use crate::files::{read_file, write_atomic};
use crate::model::packed::LazyShapes;
use crate::model::{BitLlama, BitLlamaConfig};
use crate::BitTttError;
use burn::module::Module;

/// File name of the configuration in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the tokenizer in a model directory (written and read by the CLI).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

impl BitLlamaConfig {
    /// Reads and validates a `config.json`.
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`], [`BitTttError::Io`], or [`BitTttError::InvalidConfig`] if it
    /// does not parse or describes an impossible model.
    pub fn load_json(path: &Path) -> Result<Self, BitTttError> {
        let bytes = read_file(path)?;
        let invalid = |reason: String| BitTttError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let config: Self = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Writes this configuration as pretty JSON, atomically.
    ///
    /// # Errors
    /// [`BitTttError::Io`].
    pub fn save_json(&self, path: &Path) -> Result<(), BitTttError> {
        let json = serde_json::to_vec_pretty(self).expect("a config always serializes");
        write_atomic(path, &json)
    }
}

impl<B: Backend> BitLlama<B> {
    /// Saves the configuration and the weights into `dir` (created if needed), each file atomically.
    ///
    /// # Errors
    /// [`BitTttError::Io`].
    pub fn save(&self, config: &BitLlamaConfig, dir: &Path) -> Result<(), BitTttError> {
        std::fs::create_dir_all(dir).map_err(|e| BitTttError::io(dir, e))?;
        self.save_weights(&dir.join(WEIGHTS_FILE))?;
        config.save_json(&dir.join(CONFIG_FILE))
    }

    /// Loads a model directory written by [`save`](Self::save).
    ///
    /// # Errors
    /// See the [module docs](self).
    pub fn load(dir: &Path, device: &B::Device) -> Result<(Self, BitLlamaConfig), BitTttError> {
        let config = BitLlamaConfig::load_json(&dir.join(CONFIG_FILE))?;
        let model = config
            .init::<B>(device)
            .load_weights(&dir.join(WEIGHTS_FILE))?;
        Ok((model, config))
    }

    /// Writes the weights as safetensors, atomically.
    ///
    /// # Errors
    /// [`BitTttError::Io`].
    pub fn save_weights(&self, path: &Path) -> Result<(), BitTttError> {
        let mut store = SafetensorsStore::from_bytes(None).skip_enum_variants(true);
        self.save_into(&mut store)
            .map_err(|e| BitTttError::InvalidInput(format!("collecting the weights: {e}")))?;
        let bytes = store
            .get_bytes()
            .map_err(|e| BitTttError::InvalidInput(format!("serializing the weights: {e}")))?;
        write_atomic(path, &bytes)
    }

    /// Replaces this model's weights by those of a safetensors file, after checking that the
    /// file holds exactly this model's tensors, with its shapes and element types.
    ///
    /// # Errors
    /// See the [module docs](self). On error nothing is changed.
    pub fn load_weights(mut self, path: &Path) -> Result<Self, BitTttError> {
        let bytes = read_file(path)?;
        check_weights(&self, &bytes, path)?;
        let mut store = SafetensorsStore::from_bytes(Some(bytes)).skip_enum_variants(true);
        let result = self
            .load_from(&mut store)
            .map_err(|e| BitTttError::CorruptFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if !result.errors.is_empty() || !result.missing.is_empty() {
            return Err(BitTttError::CorruptFile {
                path: path.to_path_buf(),
                reason: format!("{:?} {:?}", result.errors, result.missing),
            });
        }
        Ok(self)
    }
}

/// Compares the tensors of a safetensors file with those `model` has, reading the model's
/// shapes without drawing its random initial values (a load must not pay for, or run out of
/// memory on, parameters it is about to replace), and checks every float is finite.
fn check_weights<B: Backend>(
    model: &BitLlama<B>,
    bytes: &[u8],
    path: &Path,
) -> Result<(), BitTttError> {
    let file =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| BitTttError::CorruptFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut lazy = LazyShapes::default();
    model.visit(&mut lazy);
    // Every tensor of the model is a float parameter.
    let float = dtype_name(<B::FloatElem as burn::tensor::Element>::dtype());
    let expected: BTreeMap<String, (Vec<usize>, String)> = lazy
        .shapes
        .into_iter()
        .map(|(name, shape)| (name, (shape, float.clone())))
        .collect();

    let mut errors = Vec::new();
    for (name, (shape, dtype)) in &expected {
        match file.tensor(name) {
            Err(_) => errors.push(BitTttError::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            }),
            Ok(view) => {
                let actual_dtype = format!("{:?}", view.dtype());
                if &actual_dtype != dtype {
                    errors.push(BitTttError::DtypeMismatch {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        expected: dtype.clone(),
                        actual: actual_dtype,
                    });
                } else if view.shape() != shape.as_slice() {
                    errors.push(BitTttError::ShapeMismatch {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        expected: shape.clone(),
                        actual: view.shape().to_vec(),
                    });
                }
            }
        }
    }
    let mut unexpected: Vec<String> = file
        .names()
        .into_iter()
        .filter(|n| !expected.contains_key(*n))
        .map(str::to_string)
        .collect();
    unexpected.sort();
    errors.extend(
        unexpected
            .into_iter()
            .map(|name| BitTttError::UnexpectedTensor {
                path: path.to_path_buf(),
                name,
            }),
    );

    if errors.is_empty() {
        for name in expected.keys() {
            let view = file.tensor(name).expect("checked above");
            check_finite(path, name, view.dtype(), view.data())?;
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(BitTttError::WeightsDoNotFitConfig {
            path: path.to_path_buf(),
            problems: errors.iter().map(ToString::to_string).collect(),
        }),
    }
}

/// Fails with [`BitTttError::CorruptFile`] naming the tensor and the index of its first
/// value that is NaN or infinite (a model with one would only give NaN logits later).
pub(crate) fn check_finite(
    path: &Path,
    name: &str,
    dtype: safetensors::Dtype,
    data: &[u8],
) -> Result<(), BitTttError> {
    let first_bad = match dtype {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        safetensors::Dtype::F64 => data
            .chunks_exact(8)
            .position(|b| !f64::from_le_bytes(b.try_into().expect("8 bytes")).is_finite()),
        // Our files hold no other float types (their element type is checked first).
        _ => None,
    };
    match first_bad {
        None => Ok(()),
        Some(index) => Err(BitTttError::CorruptFile {
            path: path.to_path_buf(),
            reason: format!("tensor {name:?} holds a value that is not finite (NaN or infinite) at index {index}"),
        }),
    }
}

/// The safetensors spelling of a Burn element type (`F32`, `F16`, …).
fn dtype_name(dtype: burn::tensor::DType) -> String {
    use burn::tensor::DType;
    match dtype {
        DType::F64 => "F64",
        DType::F32 | DType::Flex32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::U8 => "U8",
        DType::Bool(_) => "BOOL",
        _ => "other",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::rewrite;
    use crate::MixerKind;
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor};
    use std::fs;

    type B = NdArray;

    fn tiny() -> BitLlamaConfig {
        BitLlamaConfig::tiny(50)
    }

    fn logits(model: &BitLlama<B>) -> Vec<f32> {
        let tokens = Tensor::<B, 2, Int>::from_ints([[1, 7, 3, 49, 0]], &Default::default());
        model.forward(tokens).into_data().to_vec().unwrap()
    }

    /// Saves a tiny model and returns its directory and the bytes of its files.
    fn saved() -> (tempfile::TempDir, BitLlama<B>, Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny();
        let model = config.init::<B>(&Default::default());
        model.save(&config, dir.path()).unwrap();
        let weights = fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let json = fs::read(dir.path().join(CONFIG_FILE)).unwrap();
        (dir, model, weights, json)
    }

    #[test]
    fn save_load_gives_identical_logits() {
        for mixer in [
            MixerKind::TttLinear,
            MixerKind::TttMlp,
            MixerKind::Attention,
        ] {
            for ternary in [true, false] {
                let dir = tempfile::tempdir().unwrap();
                let config = tiny().with_mixer(mixer).with_ternary(ternary);
                let model = config.init::<B>(&Default::default());
                model.save(&config, dir.path()).unwrap();
                let (loaded, loaded_config) =
                    BitLlama::<B>::load(dir.path(), &Default::default()).unwrap();
                assert_eq!(loaded_config, config);
                assert_eq!(
                    logits(&loaded),
                    logits(&model),
                    "{mixer:?}, ternary {ternary}"
                );
            }
        }
    }

    #[test]
    fn tensor_names_are_stable() {
        let (_, model, weights, _) = saved();
        let file = safetensors::SafeTensors::deserialize(&weights).unwrap();
        let mut names: Vec<&str> = file.names();
        names.sort();
        for expected in [
            "embedding.weight",
            "blocks.0.mixer_norm.gamma",
            "blocks.0.mixer.q_proj.weight",
            "blocks.1.ffn.down_proj.weight",
            "norm.gamma",
            "lm_head.weight",
        ] {
            assert!(names.contains(&expected), "{expected} not in {names:?}");
        }
        assert_eq!(names.len(), model.collect(None, None, true).len());
    }

    /// Writes `weights` (and optionally a config) into a copy of the model directory and
    /// checks loading fails as `check` says, with the files left byte for byte as written.
    fn load_fails(weights: &[u8], json: &[u8], check: impl Fn(&BitTttError) -> bool) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(WEIGHTS_FILE), weights).unwrap();
        fs::write(dir.path().join(CONFIG_FILE), json).unwrap();
        let err = BitLlama::<B>::load(dir.path(), &Default::default()).unwrap_err();
        assert!(check(&err), "unexpected error: {err}");
        assert_eq!(fs::read(dir.path().join(WEIGHTS_FILE)).unwrap(), weights);
        assert_eq!(fs::read(dir.path().join(CONFIG_FILE)).unwrap(), json);
    }

    #[test]
    fn bad_files_give_typed_errors_and_stay_untouched() {
        let (_, _, weights, json) = saved();

        // Missing files.
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            BitLlama::<B>::load(dir.path(), &Default::default()),
            Err(BitTttError::MissingFile(_))
        ));
        fs::write(dir.path().join(CONFIG_FILE), &json).unwrap();
        assert!(matches!(
            BitLlama::<B>::load(dir.path(), &Default::default()),
            Err(BitTttError::MissingFile(p)) if p.ends_with(WEIGHTS_FILE)
        ));

        // Truncated at several offsets: inside the length prefix, the header, and the data.
        for cut in [0, 5, 8, 40, weights.len() / 2, weights.len() - 1] {
            load_fails(&weights[..cut], &json, |e| {
                matches!(e, BitTttError::CorruptFile { .. })
            });
        }
        // A flipped header byte (the opening brace of the JSON header).
        let mut flipped = weights.clone();
        flipped[8] ^= 0xff;
        load_fails(&flipped, &json, |e| {
            matches!(e, BitTttError::CorruptFile { .. })
        });

        // F16 where F32 is expected.
        let f16 = rewrite(&weights, |t| {
            let entry = t.iter_mut().find(|e| e.0 == "norm.gamma").unwrap();
            entry.1 = safetensors::Dtype::F16;
            entry.3.truncate(entry.3.len() / 2);
        });
        load_fails(
            &f16,
            &json,
            |e| matches!(e, BitTttError::DtypeMismatch { name, actual, .. } if name == "norm.gamma" && actual == "F16"),
        );

        // One tensor missing, one extra, one mis-shaped.
        let missing = rewrite(&weights, |t| t.retain(|e| e.0 != "lm_head.weight"));
        load_fails(
            &missing,
            &json,
            |e| matches!(e, BitTttError::MissingTensor { name, .. } if name == "lm_head.weight"),
        );
        let extra = rewrite(&weights, |t| {
            t.push((
                "blocks.9.extra".into(),
                safetensors::Dtype::F32,
                vec![1],
                vec![0; 4],
            ))
        });
        load_fails(
            &extra,
            &json,
            |e| matches!(e, BitTttError::UnexpectedTensor { name, .. } if name == "blocks.9.extra"),
        );
        let misshaped = rewrite(&weights, |t| {
            let entry = t.iter_mut().find(|e| e.0 == "norm.gamma").unwrap();
            entry.2 = vec![entry.2[0] / 2, 2];
        });
        load_fails(
            &misshaped,
            &json,
            |e| matches!(e, BitTttError::ShapeMismatch { name, actual, .. } if name == "norm.gamma" && actual == &vec![32, 2]),
        );

        // A NaN and an infinity among the weights.
        for bad in [f32::NAN, f32::NEG_INFINITY] {
            let poisoned = rewrite(&weights, |t| {
                let entry = t.iter_mut().find(|e| e.0 == "norm.gamma").unwrap();
                entry.3[12..16].copy_from_slice(&bad.to_le_bytes());
            });
            load_fails(
                &poisoned,
                &json,
                |e| matches!(e, BitTttError::CorruptFile { reason, .. } if reason.contains("\"norm.gamma\"") && reason.contains("index 3")),
            );
        }
        // A config whose floats make no sense.
        let zero_eps = serde_json::to_vec(&tiny().with_norm_eps(0.0)).unwrap();
        load_fails(
            &weights,
            &zero_eps,
            |e| matches!(e, BitTttError::InvalidConfig { reason, .. } if reason.contains("norm_eps")),
        );
        // A config too large to allocate is refused before anything is allocated.
        let huge = serde_json::to_vec(&BitLlamaConfig {
            d_model: 100_000_000,
            ..tiny()
        })
        .unwrap();
        load_fails(&weights, &huge, |e| {
            matches!(e, BitTttError::InvalidConfig { .. })
        });

        // A config.json that does not parse, one that is impossible, one that does not fit.
        load_fails(&weights, b"{ not json", |e| {
            matches!(e, BitTttError::InvalidConfig { .. })
        });
        let zero_heads = serde_json::to_vec(&BitLlamaConfig {
            n_heads: 0,
            ..tiny()
        })
        .unwrap();
        load_fails(&weights, &zero_heads, |e| {
            matches!(e, BitTttError::InvalidConfig { .. })
        });
        let wider = serde_json::to_vec(&BitLlamaConfig {
            n_layers: 3,
            ..tiny()
        })
        .unwrap();
        load_fails(
            &weights,
            &wider,
            |e| matches!(e, BitTttError::WeightsDoNotFitConfig { problems, .. } if problems.iter().any(|p| p.contains("blocks.2"))),
        );
    }
}
