//! The packed inference file: ternary weights 2 bits each, memory-mapped and used in place.
//!
//! `BitLlama::save_packed` writes one safetensors file (conventionally `model.packed.safetensors`):
//!
//! | tensor | dtype | shape | what |
//! |--------|-------|-------|------|
//! | `{projection}.qweight` | U8 | `[rows, ceil(cols / 128) · 32]` | the [`BlockTernary`](bit_ttt_kernels::BlockTernary)s of each row (layout in `bit-ttt-kernels/src/packing.rs`) |
//! | `{projection}.scale` | F32 | `[1]` | the absmean scale `gamma` |
//! | `{projection}.cols` | I64 | `[1]` | input features (`cols`), checked against the config on load |
//! | every other tensor | F32 | as in `model.safetensors` | embedding, norms, TTT parameters, f32 head, biases |
//!
//! `{projection}` is the module path of each ternary projection (`blocks.3.mixer.q_proj`,
//! `blocks.3.ffn.down_proj`, `lm_head` when the head is ternary). The metadata holds
//! `format = bit-ttt-packed`, `version = 1` and the model's `config` as JSON, so the file is
//! self-contained. `BitLlama::load_packed` maps the file and points each packed projection at
//! its blocks inside the mapping: the ternary weights are never copied (only the f32 rest is
//! loaded into tensors).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bit_ttt_kernels::packing::blocks_per_row;
use bit_ttt_kernels::BlockTernary;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use burn_store::{ModuleSnapshot, SafetensorsStore};
use memmap2::Mmap;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::files::write_atomic;
use crate::model::{BitLlama, BitLlamaConfig};
use crate::packed_bit_linear::{TernaryParam, TernaryWeights};
use crate::{BitTttError, Projection, TernaryBackend};

/// A visitor of the projections of a model: their module path, and the projection.
type ProjectionVisitor<'a, B> =
    dyn FnMut(String, &mut Projection<B>) -> Result<(), BitTttError> + 'a;

/// Reads every parameter once, which initializes a lazily initialized one in place.
struct Materialize;

impl<B: Backend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

const FORMAT: &str = "bit-ttt-packed";
const VERSION: &str = "1";

impl<B: Backend> BitLlama<B> {
    /// Calls `f` with the module path and a mutable reference of every projection, in file
    /// order (see [`projections`](Self::projections)).
    pub(crate) fn for_each_projection(
        &mut self,
        f: &mut ProjectionVisitor<'_, B>,
    ) -> Result<(), BitTttError> {
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, p) in block.mixer.projections_mut() {
                f(format!("blocks.{i}.mixer.{name}"), p)?;
            }
            for (name, p) in block.ffn.projections_mut() {
                f(format!("blocks.{i}.ffn.{name}"), p)?;
            }
        }
        f("lm_head".to_string(), &mut self.lm_head)
    }

    /// The module path and a reference of every projection, in file order: per block its
    /// mixer's (each mixer lists its own), then the feed-forward network's; the head last.
    pub fn projections(&self) -> Vec<(String, &Projection<B>)> {
        let mut all = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for (name, p) in block.mixer.projections() {
                all.push((format!("blocks.{i}.mixer.{name}"), p));
            }
            for (name, p) in block.ffn.projections() {
                all.push((format!("blocks.{i}.ffn.{name}"), p));
            }
        }
        all.push(("lm_head".to_string(), &self.lm_head));
        all
    }

    /// Bytes of weights one decode step reads: the blocks and scale of every packed
    /// projection, the f32 weights and biases of the other projections, and one row of the
    /// embedding. Norms and the TTT layers' own parameters (the η gate is `heads · d_model`
    /// per TTT layer) are left out; [`CpuDecoder::weight_bytes_per_token`](crate::cpu_decode::CpuDecoder::weight_bytes_per_token)
    /// counts everything a decode step reads.
    pub fn weight_bytes_per_token(&self) -> usize {
        let f32_bytes = |n: usize| n * std::mem::size_of::<f32>();
        let bias_len = |bias: &Option<burn::module::Param<burn::tensor::Tensor<B, 1>>>| {
            bias.as_ref().map_or(0, |b| b.dims()[0])
        };
        let projections: usize = self
            .projections()
            .into_iter()
            .map(|(_, p)| match p {
                // The blocks, the scale and the bias.
                Projection::Packed(layer) => {
                    layer.weight.view().size_in_bytes() + f32_bytes(1 + bias_len(&layer.bias))
                }
                Projection::Ternary(layer) => {
                    f32_bytes(layer.weight.shape().num_elements() + bias_len(&layer.bias))
                }
                Projection::Float(layer) => {
                    f32_bytes(layer.weight.shape().num_elements() + bias_len(&layer.bias))
                }
            })
            .sum();
        projections + f32_bytes(self.embedding.weight.dims()[1])
    }

    /// The inference form of this model: every ternary projection packed 2 bits a weight
    /// ([`PackedBitLinear`](crate::PackedBitLinear)); its logits equal this model's up to float
    /// rounding.
    ///
    /// # Errors
    /// [`BitTttError::Kernel`] if a latent weight is NaN or infinite.
    pub fn into_packed(mut self) -> Result<Self, BitTttError> {
        self.for_each_projection(&mut |_, p| {
            let owned = std::mem::replace(p, placeholder_projection());
            *p = owned.into_packed()?;
            Ok(())
        })?;
        Ok(self)
    }

    /// Writes the packed inference file (layout: the README's "Packed ternary layout")
    /// atomically. Ternary projections are packed on the way if they are not already.
    ///
    /// # Errors
    /// [`BitTttError::Io`], or [`BitTttError::Kernel`] for non-finite weights.
    pub fn save_packed(&self, config: &BitLlamaConfig, path: &Path) -> Result<(), BitTttError> {
        // Burn 0.21 initializes parameters lazily, and a clone of a parameter that was never
        // read draws its own random values: materialize ours first, or the file would hold
        // another model than `self`.
        self.visit(&mut Materialize);
        let mut packed = self.clone().into_packed()?;
        // The f32 rest, as burn-store names it.
        let mut store = SafetensorsStore::from_bytes(None).skip_enum_variants(true);
        packed
            .save_into(&mut store)
            .map_err(|e| BitTttError::InvalidInput(format!("collecting the weights: {e}")))?;
        let rest = store
            .get_bytes()
            .map_err(|e| BitTttError::InvalidInput(format!("serializing the weights: {e}")))?;
        let rest = SafeTensors::deserialize(&rest).expect("burn-store writes valid safetensors");

        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = rest
            .tensors()
            .into_iter()
            .map(|(name, v)| (name, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        packed.for_each_projection(&mut |name, p| {
            if let Projection::Packed(layer) = p {
                let view = layer.weight.view();
                let bytes = BlockTernary::slice_as_bytes(view.blocks()).to_vec();
                let shape = vec![view.rows(), blocks_per_row(view.cols()) * 32];
                owned.push((format!("{name}.qweight"), Dtype::U8, shape, bytes));
                owned.push((
                    format!("{name}.scale"),
                    Dtype::F32,
                    vec![1],
                    view.scale().to_le_bytes().to_vec(),
                ));
                owned.push((
                    format!("{name}.cols"),
                    Dtype::I64,
                    vec![1],
                    (view.cols() as i64).to_le_bytes().to_vec(),
                ));
            }
            Ok(())
        })?;
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(name, dtype, shape, data)| {
                let view = TensorView::new(*dtype, shape.clone(), data).expect("consistent tensor");
                (name.clone(), view)
            })
            .collect();
        let config_json = serde_json::to_string(config).expect("a config always serializes");
        let metadata = std::collections::HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("config".to_string(), config_json),
        ]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| BitTttError::InvalidInput(format!("serializing the packed file: {e}")))?;
        write_atomic(path, &bytes)
    }
}

/// The config of a packed inference file, from its header alone (the weights are not read).
///
/// # Errors
/// As [`BitLlama::load_packed`] for the file's header and config.
pub fn packed_config(path: &Path) -> Result<BitLlamaConfig, BitTttError> {
    Ok(map_packed(path)?.1)
}

/// Maps a packed file and checks its header: its length, its format and version, and its
/// config (parsed and validated).
fn map_packed(path: &Path) -> Result<(Arc<Mmap>, BitLlamaConfig), BitTttError> {
    let mut file = std::fs::File::open(path).map_err(|e| BitTttError::io(path, e))?;
    check_header_fits(&mut file, path)?;
    // SAFETY: the mapping is read-only; like every memory-mapped model loader we rely on the
    // file not being truncated or rewritten by another process while it is mapped (our own
    // writers replace files by rename, which leaves a mapped old file intact).
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| BitTttError::io(path, e))?);
    let corrupt = |reason: String| BitTttError::CorruptFile {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if metadata.get("format").map(String::as_str) != Some(FORMAT)
        || metadata.get("version").map(String::as_str) != Some(VERSION)
    {
        return Err(corrupt(format!("not a {FORMAT} version {VERSION} file")));
    }
    let config: BitLlamaConfig = serde_json::from_str(
        metadata
            .get("config")
            .ok_or_else(|| corrupt("no config in the metadata".into()))?,
    )
    .map_err(|e| corrupt(format!("config: {e}")))?;
    config
        .validate()
        .map_err(|e| corrupt(format!("config: {e}")))?;
    Ok((map, config))
}

impl<B: TernaryBackend> BitLlama<B> {
    /// Opens a packed inference file by memory-mapping it; the ternary weights are read in place
    /// on the CPU, and uploaded once to a GPU backend's device.
    ///
    /// # The file must not change while mapped
    /// The model reads the file's pages for as long as it lives. Replace a packed file by
    /// writing a new one and renaming it over the old (as `export` and
    /// [`save_packed`](Self::save_packed) do: the mapped old file stays intact); rewriting it
    /// in place (`cp` over it, truncating it) while a model from it is alive changes the
    /// weights under the model or ends the process with `SIGBUS`. Every check below runs
    /// before any weight is used.
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::CorruptFile`] for a
    /// truncated or malformed file, one that is not a packed model, whose config does not
    /// parse, or whose `.cols` differs from the config's width; [`BitTttError::MissingTensor`],
    /// [`BitTttError::UnexpectedTensor`], [`BitTttError::DtypeMismatch`] and
    /// [`BitTttError::ShapeMismatch`] naming the first tensor that is missing, extra, of another
    /// element type or of another shape.
    pub fn load_packed(
        path: &Path,
        device: &B::Device,
    ) -> Result<(Self, BitLlamaConfig), BitTttError> {
        Self::load_packed_part(path, device, PackedPart::Whole)
    }

    /// [`load_packed`](Self::load_packed) of the whole file or of its first blocks (see
    /// [`PackedPart`]).
    pub(crate) fn load_packed_part(
        path: &Path,
        device: &B::Device,
        part: PackedPart,
    ) -> Result<(Self, BitLlamaConfig), BitTttError> {
        let (map, config) = map_packed(path)?;
        let corrupt = |reason: String| BitTttError::CorruptFile {
            path: path.to_path_buf(),
            reason,
        };
        let tensors = SafeTensors::deserialize(&map).map_err(|e| corrupt(e.to_string()))?;
        // Which of the file's tensors this load takes: a part's model has only its blocks,
        // whose names are the whole model's (`blocks.{i}` for i below the count).
        let (init_config, with_head) = match part {
            PackedPart::Whole => (config.clone(), true),
            PackedPart::FirstBlocks { n_blocks, head } => {
                if n_blocks == 0
                    || n_blocks > config.n_layers
                    || (head && n_blocks < config.n_layers)
                {
                    return Err(BitTttError::InvalidInput(format!(
                        "cannot load the first {n_blocks} blocks{} of a model of {}",
                        if head { " and the head" } else { "" },
                        config.n_layers
                    )));
                }
                let mut c = config.clone();
                c.n_layers = n_blocks;
                (c, head)
            }
        };
        let takes = |name: &str| {
            matches!(part, PackedPart::Whole)
                || name.starts_with("blocks.")
                || (with_head && (name.starts_with("norm.") || name.starts_with("lm_head")))
        };

        // Parameters are initialised lazily: replacing the ternary projections before anything
        // reads them means their latent f32 weights are never allocated (and a part's unused
        // embedding and head never are).
        let mut model = init_config.init::<B>(device);
        let mut used = std::collections::HashSet::new();
        let base = map.as_ptr() as usize;
        model.for_each_projection(&mut |name, p| {
            let Projection::Ternary(layer) = p else {
                return Ok(());
            };
            if !takes(&name) {
                return Ok(());
            }
            // `lazy_shape`: `dims()` would first draw the latent weights' random initial values.
            let [rows, cols] = layer.weight.lazy_shape().dims();
            let (q, s, c) = (
                format!("{name}.qweight"),
                format!("{name}.scale"),
                format!("{name}.cols"),
            );
            let get = |n: &str| {
                tensors.tensor(n).map_err(|_| BitTttError::MissingTensor {
                    path: path.to_path_buf(),
                    name: n.to_string(),
                })
            };
            let (qweight, scale, stored_cols) = (get(&q)?, get(&s)?, get(&c)?);
            let blocks_shape = [rows, blocks_per_row(cols) * 32];
            check_tensor(path, &q, &qweight, Dtype::U8, &blocks_shape)?;
            check_tensor(path, &s, &scale, Dtype::F32, &[1])?;
            check_tensor(path, &c, &stored_cols, Dtype::I64, &[1])?;
            // Widths that round up to the same number of 128-weight blocks give the same
            // qweight shape: only `.cols` tells blocks packed for another width apart.
            let stored = i64::from_le_bytes(stored_cols.data().try_into().expect("8 bytes"));
            if usize::try_from(stored).ok() != Some(cols) {
                return Err(corrupt(format!(
                    "{c} is {stored}, the config gives {cols} input features"
                )));
            }
            let gamma = f32::from_le_bytes(scale.data().try_into().expect("4 bytes"));
            let blocks =
                BlockTernary::slice_from_bytes(qweight.data()).expect("a multiple of 32 bytes");
            let view = bit_ttt_kernels::TernaryView::new(blocks, rows, cols, gamma)?;
            view.verify_codes()?;
            *p = Projection::Packed(crate::PackedBitLinear {
                weight: TernaryParam::new(TernaryWeights::Mapped {
                    map: map.clone(),
                    offset: qweight.data().as_ptr() as usize - base,
                    rows,
                    cols,
                    scale: gamma,
                }),
                bias: layer
                    .bias
                    .as_ref()
                    .map(|b| burn::module::Param::from_tensor(b.val())),
                quantize_activations: layer.quantize_activations,
                eps: layer.eps,
            });
            used.extend([q, s, c]);
            Ok(())
        })?;

        // The f32 rest: exactly the model's remaining tensors, then loaded through burn-store.
        let mut lazy = LazyShapes::default();
        model.visit(&mut lazy);
        let mut expected = lazy.shapes;
        expected.retain(|name, _| takes(name));
        for (name, shape) in &expected {
            let view = tensors
                .tensor(name)
                .map_err(|_| BitTttError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                })?;
            check_tensor(path, name, &view, Dtype::F32, shape)?;
            super::files::check_finite(path, name, view.dtype(), view.data())?;
        }
        if let Some(extra) = tensors.names().into_iter().find(|n| {
            matches!(part, PackedPart::Whole) && !used.contains(*n) && !expected.contains_key(*n)
        }) {
            return Err(BitTttError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: extra.to_string(),
            });
        }
        let rest: Vec<(String, TensorView<'_>)> = tensors
            .tensors()
            .into_iter()
            .filter(|(name, _)| expected.contains_key(name))
            .collect();
        let rest = safetensors::serialize(rest, None).map_err(|e| corrupt(e.to_string()))?;
        let mut store = SafetensorsStore::from_bytes(Some(rest))
            .skip_enum_variants(true)
            .allow_partial(!matches!(part, PackedPart::Whole));
        let result = model
            .load_from(&mut store)
            .map_err(|e| corrupt(e.to_string()))?;
        // A part leaves what it does not take (the embedding, maybe the head) unloaded.
        let missing: Vec<_> = result
            .missing
            .iter()
            .filter(|(name, _)| expected.contains_key(name))
            .collect();
        if !result.errors.is_empty() || !missing.is_empty() {
            return Err(corrupt(format!("{:?} {:?}", result.errors, missing)));
        }
        for (name, p) in model.projections() {
            if let (true, Projection::Packed(layer)) = (takes(&name), p) {
                layer.upload(device)?;
            }
        }
        Ok((model, config))
    }

    /// Makes every packed projection's weights resident on the model's device (see
    /// [`PackedBitLinear::upload`](crate::PackedBitLinear::upload)): a no-op for weights that
    /// already are. [`load_packed`](Self::load_packed) does it; call it after
    /// [`into_packed`](Self::into_packed) or a move to another device to pay for the upload
    /// (and see its errors) before the first forward rather than in it.
    ///
    /// # Errors
    /// As [`TernaryBackend::upload_ternary`].
    pub fn upload_packed(&self) -> Result<(), BitTttError> {
        let device = self.embedding.weight.device();
        for (_, p) in self.projections() {
            if let Projection::Packed(layer) = p {
                layer.upload(&device)?;
            }
        }
        Ok(())
    }
}

/// Checks, before the file is mapped, that it holds at least the header its 8-byte length
/// prefix announces (the tensor offsets are checked against the mapped length after).
fn check_header_fits(file: &mut std::fs::File, path: &Path) -> Result<(), BitTttError> {
    use std::io::Read;
    let corrupt = |reason: String| BitTttError::CorruptFile {
        path: path.to_path_buf(),
        reason,
    };
    let len = file.metadata().map_err(|e| BitTttError::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    if len < 8 || file.read_exact(&mut prefix).is_err() {
        return Err(corrupt(format!(
            "{len} bytes, shorter than a safetensors header's length prefix"
        )));
    }
    let header = u64::from_le_bytes(prefix);
    if header > len - 8 {
        return Err(corrupt(format!(
            "the file is {len} bytes, its header alone says {} bytes",
            header.saturating_add(8)
        )));
    }
    Ok(())
}

/// The paths (as burn-store names them, enum variants skipped) and shapes of a module's
/// tensors, read without materialising lazily initialised parameters. Collecting burn-store
/// snapshots would first draw the random initial values of every f32 tensor about to be
/// replaced by the file's (for a large embedding, most of a load's time).
#[derive(Default)]
pub(crate) struct LazyShapes {
    path: Vec<String>,
    /// Per entered module, whether it added a path segment (enum variants do not).
    pushed: Vec<bool>,
    /// Shape of every tensor, by path.
    pub(crate) shapes: BTreeMap<String, Vec<usize>>,
}

impl<B: Backend> ModuleVisitor<B> for LazyShapes {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        let segment = !container_type.starts_with("Enum:");
        if segment {
            self.path.push(name.to_string());
        }
        self.pushed.push(segment);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if self.pushed.pop() == Some(true) {
            self.path.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.shapes
            .insert(self.path.join("."), param.lazy_shape().to_vec());
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, burn::tensor::Int>>) {
        self.shapes
            .insert(self.path.join("."), param.lazy_shape().to_vec());
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, burn::tensor::Bool>>) {
        self.shapes
            .insert(self.path.join("."), param.lazy_shape().to_vec());
    }
}

/// Checks that the tensor `name` of the file at `path` has the element type `dtype` and the
/// shape `shape`, the element type first (a shape read in elements of another size means
/// little).
///
/// # Errors
/// [`BitTttError::DtypeMismatch`] or [`BitTttError::ShapeMismatch`].
fn check_tensor(
    path: &Path,
    name: &str,
    view: &TensorView<'_>,
    dtype: Dtype,
    shape: &[usize],
) -> Result<(), BitTttError> {
    if view.dtype() != dtype {
        return Err(BitTttError::DtypeMismatch {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: format!("{dtype:?}"),
            actual: format!("{:?}", view.dtype()),
        });
    }
    if view.shape() != shape {
        return Err(BitTttError::ShapeMismatch {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: shape.to_vec(),
            actual: view.shape().to_vec(),
        });
    }
    Ok(())
}

/// What [`BitLlama::load_packed_part`] loads of a packed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PackedPart {
    /// Everything.
    Whole,
    /// Blocks `[0, n_blocks)`, and the final norm and the head if `head` (only with every
    /// block). The model it gives has `n_blocks` blocks and an embedding (and, without `head`,
    /// a norm and head) that were never loaded: only its blocks (and head) may be used.
    FirstBlocks {
        /// How many blocks, at least 1.
        n_blocks: usize,
        /// Whether the final norm and the head are loaded.
        head: bool,
    },
}

/// A zero-size stand-in used while a projection is moved out and packed.
fn placeholder_projection<B: Backend>() -> Projection<B> {
    Projection::Packed(crate::PackedBitLinear {
        weight: TernaryParam::new(TernaryWeights::owned(
            bit_ttt_kernels::PackedTernary::pack(&[], 0, 0, 1.0).expect("an empty matrix packs"),
        )),
        bias: None,
        quantize_activations: false,
        eps: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{load_error_leaves_file, rewrite};
    use crate::MixerKind;
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor};

    type B = NdArray;

    fn logits(model: &BitLlama<B>) -> Vec<f32> {
        let tokens = Tensor::<B, 2, Int>::from_ints([[1, 7, 3, 29, 0, 12, 5]], &Default::default());
        model.forward(tokens).into_data().to_vec().unwrap()
    }

    /// Loads a packed file on the default device.
    fn load(path: &Path) -> Result<(BitLlama<B>, BitLlamaConfig), BitTttError> {
        BitLlama::<B>::load_packed(path, &Default::default())
    }

    /// A tiny model with a ternary head for each mixer, freshly initialised, with its config.
    fn tiny_ternary_models() -> Vec<(MixerKind, BitLlamaConfig, BitLlama<B>)> {
        [
            MixerKind::TttLinear,
            MixerKind::TttMlp,
            MixerKind::Attention,
        ]
        .into_iter()
        .map(|mixer| {
            let config = BitLlamaConfig::tiny(30)
                .with_mixer(mixer)
                .with_ternary_head(true);
            let model = config.init::<B>(&Default::default());
            (mixer, config, model)
        })
        .collect()
    }

    #[test]
    fn packed_file_gives_the_training_mode_logits() {
        for (mixer, config, model) in tiny_ternary_models() {
            let expected = logits(&model);
            // Integer accumulation on both paths: not merely close, identical.
            assert_eq!(
                logits(&model.clone().into_packed().unwrap()),
                expected,
                "in memory, {mixer:?}"
            );

            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.packed.safetensors");
            model.save_packed(&config, &path).unwrap();
            let (loaded, loaded_config) =
                BitLlama::<B>::load_packed(&path, &Default::default()).unwrap();
            assert_eq!(loaded_config, config);
            assert!(matches!(loaded.lm_head, Projection::Packed(_)));
            assert_eq!(logits(&loaded), expected, "memory-mapped, {mixer:?}");
        }
    }

    #[test]
    fn lazy_shapes_name_the_tensors_as_burn_store_does_without_initialising_them() {
        for (mixer, _, model) in tiny_ternary_models() {
            let mut lazy = LazyShapes::default();
            model.visit(&mut lazy);
            assert!(
                !model.embedding.weight.is_initialized(),
                "visiting drew the initial values, {mixer:?}"
            );
            let collected: BTreeMap<String, Vec<usize>> = model
                .collect(None, None, true)
                .into_iter()
                .map(|s| (s.full_path(), s.shape.to_vec()))
                .collect();
            assert_eq!(lazy.shapes, collected, "{mixer:?}");
        }
    }

    #[test]
    fn packed_file_is_smaller_and_bad_files_are_errors() {
        let config = BitLlamaConfig::tiny(30);
        let model = config.init::<B>(&Default::default());
        let dir = tempfile::tempdir().unwrap();
        let packed = dir.path().join("p.safetensors");
        model.save_packed(&config, &packed).unwrap();
        model
            .save_weights(&dir.path().join("f.safetensors"))
            .unwrap();
        let packed_len = std::fs::metadata(&packed).unwrap().len();
        let full_len = std::fs::metadata(dir.path().join("f.safetensors"))
            .unwrap()
            .len();
        assert!(
            packed_len * 2 < full_len,
            "packed {packed_len} vs f32 {full_len}"
        );

        let bytes = std::fs::read(&packed).unwrap();
        for cut in [0, 7, 100, bytes.len() - 1] {
            std::fs::write(&packed, &bytes[..cut]).unwrap();
            let err = BitLlama::<B>::load_packed(&packed, &Default::default()).unwrap_err();
            assert!(
                matches!(err, BitTttError::CorruptFile { .. }),
                "cut at {cut}: {err}"
            );
        }
        // An f32 model file is not a packed file.
        let err =
            BitLlama::<B>::load_packed(&dir.path().join("f.safetensors"), &Default::default())
                .unwrap_err();
        assert!(err.to_string().contains("not a bit-ttt-packed"), "{err}");

        // Edited files: each fails with its own typed error and stays byte for byte as written.
        let bad = dir.path().join("bad.safetensors");
        let fails = |edited: Vec<u8>| load_error_leaves_file(&bad, &edited, load);
        // Rewriting without an edit keeps a loadable file (metadata included).
        std::fs::write(&bad, rewrite(&bytes, |_| {})).unwrap();
        let (_, loaded_config) = load(&bad).unwrap();
        assert_eq!(loaded_config, config);

        let qweight = "blocks.0.mixer.q_proj.qweight";
        let err = fails(rewrite(&bytes, |t| t.retain(|e| e.0 != qweight)));
        assert!(
            matches!(&err, BitTttError::MissingTensor { name, .. } if name == qweight),
            "{err}"
        );
        let cols = "blocks.0.mixer.q_proj.cols";
        let err = fails(rewrite(&bytes, |t| t.retain(|e| e.0 != cols)));
        assert!(
            matches!(&err, BitTttError::MissingTensor { name, .. } if name == cols),
            "{err}"
        );
        let extra = rewrite(&bytes, |t| {
            t.push(("blocks.9.extra".into(), Dtype::F32, vec![1], vec![0; 4]))
        });
        let err = fails(extra);
        assert!(
            matches!(&err, BitTttError::UnexpectedTensor { name, .. } if name == "blocks.9.extra"),
            "{err}"
        );
        // Same bytes, rows halved and doubled in length.
        let misshaped = rewrite(&bytes, |t| {
            let entry = t.iter_mut().find(|e| e.0 == qweight).unwrap();
            entry.2 = vec![entry.2[0] / 2, entry.2[1] * 2];
        });
        let err = fails(misshaped);
        assert!(
            matches!(&err, BitTttError::ShapeMismatch { name, expected, actual, .. } if name == qweight && expected == &vec![64, 32] && actual == &vec![32, 64]),
            "{err}"
        );
        // F16 where F32 is expected: a packed projection's scale and an f32 tensor of the rest.
        for f32_name in ["blocks.0.mixer.k_proj.scale", "norm.gamma"] {
            let f16 = rewrite(&bytes, |t| {
                let entry = t.iter_mut().find(|e| e.0 == f32_name).unwrap();
                entry.1 = Dtype::F16;
                entry.3.truncate(entry.3.len() / 2);
            });
            let err = fails(f16);
            assert!(
                matches!(&err, BitTttError::DtypeMismatch { name, expected, actual, .. } if name == f32_name && expected == "F32" && actual == "F16"),
                "{err}"
            );
        }
        // Signed bytes where the blocks must be U8 (same size, so only the element type differs).
        let i8_blocks = rewrite(&bytes, |t| {
            t.iter_mut().find(|e| e.0 == qweight).unwrap().1 = Dtype::I8;
        });
        let err = fails(i8_blocks);
        assert!(
            matches!(&err, BitTttError::DtypeMismatch { name, expected, actual, .. } if name == qweight && expected == "U8" && actual == "I8"),
            "{err}"
        );
        // A width of 100 instead of 128 packs into as many blocks: only `.cols` tells.
        let down = "blocks.1.ffn.down_proj.cols";
        let narrower = rewrite(&bytes, |t| {
            t.iter_mut().find(|e| e.0 == down).unwrap().3 = 100i64.to_le_bytes().to_vec();
        });
        let err = fails(narrower);
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains(down)),
            "{err}"
        );
        // A NaN in an f32 tensor of the rest.
        let poisoned = rewrite(&bytes, |t| {
            let entry = t.iter_mut().find(|e| e.0 == "norm.gamma").unwrap();
            entry.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        });
        let err = fails(poisoned);
        assert!(
            matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("norm.gamma") && reason.contains("not finite")),
            "{err}"
        );
    }
}
