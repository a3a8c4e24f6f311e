//! `BitLlamaConfig`: the shape of a model, saved beside its weights as `config.json`.

use burn::config::Config;
use serde::{Deserialize, Serialize};

/// The most weights a configuration's matrices may hold ([`BitLlamaConfig::matrix_weights`]):
/// 2⁴⁰, about 1.1 × 10¹², fifteen times a 70B model.
pub const MAX_MATRIX_WEIGHTS: u64 = 1 << 40;
/// The largest TTT mini-batch a configuration may ask for.
pub const MAX_MINI_BATCH_SIZE: usize = 4096;
/// The most values of the TTT layers' RoPE tables (`n_layers × mini_batch_size × head_dim`),
/// which are allocated when the model is made.
pub const MAX_ROPE_TABLE: usize = 1 << 26;
/// The most blocks a configuration may ask for.
pub const MAX_LAYERS: usize = 4096;

/// Which sequence mixer the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixerKind {
    /// TTT-Linear: fast weights `W1, b1` learn the context (no KV cache).
    TttLinear,
    /// TTT-MLP: a two-layer fast-weight MLP learns the context (no KV cache).
    TttMlp,
    /// Causal multi-head attention with RoPE and a KV cache (the baseline).
    Attention,
}

impl MixerKind {
    /// The name used in `config.json` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MixerKind::TttLinear => "ttt_linear",
            MixerKind::TttMlp => "ttt_mlp",
            MixerKind::Attention => "attention",
        }
    }
}

impl std::str::FromStr for MixerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ttt_linear" => Ok(MixerKind::TttLinear),
            "ttt_mlp" => Ok(MixerKind::TttMlp),
            "attention" => Ok(MixerKind::Attention),
            other => Err(format!(
                "unknown mixer {other:?}: expected ttt_linear, ttt_mlp or attention"
            )),
        }
    }
}

/// The activation that gates the feed-forward network: `down(act(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnActivation {
    /// SiLU (SwiGLU, Llama).
    Silu,
    /// Squared ReLU, `relu(x)²` (BitNet b1.58 2B-4T).
    Relu2,
}

/// Configuration of a [`BitLlama`](super::BitLlama) model.
///
/// Presets: [`tiny`](Self::tiny) for tests and the sizes of the TTT paper
/// ([`ttt_125m`](Self::ttt_125m), [`ttt_350m`](Self::ttt_350m), [`ttt_760m`](Self::ttt_760m),
/// [`ttt_1_3b`](Self::ttt_1_3b)), and [`ternary_1b`](Self::ternary_1b), the fully ternary
/// shape `bit-ttt-train bench` decodes. Their parameter counts (vocabulary 32,000):
///
/// | preset | d_model | layers | heads | d_ffn | parameters (TTT-Linear) |
/// |--------|---------|--------|-------|-------|------------|
/// | tiny   | 64      | 2      | 4     | 128   | 347,600 (vocabulary 2,048) |
/// | 125m   | 768     | 12     | 12    | 2048  | 134,852,688 |
/// | 350m   | 1024    | 24     | 16    | 2736  | 370,059,008 |
/// | 760m   | 1536    | 24     | 16    | 4096  | 782,170,368 |
/// | 1.3b   | 2048    | 24     | 32    | 5504  | 1,350,388,864 |
/// | 1b (ternary head) | 2048 | 24 | 32  | 5632  | 1,369,263,232 |
///
/// (Counted by the `parameter_counts_of_presets` test; the embedding and the head are
/// 2 × 32,000 × d_model of them.)
#[derive(Config, Debug, PartialEq)]
pub struct BitLlamaConfig {
    /// Vocabulary size (token ids are `0..vocab_size`).
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Number of heads of the mixer.
    pub n_heads: usize,
    /// Hidden width of the SwiGLU feed-forward network.
    pub d_ffn: usize,
    /// The sequence mixer of every block.
    #[config(default = "MixerKind::TttLinear")]
    pub mixer: MixerKind,
    /// Ternary (BitLinear) projections in the blocks; false gives an f32 model with the same code.
    #[config(default = true)]
    pub ternary: bool,
    /// Ternary LM head (BitNet keeps it in full precision; so does the default).
    #[config(default = false)]
    pub ternary_head: bool,
    /// TTT mini-batch size.
    #[config(default = 16)]
    pub mini_batch_size: usize,
    /// TTT inner-loop base learning rate; `None` takes the paper's (1.0 linear, 0.1 MLP).
    #[config(default = "None")]
    pub ttt_base_lr: Option<f64>,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Key/value heads of the attention mixer (grouped-query attention: each serves
    /// `n_heads / n_kv_heads` query heads); `None`: one per query head.
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// The activation that gates the feed-forward network; `None`: SiLU. (The fields added
    /// after the first release are `Option`s, so that a `config.json` written before them
    /// still reads: Burn's `Config` fills in only an absent `Option`.)
    #[config(default = "None")]
    pub ffn_activation: Option<FfnActivation>,
    /// BitNet b1.58's sub-norms: an RMSNorm on the attention output before `o_proj` and one on
    /// the feed-forward hidden `act(gate) ⊙ up` before `down_proj` (attention mixer only);
    /// `None`: none.
    #[config(default = "None")]
    pub sub_norms: Option<bool>,
    /// The token a text starts with (BOS), for models trained with one (imported ones).
    #[config(default = "None")]
    pub bos_token_id: Option<u32>,
    /// The tokens that end a text (EOS; a checkpoint's `config.json` and
    /// `generation_config.json` may name several), where the model says which.
    #[config(default = "None")]
    pub eos_token_ids: Option<Vec<u32>>,
}

impl BitLlamaConfig {
    /// A model small enough for tests (< 1M parameters with a vocabulary up to 2,048).
    pub fn tiny(vocab_size: usize) -> Self {
        Self::new(vocab_size, 64, 2, 4, 128).with_mini_batch_size(4)
    }

    /// TTT paper, 125M: d_model 768, 12 layers, 12 heads, FFN 2048.
    pub fn ttt_125m(vocab_size: usize) -> Self {
        Self::new(vocab_size, 768, 12, 12, 2048)
    }

    /// TTT paper, 350M: d_model 1024, 24 layers, 16 heads, FFN 2736.
    pub fn ttt_350m(vocab_size: usize) -> Self {
        Self::new(vocab_size, 1024, 24, 16, 2736)
    }

    /// TTT paper, 760M: d_model 1536, 24 layers, 16 heads, FFN 4096.
    pub fn ttt_760m(vocab_size: usize) -> Self {
        Self::new(vocab_size, 1536, 24, 16, 4096)
    }

    /// TTT paper, 1.3B: d_model 2048, 24 layers, 32 heads, FFN 5504.
    pub fn ttt_1_3b(vocab_size: usize) -> Self {
        Self::new(vocab_size, 2048, 24, 32, 5504)
    }

    /// A ~1B fully ternary model: d_model 2048, 24 layers, 32 heads, FFN 5632 (the
    /// TinyLlama / BitNet-1B shape), with a ternary LM head too, so that every large matrix is
    /// read 2 bits a weight. The shape of the end-to-end decode benchmark.
    pub fn ternary_1b(vocab_size: usize) -> Self {
        Self::new(vocab_size, 2048, 24, 32, 5632).with_ternary_head(true)
    }

    /// The shape of `microsoft/bitnet-b1.58-2B-4T`: d_model 2560, 30 blocks, 20 query heads
    /// sharing 5 key/value heads (head_dim 128), FFN 6912 gated by squared ReLU, sub-norms,
    /// RoPE θ 500,000, f32 head (the checkpoint ties it to the embedding). Its vocabulary is
    /// 128,256; `vocab_size` is the caller's, as for the other presets.
    pub fn bitnet_2b(vocab_size: usize) -> Self {
        Self::new(vocab_size, 2560, 30, 20, 6912)
            .with_mixer(MixerKind::Attention)
            .with_n_kv_heads(Some(5))
            .with_ffn_activation(Some(FfnActivation::Relu2))
            .with_sub_norms(Some(true))
            .with_rope_theta(500_000.0)
            .with_norm_eps(1e-5)
    }

    /// A preset by name: `tiny`, `125m`, `350m`, `760m`, `1.3b`, `1b` ([`ternary_1b`](Self::ternary_1b)),
    /// `bitnet-2b` ([`bitnet_2b`](Self::bitnet_2b)).
    pub fn preset(name: &str, vocab_size: usize) -> Option<Self> {
        Some(match name {
            "tiny" => Self::tiny(vocab_size),
            "125m" => Self::ttt_125m(vocab_size),
            "350m" => Self::ttt_350m(vocab_size),
            "760m" => Self::ttt_760m(vocab_size),
            "1.3b" => Self::ttt_1_3b(vocab_size),
            "1b" => Self::ternary_1b(vocab_size),
            "bitnet-2b" => Self::bitnet_2b(vocab_size),
            _ => return None,
        })
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Key/value heads of the attention mixer.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// The feed-forward network's activation.
    pub fn ffn_activation(&self) -> FfnActivation {
        self.ffn_activation.unwrap_or(FfnActivation::Silu)
    }

    /// Whether the blocks have BitNet's sub-norms.
    pub fn has_sub_norms(&self) -> bool {
        self.sub_norms.unwrap_or(false)
    }

    /// Checks the shape parameters fit together.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("d_ffn", self.d_ffn),
            ("mini_batch_size", self.mini_batch_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be > 0"));
        }
        if !self.d_model.is_multiple_of(self.n_heads) || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "d_model {} must split into {} heads of even size",
                self.d_model, self.n_heads
            ));
        }
        // Bounded before anything is allocated: a config read from a file or typed as a flag
        // must not turn into an out-of-memory abort.
        match self.matrix_weights() {
            Some(n) if n <= MAX_MATRIX_WEIGHTS => {}
            n => {
                return Err(format!(
                    "the model would have {} weights in its matrices, more than the limit of {MAX_MATRIX_WEIGHTS} (vocab_size {}, d_model {}, n_layers {}, d_ffn {})",
                    n.map_or("over 2^64".to_string(), |n| n.to_string()),
                    self.vocab_size,
                    self.d_model,
                    self.n_layers,
                    self.d_ffn
                ))
            }
        }
        if self.mini_batch_size > MAX_MINI_BATCH_SIZE {
            return Err(format!(
                "mini_batch_size {} is larger than the limit of {MAX_MINI_BATCH_SIZE}",
                self.mini_batch_size
            ));
        }
        if self.n_layers > MAX_LAYERS {
            return Err(format!(
                "n_layers {} is larger than the limit of {MAX_LAYERS}",
                self.n_layers
            ));
        }
        // Every TTT layer allocates its RoPE table when the model is made:
        // n_layers × mini_batch_size × head_dim values in all.
        let rope = self
            .n_layers
            .saturating_mul(self.mini_batch_size)
            .saturating_mul(self.head_dim());
        if rope > MAX_ROPE_TABLE {
            return Err(format!(
                "n_layers {} × mini_batch_size {} × head_dim {} is larger than the limit of {MAX_ROPE_TABLE} (the RoPE tables)",
                self.n_layers,
                self.mini_batch_size,
                self.head_dim()
            ));
        }
        let positive_finite = |name: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number > 0, not {value}"))
            }
        };
        positive_finite("norm_eps", self.norm_eps)?;
        positive_finite("rope_theta", self.rope_theta)?;
        // The TTT layer keeps θ as an f32.
        if self.rope_theta > f64::from(f32::MAX) {
            return Err(format!(
                "rope_theta {} does not fit an f32",
                self.rope_theta
            ));
        }
        if let Some(lr) = self.ttt_base_lr {
            positive_finite("ttt_base_lr", lr)?;
        }
        if let Some(kv) = self.n_kv_heads {
            if self.mixer != MixerKind::Attention && kv != self.n_heads {
                return Err(format!(
                    "n_kv_heads {kv} differs from n_heads {}: grouped-query heads are for the attention mixer, not {}",
                    self.n_heads,
                    self.mixer.name()
                ));
            }
            if kv == 0 || !self.n_heads.is_multiple_of(kv) {
                return Err(format!(
                    "n_kv_heads {kv} must be > 0 and divide n_heads {}",
                    self.n_heads
                ));
            }
        }
        if self.has_sub_norms() && self.mixer != MixerKind::Attention {
            return Err(format!(
                "sub_norms (BitNet b1.58's) are for the attention mixer, not {}",
                self.mixer.name()
            ));
        }
        let eos = self.eos_token_ids.iter().flatten().copied();
        for (name, id) in std::iter::once(("bos_token_id", self.bos_token_id))
            .chain(eos.map(|id| ("eos_token_ids", Some(id))))
        {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Err(format!(
                        "{name} {id} is outside the vocabulary of {}",
                        self.vocab_size
                    ));
                }
            }
        }
        Ok(())
    }

    /// The weights of the model's large matrices: embedding and head (`2 × vocab_size ×
    /// d_model`), and per block the four mixer projections, the three FFN projections and the
    /// TTT fast weights. A lower bound of the parameter count (norms, biases and gates are left
    /// out) computed without allocating anything; `None` if it overflows `u64`.
    pub fn matrix_weights(&self) -> Option<u64> {
        let [v, d, l, f, h, kv] = [
            self.vocab_size,
            self.d_model,
            self.n_layers,
            self.d_ffn,
            self.head_dim(),
            self.kv_heads(),
        ]
        .map(|x| x as u64);
        // TTT-Linear: one head_dim² matrix per head; TTT-MLP: head_dim × 4·head_dim and back.
        let fast = match self.mixer {
            MixerKind::TttLinear => d.checked_mul(h)?,
            MixerKind::TttMlp => d.checked_mul(h)?.checked_mul(8)?,
            MixerKind::Attention => 0,
        };
        // Q and O are d × d; K and V d × (kv_heads · head_dim).
        let block = d
            .checked_mul(d)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(kv)?.checked_mul(h)?.checked_mul(2)?)?
            .checked_add(d.checked_mul(f)?.checked_mul(3)?)?
            .checked_add(fast)?;
        v.checked_mul(d)?
            .checked_mul(2)?
            .checked_add(block.checked_mul(l)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Block;
    use burn::backend::NdArray;
    use burn::module::Module;

    /// Parameters of a model of `config`'s shape: the blocks are identical, so one block is
    /// materialized and counted, plus the embedding, the final norm and the f32 head.
    fn parameter_count(config: &BitLlamaConfig) -> usize {
        let block = Block::<NdArray>::init(config, &Default::default()).num_params();
        let (v, d) = (config.vocab_size, config.d_model);
        v * d + config.n_layers * block + d + d * v
    }

    #[test]
    fn parameter_counts_of_presets() {
        let tiny = BitLlamaConfig::tiny(2048);
        let model = tiny.init::<NdArray>(&Default::default());
        assert_eq!(parameter_count(&tiny), model.num_params());
        assert!(
            model.num_params() < 1_000_000,
            "tiny has {}",
            model.num_params()
        );

        assert_eq!(
            model.num_params(),
            347_600,
            "the doc table's count for tiny"
        );

        // The doc table's counts (TTT-Linear, vocabulary 32,000), and the sizes they stand for.
        for (name, expected, lo, hi) in [
            ("125m", 134_852_688, 100, 200),
            ("350m", 370_059_008, 300, 450),
            ("760m", 782_170_368, 650, 900),
            ("1.3b", 1_350_388_864, 1200, 1600),
            ("1b", 1_369_263_232, 1200, 1600),
        ] {
            let config = BitLlamaConfig::preset(name, 32_000).unwrap();
            let n = parameter_count(&config);
            assert_eq!(n, expected, "{name}: the doc table says {expected}");
            assert!(
                (lo * 1_000_000..hi * 1_000_000).contains(&n),
                "{name} has {n}"
            );
        }
    }

    #[test]
    fn matrix_weights_bound_the_parameter_count_from_below() {
        for mixer in [
            MixerKind::TttLinear,
            MixerKind::TttMlp,
            MixerKind::Attention,
        ] {
            let config = BitLlamaConfig::tiny(2048).with_mixer(mixer);
            let n = config.matrix_weights().unwrap();
            let all = parameter_count(&config) as u64;
            // Hand count for tiny (vocab 2048, d 64, 2 layers, 16-wide heads, FFN 128):
            // 2·2048·64 + 2·(4·64² + 3·64·128 + fast), fast = 64·16 (linear) or 8·64·16 (MLP).
            let fast = match mixer {
                MixerKind::TttLinear => 1024,
                MixerKind::TttMlp => 8192,
                MixerKind::Attention => 0,
            };
            assert_eq!(n, 262_144 + 2 * (16_384 + 24_576 + fast), "{mixer:?}");
            assert!(n <= all && all - n < all / 20, "{mixer:?}: {n} of {all}");
        }
    }

    #[test]
    fn absurd_configs_are_refused_before_anything_is_allocated() {
        let ok = BitLlamaConfig::tiny(2048);
        let wide = BitLlamaConfig {
            d_model: 100_000_000,
            ..ok.clone()
        };
        assert!(wide
            .validate()
            .unwrap_err()
            .contains("weights in its matrices"));
        let overflow = BitLlamaConfig {
            vocab_size: usize::MAX / 2,
            ..ok.clone()
        };
        assert!(overflow.validate().unwrap_err().contains("over 2^64"));
        let mini_batch = ok.clone().with_mini_batch_size(1 << 20);
        assert!(mini_batch
            .validate()
            .unwrap_err()
            .contains("mini_batch_size"));
        for (field, config) in [
            ("norm_eps", ok.clone().with_norm_eps(0.0)),
            ("norm_eps", ok.clone().with_norm_eps(f64::NAN)),
            ("rope_theta", ok.clone().with_rope_theta(-1.0)),
            ("rope_theta", ok.clone().with_rope_theta(f64::INFINITY)),
            ("rope_theta", ok.clone().with_rope_theta(1e300)),
            ("ttt_base_lr", ok.clone().with_ttt_base_lr(Some(f64::NAN))),
            ("ttt_base_lr", ok.clone().with_ttt_base_lr(Some(0.0))),
        ] {
            let err = config.validate().unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
        // A 70B shape is well inside the bound.
        let big = BitLlamaConfig::new(128_256, 8192, 80, 64, 28_672);
        assert_eq!(big.validate(), Ok(()));
    }

    #[test]
    fn bitnet_fields_are_checked_and_default_when_absent() {
        let ok = BitLlamaConfig::tiny(300).with_mixer(MixerKind::Attention);
        for (field, config) in [
            ("n_kv_heads", ok.clone().with_n_kv_heads(Some(3))),
            ("n_kv_heads", ok.clone().with_n_kv_heads(Some(0))),
            (
                "n_kv_heads",
                ok.clone()
                    .with_mixer(MixerKind::TttLinear)
                    .with_n_kv_heads(Some(2)),
            ),
            (
                "sub_norms",
                ok.clone()
                    .with_mixer(MixerKind::TttMlp)
                    .with_sub_norms(Some(true)),
            ),
            ("bos_token_id", ok.clone().with_bos_token_id(Some(300))),
            (
                "eos_token_ids",
                ok.clone().with_eos_token_ids(Some(vec![2, 1000])),
            ),
        ] {
            let err = config.validate().unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
        assert_eq!(ok.clone().with_n_kv_heads(Some(2)).validate(), Ok(()));
        assert_eq!(BitLlamaConfig::bitnet_2b(128_256).validate(), Ok(()));
        // A config.json written before these fields existed reads as before.
        let mut json = serde_json::to_value(&ok).unwrap();
        for field in [
            "n_kv_heads",
            "ffn_activation",
            "sub_norms",
            "bos_token_id",
            "eos_token_ids",
        ] {
            json.as_object_mut().unwrap().remove(field);
        }
        let old: BitLlamaConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old, ok);
        assert_eq!(old.kv_heads(), 4);
        assert_eq!(old.ffn_activation(), FfnActivation::Silu);
        assert!(!old.has_sub_norms());
    }

    #[test]
    fn mixer_names_round_trip() {
        for kind in [
            MixerKind::TttLinear,
            MixerKind::TttMlp,
            MixerKind::Attention,
        ] {
            assert_eq!(kind.name().parse::<MixerKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
        }
        assert!("lstm".parse::<MixerKind>().is_err());
    }
}
