//! Running a trained model: opening either of its forms (a model directory or a packed file)
//! and decoding with the engine that suits its backend.
//!
//! A [`Decoder`] reads and generates one sequence. Where the model's tensors live in host
//! memory (Burn's `ndarray` backend, with or without autodiff) it decodes with the fused
//! [`CpuDecoder`], which computes the same logits without Burn's per-op overhead (see
//! [`cpu_decode`](crate::cpu_decode) for how close they are); on any other backend (a GPU) with
//! the model's own [`BitLlama::read`] and [`BitLlama::generate`], whose ops run on the device.
//! Callers ask for [`DecoderChoice::Auto`] and need not know which backends have a fused path.
//!
//! ```no_run
//! # use std::ops::ControlFlow;
//! # use bit_ttt_burn::inference::{Decoder, DecoderChoice};
//! # use bit_ttt_burn::{BitLlama, GenerationConfig, SamplingConfig};
//! # use burn::backend::NdArray;
//! # fn run(path: &std::path::Path) -> Result<(), bit_ttt_burn::BitTttError> {
//! // A model directory or a `*.packed.safetensors` file (memory-mapped).
//! let (model, _config) = BitLlama::<NdArray>::open(path, &Default::default())?;
//! let decoder = Decoder::new(model, DecoderChoice::Auto, 0)?; // the fused decoder here
//! let config = GenerationConfig {
//!     max_new_tokens: 20,
//!     sampling: SamplingConfig::greedy(),
//!     stop_tokens: vec![],
//! };
//! let tokens = decoder.generate(&[1, 2, 3], &config, &mut decoder.new_state(), |_| {
//!     ControlFlow::Continue(())
//! })?;
//! # Ok(()) }
//! ```

use std::any::TypeId;
use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::cpu_decode::{CpuDecodeState, CpuDecoder};
use crate::hybrid::{HybridDecoder, HybridState};
use crate::soul::{as_file_error, Soul};
use crate::{BitLlama, BitLlamaConfig, BitTttError, GenerationConfig, ModelState, TernaryBackend};

/// Which engine a [`Decoder`] should decode with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecoderChoice {
    /// The fused CPU decoder where the model computes on the CPU, Burn's ops elsewhere (see
    /// [`resolve`](Self::resolve)).
    #[default]
    Auto,
    /// The fused CPU decoder whatever the backend (on a GPU backend the parameters are copied
    /// to host memory once, and decoding runs on the CPU).
    Fused,
    /// The model's own Burn forward, op by op, on its backend.
    Burn,
}

/// The engine a [`Decoder`] runs: what a [`DecoderChoice`] resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderKind {
    /// [`CpuDecoder`].
    Fused,
    /// [`BitLlama::read`] / [`BitLlama::generate`].
    Burn,
    /// [`HybridDecoder`]: the first blocks on the backend's device, the rest on the CPU.
    Hybrid,
}

impl DecoderChoice {
    /// The engine this choice means for a model on backend `B`: [`Auto`](Self::Auto) is
    /// [`DecoderKind::Fused`] exactly when `B` computes in host memory (its device is the
    /// `ndarray` CPU device: `NdArray` of any element type, also inside `Autodiff`), where the
    /// fused decoder reads the parameters (and a packed file's mapping) where they lie.
    pub fn resolve<B: Backend>(self) -> DecoderKind {
        match self {
            DecoderChoice::Fused => DecoderKind::Fused,
            DecoderChoice::Burn => DecoderKind::Burn,
            DecoderChoice::Auto if computes_on_host::<B>() => DecoderKind::Fused,
            DecoderChoice::Auto => DecoderKind::Burn,
        }
    }
}

/// Whether `B`'s tensors live in host memory. Decided by the device type, so that every
/// `NdArray` flavour and an `Autodiff` wrapper of one (which share `NdArrayDevice`) count,
/// without a list of backend types.
fn computes_on_host<B: Backend>() -> bool {
    #[cfg(feature = "ndarray")]
    {
        TypeId::of::<B::Device>() == TypeId::of::<burn::backend::ndarray::NdArrayDevice>()
    }
    #[cfg(not(feature = "ndarray"))]
    {
        let _ = TypeId::of::<B::Device>;
        false
    }
}

/// What a [`Decoder`] runs.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per decoder, built once: boxing only adds an indirection
enum Engine<B: TernaryBackend> {
    Fused(CpuDecoder),
    Burn(BitLlama<B>),
    Hybrid(HybridDecoder<B>),
}

/// A model ready to read and generate one sequence with the engine [`DecoderChoice`] picks
/// (see the [module docs](self)). Both engines give the same logits up to float rounding, and
/// so the same tokens for the same sampling seed unless two logits are within rounding of
/// each other.
#[derive(Debug)]
pub struct Decoder<B: TernaryBackend> {
    engine: Engine<B>,
}

/// What a [`Decoder`] has read of one sequence; made by [`Decoder::new_state`], used only with
/// the decoder that made it.
#[derive(Debug, Clone)]
pub struct DecoderState<B: Backend> {
    inner: StateInner<B>,
}

#[derive(Debug, Clone)]
enum StateInner<B: Backend> {
    Fused(CpuDecodeState),
    Burn(ModelState<B>),
    Hybrid(HybridState<B>),
}

impl<B: Backend> DecoderState<B> {
    /// Tokens read so far.
    pub fn position(&self) -> usize {
        match &self.inner {
            StateInner::Fused(s) => s.position(),
            StateInner::Burn(s) => s.position,
            StateInner::Hybrid(s) => s.position(),
        }
    }
}

impl<B: TernaryBackend> Decoder<B> {
    /// Prepares `model` for decoding with the engine `choice` resolves to on `B`. The fused
    /// engine copies the parameters it needs out of the model once (packed projections are
    /// shared, not copied) and drops the model, so its tensors are not held twice; it uses
    /// `threads` threads (`0`: the kernels' default). The Burn engine keeps the model and
    /// ignores `threads` (its ops use the backend's own parallelism).
    ///
    /// # Errors
    /// As [`CpuDecoder::new`] for the fused engine; none for the Burn engine.
    pub fn new(
        model: BitLlama<B>,
        choice: DecoderChoice,
        threads: usize,
    ) -> Result<Self, BitTttError> {
        let engine = match choice.resolve::<B>() {
            DecoderKind::Fused => Engine::Fused(CpuDecoder::new(&model, threads)?),
            // `resolve` never gives `Hybrid`: a split model is built by `Decoder::hybrid`.
            DecoderKind::Burn | DecoderKind::Hybrid => Engine::Burn(model),
        };
        Ok(Self { engine })
    }

    /// This decoder with its f32 head stored 8 bits a weight (see
    /// [`CpuDecoder::with_int8_head`]).
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] unless the engine is the fused CPU decoder (the int8 head
    /// is one of its products); as [`CpuDecoder::with_int8_head`].
    pub fn with_int8_head(self) -> Result<Self, BitTttError> {
        match self.engine {
            Engine::Fused(d) => Ok(Self {
                engine: Engine::Fused(d.with_int8_head()?),
            }),
            _ => Err(BitTttError::InvalidInput(
                "the 8-bit head runs on the fused CPU decoder (--device ndarray, no --n-gpu-layers)"
                    .into(),
            )),
        }
    }

    /// A decoder that runs `hybrid`: the model split between `B`'s device and the CPU.
    pub fn hybrid(hybrid: HybridDecoder<B>) -> Self {
        Self {
            engine: Engine::Hybrid(hybrid),
        }
    }

    /// The engine this decoder runs.
    pub fn kind(&self) -> DecoderKind {
        match self.engine {
            Engine::Fused(_) => DecoderKind::Fused,
            Engine::Burn(_) => DecoderKind::Burn,
            Engine::Hybrid(_) => DecoderKind::Hybrid,
        }
    }

    /// The vocabulary size (length of the logits).
    pub fn vocab_size(&self) -> usize {
        match &self.engine {
            Engine::Fused(d) => d.vocab_size(),
            Engine::Burn(m) => m.vocab_size(),
            Engine::Hybrid(h) => h.vocab_size(),
        }
    }

    /// The state before any token.
    pub fn new_state(&self) -> DecoderState<B> {
        let inner = match &self.engine {
            Engine::Fused(d) => StateInner::Fused(d.new_state()),
            Engine::Burn(m) => StateInner::Burn(m.new_state()),
            Engine::Hybrid(h) => StateInner::Hybrid(h.new_state()),
        };
        DecoderState { inner }
    }

    /// Reads `tokens` after everything `state` has read and returns the logits of the token
    /// that follows, `[vocab_size]`.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] for no tokens or an id not below the vocabulary size
    /// (`state` is unchanged then); [`BitTttError::InvalidCache`] for a state another decoder
    /// made.
    pub fn read(
        &self,
        tokens: &[u32],
        state: &mut DecoderState<B>,
    ) -> Result<Vec<f32>, BitTttError> {
        match (&self.engine, &mut state.inner) {
            (Engine::Fused(d), StateInner::Fused(s)) => d.read(tokens, s),
            (Engine::Burn(m), StateInner::Burn(s)) => m.read(tokens, s),
            (Engine::Hybrid(h), StateInner::Hybrid(s)) => h.read(tokens, s),
            _ => Err(foreign_state()),
        }
    }

    /// As [`read`](Self::read), but the logits after every token of `tokens`,
    /// `[tokens.len() · vocab_size]` (row `t` predicts the token after `tokens[t]`).
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_all(
        &self,
        tokens: &[u32],
        state: &mut DecoderState<B>,
    ) -> Result<Vec<f32>, BitTttError> {
        match (&self.engine, &mut state.inner) {
            (Engine::Fused(d), StateInner::Fused(s)) => d.read_all(tokens, s),
            (Engine::Burn(m), StateInner::Burn(s)) => m.read_all(tokens, s),
            (Engine::Hybrid(h), StateInner::Hybrid(s)) => h.read_all(tokens, s),
            _ => Err(foreign_state()),
        }
    }

    /// Generates after `prompt`, continuing `state`, as [`BitLlama::generate`] does (same
    /// sampling, same stops, each token streamed to `on_token`, which may stop early with
    /// [`ControlFlow::Break`]); returns the generated tokens.
    ///
    /// # Errors
    /// As [`BitLlama::generate`]; [`BitTttError::InvalidCache`] for a state another decoder
    /// made.
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        state: &mut DecoderState<B>,
        on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Vec<u32>, BitTttError> {
        match (&self.engine, &mut state.inner) {
            (Engine::Fused(d), StateInner::Fused(s)) => d.generate(prompt, config, s, on_token),
            (Engine::Burn(m), StateInner::Burn(s)) => m.generate(prompt, config, s, on_token),
            (Engine::Hybrid(h), StateInner::Hybrid(s)) => h.generate(prompt, config, s, on_token),
            _ => Err(foreign_state()),
        }
    }
}

impl<B: TernaryBackend> Decoder<B> {
    /// Writes what `state` has read to a `.soul` file, atomically. The file is the same
    /// whichever engine wrote it ([`crate::soul`]), so [`load_state`](Self::load_state) of a
    /// decoder on another engine or backend continues from it.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] for a state another decoder made; [`BitTttError::Io`].
    pub fn save_state(&self, state: &DecoderState<B>, path: &Path) -> Result<(), BitTttError> {
        match (&self.engine, &state.inner) {
            (Engine::Fused(d), StateInner::Fused(s)) => d.save_state(s, path),
            (Engine::Burn(_), StateInner::Burn(s)) => s.save(path),
            (Engine::Hybrid(h), StateInner::Hybrid(s)) => h.save_state(s, path),
            _ => Err(foreign_state()),
        }
    }

    /// Restores a state from a `.soul` file of this model (one sequence), written by any
    /// engine.
    ///
    /// # Errors
    /// [`BitTttError::MissingFile`] / [`BitTttError::Io`]; [`BitTttError::CorruptFile`] if the
    /// file does not fit this model.
    pub fn load_state(&self, path: &Path) -> Result<DecoderState<B>, BitTttError> {
        let inner = match &self.engine {
            Engine::Fused(d) => StateInner::Fused(d.load_state(path)?),
            Engine::Burn(m) => {
                let (soul, _) = Soul::load(path, m.blocks.len())?;
                // A decoder reads one sequence; a state of several would break its next step.
                soul.check_one_sequence().map_err(as_file_error(path))?;
                StateInner::Burn(m.state_from_soul(soul).map_err(as_file_error(path))?)
            }
            Engine::Hybrid(h) => StateInner::Hybrid(h.load_state(path)?),
        };
        Ok(DecoderState { inner })
    }
}

fn foreign_state() -> BitTttError {
    BitTttError::InvalidCache("the decoder state was made by another kind of decoder".into())
}

impl<B: TernaryBackend> BitLlama<B> {
    /// Loads a model from either of its forms: a model directory ([`load`](Self::load):
    /// `config.json` and `model.safetensors`) or a packed inference file
    /// ([`load_packed`](Self::load_packed), memory-mapped), told apart by whether `path` is a
    /// directory or a file. A packed file must not be rewritten in place while the model
    /// lives (see [`load_packed`](Self::load_packed)).
    ///
    /// # Errors
    /// [`BitTttError::NotAModel`] if `path` is neither (it does not exist, or is a broken
    /// link); otherwise what [`load`](Self::load) or [`load_packed`](Self::load_packed) return.
    pub fn open(path: &Path, device: &B::Device) -> Result<(Self, BitLlamaConfig), BitTttError> {
        if path.is_dir() {
            Self::load(path, device)
        } else if path.is_file() {
            Self::load_packed(path, device)
        } else {
            Err(BitTttError::NotAModel(path.to_path_buf()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::Deterministic;
    use crate::{MixerKind, Projection, SamplingConfig};
    use burn::backend::{Autodiff, NdArray};
    use burn::module::Module;

    type B = NdArray;

    /// A small seeded ternary model, packed (so that both engines multiply by the same packed
    /// weights), with its config.
    fn model(mixer: MixerKind) -> (BitLlama<B>, BitLlamaConfig) {
        let config = BitLlamaConfig::new(61, 32, 2, 4, 48)
            .with_mini_batch_size(4)
            .with_mixer(mixer);
        let model = config
            .init::<B>(&Default::default())
            .map(&mut Deterministic(11))
            .into_packed()
            .unwrap();
        (model, config)
    }

    #[test]
    fn auto_is_fused_on_the_cpu_backend_and_explicit_choices_are_kept() {
        assert_eq!(DecoderChoice::default(), DecoderChoice::Auto);
        assert_eq!(DecoderChoice::Auto.resolve::<B>(), DecoderKind::Fused);
        assert_eq!(
            DecoderChoice::Auto.resolve::<NdArray<f64>>(),
            DecoderKind::Fused
        );
        assert_eq!(
            DecoderChoice::Auto.resolve::<Autodiff<B>>(),
            DecoderKind::Fused
        );
        assert_eq!(DecoderChoice::Burn.resolve::<B>(), DecoderKind::Burn);
        assert_eq!(DecoderChoice::Fused.resolve::<B>(), DecoderKind::Fused);
        #[cfg(feature = "wgpu")]
        {
            assert_eq!(
                DecoderChoice::Auto.resolve::<burn::backend::Wgpu>(),
                DecoderKind::Burn
            );
            assert_eq!(
                DecoderChoice::Fused.resolve::<burn::backend::Wgpu>(),
                DecoderKind::Fused
            );
        }
    }

    /// Both engines read the same logits (within the fused decoder's documented 1e-4 of the
    /// largest logit) and generate the same tokens, which are the model's own.
    #[test]
    fn both_engines_decode_like_the_model() {
        for mixer in [MixerKind::TttLinear, MixerKind::Attention] {
            let (model, _) = model(mixer);
            let config = GenerationConfig {
                max_new_tokens: 12,
                sampling: SamplingConfig {
                    temperature: 0.8,
                    top_k: Some(20),
                    top_p: Some(0.9),
                    seed: 4,
                },
                stop_tokens: vec![],
            };
            let prompt = [5, 9, 2, 33];
            let expected = model
                .generate(&prompt, &config, &mut model.new_state(), |_| {
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(expected.len(), 12);
            let fused = Decoder::new(model.clone(), DecoderChoice::Auto, 2).unwrap();
            let burn = Decoder::new(model.clone(), DecoderChoice::Burn, 0).unwrap();
            assert_eq!(fused.kind(), DecoderKind::Fused);
            assert_eq!(burn.kind(), DecoderKind::Burn);
            for decoder in [&fused, &burn] {
                assert_eq!(decoder.vocab_size(), 61);
                let mut streamed = Vec::new();
                let mut state = decoder.new_state();
                let tokens = decoder
                    .generate(&prompt, &config, &mut state, |t| {
                        streamed.push(t);
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                assert_eq!(tokens, expected, "{:?} {}", decoder.kind(), mixer.name());
                assert_eq!(streamed, expected);
                // The prompt and every generated token but the last were read.
                assert_eq!(state.position(), prompt.len() + 11);
            }
            let (mut fs, mut bs) = (fused.new_state(), burn.new_state());
            let f = fused.read(&prompt, &mut fs).unwrap();
            let b = burn.read(&prompt, &mut bs).unwrap();
            let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = f
                .iter()
                .zip(&b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-4 * scale, "{}: {diff}", mixer.name());
        }
    }

    /// `read_all` gives, on both engines, the logits after every token: its last row is what
    /// `read` gives, and each row equals reading the prefix up to it (to the engines' 1e-4 of
    /// the largest logit between engines; bit for bit within the fused engine).
    #[test]
    fn read_all_gives_every_positions_logits_on_both_engines() {
        let (model, _) = model(MixerKind::TttLinear);
        let fused = Decoder::new(model.clone(), DecoderChoice::Fused, 1).unwrap();
        let burn = Decoder::new(model, DecoderChoice::Burn, 0).unwrap();
        let prompt = [5u32, 9, 2, 33, 7, 1];
        let rows: Vec<Vec<f32>> = [&fused, &burn]
            .iter()
            .map(|decoder| {
                let all = decoder.read_all(&prompt, &mut decoder.new_state()).unwrap();
                assert_eq!(all.len(), prompt.len() * 61);
                let mut state = decoder.new_state();
                for (t, row) in all.chunks_exact(61).enumerate() {
                    let step = decoder.read(&prompt[t..t + 1], &mut state).unwrap();
                    let diff = row
                        .iter()
                        .zip(&step)
                        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                    if decoder.kind() == DecoderKind::Fused {
                        assert_eq!(row, &step[..], "fused row {t}");
                    } else {
                        assert!(diff <= 1e-5, "burn row {t}: {diff}");
                    }
                }
                all
            })
            .collect();
        let scale = rows[1].iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = rows[0]
            .iter()
            .zip(&rows[1])
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{diff}");
        assert!(matches!(
            burn.read_all(&prompt, &mut fused.new_state()),
            Err(BitTttError::InvalidCache(_))
        ));
    }

    #[test]
    fn bad_tokens_and_foreign_states_are_errors() {
        let (model, _) = model(MixerKind::TttLinear);
        let fused = Decoder::new(model.clone(), DecoderChoice::Fused, 1).unwrap();
        let burn = Decoder::new(model, DecoderChoice::Burn, 0).unwrap();
        for decoder in [&fused, &burn] {
            let mut state = decoder.new_state();
            assert!(matches!(
                decoder.read(&[], &mut state),
                Err(BitTttError::InvalidInput(_))
            ));
            let err = decoder.read(&[1, 61], &mut state).unwrap_err();
            assert!(err.to_string().contains("token id 61"), "{err}");
            assert_eq!(state.position(), 0);
        }
        let mut burn_state = burn.new_state();
        assert!(matches!(
            fused.read(&[1], &mut burn_state),
            Err(BitTttError::InvalidCache(_))
        ));
        let config = GenerationConfig {
            max_new_tokens: 1,
            sampling: SamplingConfig::greedy(),
            stop_tokens: vec![],
        };
        let mut fused_state = fused.new_state();
        assert!(matches!(
            burn.generate(&[1], &config, &mut fused_state, |_| ControlFlow::Continue(
                ()
            )),
            Err(BitTttError::InvalidCache(_))
        ));
    }

    /// `open` reads a model directory and a packed file; both give the model's logits.
    /// A context read by one engine, saved, continues on the other with the logits the
    /// uninterrupted engine gives (within the engines' 1e-4 of the largest logit); a state of
    /// two sequences is refused by both.
    #[test]
    fn a_state_saved_by_one_engine_continues_on_the_other() {
        let dir = tempfile::tempdir().unwrap();
        for mixer in [MixerKind::TttLinear, MixerKind::Attention] {
            let (model, _) = model(mixer);
            let model_for_batch = model.clone();
            let fused = Decoder::new(model.clone(), DecoderChoice::Fused, 1).unwrap();
            let burn = Decoder::new(model, DecoderChoice::Burn, 1).unwrap();
            let context = [3u32, 17, 5, 40, 2, 9];
            for (from, to) in [(&fused, &burn), (&burn, &fused)] {
                let mut state = from.new_state();
                from.read(&context, &mut state).unwrap();
                let path = dir.path().join("context.soul");
                from.save_state(&state, &path).unwrap();
                let mut restored = to.load_state(&path).unwrap();
                assert_eq!(restored.position(), context.len());
                for token in [7u32, 1, 30] {
                    let expected = from.read(&[token], &mut state).unwrap();
                    let got = to.read(&[token], &mut restored).unwrap();
                    let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    let diff = got
                        .iter()
                        .zip(&expected)
                        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff <= 1e-4 * scale, "{mixer:?}: {diff} (scale {scale})");
                }
                // A state is saved only by the decoder that made it.
                assert!(to.save_state(&state, &path).is_err());
            }
            let mut two = model_for_batch.new_batch_state(2);
            let batch = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_ints(
                [[1, 2, 3], [4, 5, 6]],
                &Default::default(),
            );
            model_for_batch.forward_with_state(batch, &mut two).unwrap();
            let path = dir.path().join("two.soul");
            two.save(&path).unwrap();
            for decoder in [&fused, &burn] {
                let err = decoder.load_state(&path).unwrap_err();
                assert!(
                    matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("2 sequences")),
                    "{mixer:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn open_reads_a_directory_and_a_packed_file() {
        let dir = tempfile::tempdir().unwrap();
        let (model, config) = {
            let config = BitLlamaConfig::new(61, 32, 2, 4, 48).with_mini_batch_size(4);
            let model = config
                .init::<B>(&Default::default())
                .map(&mut Deterministic(12));
            (model, config)
        };
        let model_dir = dir.path().join("model");
        model.save(&config, &model_dir).unwrap();
        let packed_path = dir.path().join("model.packed.safetensors");
        model.save_packed(&config, &packed_path).unwrap();
        let device = Default::default();
        let (from_dir, dir_config) = BitLlama::<B>::open(&model_dir, &device).unwrap();
        let (from_file, file_config) = BitLlama::<B>::open(&packed_path, &device).unwrap();
        assert_eq!(dir_config, config);
        assert_eq!(file_config, config);
        let packed_projections = |m: &BitLlama<B>| {
            m.projections()
                .into_iter()
                .filter(|(_, p)| matches!(p, Projection::Packed(_)))
                .count()
        };
        assert_eq!(packed_projections(&from_dir), 0);
        assert!(packed_projections(&from_file) > 0);
        let probe = crate::LogitCheck::probe_tokens(61);
        for loaded in [&from_dir, &from_file] {
            let check = model.check_packed_logits(loaded, &probe).unwrap();
            assert!(check.within(1e-4), "{check:?}");
        }

        let missing = dir.path().join("nothing");
        let err = BitLlama::<B>::open(&missing, &device).unwrap_err();
        assert!(matches!(err, BitTttError::NotAModel(_)), "{err}");
        assert!(err.to_string().contains("nothing"), "{err}");
        // A file that is not a packed model is the packed loader's clear error.
        let err = BitLlama::<B>::open(&model_dir.join("config.json"), &device).unwrap_err();
        assert!(matches!(err, BitTttError::CorruptFile { .. }), "{err}");
    }
}
