//! Count-based baselines, in nats per token on the validation split, for the same targets the
//! model predicts (every validation token but the first):
//!
//! - **unigram** with add-one smoothing: `p(w) = (c(w) + 1) / (N + V)`;
//! - **interpolated bigram** (Jelinek-Mercer): `p(w | v) = λ c(v, w) / c(v) + (1 - λ) p_uni(w)`,
//!   with `p_uni` the add-one unigram and `p(w | v) = p_uni(w)` for an unseen `v`. λ is chosen
//!   honestly, without looking at the validation split: counts from the first 90% of the
//!   training split, λ from a grid of 0.05…0.95 maximizing the likelihood of its last 10%,
//!   then the counts are redone on the whole training split with that λ.

use std::collections::HashMap;

use crate::TrainError;

/// The two baselines' cross-entropies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baselines {
    /// Add-one unigram, nats/token.
    pub unigram: f64,
    /// Interpolated bigram, nats/token.
    pub bigram: f64,
    /// The λ the bigram uses.
    pub lambda: f64,
}

struct Counts {
    vocab: usize,
    unigram: Vec<u64>,
    total: u64,
    /// Count of `v` as a context (followed by something).
    context: Vec<u64>,
    bigram: HashMap<(u32, u32), u64>,
}

impl Counts {
    fn new(tokens: &[u32], vocab: usize) -> Self {
        let mut unigram = vec![0u64; vocab];
        let mut context = vec![0u64; vocab];
        let mut bigram = HashMap::new();
        for &t in tokens {
            unigram[t as usize] += 1;
        }
        for pair in tokens.windows(2) {
            context[pair[0] as usize] += 1;
            *bigram.entry((pair[0], pair[1])).or_insert(0) += 1;
        }
        Self {
            vocab,
            unigram,
            total: tokens.len() as u64,
            context,
            bigram,
        }
    }

    fn p_unigram(&self, w: u32) -> f64 {
        (self.unigram[w as usize] + 1) as f64 / (self.total + self.vocab as u64) as f64
    }

    fn p_bigram(&self, v: u32, w: u32, lambda: f64) -> f64 {
        let uni = self.p_unigram(w);
        let c_v = self.context[v as usize];
        if c_v == 0 {
            return uni;
        }
        let c_vw = self.bigram.get(&(v, w)).copied().unwrap_or(0);
        lambda * c_vw as f64 / c_v as f64 + (1.0 - lambda) * uni
    }

    /// Mean negative log-likelihood of `tokens[1..]`.
    fn unigram_ce(&self, tokens: &[u32]) -> f64 {
        let n = tokens.len().saturating_sub(1).max(1);
        -tokens[1..]
            .iter()
            .map(|&w| self.p_unigram(w).ln())
            .sum::<f64>()
            / n as f64
    }

    /// Mean negative log-likelihood of `tokens[1..]`, each given the one before.
    fn bigram_ce(&self, tokens: &[u32], lambda: f64) -> f64 {
        let n = tokens.len().saturating_sub(1).max(1);
        -tokens
            .windows(2)
            .map(|p| self.p_bigram(p[0], p[1], lambda).ln())
            .sum::<f64>()
            / n as f64
    }
}

/// Fits both baselines on `train` and scores them on `valid`.
///
/// # Errors
/// [`TrainError::NotEnoughData`] if `valid` has fewer than 2 tokens;
/// [`TrainError::InvalidSetting`] for an empty `train` or a token id `>= vocab`.
pub fn compute(train: &[u32], valid: &[u32], vocab: usize) -> Result<Baselines, TrainError> {
    if train.is_empty() {
        return Err(TrainError::InvalidSetting(
            "the train split is empty: no baselines can be fitted".into(),
        ));
    }
    if valid.len() < 2 {
        return Err(TrainError::NotEnoughData {
            split: "validation",
            tokens: valid.len(),
            seq_len: 1,
        });
    }
    if let Some(&bad) = train.iter().chain(valid).find(|&&t| t as usize >= vocab) {
        return Err(TrainError::InvalidSetting(format!(
            "token id {bad} is out of range for a vocabulary of {vocab}"
        )));
    }
    // λ on a held-out tail of the training split.
    let cut = train.len() * 9 / 10;
    let (fit, held) = train.split_at(cut);
    let lambda = if held.len() >= 2 && fit.len() >= 2 {
        let counts = Counts::new(fit, vocab);
        (1..=19)
            .map(|i| i as f64 * 0.05)
            .min_by(|&a, &b| {
                counts
                    .bigram_ce(held, a)
                    .total_cmp(&counts.bigram_ce(held, b))
            })
            .expect("a non-empty grid")
    } else {
        0.5
    };
    let counts = Counts::new(train, vocab);
    Ok(Baselines {
        unigram: counts.unigram_ce(valid),
        bigram: counts.bigram_ce(valid, lambda),
        lambda,
    })
}

/// The bigram's cross-entropy with a given λ (for tests and experiments).
pub fn bigram_with_lambda(train: &[u32], valid: &[u32], vocab: usize, lambda: f64) -> f64 {
    Counts::new(train, vocab).bigram_ce(valid, lambda)
}

/// The bigram's cross-entropy of each prediction of `valid` (`valid[i + 1]` given `valid[i]`,
/// nats), fitted on `train` with `lambda`: a context-free reference for losses by position.
///
/// # Panics
/// If a token id is `>= vocab` ([`compute`] checks them first).
pub fn bigram_token_losses(train: &[u32], valid: &[u32], vocab: usize, lambda: f64) -> Vec<f64> {
    let counts = Counts::new(train, vocab);
    valid
        .windows(2)
        .map(|p| -counts.p_bigram(p[0], p[1], lambda).ln())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_losses_average_to_the_bigram_cross_entropy() {
        let train: Vec<u32> = (0..500).map(|i| (i * 7 % 13) as u32).collect();
        let valid: Vec<u32> = (0..90).map(|i| (i * 5 % 13) as u32).collect();
        let losses = bigram_token_losses(&train, &valid, 13, 0.7);
        assert_eq!(losses.len(), 89);
        let mean = losses.iter().sum::<f64>() / 89.0;
        assert!((mean - bigram_with_lambda(&train, &valid, 13, 0.7)).abs() < 1e-12);
    }

    #[test]
    fn hand_checked_tiny_corpus() {
        // Vocabulary {0, 1, 2}; train = 0 1 0 1 0 2 (N = 6).
        let train = [0u32, 1, 0, 1, 0, 2];
        let valid = [0u32, 1, 2];
        // Unigram counts 3, 2, 1; add-one over N + V = 9: p = 4/9, 3/9, 2/9.
        // Targets 1 and 2: -(ln 3/9 + ln 2/9) / 2.
        let expected_uni = -((3.0f64 / 9.0).ln() + (2.0f64 / 9.0).ln()) / 2.0;
        let b = compute(&train, &valid, 3).unwrap();
        assert!((b.unigram - expected_uni).abs() < 1e-12, "{b:?}");
        // Bigram contexts: c(0) = 3 (0→1, 0→1, 0→2), c(1) = 2 (1→0, 1→0).
        // p(1|0) = λ 2/3 + (1-λ) 3/9; p(2|1) = λ 0/2 + (1-λ) 2/9.
        let l: f64 = 0.5;
        let p1 = l * 2.0 / 3.0 + (1.0 - l) * 3.0 / 9.0;
        let p2 = (1.0 - l) * 2.0 / 9.0;
        let expected_bi = -(p1.ln() + p2.ln()) / 2.0;
        assert!((bigram_with_lambda(&train, &valid, 3, l) - expected_bi).abs() < 1e-12);
        // Unseen context falls back to the unigram.
        let unseen = bigram_with_lambda(&train, &[2, 0], 3, 0.7);
        assert!((unseen + (4.0f64 / 9.0).ln()).abs() < 1e-12);
    }

    #[test]
    fn short_or_out_of_range_data_is_an_error() {
        assert!(matches!(
            compute(&[0, 1, 2], &[1], 3),
            Err(TrainError::NotEnoughData {
                split: "validation",
                tokens: 1,
                ..
            })
        ));
        let err = compute(&[], &[1, 2], 3).unwrap_err();
        assert!(err.to_string().contains("train split is empty"), "{err}");
        let err = compute(&[0, 1, 5], &[1, 2], 3).unwrap_err();
        assert!(err.to_string().contains("token id 5"), "{err}");
    }

    #[test]
    fn bigram_beats_unigram_on_structured_text() {
        // A deterministic cycle: each token predicts the next perfectly.
        let train: Vec<u32> = (0..3000).map(|i| (i % 7) as u32).collect();
        let valid: Vec<u32> = (0..300).map(|i| (i % 7) as u32).collect();
        let b = compute(&train, &valid, 7).unwrap();
        assert!((b.unigram - 7f64.ln()).abs() < 0.01, "{b:?}");
        assert!(b.bigram < 0.1 && b.lambda > 0.9, "{b:?}");
    }
}
