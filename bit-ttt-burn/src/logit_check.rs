//! The check that two forms of one model compute the same logits: a model in training form and
//! its packed inference form (or a packed file read back), as `bit-ttt-train export` runs it
//! after writing the packed file.
//!
//! ```no_run
//! # use bit_ttt_burn::{BitLlama, LogitCheck};
//! # use burn::backend::NdArray;
//! # fn run(dir: &std::path::Path, out: &std::path::Path) -> Result<(), bit_ttt_burn::BitTttError> {
//! let device = Default::default();
//! let (model, config) = BitLlama::<NdArray>::load(dir, &device)?;
//! model.save_packed(&config, out)?;
//! let (packed, _) = BitLlama::<NdArray>::load_packed(out, &device)?;
//! let check = model.check_packed_logits(&packed, &LogitCheck::probe_tokens(config.vocab_size))?;
//! assert!(check.max_abs_diff <= 1e-4);
//! # Ok(()) }
//! ```

use burn::tensor::{Int, Tensor, TensorData};

use crate::{BitLlama, BitTttError, TernaryBackend};

/// How far two models' logits are apart on the same tokens: what
/// [`BitLlama::check_packed_logits`] measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitCheck {
    /// The largest absolute difference between corresponding logits; NaN if either model
    /// gave a NaN logit (a broken model must not pass as an exact one).
    pub max_abs_diff: f32,
    /// The largest absolute logit of the reference model (`self` of the check), the scale to
    /// judge [`max_abs_diff`](Self::max_abs_diff) against.
    pub max_abs_logit: f32,
    /// Number of positions compared (each gives `vocab_size` logits).
    pub positions: usize,
}

impl LogitCheck {
    /// Number of tokens [`probe_tokens`](Self::probe_tokens) returns.
    pub const PROBE_LEN: usize = 16;

    /// A short token sequence spread over a vocabulary of `vocab_size` (`i · 37 mod
    /// vocab_size` for `i` in `0..16`): the probe `export` checks a packed file with. Steps of
    /// 37 reach rows of the embedding far apart instead of its first 16. Empty for an empty
    /// vocabulary.
    pub fn probe_tokens(vocab_size: usize) -> Vec<u32> {
        if vocab_size == 0 {
            return Vec::new();
        }
        (0..Self::PROBE_LEN)
            .map(|i| (i * 37 % vocab_size) as u32)
            .collect()
    }

    /// Whether the logits agree within `tolerance` (absolute); false if a logit was NaN.
    pub fn within(&self, tolerance: f32) -> bool {
        self.max_abs_diff <= tolerance
    }
}

impl<B: TernaryBackend> BitLlama<B> {
    /// Runs this model and `packed` (typically this model's packed form, or its packed file
    /// loaded back with [`load_packed`](Self::load_packed)) over `tokens` as one sequence, with
    /// the whole-sequence [`forward`](Self::forward), and compares the logits of every position.
    /// Packing keeps the ternary codes and scales, so the difference should be 0 up to float
    /// summation order.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if `tokens` is empty, the two vocabularies differ, or an
    /// id is not below the vocabulary size; [`BitTttError::Data`] if the logits cannot be read
    /// as f32.
    pub fn check_packed_logits(
        &self,
        packed: &BitLlama<B>,
        tokens: &[u32],
    ) -> Result<LogitCheck, BitTttError> {
        let vocab = self.vocab_size();
        if packed.vocab_size() != vocab {
            return Err(BitTttError::InvalidInput(format!(
                "the models have vocabularies of {vocab} and {} tokens: not two forms of one model",
                packed.vocab_size()
            )));
        }
        if tokens.is_empty() {
            return Err(BitTttError::InvalidInput(
                "no tokens to compare the logits on".into(),
            ));
        }
        // The embedding lookup would panic on an out-of-range id; say which instead.
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(BitTttError::InvalidInput(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let logits = |model: &BitLlama<B>| -> Result<Vec<f32>, BitTttError> {
            let device = model.embedding.weight.device();
            let input = Tensor::<B, 2, Int>::from_data(
                TensorData::new(ids.clone(), [1, ids.len()]),
                &device,
            );
            Ok(model
                .forward(input)
                .into_data()
                .convert::<f32>()
                .into_vec()?)
        };
        let (reference, other) = (logits(self)?, logits(packed)?);
        // `f32::max` drops a NaN operand, so a NaN is carried on explicitly.
        let nan_max = |m: f32, v: f32| {
            if m.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                m.max(v)
            }
        };
        let max_abs_diff = reference
            .iter()
            .zip(&other)
            .fold(0.0f32, |m, (a, b)| nan_max(m, (a - b).abs()));
        let max_abs_logit = reference.iter().fold(0.0f32, |m, v| nan_max(m, v.abs()));
        Ok(LogitCheck {
            max_abs_diff,
            max_abs_logit,
            positions: tokens.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::Deterministic;
    use crate::{BitLlamaConfig, MixerKind};
    use burn::backend::NdArray;
    use burn::module::{Module, Param};

    type B = NdArray;

    /// A seeded ternary model with an f32 head (no bias), its parameters read once (a clone of
    /// an unread lazy parameter would draw other values).
    fn model(seed: u64) -> BitLlama<B> {
        BitLlamaConfig::new(40, 32, 2, 4, 48)
            .with_mini_batch_size(4)
            .with_mixer(MixerKind::TttLinear)
            .init::<B>(&Default::default())
            .map(&mut Deterministic(seed))
    }

    #[test]
    fn probe_tokens_are_distinct_and_in_range() {
        let probe = LogitCheck::probe_tokens(40);
        assert_eq!(probe.len(), LogitCheck::PROBE_LEN);
        assert_eq!(&probe[..4], &[0, 37, 34, 31]);
        let mut sorted = probe.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 16);
        assert!(probe.iter().all(|&t| t < 40));
        // A vocabulary smaller than the probe still gives valid ids.
        assert!(LogitCheck::probe_tokens(3).iter().all(|&t| t < 3));
        assert!(LogitCheck::probe_tokens(0).is_empty());
    }

    #[test]
    fn a_model_against_itself_differs_by_zero() {
        let model = model(5);
        let check = model
            .check_packed_logits(&model, &LogitCheck::probe_tokens(40))
            .unwrap();
        assert_eq!(check.max_abs_diff, 0.0);
        assert!(check.max_abs_logit > 0.0);
        assert_eq!(check.positions, 16);
        assert!(check.within(0.0));
    }

    /// Packing keeps the codes and scales: the packed form's logits equal the training form's
    /// within the tolerance `export`'s test uses (1e-4).
    #[test]
    fn the_packed_form_gives_the_same_logits() {
        let model = model(5);
        let packed = model.clone().into_packed().unwrap();
        let check = model
            .check_packed_logits(&packed, &LogitCheck::probe_tokens(40))
            .unwrap();
        assert!(check.within(1e-4), "{check:?}");
    }

    /// The final norm's scale doubled doubles every logit exactly (the head is f32 without a
    /// bias, and scaling by a power of two rounds the same), so the largest difference is
    /// exactly the largest logit.
    #[test]
    fn doubled_logits_differ_by_the_largest_logit() {
        let model = model(5);
        let mut doubled = model.clone();
        doubled.norm.gamma = Param::from_tensor(doubled.norm.gamma.val() * 2.0);
        let check = model
            .check_packed_logits(&doubled, &LogitCheck::probe_tokens(40))
            .unwrap();
        assert!(check.max_abs_logit > 0.0);
        assert_eq!(check.max_abs_diff, check.max_abs_logit);
        assert!(!check.within(check.max_abs_logit / 2.0));
    }

    #[test]
    fn another_model_differs() {
        let check = model(5)
            .check_packed_logits(&model(6), &LogitCheck::probe_tokens(40))
            .unwrap();
        assert!(check.max_abs_diff > 1e-3, "{check:?}");
    }

    #[test]
    fn a_nan_logit_is_reported_as_nan() {
        let model = model(5);
        let mut broken = model.clone();
        broken.norm.gamma = Param::from_tensor(broken.norm.gamma.val() * f32::NAN);
        let check = model
            .check_packed_logits(&broken, &LogitCheck::probe_tokens(40))
            .unwrap();
        assert!(check.max_abs_diff.is_nan());
        assert!(!check.within(f32::INFINITY));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = model(5);
        let err = model.check_packed_logits(&model, &[]).unwrap_err();
        assert!(matches!(err, BitTttError::InvalidInput(_)), "{err}");
        let err = model.check_packed_logits(&model, &[1, 40]).unwrap_err();
        assert!(err.to_string().contains("token id 40"), "{err}");
        let other = BitLlamaConfig::new(41, 32, 2, 4, 48)
            .with_mini_batch_size(4)
            .init::<B>(&Default::default());
        let err = model.check_packed_logits(&other, &[1]).unwrap_err();
        assert!(err.to_string().contains("40 and 41"), "{err}");
    }
}
