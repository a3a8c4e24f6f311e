//! The engine under the Python module, in plain Rust: a model opened on a device (the fused
//! CPU decoder on the CPU, Burn's ops or a GPU/CPU split on a GPU), its states, whole-window
//! forward passes, and generation pulled one text piece at a time.
//!
//! Everything here is testable without Python; `python.rs` only converts arguments and
//! results and releases the GIL around these calls.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bit_ttt_burn::generate::TokenStream;
use bit_ttt_burn::hybrid::{GpuLayers, HybridDecoder};
use bit_ttt_burn::inference::{Decoder, DecoderChoice, DecoderKind, DecoderState};
use bit_ttt_burn::model::packed_config;
use bit_ttt_burn::{BitLlama, BitLlamaConfig, BitTttError, GenerationConfig, TernaryBackend};
use bit_ttt_train::device::DeviceKind;
use bit_ttt_train::tokenizer::{TextStream, Tokenizer};
use bit_ttt_train::TrainError;

/// What goes wrong in the engine; the module raises each as a Python exception
/// (`ValueError` for bad arguments, `FileNotFoundError`, `OSError`, `RuntimeError`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A bad argument: ids out of range, an empty input, a state of another model, a bad
    /// setting.
    #[error("{0}")]
    InvalidInput(String),
    /// From the model library.
    #[error(transparent)]
    Model(#[from] BitTttError),
    /// From the training library (tokenizers, devices).
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// The backend a model runs on: the fused CPU decoder, or a GPU backend compiled in.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per model, built once: boxing only adds an indirection
enum AnyDecoder {
    Cpu(Decoder<burn::backend::NdArray>),
    #[cfg(feature = "wgpu")]
    Wgpu(Decoder<burn::backend::Wgpu>),
    #[cfg(feature = "cuda")]
    Cuda(Decoder<burn::backend::Cuda>),
}

/// A state of [`AnyDecoder`]'s backend.
#[derive(Debug, Clone)]
enum AnyState {
    Cpu(DecoderState<burn::backend::NdArray>),
    #[cfg(feature = "wgpu")]
    Wgpu(DecoderState<burn::backend::Wgpu>),
    #[cfg(feature = "cuda")]
    Cuda(DecoderState<burn::backend::Cuda>),
}

/// `$body` with `$d` bound to the model's decoder, whatever its backend; `$wrap` names the
/// [`AnyState`] variant of that backend (to wrap a state the body makes).
macro_rules! on_decoder {
    ($model:expr, |$d:ident, $wrap:ident| $body:expr) => {
        match &$model.decoder {
            AnyDecoder::Cpu($d) => {
                let $wrap = AnyState::Cpu;
                $body
            }
            #[cfg(feature = "wgpu")]
            AnyDecoder::Wgpu($d) => {
                let $wrap = AnyState::Wgpu;
                $body
            }
            #[cfg(feature = "cuda")]
            AnyDecoder::Cuda($d) => {
                let $wrap = AnyState::Cuda;
                $body
            }
        }
    };
}

/// `$body` with the model's decoder `$d` and the state's inner state `$s` of the same backend.
macro_rules! on_state {
    ($model:expr, $state:expr, |$d:ident, $s:ident| $body:expr) => {
        match (&$model.decoder, $state) {
            (AnyDecoder::Cpu($d), AnyState::Cpu($s)) => $body,
            #[cfg(feature = "wgpu")]
            (AnyDecoder::Wgpu($d), AnyState::Wgpu($s)) => $body,
            #[cfg(feature = "cuda")]
            (AnyDecoder::Cuda($d), AnyState::Cuda($s)) => $body,
            #[allow(unreachable_patterns)]
            _ => Err(another_models_state()),
        }
    };
}

fn another_models_state() -> EngineError {
    EngineError::InvalidInput("this state belongs to another model".into())
}

/// Every model gets its own number, so that a state is never used with another model (even
/// one of the same shape, whose decoder would accept it).
static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

/// Where and how to open a model.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The backend.
    pub device: DeviceKind,
    /// Split the model: its first blocks on `device` (a GPU), the rest on the fused CPU decoder.
    pub n_gpu_layers: Option<GpuLayers>,
    /// Tokens of context a split's GPU part keeps room for.
    pub context: usize,
    /// Threads of the CPU decoder (`0`: the kernels' default).
    pub threads: usize,
    /// A tokenizer file; by default the one next to the model, if there is one.
    pub tokenizer: Option<std::path::PathBuf>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            device: DeviceKind::Ndarray,
            n_gpu_layers: None,
            context: 4096,
            threads: 0,
            tokenizer: None,
        }
    }
}

/// A model ready to read and generate, with its config and (if found) its tokenizer.
#[derive(Debug)]
pub struct Model {
    id: u64,
    decoder: AnyDecoder,
    config: BitLlamaConfig,
    tokenizer: Option<Tokenizer>,
    device: DeviceKind,
}

/// What a [`Model`] has read of one sequence.
#[derive(Debug, Clone)]
pub struct State {
    model_id: u64,
    inner: AnyState,
}

impl State {
    /// Tokens read so far.
    pub fn position(&self) -> usize {
        match &self.inner {
            AnyState::Cpu(s) => s.position(),
            #[cfg(feature = "wgpu")]
            AnyState::Wgpu(s) => s.position(),
            #[cfg(feature = "cuda")]
            AnyState::Cuda(s) => s.position(),
        }
    }
}

impl Model {
    /// Opens a model directory or a packed file (memory-mapped) as `options` say.
    ///
    /// # Errors
    /// A device that is not compiled in or cannot be opened, a split on the CPU, what loading
    /// the model returns, and a tokenizer given that cannot be loaded (one missing next to the
    /// model is no error: the model then takes ids only).
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self, EngineError> {
        let device = options.device.check()?;
        if device == DeviceKind::Ndarray && options.n_gpu_layers.is_some() {
            return Err(EngineError::InvalidInput(
                "n_gpu_layers splits a model between a GPU and the CPU: give device=\"wgpu\" or \"cuda\"".into(),
            ));
        }
        let tokenizer = match &options.tokenizer {
            Some(file) => Some(Tokenizer::load(file)?),
            None => match Tokenizer::find(None, path) {
                Ok(t) => Some(t),
                Err(TrainError::NoTokenizerFor(_)) => None,
                Err(e) => return Err(e.into()),
            },
        };
        let (decoder, config) = match device {
            DeviceKind::Ndarray => {
                let (d, c) = open_on::<burn::backend::NdArray>(path, options, &Default::default())?;
                (AnyDecoder::Cpu(d), c)
            }
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => {
                let (d, c) = open_on::<burn::backend::Wgpu>(path, options, &Default::default())?;
                (AnyDecoder::Wgpu(d), c)
            }
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => {
                let (d, c) = open_on::<burn::backend::Cuda>(path, options, &Default::default())?;
                (AnyDecoder::Cuda(d), c)
            }
            #[allow(unreachable_patterns)]
            other => return Err(other.check().unwrap_err().into()),
        };
        if let Some(t) = &tokenizer {
            if t.vocab_size() > config.vocab_size {
                return Err(EngineError::InvalidInput(format!(
                    "the tokenizer has {} tokens but the model only {}: wrong tokenizer?",
                    t.vocab_size(),
                    config.vocab_size
                )));
            }
        }
        Ok(Self {
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            decoder,
            config,
            tokenizer,
            device,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &BitLlamaConfig {
        &self.config
    }

    /// The tokenizer found or given at [`open`](Self::open), if any.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The backend the model runs on.
    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// The engine: `"fused"` (the CPU decoder), `"burn"` (Burn's ops on a GPU) or `"hybrid"`.
    pub fn engine(&self) -> &'static str {
        let kind = on_decoder!(self, |d, _wrap| d.kind());
        match kind {
            DecoderKind::Fused => "fused",
            DecoderKind::Burn => "burn",
            DecoderKind::Hybrid => "hybrid",
        }
    }

    /// The vocabulary size: ids must be below it.
    pub fn vocab_size(&self) -> usize {
        on_decoder!(self, |d, _wrap| d.vocab_size())
    }

    /// The state before any token.
    pub fn new_state(&self) -> State {
        let inner = on_decoder!(self, |d, wrap| wrap(d.new_state()));
        State {
            model_id: self.id,
            inner,
        }
    }

    /// The logits at every position of `batch` sequences of `seq` tokens each (`ids` row by
    /// row), each read from no context: `[batch · seq · vocab_size]`.
    ///
    /// # Errors
    /// [`EngineError::InvalidInput`] for no tokens, a length that is not `batch · seq`, or an
    /// id not below the vocabulary size (checked before anything is computed).
    pub fn forward(&self, ids: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>, EngineError> {
        if batch == 0 || seq == 0 {
            return Err(EngineError::InvalidInput(format!(
                "ids of shape [{batch}, {seq}]: nothing to read"
            )));
        }
        if ids.len() != batch * seq {
            return Err(EngineError::InvalidInput(format!(
                "{} ids are not {batch} sequences of {seq}",
                ids.len()
            )));
        }
        self.check_ids(ids)?;
        let mut logits = Vec::with_capacity(ids.len() * self.vocab_size());
        for row in ids.chunks_exact(seq) {
            let mut state = self.new_state();
            logits.extend(self.read_rows(row, &mut state, true)?);
        }
        Ok(logits)
    }

    /// Reads `ids` after everything `state` has read; returns the logits of the next token,
    /// `[vocab_size]`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward); a state of another model. `state` is unchanged then.
    pub fn read(&self, ids: &[u32], state: &mut State) -> Result<Vec<f32>, EngineError> {
        self.check_ids(ids)?;
        self.read_rows(ids, state, false)
    }

    fn read_rows(
        &self,
        ids: &[u32],
        state: &mut State,
        all: bool,
    ) -> Result<Vec<f32>, EngineError> {
        self.check_owner(state)?;
        on_state!(self, &mut state.inner, |d, s| Ok(if all {
            d.read_all(ids, s)?
        } else {
            d.read(ids, s)?
        }))
    }

    /// Writes `state` to a `.soul` file (atomically); any engine of this model continues from
    /// it.
    ///
    /// # Errors
    /// A state of another model; I/O errors.
    pub fn save_state(&self, state: &State, path: &Path) -> Result<(), EngineError> {
        self.check_owner(state)?;
        on_state!(self, &state.inner, |d, s| Ok(d.save_state(s, path)?))
    }

    /// Restores a state saved by [`save_state`](Self::save_state) (or by the command line, or
    /// the library) for this model.
    ///
    /// # Errors
    /// A missing file; a file that is not a state of this model.
    pub fn load_state(&self, path: &Path) -> Result<State, EngineError> {
        let inner = on_decoder!(self, |d, wrap| wrap(d.load_state(path)?));
        Ok(State {
            model_id: self.id,
            inner,
        })
    }

    fn check_owner(&self, state: &State) -> Result<(), EngineError> {
        if state.model_id == self.id {
            Ok(())
        } else {
            Err(another_models_state())
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("no ids to read".into()));
        }
        let vocab = self.vocab_size();
        if let Some((index, &bad)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(EngineError::InvalidInput(format!(
                "id {bad} at index {index} is out of range for a vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// The tokenizer, or the error that says how to give one.
    ///
    /// # Errors
    /// [`EngineError::InvalidInput`] when the model has none.
    pub fn require_tokenizer(&self) -> Result<&Tokenizer, EngineError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            EngineError::InvalidInput(
                "the model has no tokenizer (no tokenizer.json next to it): load it with tokenizer=PATH, or pass ids".into(),
            )
        })
    }
}

/// Opens the decoder of `path` on backend `B`: a split when asked for, else the engine the
/// library picks for `B` (the fused decoder on the CPU, Burn's ops on a GPU).
fn open_on<B: TernaryBackend>(
    path: &Path,
    options: &OpenOptions,
    device: &B::Device,
) -> Result<(Decoder<B>, BitLlamaConfig), EngineError> {
    match options.n_gpu_layers {
        Some(layers) => {
            let hybrid =
                HybridDecoder::<B>::open(path, layers, options.context, device, options.threads)?;
            Ok((Decoder::hybrid(hybrid), packed_config(path)?))
        }
        None => {
            let (model, config) = BitLlama::<B>::open(path, device)?;
            Ok((
                Decoder::new(model, DecoderChoice::Auto, options.threads)?,
                config,
            ))
        }
    }
}

/// A generation pulled one text piece at a time: what `generate` loops over and `stream`
/// hands out. Text ends at a stop token, after `max_new_tokens`, or just before the first
/// stop string; text that could be the start of a stop string is held back until it is known
/// not to be one.
#[derive(Debug)]
pub struct TextGeneration {
    tokens: TokenStream,
    pieces: TextStream,
    stop: Vec<String>,
    /// Decoded text not yet handed out (it may begin a stop string).
    held: String,
    finished: bool,
}

impl TextGeneration {
    /// Reads `prompt` into `state` and prepares to generate.
    ///
    /// # Errors
    /// Bad sampling settings, an empty stop string, bad ids, a state of another model, or a
    /// model without a tokenizer.
    pub fn start(
        model: &Model,
        state: &mut State,
        prompt: &[u32],
        config: GenerationConfig,
        stop: Vec<String>,
    ) -> Result<Self, EngineError> {
        model.require_tokenizer()?;
        if stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidInput(
                "a stop string must not be empty".into(),
            ));
        }
        config.sampling.validate()?;
        model.check_ids(prompt)?;
        let tokens = TokenStream::start(prompt, config, |ids| {
            model.read_rows(ids, state, false).map_err(into_model_error)
        })
        .map_err(EngineError::from)?;
        Ok(Self {
            tokens,
            pieces: TextStream::default(),
            stop,
            held: String::new(),
            finished: false,
        })
    }

    /// Tokens generated so far.
    pub fn tokens_generated(&self) -> usize {
        self.tokens.generated()
    }

    /// The next piece of text (never empty), or `None` when the generation has ended.
    ///
    /// # Errors
    /// What reading a token or decoding it returns; the generation ends then.
    pub fn next_piece(
        &mut self,
        model: &Model,
        state: &mut State,
    ) -> Result<Option<String>, EngineError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            let tokenizer = model.require_tokenizer()?;
            let token = self
                .tokens
                .next_token(|ids| model.read_rows(ids, state, false).map_err(into_model_error));
            let token = match token {
                Ok(t) => t,
                Err(e) => {
                    self.finished = true;
                    return Err(e.into());
                }
            };
            let Some(token) = token else {
                // The end: a character the last token left unfinished comes out too.
                self.finished = true;
                self.held.push_str(&self.pieces.finish(tokenizer)?);
                if let Some(at) = self.first_stop() {
                    self.held.truncate(at);
                }
                let rest = std::mem::take(&mut self.held);
                return Ok((!rest.is_empty()).then_some(rest));
            };
            self.held.push_str(&self.pieces.push(tokenizer, token)?);
            if let Some(at) = self.first_stop() {
                self.finished = true;
                self.held.truncate(at);
                let rest = std::mem::take(&mut self.held);
                return Ok((!rest.is_empty()).then_some(rest));
            }
            let keep = held_back(&self.held, &self.stop);
            if keep < self.held.len() {
                let rest = self.held.split_off(self.held.len() - keep);
                return Ok(Some(std::mem::replace(&mut self.held, rest)));
            }
        }
    }
}

impl TextGeneration {
    /// Where the first stop string begins in the held text.
    fn first_stop(&self) -> Option<usize> {
        self.stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }
}

/// The model library's errors pass through the token stream as they are; ours become
/// invalid input there (they are all argument errors).
fn into_model_error(e: EngineError) -> BitTttError {
    match e {
        EngineError::Model(e) => e,
        other => BitTttError::InvalidInput(other.to_string()),
    }
}

/// How many bytes at the end of `text` could begin one of `stop` (the longest such suffix,
/// on a character boundary).
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut keep = 0;
    for s in stop {
        for (end, _) in s.char_indices().skip(1) {
            // A proper prefix of `s` of `end` bytes, at the end of `text`.
            if end > keep && text.ends_with(&s[..end]) {
                keep = end;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use bit_ttt_burn::SamplingConfig;
    use std::ops::ControlFlow;

    type B = burn::backend::NdArray;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A model directory holding a tiny random TTT-Linear model and a tokenizer trained on a
    /// little text.
    fn model_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little \
                    or no money in my purse, I thought I would sail about a little.\n"
            .repeat(8);
        let tokenizer = Tokenizer::train(&[text], 300).unwrap();
        tokenizer
            .save(&dir.path().join(bit_ttt_burn::model::files::TOKENIZER_FILE))
            .unwrap();
        let config = BitLlamaConfig::tiny(tokenizer.vocab_size());
        let model = config.init::<B>(&Default::default());
        model.save(&config, dir.path()).unwrap();
        dir
    }

    #[test]
    fn forward_reads_each_row_from_no_context_and_checks_its_input() {
        let dir = model_dir();
        let model = Model::open(dir.path(), &OpenOptions::default()).unwrap();
        assert_eq!(model.engine(), "fused");
        assert!(model.tokenizer().is_some());
        let vocab = model.vocab_size();
        let ids = [5u32, 9, 2, 33, 7, 1, 40, 3];
        let logits = model.forward(&ids, 2, 4).unwrap();
        assert_eq!(logits.len(), 2 * 4 * vocab);
        // Row 1 equals reading its tokens alone; the last position equals `read`.
        let mut state = model.new_state();
        let row1 = model.forward(&ids[4..], 1, 4).unwrap();
        assert_eq!(&logits[4 * vocab..], &row1[..]);
        let last = model.read(&ids[4..], &mut state).unwrap();
        assert_eq!(&row1[3 * vocab..], &last[..]);
        assert_eq!(state.position(), 4);

        for (ids, batch, seq, what) in [
            (&ids[..], 3, 3, "are not 3 sequences of 3"),
            (&ids[..0], 0, 4, "nothing to read"),
            (&[1, vocab as u32][..], 1, 2, "out of range"),
        ] {
            let err = model.forward(ids, batch, seq).unwrap_err();
            assert!(matches!(err, EngineError::InvalidInput(_)), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        let err = model.read(&[], &mut state).unwrap_err();
        assert!(err.to_string().contains("no ids"), "{err}");
        assert_eq!(state.position(), 4);
    }

    /// A state belongs to the model that made it, even against a twin of the same shape; a
    /// saved state continues exactly where it stopped.
    #[test]
    fn states_belong_to_their_model_and_continue_after_a_save() {
        let dir = model_dir();
        let model = Model::open(dir.path(), &OpenOptions::default()).unwrap();
        let twin = Model::open(dir.path(), &OpenOptions::default()).unwrap();
        let mut state = model.new_state();
        // 8 tokens: two whole mini-batches of 4, where the saved state is exact.
        model.read(&[3, 4, 5, 6, 7, 8, 9, 10], &mut state).unwrap();
        let err = twin.read(&[1], &mut state.clone()).unwrap_err();
        assert!(err.to_string().contains("another model"), "{err}");
        let file = dir.path().join("s.soul");
        assert!(twin.save_state(&state, &file).is_err());
        model.save_state(&state, &file).unwrap();
        let mut restored = model.load_state(&file).unwrap();
        assert_eq!(restored.position(), 8);
        let a = model.read(&[11, 12, 13], &mut state).unwrap();
        let b = model.read(&[11, 12, 13], &mut restored).unwrap();
        assert_eq!(a, b);
        // The twin restores it too: the file is the model's, not the object's.
        assert_eq!(twin.load_state(&file).unwrap().position(), 8);
        assert!(matches!(
            model.load_state(&dir.path().join("missing.soul")),
            Err(EngineError::Model(BitTttError::MissingFile(_)))
        ));
    }

    /// The pieces of a generation are the text of the tokens the library generates with the
    /// same settings; a stop string cuts the text before it, wherever the pieces split.
    #[test]
    fn generation_pieces_are_the_librarys_tokens_and_stop_strings_cut_them() {
        let dir = model_dir();
        let model = Model::open(dir.path(), &OpenOptions::default()).unwrap();
        let tokenizer = model.tokenizer().unwrap().clone();
        let prompt = tokenizer.encode("Call me").unwrap();
        let config = GenerationConfig {
            max_new_tokens: 24,
            sampling: SamplingConfig {
                temperature: 1.0,
                top_k: None,
                top_p: None,
                seed: 7,
            },
            stop_tokens: vec![],
        };
        let (bare, _) = BitLlama::<B>::open(dir.path(), &Default::default()).unwrap();
        let decoder = Decoder::new(bare, DecoderChoice::Auto, 0).unwrap();
        let tokens = decoder
            .generate(&prompt, &config, &mut decoder.new_state(), |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        let expected = tokenizer.decode(&tokens).unwrap();

        let run = |stop: Vec<String>| {
            let mut state = model.new_state();
            let mut generation =
                TextGeneration::start(&model, &mut state, &prompt, config.clone(), stop).unwrap();
            let mut pieces = Vec::new();
            while let Some(p) = generation.next_piece(&model, &mut state).unwrap() {
                assert!(!p.is_empty());
                pieces.push(p);
            }
            assert_eq!(generation.next_piece(&model, &mut state).unwrap(), None);
            pieces.concat()
        };
        assert_eq!(run(vec![]), expected);
        // Cut at a stop string taken from the middle of the text.
        let chars: Vec<char> = expected.chars().collect();
        let cut: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let at = expected.find(&cut).unwrap();
        assert_eq!(run(vec![cut.clone()]), expected[..at]);
        assert_eq!(run(vec!["no such text \u{1}".into()]), expected);

        let mut state = model.new_state();
        let err = TextGeneration::start(&model, &mut state, &prompt, config, vec![String::new()])
            .unwrap_err();
        assert!(err.to_string().contains("stop string"), "{err}");
    }

    #[test]
    fn a_split_on_the_cpu_and_a_missing_model_are_errors() {
        let dir = model_dir();
        let options = OpenOptions {
            n_gpu_layers: Some(GpuLayers::Count(1)),
            ..OpenOptions::default()
        };
        let err = Model::open(dir.path(), &options).unwrap_err();
        assert!(err.to_string().contains("n_gpu_layers"), "{err}");
        let err = Model::open(&dir.path().join("nothing"), &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(err, EngineError::Model(BitTttError::NotAModel(_))),
            "{err}"
        );
    }

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_back() {
        assert_eq!(held_back("the whale\n", &stops(&["\n\n"])), 1);
        assert_eq!(held_back("the whale", &stops(&["\n\n"])), 0);
        assert_eq!(held_back("Call me Ish", &stops(&["Ishmael", "me"])), 3);
        assert_eq!(held_back("Call m", &stops(&["Ishmael", "me"])), 1);
        // Character boundaries: "é" is two bytes; "xé" ends with the prefix "é" of "éa".
        assert_eq!(held_back("xé", &stops(&["éa"])), 2);
        assert_eq!(held_back("anything", &[]), 0);
    }
}
