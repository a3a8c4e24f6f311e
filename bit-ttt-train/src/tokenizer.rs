//! Byte-level BPE tokenizers (the HF `tokenizers` crate, pure Rust): training on text, loading
//! and saving `tokenizer.json`, encoding and decoding.

use bit_ttt_burn::model::files::TOKENIZER_FILE;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::TrainError;

/// The end-of-text token every trained tokenizer reserves (id 0).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The smallest vocabulary a byte-level BPE can have: 256 bytes and the end-of-text token.
pub const MIN_VOCAB_SIZE: usize = 257;

/// A byte-level BPE tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Trains a byte-level BPE with `vocab_size` entries (bytes, merges and the end-of-text
    /// token) on `texts`. Deterministic for the same texts and size.
    ///
    /// # Errors
    /// [`TrainError::InvalidSetting`] if `vocab_size < MIN_VOCAB_SIZE`;
    /// [`TrainError::Tokenizer`] if training fails.
    pub fn train(texts: &[String], vocab_size: usize) -> Result<Self, TrainError> {
        if vocab_size < MIN_VOCAB_SIZE {
            return Err(TrainError::InvalidSetting(format!(
                "vocabulary size {vocab_size} is too small: a byte-level BPE needs at least \
                 {MIN_VOCAB_SIZE} entries (256 bytes and {END_OF_TEXT})"
            )));
        }
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build(),
        );
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        // No prefix space, so the text encodes the same whether split into files or not.
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)));
        // Lines train in parallel; the byte-level pre-tokenizer splits at spaces anyway.
        let lines = texts
            .iter()
            .flat_map(|t| t.split_inclusive('\n'))
            .collect::<Vec<_>>();
        inner
            .train(&mut trainer, lines.into_iter())
            .map_err(tok_err)?;
        Ok(Self { inner })
    }

    /// Loads a `tokenizer.json`.
    ///
    /// # Errors
    /// [`TrainError::MissingTokenizer`] or [`TrainError::Tokenizer`] if it does not parse.
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        if !path.is_file() {
            return Err(TrainError::MissingTokenizer(path.to_path_buf()));
        }
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let bad = |e: String| TrainError::Tokenizer(format!("{}: {e}", path.display()));
        // tokenizers 0.22 panics ("Helper") on some bad input instead of returning an error
        // (found by the loader fuzzer): a syntax error inside the decoder section, a `\u`
        // escape that is no code point. JSON syntax is checked first for a clear message;
        // a panic on what remains is this file's error too.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| bad(format!("not JSON: {e}")))?;
        let inner = crate::catch::catch_quietly(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|panic| bad(format!("not a tokenizer: {panic}")))?
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self { inner })
    }

    /// The tokenizer of a model: `explicit` if given, else the `tokenizer.json` next to
    /// `model` (a model directory, one of a run's checkpoints, whose run directory is then
    /// searched too, or a packed file, whose directory is searched).
    ///
    /// # Errors
    /// [`TrainError::MissingTokenizer`] naming where it was looked for; as [`load`](Self::load).
    pub fn find(explicit: Option<&Path>, model: &Path) -> Result<Self, TrainError> {
        if let Some(path) = explicit {
            return Self::load(path);
        }
        // `export` writes the packed file into the model directory, next to the tokenizer.
        let (model_dir, place) = if model.is_file() {
            let place = format!("next to {} (or in its run directory)", model.display());
            (model.parent().unwrap_or(Path::new("")), place)
        } else {
            let place = format!("in {} (or its run directory)", model.display());
            (model, place)
        };
        // A model directory, or a checkpoint inside a run directory (run/checkpoints/step-N).
        let candidates = [
            Some(model_dir.join(TOKENIZER_FILE)),
            model_dir
                .parent()
                .and_then(Path::parent)
                .map(|run| run.join(TOKENIZER_FILE)),
        ];
        for path in candidates.into_iter().flatten() {
            if path.is_file() {
                return Self::load(&path);
            }
        }
        Err(TrainError::NoTokenizerFor(place))
    }

    /// Writes `tokenizer.json` atomically.
    ///
    /// # Errors
    /// [`TrainError::Model`] (an I/O error) or [`TrainError::Tokenizer`].
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let json = self.inner.to_string(true).map_err(tok_err)?;
        bit_ttt_burn::files::write_atomic(path, json.as_bytes())?;
        Ok(())
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (no special tokens added).
    ///
    /// # Errors
    /// [`TrainError::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`.
    ///
    /// # Errors
    /// [`TrainError::Tokenizer`].
    pub fn decode(&self, ids: &[u32]) -> Result<String, TrainError> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The id of the end-of-text token, if the vocabulary has one.
    pub fn end_of_text(&self) -> Option<u32> {
        self.inner.token_to_id(END_OF_TEXT)
    }
}

/// Turns a stream of token ids into text pieces as soon as they form whole characters.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    /// Adds `id` and returns the new text it completes (possibly empty).
    ///
    /// # Errors
    /// [`TrainError::Tokenizer`].
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TrainError> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        // A token may end inside a multi-byte character: wait for the rest.
        if text.ends_with('\u{FFFD}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }

    /// The text not handed out yet, at the end of the stream: what a last token that ended
    /// inside a character left held back (it shows as U+FFFD, as decoding all the ids shows
    /// it), so that the pieces add up to the decoded ids.
    ///
    /// # Errors
    /// [`TrainError::Tokenizer`].
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TrainError> {
        let text = tokenizer.decode(&self.ids)?;
        let rest = text.get(self.printed..).unwrap_or_default().to_string();
        self.printed = self.printed.max(text.len());
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        vec!["the cat sat on the mat. the cat ate the rat.\nthe whale, the whale!\n".repeat(20)]
    }

    /// A stream whose last token ends inside a character holds it back, and `finish` hands
    /// it out, so that the pieces add up to the decoded ids (as `generate` prints them).
    #[test]
    fn a_stream_ending_inside_a_character_hands_out_the_rest_at_finish() {
        let tokenizer = Tokenizer::train(&corpus(), 300).unwrap();
        let a = tokenizer.encode("a").unwrap();
        // Byte 0xE2 (shown as 'â' by the byte-level alphabet): the first of three bytes.
        let lead = tokenizer.inner.token_to_id("â").unwrap();
        let ids = [a.as_slice(), &[lead]].concat();
        let mut stream = TextStream::default();
        let pieces: String = ids
            .iter()
            .map(|&id| stream.push(&tokenizer, id).unwrap())
            .collect();
        assert_eq!(pieces, "a");
        let rest = stream.finish(&tokenizer).unwrap();
        assert_eq!(rest, "\u{FFFD}");
        assert_eq!(pieces + &rest, tokenizer.decode(&ids).unwrap());
        assert_eq!(stream.finish(&tokenizer).unwrap(), "");
    }

    #[test]
    fn trains_round_trips_and_saves() {
        let tokenizer = Tokenizer::train(&corpus(), 300).unwrap();
        assert!(tokenizer.vocab_size() <= 300 && tokenizer.vocab_size() > 257);
        assert_eq!(tokenizer.end_of_text(), Some(0));
        for text in ["the cat sat", "Ünïcödé — 鯨 and\nnewlines  ", "the whale"] {
            let ids = tokenizer.encode(text).unwrap();
            assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        }
        // Merges learnt: "the" is fewer tokens than its 3 bytes.
        assert!(tokenizer.encode("the cat").unwrap().len() < 7);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tokenizer.save(&path).unwrap();
        let loaded = Tokenizer::load(&path).unwrap();
        assert_eq!(
            loaded.encode("the whale sat").unwrap(),
            tokenizer.encode("the whale sat").unwrap()
        );

        // Streaming decode reassembles multi-byte characters.
        let ids = tokenizer.encode("鯨 whale").unwrap();
        let mut stream = TextStream::default();
        let text: String = ids
            .iter()
            .map(|&id| stream.push(&tokenizer, id).unwrap())
            .collect();
        assert_eq!(text, "鯨 whale");
    }

    #[test]
    fn too_small_vocabulary_and_bad_files_are_errors() {
        let err = Tokenizer::train(&corpus(), 100).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Tokenizer::load(&dir.path().join("nope.json")),
            Err(TrainError::MissingTokenizer(_))
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{ not a tokenizer").unwrap();
        assert!(matches!(
            Tokenizer::load(&bad),
            Err(TrainError::Tokenizer(_))
        ));
    }

    /// What the loader fuzzer found: well-formed JSON whose decoder section holds a `\u`
    /// escape that is no code point made `tokenizers` panic; it is an error naming the file.
    #[test]
    fn an_escape_that_is_no_code_point_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        Tokenizer::train(&corpus(), 300)
            .unwrap()
            .save(&path)
            .unwrap();
        let json = std::fs::read_to_string(&path).unwrap();
        let (head, decoder) = json.split_once("\"decoder\"").unwrap();
        let mut panics = 0;
        for escape in ["\\ud800", "\\udfff", "\\udc00\\ud800"] {
            let broken = format!(
                "{head}\"decoder\"{}",
                decoder.replacen("ByteLevel", escape, 1)
            );
            std::fs::write(&path, broken).unwrap();
            match Tokenizer::load(&path) {
                Err(TrainError::Tokenizer(message)) => {
                    assert!(message.contains("tokenizer.json"), "{message}");
                    panics += usize::from(message.contains("not a tokenizer"));
                }
                Err(other) => panic!("another error: {other}"),
                Ok(_) => panic!("{escape} loaded"),
            }
        }
        // The panic path itself was taken (not only the ordinary errors).
        assert!(panics > 0);
    }
}
