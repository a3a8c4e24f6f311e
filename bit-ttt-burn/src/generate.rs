//! Autoregressive generation with streaming: each token reaches the caller as it is produced.

use std::ops::ControlFlow;

use burn::tensor::{Int, Tensor, TensorData};

use crate::sampling::{Sampler, SamplingConfig};
use crate::{BitLlama, BitTttError, ModelState, TernaryBackend};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingConfig,
    /// Tokens that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
}

impl<B: TernaryBackend> BitLlama<B> {
    /// Reads `tokens` (continuing `state`) and returns the logits of the last one.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if `tokens` is empty or holds an id `>= vocab_size`.
    pub fn read(&self, tokens: &[u32], state: &mut ModelState<B>) -> Result<Vec<f32>, BitTttError> {
        self.read_rows(tokens, state, false)
    }

    /// As [`read`](Self::read), but the logits after every token of `tokens`,
    /// `[tokens.len() · vocab_size]` (row `t` predicts the token after `tokens[t]`).
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_all(
        &self,
        tokens: &[u32],
        state: &mut ModelState<B>,
    ) -> Result<Vec<f32>, BitTttError> {
        self.read_rows(tokens, state, true)
    }

    /// The logits after every token (`all`) or after the last.
    fn read_rows(
        &self,
        tokens: &[u32],
        state: &mut ModelState<B>,
        all: bool,
    ) -> Result<Vec<f32>, BitTttError> {
        let vocab = self.vocab_size();
        if tokens.is_empty() {
            return Err(BitTttError::InvalidInput("no tokens to read".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(BitTttError::InvalidInput(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        let device = self.embedding.weight.device();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &device);
        let logits = self.forward_with_state(input, state)?; // [1, seq, vocab]
        let rows = if all {
            logits
        } else {
            logits.narrow(1, tokens.len() - 1, 1) // [1, 1, vocab]
        };
        Ok(rows.into_data().convert::<f32>().into_vec()?)
    }

    /// Generates after `prompt`, calling `on_token` with each new token as soon as it exists;
    /// `on_token` may return [`ControlFlow::Break`] to stop early. Returns the generated tokens.
    ///
    /// `state` carries what the model has read: pass [`new_state`](Self::new_state) for a fresh
    /// start, or a state restored from a file to continue a long context read earlier. TTT models
    /// carry their fast weights from token to token (constant size); attention models grow a KV cache.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] for an empty prompt (a state restored from a file continues
    /// after at least one new token), an out-of-range id, or bad sampling values.
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        state: &mut ModelState<B>,
        on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Vec<u32>, BitTttError> {
        generate_with(prompt, config, |tokens| self.read(tokens, state), on_token)
    }
}

/// The generation loop over any decoder: `read(tokens)` reads `tokens` after everything read
/// before and returns the logits of the last (as [`BitLlama::read`] and
/// [`CpuDecoder::read`](crate::cpu_decode::CpuDecoder::read) do). Sampling settings are checked
/// before the prompt is read.
///
/// # Errors
/// [`BitTttError::InvalidInput`] for bad sampling values, [`BitTttError::NonFinite`] when the
/// logits hold a NaN or an infinity (a sampler would otherwise pick some token from them
/// silently), or what `read` returns.
pub fn generate_with(
    prompt: &[u32],
    config: &GenerationConfig,
    mut read: impl FnMut(&[u32]) -> Result<Vec<f32>, BitTttError>,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>, BitTttError> {
    let mut stream = TokenStream::start(prompt, config.clone(), &mut read)?;
    let mut generated = Vec::new();
    while let Some(token) = stream.next_token(&mut read)? {
        generated.push(token);
        if on_token(token).is_break() {
            break;
        }
    }
    Ok(generated)
}

/// Generation one token at a time, for callers that pull tokens (an iterator in another
/// language, a server) instead of being called back: [`generate_with`] is a loop over it.
/// Each call is given the same `read` (a decoder and its state): a token is read only when the
/// next one is asked for, so a stream stopped early has read every token but its last.
#[derive(Debug, Clone)]
pub struct TokenStream {
    sampler: Sampler,
    config: GenerationConfig,
    next: Next,
    prompt_len: usize,
    generated: usize,
}

/// What a [`TokenStream`] does on the next call.
#[derive(Debug, Clone)]
enum Next {
    /// Samples from these logits (the prompt's).
    Sample(Vec<f32>),
    /// Reads the last token given out, then samples.
    Read(u32),
    /// Nothing: the stream has ended.
    Done,
}

impl TokenStream {
    /// Checks the sampling settings, then reads `prompt` with `read`.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] for bad sampling values, or what `read` returns.
    pub fn start(
        prompt: &[u32],
        config: GenerationConfig,
        read: impl FnOnce(&[u32]) -> Result<Vec<f32>, BitTttError>,
    ) -> Result<Self, BitTttError> {
        let sampler = Sampler::new(config.sampling.clone())?;
        let logits = read(prompt)?;
        Ok(Self {
            sampler,
            config,
            next: Next::Sample(logits),
            prompt_len: prompt.len(),
            generated: 0,
        })
    }

    /// Tokens given out so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The next token, or `None` at a stop token or after `max_new_tokens` (and ever after).
    ///
    /// # Errors
    /// [`BitTttError::NonFinite`] when the logits hold a NaN or an infinity (a sampler would
    /// otherwise pick some token from them silently), or what `read` returns; the stream ends
    /// then.
    pub fn next_token(
        &mut self,
        read: impl FnOnce(&[u32]) -> Result<Vec<f32>, BitTttError>,
    ) -> Result<Option<u32>, BitTttError> {
        // Whatever happens below, the stream has ended unless it gives out a token.
        let next = std::mem::replace(&mut self.next, Next::Done);
        if self.generated >= self.config.max_new_tokens {
            return Ok(None);
        }
        let logits = match next {
            Next::Sample(logits) => logits,
            Next::Read(token) => read(&[token])?,
            Next::Done => return Ok(None),
        };
        if let Some(index) = logits.iter().position(|v| !v.is_finite()) {
            return Err(BitTttError::NonFinite(format!(
                "the logits for token {} of the sequence (generation step {}) hold {} at token id {index}",
                self.prompt_len + self.generated,
                self.generated + 1,
                logits[index]
            )));
        }
        let token = self.sampler.sample(&logits);
        if self.config.stop_tokens.contains(&token) {
            return Ok(None);
        }
        self.generated += 1;
        self.next = Next::Read(token);
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::Deterministic;
    use crate::model::MixerState;
    use crate::sampling::argmax;
    use crate::{BitLlamaConfig, MixerKind};
    use burn::backend::NdArray;
    use burn::module::Module;

    type B = NdArray;

    /// Greedy generation equals, token by token, the argmax of a full forward pass over the
    /// growing sequence.
    fn greedy_matches_full_forward(mixer: MixerKind) {
        let device = Default::default();
        // A reproducible model: decoding (primal form) and the full forward (dual form) round
        // differently, so a near tie between two logits could flip an argmax; with fixed
        // weights that would show on every run, not now and then.
        let model = BitLlamaConfig::tiny(40)
            .with_mixer(mixer)
            .init::<B>(&device)
            .map(&mut Deterministic(23));
        let prompt = [3u32, 17, 5, 22, 9];
        let config = GenerationConfig {
            max_new_tokens: 32,
            sampling: SamplingConfig::greedy(),
            stop_tokens: vec![],
        };
        let mut streamed = Vec::new();
        let generated = model
            .generate(&prompt, &config, &mut model.new_state(), |t| {
                streamed.push(t);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(generated.len(), 32);
        assert_eq!(streamed, generated);

        let mut sequence: Vec<u32> = prompt.to_vec();
        for &token in &generated {
            let ids: Vec<i64> = sequence.iter().map(|&t| t as i64).collect();
            let input =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, sequence.len()]), &device);
            let logits = model.forward(input).narrow(1, sequence.len() - 1, 1);
            let expected = argmax(&logits.into_data().to_vec::<f32>().unwrap());
            assert_eq!(token, expected, "at position {}", sequence.len());
            sequence.push(token);
        }
    }

    #[test]
    fn greedy_generation_matches_full_forward_attention() {
        greedy_matches_full_forward(MixerKind::Attention);
    }

    #[test]
    fn greedy_generation_matches_full_forward_ttt_linear() {
        greedy_matches_full_forward(MixerKind::TttLinear);
    }

    #[test]
    fn greedy_generation_matches_full_forward_ttt_mlp() {
        greedy_matches_full_forward(MixerKind::TttMlp);
    }

    /// Bytes a TTT model's state holds: the sum of its layers' `TttCache::size_bytes`.
    fn ttt_size_bytes(state: &ModelState<B>) -> usize {
        state.layers.iter().map(MixerState::size_bytes).sum()
    }

    #[test]
    fn ttt_state_size_is_constant_over_2000_tokens() {
        let device = Default::default();
        for mixer in [MixerKind::TttLinear, MixerKind::TttMlp] {
            let model = BitLlamaConfig::tiny(40)
                .with_mixer(mixer)
                .init::<B>(&device);
            let mut state = model.new_state();
            model.read(&[1], &mut state).unwrap();
            let (elements, bytes) = (state.num_elements(), ttt_size_bytes(&state));
            assert!(elements > 0, "{mixer:?}");
            // The state is f32 on NdArray: 4 bytes a value.
            assert_eq!(bytes, 4 * elements, "{mixer:?}");
            for t in 1..2000u32 {
                model.read(&[t % 40], &mut state).unwrap();
                assert_eq!(
                    (state.num_elements(), ttt_size_bytes(&state)),
                    (elements, bytes),
                    "{mixer:?} after {} tokens",
                    t + 1
                );
            }
            assert_eq!(state.position, 2000, "{mixer:?}");
        }
    }

    #[test]
    fn sampling_is_reproducible_and_stops() {
        let device = Default::default();
        let model = BitLlamaConfig::tiny(40)
            .with_mixer(MixerKind::Attention)
            .init::<B>(&device);
        let config = GenerationConfig {
            max_new_tokens: 20,
            sampling: SamplingConfig {
                temperature: 1.0,
                top_k: None,
                top_p: None,
                seed: 7,
            },
            stop_tokens: vec![],
        };
        let run = |c: &GenerationConfig| {
            model
                .generate(&[1, 2], c, &mut model.new_state(), |_| {
                    ControlFlow::Continue(())
                })
                .unwrap()
        };
        let first = run(&config);
        assert_eq!(first, run(&config));
        // Stopping at the third generated token's id returns what came before it.
        let stop = GenerationConfig {
            stop_tokens: vec![first[2]],
            ..config.clone()
        };
        let stopped = run(&stop);
        assert!(stopped.len() <= 2 && first.starts_with(&stopped));
        // A callback can stop early.
        let n = model
            .generate(&[1], &config, &mut model.new_state(), |_| {
                ControlFlow::Break(())
            })
            .unwrap();
        assert_eq!(n.len(), 1);
    }

    #[test]
    fn non_finite_logits_are_an_error_naming_the_step() {
        let config = GenerationConfig {
            max_new_tokens: 5,
            sampling: SamplingConfig::greedy(),
            stop_tokens: vec![],
        };
        // A decoder whose logits turn NaN after two generated tokens.
        let mut calls = 0;
        let err = generate_with(
            &[1, 2, 3],
            &config,
            |_| {
                calls += 1;
                Ok(if calls == 3 {
                    vec![0.5, f32::NAN, 1.0]
                } else {
                    vec![0.0, 1.0, 0.0]
                })
            },
            |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "not finite: the logits for token 5 of the sequence (generation step 3) hold NaN at token id 1"
        );

        // A model whose final norm holds a NaN: an error, not token 0.
        let device = Default::default();
        let mut model = BitLlamaConfig::tiny(40).init::<B>(&device);
        let gamma = model.norm.gamma.val();
        model.norm.gamma = burn::module::Param::from_tensor(gamma.mul_scalar(f32::NAN));
        let err = model
            .generate(&[1], &config, &mut model.new_state(), |_| {
                ControlFlow::Continue(())
            })
            .unwrap_err();
        assert!(matches!(err, BitTttError::NonFinite(_)), "{err}");
    }

    #[test]
    fn states_of_another_model_are_errors_not_panics() {
        let device = Default::default();
        let ttt = BitLlamaConfig::tiny(40).init::<B>(&device);
        let attention = BitLlamaConfig::tiny(40)
            .with_mixer(MixerKind::Attention)
            .init::<B>(&device);
        let deeper = BitLlamaConfig {
            n_layers: 3,
            ..BitLlamaConfig::tiny(40)
        }
        .init::<B>(&device);
        let mlp = BitLlamaConfig::tiny(40)
            .with_mixer(MixerKind::TttMlp)
            .init::<B>(&device);
        let cases = [
            (
                ttt.new_state(),
                &deeper,
                "a state of 2 layers for a model of 3 blocks",
            ),
            (attention.new_state(), &ttt, "layer 0's attention state"),
            (ttt.new_state(), &attention, "layer 0's TTT state"),
            (mlp.new_state(), &ttt, "layer 0's TTT state"),
            (ttt.new_batch_state(2), &ttt, "for a batch of 1"),
        ];
        for (mut state, model, expected) in cases {
            let before = state.position;
            let err = model.read(&[1, 2], &mut state).unwrap_err();
            assert!(
                matches!(&err, BitTttError::InvalidCache(m) if m.contains(expected)),
                "{expected}: {err}"
            );
            assert_eq!(state.position, before);
        }
    }

    /// A stream pulled token by token gives what `generate` gives, reads nothing after its
    /// last token, ends at `max_new_tokens` or a stop token and stays ended; an error from
    /// `read` ends it too.
    #[test]
    fn a_pulled_stream_is_generate_token_by_token() {
        let device = Default::default();
        let model = BitLlamaConfig::tiny(40)
            .with_mixer(MixerKind::TttLinear)
            .init::<B>(&device)
            .map(&mut Deterministic(5));
        let prompt = [3u32, 17, 5];
        let config = GenerationConfig {
            max_new_tokens: 9,
            sampling: SamplingConfig {
                temperature: 0.9,
                top_k: Some(10),
                top_p: None,
                seed: 3,
            },
            stop_tokens: vec![],
        };
        let expected = model
            .generate(&prompt, &config, &mut model.new_state(), |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        let mut state = model.new_state();
        let mut stream =
            TokenStream::start(&prompt, config.clone(), |t| model.read(t, &mut state)).unwrap();
        let mut pulled = Vec::new();
        while let Some(t) = stream.next_token(|t| model.read(t, &mut state)).unwrap() {
            pulled.push(t);
        }
        assert_eq!(pulled, expected);
        assert_eq!(stream.generated(), 9);
        // The prompt and every token but the last were read.
        assert_eq!(state.position, prompt.len() + 8);
        assert_eq!(stream.next_token(|_| unreachable!()).unwrap(), None);

        // A stop token: the stream ends before it, for good.
        let stop = GenerationConfig {
            stop_tokens: vec![expected[2]],
            ..config.clone()
        };
        let mut state = model.new_state();
        let mut stream = TokenStream::start(&prompt, stop, |t| model.read(t, &mut state)).unwrap();
        let mut pulled = Vec::new();
        while let Some(t) = stream.next_token(|t| model.read(t, &mut state)).unwrap() {
            pulled.push(t);
        }
        let before_stop: Vec<u32> = expected
            .iter()
            .copied()
            .take_while(|&t| t != expected[2])
            .collect();
        assert_eq!(pulled, before_stop);
        assert_eq!(stream.next_token(|_| unreachable!()).unwrap(), None);

        // A failing read ends the stream with its error.
        let mut stream =
            TokenStream::start(&prompt, config, |t| model.read(t, &mut model.new_state())).unwrap();
        assert!(stream.next_token(|_| unreachable!()).unwrap().is_some());
        let err = stream
            .next_token(|_| Err(BitTttError::InvalidInput("gone".into())))
            .unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
        assert_eq!(stream.next_token(|_| unreachable!()).unwrap(), None);
    }

    #[test]
    fn bad_prompts_are_errors() {
        let device = Default::default();
        let model = BitLlamaConfig::tiny(40)
            .with_mixer(MixerKind::Attention)
            .init::<B>(&device);
        let config = GenerationConfig {
            max_new_tokens: 1,
            sampling: SamplingConfig::greedy(),
            stop_tokens: vec![],
        };
        let mut state = model.new_state();
        assert!(matches!(
            model.generate(&[], &config, &mut state, |_| ControlFlow::Continue(())),
            Err(BitTttError::InvalidInput(_))
        ));
        let err = model
            .generate(&[1, 40], &config, &mut state, |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert!(
            err.to_string().contains("token id 40 is out of range"),
            "{err}"
        );
    }
}
