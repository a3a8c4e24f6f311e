//! `.soul` files: the state of a model after reading a context, saved to disk and restored
//! later, so a long document is read once and generation resumes from it — on the same
//! decoder or on another one (Burn on any backend, the fused CPU decoder).
//!
//! A `.soul` file is a safetensors file of f32 tensors. Everything of block `i` is named
//! `layers.{i}.{name}`; what the names are is its mixer's business (see `ttt/state.rs` and
//! `attention/state.rs` under [`crate::mixer`]):
//! - a TTT layer holds the fast weights at the start of the current mini-batch,
//!   `layers.{i}.state.{k}`, and the accumulated step of the unfinished mini-batch,
//!   `layers.{i}.grads.{k}` (`[batch, heads, rows, cols]` each; `k` counts the inner model's
//!   tensors: W1, b1 for TTT-Linear, W1, b1, W2, b2 for TTT-MLP), and in the metadata its
//!   position in the stream (`layers.{i}.seq_len_offset`) and mini-batch size;
//! - an attention layer holds `layers.{i}.keys` and `layers.{i}.values` (the KV cache; that
//!   file grows with the context, a TTT one does not) and `layers.{i}.kv_len`.
//!
//! The metadata also holds `format = bit-ttt-soul`, `version = 1` and the number of tokens
//! read (`position`). The format is the same whichever decoder wrote it.
//!
//! Restoring checks that the file fits the model (layer count, kinds, shapes, element types;
//! keys and values `[batch, n_kv_heads, position, d_model / n_heads]` each), that it holds no
//! tensor the model's state does not have, and that its counters agree (`position` equals every
//! TTT layer's `seq_len_offset` and every attention layer's `kv_len`), so a restored state
//! cannot make the next step panic. It gives exactly the state that was saved.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::files::{read_file, write_atomic};
use crate::BitTttError;

const FORMAT: &str = "bit-ttt-soul";
const VERSION: &str = "1";

/// An f32 tensor on the host: its shape and its values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub values: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `values`.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] if the counts differ.
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Result<Self, BitTttError> {
        let count: usize = shape.iter().product();
        if count != values.len() {
            return Err(BitTttError::InvalidCache(format!(
                "{} values for a tensor of shape {shape:?}",
                values.len()
            )));
        }
        Ok(Self { shape, values })
    }
}

/// One block's part of a state in the form every decoder reads and writes: named numbers and
/// f32 tensors (names without the `layers.{i}.` prefix). A block saves its state into one and
/// restores it from one, whatever runs it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerSoul {
    /// The block's index, for messages (`layers.{index}.…`).
    pub index: usize,
    /// Counters (`seq_len_offset`, `mini_batch_size`, `kv_len`, …).
    pub fields: BTreeMap<String, usize>,
    /// Tensors.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl LayerSoul {
    /// An empty part for block `index`.
    pub fn new(index: usize) -> Self {
        Self {
            index,
            ..Self::default()
        }
    }

    /// The full name of `name` in a file.
    pub fn full_name(&self, name: &str) -> String {
        format!("layers.{}.{name}", self.index)
    }

    /// The counter `name`.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming it when it is missing.
    pub fn field(&self, name: &str) -> Result<usize, BitTttError> {
        self.fields.get(name).copied().ok_or_else(|| {
            BitTttError::InvalidCache(format!("metadata {:?} is missing", self.full_name(name)))
        })
    }

    /// Takes the tensor `name` out, checked against `expected` when one is given.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming the tensor when it is missing or of another shape.
    pub fn take_tensor(
        &mut self,
        name: &str,
        expected: Option<&[usize]>,
    ) -> Result<HostTensor, BitTttError> {
        let full = self.full_name(name);
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| BitTttError::InvalidCache(format!("tensor {full:?} is missing")))?;
        if let Some(expected) = expected {
            if tensor.shape != expected {
                return Err(BitTttError::InvalidCache(format!(
                    "tensor {full:?} has shape {:?}, the model expects {expected:?}",
                    tensor.shape
                )));
            }
        }
        Ok(tensor)
    }

    /// The error for a counter that disagrees with the number of tokens the state has read.
    pub fn position_error(&self, counter: &str, value: usize, position: usize) -> BitTttError {
        BitTttError::InvalidCache(format!(
            "layer {}: {counter} {value} but position {position}",
            self.index
        ))
    }
}

/// A whole state in its portable form: the number of tokens read and one [`LayerSoul`] per
/// block. What a `.soul` file holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Soul {
    /// Tokens read.
    pub position: usize,
    /// One part per block, in order.
    pub layers: Vec<LayerSoul>,
}

impl Soul {
    /// The batch size of the state: dimension 0 of its tensors, which all must agree (1 if it
    /// has none).
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] for a tensor without a batch dimension, a batch of 0, or
    /// tensors of different batch sizes.
    pub fn batch_size(&self) -> Result<usize, BitTttError> {
        let mut batch: Option<(String, usize)> = None;
        for (name, t) in self
            .layers
            .iter()
            .flat_map(|l| l.tensors.iter().map(move |(n, t)| (l.full_name(n), t)))
        {
            let b = t.shape.first().copied().filter(|&b| b > 0).ok_or_else(|| {
                BitTttError::InvalidCache(format!("tensor {name:?} has no batch dimension"))
            })?;
            match &batch {
                None => batch = Some((name, b)),
                Some((first, size)) if *size != b => {
                    return Err(BitTttError::InvalidCache(format!(
                        "tensor {name:?} has a batch of {b}, tensor {first:?} one of {size}"
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(batch.map_or(1, |(_, b)| b))
    }

    /// Checks that the state has `n_layers` parts; returns the number of its tensors (for
    /// [`check_all_taken`](Self::check_all_taken)).
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] for another number of layers.
    pub fn check_layer_count(&self, n_layers: usize) -> Result<usize, BitTttError> {
        if self.layers.len() != n_layers {
            return Err(BitTttError::InvalidCache(format!(
                "a state of {} layers for a model of {n_layers}",
                self.layers.len()
            )));
        }
        Ok(self.layers.iter().map(|l| l.tensors.len()).sum())
    }

    /// Checks that the state is of one sequence, as a decoder reads.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] for a state of several sequences (or a tensor without a
    /// batch dimension).
    pub fn check_one_sequence(&self) -> Result<(), BitTttError> {
        match self.batch_size()? {
            1 => Ok(()),
            batch => Err(BitTttError::InvalidCache(format!(
                "a state of {batch} sequences: a decoder reads one"
            ))),
        }
    }

    /// The error when tensors are left over after every block took its own: the file holds
    /// something this model's state does not have.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] listing the file's tensors, when some are left over.
    pub fn check_all_taken(&self, total: usize) -> Result<(), BitTttError> {
        let left: usize = self.layers.iter().map(|l| l.tensors.len()).sum();
        if left == 0 {
            return Ok(());
        }
        let names: Vec<String> = self
            .layers
            .iter()
            .flat_map(|l| l.tensors.keys().map(move |n| l.full_name(n)))
            .collect();
        Err(BitTttError::InvalidCache(format!(
            "the file holds {total} tensors, this model's state has {} (left over: {names:?})",
            total - left
        )))
    }

    /// Writes the `.soul` file, atomically.
    ///
    /// # Errors
    /// [`BitTttError::Io`]; [`BitTttError::InvalidInput`] if serializing fails.
    pub fn save(&self, path: &Path) -> Result<(), BitTttError> {
        let mut metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("position".to_string(), self.position.to_string()),
        ]);
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for layer in &self.layers {
            for (name, value) in &layer.fields {
                metadata.insert(layer.full_name(name), value.to_string());
            }
            for (name, t) in &layer.tensors {
                let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                tensors.push((layer.full_name(name), t.shape.clone(), bytes));
            }
        }
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
                    .map_err(|e| BitTttError::InvalidCache(format!("tensor {name:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| BitTttError::InvalidInput(format!("serializing the state: {e}")))?;
        write_atomic(path, &bytes)
    }

    /// Reads a `.soul` file for a model of `n_layers` blocks. Only the file's own consistency
    /// is checked here (format, element types, names); whether it fits the model is for the
    /// blocks restoring their parts ([`LayerSoul::take_tensor`]).
    ///
    /// Returns the state and the number of tensors in the file.
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::CorruptFile`] if the
    /// file does not parse, is not a `.soul` file, or holds a tensor that is not f32 or not
    /// of a block of the model.
    pub fn load(path: &Path, n_layers: usize) -> Result<(Self, usize), BitTttError> {
        let bytes = read_file(path)?;
        let corrupt = |reason: String| BitTttError::CorruptFile {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        if metadata.get("format").map(String::as_str) != Some(FORMAT)
            || metadata.get("version").map(String::as_str) != Some(VERSION)
        {
            return Err(corrupt(format!("not a {FORMAT} version {VERSION} file")));
        }
        let number = |key: &str, value: &str| -> Result<usize, BitTttError> {
            value
                .parse()
                .map_err(|_| corrupt(format!("metadata {key:?} is not a number")))
        };
        let position = number(
            "position",
            metadata
                .get("position")
                .ok_or_else(|| corrupt("metadata \"position\" is missing".into()))?,
        )?;
        let mut layers: Vec<LayerSoul> = (0..n_layers).map(LayerSoul::new).collect();
        // `layers.{i}.{rest}` -> (i, rest) for a block of the model.
        let split = |name: &str| -> Option<(usize, String)> {
            let rest = name.strip_prefix("layers.")?;
            let (i, rest) = rest.split_once('.')?;
            let i: usize = i.parse().ok()?;
            (i < n_layers).then(|| (i, rest.to_string()))
        };
        for (key, value) in &metadata {
            if let Some((i, name)) = split(key) {
                layers[i].fields.insert(name, number(key, value)?);
            }
        }
        let total = file.len();
        for (name, view) in file.tensors() {
            let (i, rest) = split(&name).ok_or_else(|| {
                corrupt(format!(
                    "tensor {name:?} belongs to no block of a model of {n_layers}"
                ))
            })?;
            if view.dtype() != Dtype::F32 {
                return Err(corrupt(format!(
                    "tensor {name:?} is {:?}, expected F32",
                    view.dtype()
                )));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            // A NaN in a fast weight or a cached key would only show as NaN logits later.
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                return Err(corrupt(format!(
                    "tensor {name:?} holds a value that is not finite (NaN or infinite) at index {index}"
                )));
            }
            let tensor = HostTensor::new(view.shape().to_vec(), values)
                .map_err(|e| corrupt(format!("tensor {name:?}: {e}")))?;
            layers[i].tensors.insert(rest, tensor);
        }
        Ok((Self { position, layers }, total))
    }
}

/// For errors of restoring a state read from the file at `path`: a state that does not fit
/// ([`BitTttError::InvalidCache`]) is a [`BitTttError::CorruptFile`] of that file.
pub(crate) fn as_file_error(path: &Path) -> impl Fn(BitTttError) -> BitTttError + '_ {
    move |e| match e {
        BitTttError::InvalidCache(reason) => BitTttError::CorruptFile {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soul_round_trips_through_its_file() {
        let mut layer = LayerSoul::new(1);
        layer.fields.insert("kv_len".into(), 2);
        layer.tensors.insert(
            "keys".into(),
            HostTensor::new(vec![1, 1, 2, 2], vec![1.0, -2.0, 0.5, 3.0]).unwrap(),
        );
        let soul = Soul {
            position: 2,
            layers: vec![LayerSoul::new(0), layer],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.soul");
        soul.save(&path).unwrap();
        let (loaded, total) = Soul::load(&path, 2).unwrap();
        assert_eq!(loaded, soul);
        assert_eq!(total, 1);
        assert_eq!(loaded.batch_size().unwrap(), 1);

        // A model of one block: the tensor of block 1 belongs to none of its blocks.
        let err = Soul::load(&path, 1).unwrap_err();
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("layers.1.keys")),
            "{err}"
        );
    }

    #[test]
    fn non_finite_values_and_disagreeing_batches_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.soul");
        let soul_of = |tensors: Vec<(&str, HostTensor)>| {
            let mut layer = LayerSoul::new(0);
            for (name, t) in tensors {
                layer.tensors.insert(name.into(), t);
            }
            Soul {
                position: 0,
                layers: vec![layer],
            }
        };
        for bad in [f32::NAN, f32::INFINITY] {
            soul_of(vec![(
                "W1",
                HostTensor::new(vec![1, 3], vec![0.0, bad, 1.0]).unwrap(),
            )])
            .save(&path)
            .unwrap();
            let err = Soul::load(&path, 1).unwrap_err();
            assert!(
                matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("\"layers.0.W1\"") && reason.contains("index 1")),
                "{err}"
            );
        }
        // A zero-size tensor claiming a huge batch, beside a real one.
        let soul = soul_of(vec![
            (
                "a",
                HostTensor::new(vec![1_000_000_000, 0], vec![]).unwrap(),
            ),
            ("b", HostTensor::new(vec![1, 2], vec![0.0, 1.0]).unwrap()),
        ]);
        soul.save(&path).unwrap();
        let (loaded, _) = Soul::load(&path, 1).unwrap();
        let err = loaded.batch_size().unwrap_err();
        assert!(err.to_string().contains("batch of 1"), "{err}");
        let zero = soul_of(vec![("a", HostTensor::new(vec![0, 4], vec![]).unwrap())]);
        assert!(zero.batch_size().is_err());
    }

    #[test]
    fn taking_checks_names_and_shapes() {
        let mut layer = LayerSoul::new(3);
        layer.tensors.insert(
            "values".into(),
            HostTensor::new(vec![2], vec![1.0, 2.0]).unwrap(),
        );
        let err = layer.take_tensor("values", Some(&[3])).unwrap_err();
        assert_eq!(
            err.to_string(),
            BitTttError::InvalidCache(
                "tensor \"layers.3.values\" has shape [2], the model expects [3]".into()
            )
            .to_string()
        );
        let err = layer.take_tensor("keys", None).unwrap_err();
        assert!(err.to_string().contains("\"layers.3.keys\" is missing"));
        assert!(layer.field("kv_len").is_err());
        assert!(HostTensor::new(vec![2, 2], vec![0.0; 3]).is_err());
    }
}
