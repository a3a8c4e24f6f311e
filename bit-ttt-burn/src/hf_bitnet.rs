//! Import of Hugging Face BitNet b1.58 checkpoints (`BitNetForCausalLM`, `model_type:
//! "bitnet"`, e.g. `microsoft/bitnet-b1.58-2B-4T` and its `-bf16` twin) into a [`BitLlama`].
//!
//! The architecture maps onto our attention blocks ([`MixerKind::Attention`]) with the
//! BitNet fields of [`BitLlamaConfig`]: grouped-query heads (`n_kv_heads`), squared ReLU
//! (`ffn_activation`), `attn_sub_norm` and `ffn_sub_norm` (`sub_norms`), RoPE θ and the RMSNorm
//! epsilon from `config.json`, no biases, the head tied to the embedding (copied: our head is
//! its own f32 projection).
//!
//! Keys missing from `config.json` take transformers' `BitNetConfig` defaults (5 key/value
//! heads, RMSNorm ε 1e-5, RoPE θ 500,000, untied head, BOS 128000, EOS 128001); EOS ids listed
//! in `generation_config.json` are added (2B-4T's ends chat turns with `<|eot_id|>` there).
//!
//! The weights come in two forms, told apart per tensor by their element type:
//! - **packed** (`uint8 [out/4, in]`): output row `i·(out/4) + j` in bits `2i..2i+2` of packed
//!   row `j`, the value plus one; with a per-projection `weight_scale`. Its direction depends on
//!   the layer class named in `quantization_config.linear_class`: transformers'
//!   `AutoBitLinear` (`"autobitlinear"`, what 2B-4T names) *multiplies* the product by it, the
//!   older `BitLinear` (`"bitlinear"`, transformers' default) *divides* by it. Both are read
//!   (the fixture in `tests/fixtures/bitnet-tiny` has one of each, checked against
//!   transformers' logits);
//! - **float** (bf16, f16 or f32): with `quantization_mode: "offline"` they must be the ternary
//!   values themselves (scaled by `weight_scale` as above); otherwise (`"online"`, or no
//!   `quantization_config`, as a training checkpoint may have) they are latent weights,
//!   quantized here as transformers' online `AutoBitLinear` does, `s = 1 / max(mean|W|, 1e-5)`,
//!   `codes = clamp(round(W · s), -1, 1)`, scale `1 / s`. (Transformers itself runs a config
//!   without `quantization_config` as a float model; BitNet weights are meant ternary.)
//!
//! Layers that `modules_to_not_convert` keeps in full precision (other than the head) are not
//! supported: a typed error.
//!
//! HF rotates query and key features in halves (`rotate_half`: feature `j` with `j + d/2`);
//! our RoPE rotates adjacent pairs. The query and key rows of each head are reordered once at
//! import (`2j ← j`, `2j+1 ← j + d/2`), which gives the same attention scores: queries and keys
//! are permuted alike and a dot product does not see the order.
//!
//! Every size is checked against the config before anything is allocated for it, and every
//! problem is a typed [`BitTttError`] naming the file and tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bit_ttt_kernels::PackedTernary;
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::mixer::Mixer;
use crate::model::{BitLlama, BitLlamaConfig, FfnActivation, MixerKind};
use crate::{
    BitTttError, PackedBitLinear, Projection, TernaryBackend, TernaryParam, TernaryWeights,
};

/// The smallest weight scale and activation absmax, as transformers' BitNet layers clamp them.
const EPS: f64 = 1e-5;

/// How a packed checkpoint's `weight_scale` applies to a projection's product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleConvention {
    /// `y = (x · W) · weight_scale` (transformers' `AutoBitLinear`, `linear_class:
    /// "autobitlinear"`).
    Multiply,
    /// `y = (x · W) / weight_scale` (transformers' `BitLinear`, `linear_class: "bitlinear"`).
    Divide,
}

/// What `config.json` says, beyond the model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HfBitNet {
    /// The model's shape in our terms.
    pub config: BitLlamaConfig,
    /// The direction of packed projections' `weight_scale`.
    pub scale: ScaleConvention,
    /// Whether the head is the embedding (`tie_word_embeddings`).
    pub tied: bool,
    /// Whether float projection weights are already ternary (`quantization_mode:
    /// "offline"`), rather than latent weights to quantize.
    pub offline: bool,
}

fn default_kv_heads() -> Option<usize> {
    Some(5)
}
fn default_eps() -> f64 {
    1e-5
}
fn default_bos() -> Option<TokenIds> {
    Some(TokenIds::One(128_000))
}
fn default_eos() -> Option<TokenIds> {
    Some(TokenIds::One(128_001))
}

/// `config.json` of a `BitNetForCausalLM` (the fields we read; others are ignored).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    /// Absent: transformers' default 5; `null`: one per query head.
    #[serde(default = "default_kv_heads")]
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<HfRope>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    #[serde(default = "default_bos")]
    bos_token_id: Option<TokenIds>,
    #[serde(default = "default_eos")]
    eos_token_id: Option<TokenIds>,
    quantization_config: Option<HfQuantization>,
}

/// `generation_config.json`: the EOS ids generation stops at.
#[derive(Debug, Deserialize)]
struct HfGeneration {
    eos_token_id: Option<TokenIds>,
}

/// transformers 5 keeps RoPE's settings here.
#[derive(Debug, Deserialize)]
struct HfRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn first(&self) -> Option<u32> {
        self.all().first().copied()
    }

    fn all(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct HfQuantization {
    quant_method: Option<String>,
    linear_class: Option<String>,
    quantization_mode: Option<String>,
    use_rms_norm: Option<bool>,
    modules_to_not_convert: Option<Vec<String>>,
}

/// Reads and checks `dir/config.json`.
///
/// # Errors
/// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::InvalidConfig`] if it
/// does not parse or describes an impossible model; [`BitTttError::UnsupportedCheckpoint`] for
/// another `model_type` or a feature we do not run (biases, scaled RoPE, a norm inside the
/// linear layers, an activation other than `relu2` or `silu`).
pub fn read_config(dir: &Path) -> Result<HfBitNet, BitTttError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| BitTttError::io(&path, e))?;
    let invalid = |reason: String| BitTttError::InvalidConfig {
        path: path.clone(),
        reason,
    };
    let unsupported = |reason: String| BitTttError::UnsupportedCheckpoint {
        path: path.clone(),
        reason,
    };
    // The model type first, so that another architecture's config gets that message rather
    // than a missing field's.
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    match value.get("model_type").and_then(|t| t.as_str()) {
        Some("bitnet") => {}
        other => {
            return Err(unsupported(format!(
            "model_type {other:?}: only \"bitnet\" (BitNetForCausalLM) checkpoints can be imported"
        )))
        }
    }
    let hf: HfConfig = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    debug_assert_eq!(hf.model_type.as_deref(), Some("bitnet"));

    let ffn_activation = match hf.hidden_act.as_deref().unwrap_or("relu2") {
        "relu2" => FfnActivation::Relu2,
        "silu" => FfnActivation::Silu,
        other => return Err(unsupported(format!("hidden_act {other:?} (relu2 or silu)"))),
    };
    if hf.attention_bias == Some(true) {
        return Err(unsupported("attention_bias: true (biases)".into()));
    }
    if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported("rope_scaling (only plain RoPE)".into()));
    }
    let rope = hf.rope_parameters.as_ref();
    if let Some(kind) = rope.and_then(|r| r.rope_type.as_deref()) {
        if kind != "default" {
            return Err(unsupported(format!(
                "rope_type {kind:?} (only \"default\")"
            )));
        }
    }
    let rope_theta = hf
        .rope_theta
        .or(rope.and_then(|r| r.rope_theta))
        .unwrap_or(500_000.0);
    let heads = hf.num_attention_heads;
    if heads == 0 || !hf.hidden_size.is_multiple_of(heads) {
        return Err(invalid(format!(
            "hidden_size {} does not split into {heads} heads",
            hf.hidden_size
        )));
    }
    if let Some(head_dim) = hf.head_dim {
        if head_dim.checked_mul(heads) != Some(hf.hidden_size) {
            return Err(unsupported(format!(
                "head_dim {head_dim} × {heads} heads differs from hidden_size {}",
                hf.hidden_size
            )));
        }
    }
    let (scale, offline) = match &hf.quantization_config {
        None => (ScaleConvention::Divide, false),
        Some(q) => {
            if let Some(method) = q.quant_method.as_deref().filter(|m| *m != "bitnet") {
                return Err(unsupported(format!(
                    "quantization_config.quant_method {method:?} (only \"bitnet\")"
                )));
            }
            if q.use_rms_norm == Some(true) {
                return Err(unsupported(
                    "quantization_config.use_rms_norm: true (a norm inside each linear layer)"
                        .into(),
                ));
            }
            let kept: Vec<&String> = q
                .modules_to_not_convert
                .iter()
                .flatten()
                .filter(|m| m.as_str() != "lm_head")
                .collect();
            if !kept.is_empty() {
                return Err(unsupported(format!(
                    "quantization_config.modules_to_not_convert {kept:?} (full-precision layers besides the head)"
                )));
            }
            let offline = match q.quantization_mode.as_deref().unwrap_or("offline") {
                "offline" => true,
                "online" => false,
                other => {
                    return Err(unsupported(format!(
                        "quantization_config.quantization_mode {other:?} (offline or online)"
                    )))
                }
            };
            let scale = match q.linear_class.as_deref().unwrap_or("bitlinear") {
                "autobitlinear" => ScaleConvention::Multiply,
                // Transformers' `BitLinear` has no online mode: its weights are always packed.
                "bitlinear" => ScaleConvention::Divide,
                other => {
                    return Err(unsupported(format!(
                        "quantization_config.linear_class {other:?} (autobitlinear or bitlinear)"
                    )))
                }
            };
            (scale, offline)
        }
    };
    // EOS: the config's, and those generation stops at.
    let mut eos: Vec<u32> = hf
        .eos_token_id
        .as_ref()
        .map(TokenIds::all)
        .unwrap_or_default();
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        let text =
            std::fs::read_to_string(&generation).map_err(|e| BitTttError::io(&generation, e))?;
        let g: HfGeneration =
            serde_json::from_str(&text).map_err(|e| BitTttError::InvalidConfig {
                path: generation.clone(),
                reason: e.to_string(),
            })?;
        for id in g
            .eos_token_id
            .as_ref()
            .map(TokenIds::all)
            .unwrap_or_default()
        {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let config = BitLlamaConfig::new(
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        heads,
        hf.intermediate_size,
    )
    .with_mixer(MixerKind::Attention)
    .with_ternary(true)
    .with_ternary_head(false)
    .with_n_kv_heads(Some(hf.num_key_value_heads.unwrap_or(heads)))
    .with_ffn_activation(Some(ffn_activation))
    .with_sub_norms(Some(true))
    .with_rope_theta(rope_theta)
    .with_norm_eps(hf.rms_norm_eps)
    .with_bos_token_id(hf.bos_token_id.as_ref().and_then(TokenIds::first))
    .with_eos_token_ids((!eos.is_empty()).then_some(eos));
    config.validate().map_err(invalid)?;
    Ok(HfBitNet {
        config,
        scale,
        tied: hf.tie_word_embeddings,
        offline,
    })
}

/// The checkpoint's safetensors files, memory-mapped, and which file holds which tensor.
struct Shards {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl Shards {
    /// `model.safetensors`, or the files `model.safetensors.index.json` lists.
    fn open(dir: &Path) -> Result<Self, BitTttError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| BitTttError::io(&index_path, e))?;
            #[derive(Deserialize)]
            struct Index {
                weight_map: HashMap<String, String>,
            }
            let index: Index =
                serde_json::from_str(&text).map_err(|e| BitTttError::CorruptFile {
                    path: index_path.clone(),
                    reason: e.to_string(),
                })?;
            let mut files: Vec<String> = index.weight_map.into_values().collect();
            files.sort();
            files.dedup();
            files
                .iter()
                .map(|f| {
                    // A shard is a file name beside the index, not a path elsewhere.
                    let mut parts = Path::new(f).components();
                    if !matches!(
                        (parts.next(), parts.next()),
                        (Some(std::path::Component::Normal(_)), None)
                    ) {
                        return Err(BitTttError::CorruptFile {
                            path: index_path.clone(),
                            reason: format!("shard {f:?} is not a file name"),
                        });
                    }
                    Ok(dir.join(f))
                })
                .collect::<Result<_, _>>()?
        } else {
            vec![single]
        };
        let mut shards = Shards {
            files: Vec::new(),
            index: HashMap::new(),
        };
        for path in names {
            let file = std::fs::File::open(&path).map_err(|e| BitTttError::io(&path, e))?;
            // SAFETY: read-only mapping of a file we only read during the import; as every
            // memory-mapped loader, we rely on no other process truncating it meanwhile.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| BitTttError::io(&path, e))?;
            let tensors = SafeTensors::deserialize(&map).map_err(|e| BitTttError::CorruptFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            for name in tensors.names() {
                shards.index.insert(name.to_string(), shards.files.len());
            }
            drop(tensors);
            shards.files.push((path, map));
        }
        Ok(shards)
    }

    /// The tensor `name`, with the file it is in.
    fn get(&self, name: &str) -> Result<(&Path, safetensors::tensor::TensorView<'_>), BitTttError> {
        let missing = || BitTttError::MissingTensor {
            path: self
                .files
                .first()
                .map(|(p, _)| p.clone())
                .unwrap_or_default(),
            name: name.to_string(),
        };
        let &i = self.index.get(name).ok_or_else(missing)?;
        let (path, map) = &self.files[i];
        let tensors = SafeTensors::deserialize(map).map_err(|e| BitTttError::CorruptFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let view = tensors.tensor(name).map_err(|_| missing())?;
        Ok((path, view))
    }

    /// The float tensor `name` of `shape` as f32 (from f32, bf16 or f16).
    fn floats(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, BitTttError> {
        let (path, view) = self.get(name)?;
        check_shape(path, name, view.shape(), shape)?;
        to_f32(path, name, view.dtype(), view.data())
    }

    /// The ternary projection `{name}.weight` of `rows × cols` (packed, ternary floats or
    /// latent, see the module docs), with its scale.
    fn ternary(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        hf: &HfBitNet,
    ) -> Result<(Vec<i8>, f32), BitTttError> {
        let weight_name = format!("{name}.weight");
        let (path, view) = self.get(&weight_name)?;
        if view.dtype() != Dtype::U8 {
            let floats = self.floats(&weight_name, &[rows, cols])?;
            if !hf.offline {
                return absmean(&floats).ok_or(BitTttError::NonFinite(weight_name));
            }
            let mut codes = Vec::with_capacity(floats.len());
            for (i, &w) in floats.iter().enumerate() {
                if !matches!(w, -1.0 | 0.0 | 1.0) {
                    return Err(BitTttError::UnsupportedCheckpoint {
                        path: path.to_path_buf(),
                        reason: format!(
                            "{weight_name}[{i}] = {w}: offline (quantization_mode \"offline\") float weights must be -1, 0 or 1"
                        ),
                    });
                }
                codes.push(w as i8);
            }
            let gamma = self.scale(name, hf.scale)?;
            return Ok((codes, gamma));
        }
        if !rows.is_multiple_of(4) {
            return Err(BitTttError::UnsupportedCheckpoint {
                path: path.to_path_buf(),
                reason: format!("{weight_name} is packed four rows a byte but has {rows} rows"),
            });
        }
        let quarter = rows / 4;
        check_shape(path, &weight_name, view.shape(), &[quarter, cols])?;
        let packed = view.data();
        let gamma = self.scale(name, hf.scale)?;
        // Packed row j, field i (bits 2i..2i+2) is output row i·quarter + j.
        let mut codes = vec![0i8; rows * cols];
        for (j, packed_row) in packed.chunks_exact(cols).enumerate() {
            for (c, &byte) in packed_row.iter().enumerate() {
                for i in 0..4 {
                    let field = (byte >> (2 * i)) & 0b11;
                    if field == 0b11 {
                        return Err(BitTttError::CorruptFile {
                            path: path.to_path_buf(),
                            reason: format!(
                                "{weight_name}: byte [{j}, {c}] holds the code 3, not a ternary value"
                            ),
                        });
                    }
                    codes[(i * quarter + j) * cols + c] = field as i8 - 1;
                }
            }
        }
        Ok((codes, gamma))
    }

    /// `{name}.weight_scale` as the factor of the product, under `convention`.
    fn scale(&self, name: &str, convention: ScaleConvention) -> Result<f32, BitTttError> {
        let scale_name = format!("{name}.weight_scale");
        let (scale_path, scale_view) = self.get(&scale_name)?;
        let stored: usize = scale_view.shape().iter().product();
        if stored != 1 {
            return Err(BitTttError::ShapeMismatch {
                path: scale_path.to_path_buf(),
                name: scale_name,
                expected: vec![1],
                actual: scale_view.shape().to_vec(),
            });
        }
        let stored = to_f32(
            scale_path,
            &scale_name,
            scale_view.dtype(),
            scale_view.data(),
        )?[0];
        let gamma = match convention {
            ScaleConvention::Multiply => stored,
            ScaleConvention::Divide => 1.0 / stored,
        };
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(BitTttError::NonFinite(format!(
                "{scale_name} = {stored} gives no positive finite scale"
            )));
        }
        Ok(gamma)
    }
}

fn check_shape(
    path: &Path,
    name: &str,
    actual: &[usize],
    expected: &[usize],
) -> Result<(), BitTttError> {
    if actual == expected {
        Ok(())
    } else {
        Err(BitTttError::ShapeMismatch {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}

/// Little-endian f32, bf16 or f16 values as f32 (exactly: every bf16 and f16 is an f32).
fn to_f32(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, BitTttError> {
    let halves = |f: fn(u16) -> f32| {
        data.chunks_exact(2)
            .map(|b| f(u16::from_le_bytes([b[0], b[1]])))
            .collect()
    };
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => halves(|h| f32::from_bits(u32::from(h) << 16)),
        Dtype::F16 => halves(|h| half::f16::from_bits(h).to_f32()),
        other => {
            return Err(BitTttError::DtypeMismatch {
                path: path.to_path_buf(),
                name: name.to_string(),
                expected: "F32, BF16 or F16".into(),
                actual: format!("{other:?}"),
            })
        }
    })
}

/// Ternary codes and scale of latent weights, as transformers' online `AutoBitLinear`
/// quantizes them (`None` if a weight is not finite).
fn absmean(latent: &[f32]) -> Option<(Vec<i8>, f32)> {
    if latent.iter().any(|w| !w.is_finite()) {
        return None;
    }
    let mean =
        (latent.iter().map(|w| f64::from(w.abs())).sum::<f64>() / latent.len() as f64) as f32;
    let inv = 1.0 / mean.max(EPS as f32);
    let codes = latent
        .iter()
        .map(|w| (w * inv).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    Some((codes, 1.0 / inv))
}

/// Reorders the rows of each head of a `[heads · head_dim, cols]` projection from HF's
/// rotate-half layout (feature `j` pairs with `j + head_dim/2`) to our adjacent pairs (`2j`
/// with `2j + 1`).
fn rotate_half_to_pairs(codes: &[i8], head_dim: usize, cols: usize) -> Vec<i8> {
    let half = head_dim / 2;
    let mut out = vec![0; codes.len()];
    for (head_in, head_out) in codes
        .chunks_exact(head_dim * cols)
        .zip(out.chunks_exact_mut(head_dim * cols))
    {
        for j in 0..half {
            for (to, from) in [(2 * j, j), (2 * j + 1, j + half)] {
                head_out[to * cols..][..cols].copy_from_slice(&head_in[from * cols..][..cols]);
            }
        }
    }
    out
}

fn packed_projection<B: TernaryBackend>(
    codes: &[i8],
    rows: usize,
    cols: usize,
    gamma: f32,
) -> Result<Projection<B>, BitTttError> {
    Ok(Projection::Packed(PackedBitLinear {
        weight: TernaryParam::new(TernaryWeights::owned(PackedTernary::pack(
            codes, rows, cols, gamma,
        )?)),
        bias: None,
        quantize_activations: true,
        eps: EPS,
    }))
}

/// Builds the model of the checkpoint in `dir` (`config.json`, `model.safetensors` or a
/// sharded `model.safetensors.index.json`) on `device`: every projection packed, the f32 rest
/// loaded. Save it with [`BitLlama::save_packed`] so that later loads are a memory map.
///
/// # Errors
/// As [`read_config`]; [`BitTttError::MissingTensor`], [`BitTttError::ShapeMismatch`] and
/// [`BitTttError::DtypeMismatch`] naming the first tensor that is missing or of another
/// shape or element type; [`BitTttError::CorruptFile`] for an unreadable file or a packed
/// code 3; [`BitTttError::NonFinite`] for a non-finite latent weight or scale.
pub fn import<B: TernaryBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(BitLlama<B>, HfBitNet), BitTttError> {
    let hf = read_config(dir)?;
    let shards = Shards::open(dir)?;
    let c = &hf.config;
    let (d, head_dim) = (c.d_model, c.head_dim());
    let kv_dim = c.kv_heads() * head_dim;
    let vector = |name: &str, n: usize| -> Result<Tensor<B, 1>, BitTttError> {
        let values = shards.floats(name, &[n])?;
        Ok(Tensor::from_data(TensorData::new(values, [n]), device))
    };

    let mut model = c.init::<B>(device);
    let embedding = shards.floats("model.embed_tokens.weight", &[c.vocab_size, d])?;
    // Tied: the head is the embedding, whatever else the file holds (transformers ties it).
    let head = if hf.tied {
        embedding.clone()
    } else {
        shards.floats("lm_head.weight", &[c.vocab_size, d])?
    };
    model.embedding.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(embedding, [c.vocab_size, d]),
        device,
    ));
    // [vocab, d] → Burn's Linear [d_input, d_output] = [d, vocab].
    let head =
        Tensor::<B, 2>::from_data(TensorData::new(head, [c.vocab_size, d]), device).transpose();
    let Projection::Float(linear) = &mut model.lm_head else {
        unreachable!("the config asks for an f32 head")
    };
    linear.weight = Param::from_tensor(head);
    linear.bias = None;
    model.norm.gamma = Param::from_tensor(vector("model.norm.weight", d)?);

    for (i, block) in model.blocks.iter_mut().enumerate() {
        let layer = format!("model.layers.{i}");
        block.mixer_norm.gamma =
            Param::from_tensor(vector(&format!("{layer}.input_layernorm.weight"), d)?);
        block.ffn_norm.gamma = Param::from_tensor(vector(
            &format!("{layer}.post_attention_layernorm.weight"),
            d,
        )?);
        let Mixer::Attention(attention) = &mut block.mixer else {
            unreachable!("the config asks for attention")
        };
        let projection = |name: &str,
                          rows: usize,
                          cols: usize,
                          rope: bool|
         -> Result<Projection<B>, BitTttError> {
            let (codes, gamma) = shards.ternary(&format!("{layer}.{name}"), rows, cols, &hf)?;
            let codes = if rope {
                rotate_half_to_pairs(&codes, head_dim, cols)
            } else {
                codes
            };
            packed_projection(&codes, rows, cols, gamma)
        };
        attention.q_proj = projection("self_attn.q_proj", d, d, true)?;
        attention.k_proj = projection("self_attn.k_proj", kv_dim, d, true)?;
        attention.v_proj = projection("self_attn.v_proj", kv_dim, d, false)?;
        attention.o_proj = projection("self_attn.o_proj", d, d, false)?;
        if let Some(norm) = attention.sub_norm.as_mut() {
            norm.gamma = Param::from_tensor(vector(
                &format!("{layer}.self_attn.attn_sub_norm.weight"),
                d,
            )?);
        }
        block.ffn.gate_proj = projection("mlp.gate_proj", c.d_ffn, d, false)?;
        block.ffn.up_proj = projection("mlp.up_proj", c.d_ffn, d, false)?;
        block.ffn.down_proj = projection("mlp.down_proj", d, c.d_ffn, false)?;
        if let Some(norm) = block.ffn.sub_norm.as_mut() {
            norm.gamma = Param::from_tensor(vector(
                &format!("{layer}.mlp.ffn_sub_norm.weight"),
                c.d_ffn,
            )?);
        }
    }
    Ok((model, hf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_half_rows_become_adjacent_pairs() {
        // One head of 4 features, one column: rows [a, b, c, d] pair (a, c) and (b, d).
        let codes = [1, 0, -1, 1];
        assert_eq!(rotate_half_to_pairs(&codes, 4, 1), vec![1, -1, 0, 1]);
        // Two heads of 2, two columns: each head is its own pair already.
        let codes = [1, 0, -1, 1, 0, 0, 1, 1];
        assert_eq!(rotate_half_to_pairs(&codes, 2, 2), codes.to_vec());
    }

    #[test]
    fn absmean_codes_by_hand() {
        // mean |w| = 0.5: w / 0.5 = [2, -0.4, 0.6, -1] → [1, 0, 1, -1].
        let (codes, gamma) = absmean(&[1.0, -0.2, 0.3, -0.5]).unwrap();
        assert_eq!(codes, vec![1, 0, 1, -1]);
        assert!((gamma - 0.5).abs() < 1e-7);
        assert!(absmean(&[1.0, f32::NAN]).is_none());
        // All zeros: the clamped scale keeps the codes zero and finite.
        let (codes, gamma) = absmean(&[0.0; 3]).unwrap();
        assert_eq!((codes, gamma > 0.0), (vec![0, 0, 0], true));
    }
}
