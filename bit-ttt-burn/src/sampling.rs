//! Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

use crate::BitTttError;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (`None`: all).
    pub top_p: Option<f64>,
    /// Seed of the random-number generator: the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Checks the values are in range.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] naming the bad value.
    pub fn validate(&self) -> Result<(), BitTttError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(BitTttError::InvalidInput(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(BitTttError::InvalidInput("top_k must be >= 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(BitTttError::InvalidInput(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// A seeded sampler (SplitMix64), so generation is reproducible without a global RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    state: u64,
}

impl Sampler {
    /// A sampler for `config`.
    ///
    /// # Errors
    /// [`BitTttError::InvalidInput`] if the config is out of range.
    pub fn new(config: SamplingConfig) -> Result<Self, BitTttError> {
        config.validate()?;
        let state = config.seed;
        Ok(Self { config, state })
    }

    fn next_unit(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks a token id from one position's logits.
    ///
    /// # Panics
    /// If `logits` is empty (a programmer error).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        assert!(!logits.is_empty(), "cannot sample from empty logits");
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, most likely first (ties: lower id first).
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.config.top_k {
            order.truncate(k);
        }
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / self.config.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.config.top_p {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut target = self.next_unit() * total;
        for (&id, p) in order.iter().zip(&probs) {
            if target < *p {
                return id as u32;
            }
            target -= p;
        }
        order[order.len() - 1] as u32
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let logits = [1.0, 3.0, 2.9, -5.0];
        let mut s = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_k: Some(1),
            top_p: None,
            seed: 3,
        })
        .unwrap();
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // p(1) ≈ 0.49, p(2) ≈ 0.44, p(0) ≈ 0.07: top_p 0.9 keeps ids 1 and 2 only.
        let mut s = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.9),
            seed: 3,
        })
        .unwrap();
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let config = SamplingConfig {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 42,
        };
        let run = |c: SamplingConfig| {
            let mut s = Sampler::new(c).unwrap();
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(config.clone()), run(config.clone()));
        assert_ne!(
            run(config.clone()),
            run(SamplingConfig { seed: 43, ..config })
        );
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            SamplingConfig {
                temperature: -1.0,
                ..SamplingConfig::default()
            },
            SamplingConfig {
                top_k: Some(0),
                ..SamplingConfig::default()
            },
            SamplingConfig {
                top_p: Some(0.0),
                ..SamplingConfig::default()
            },
            SamplingConfig {
                top_p: Some(1.5),
                ..SamplingConfig::default()
            },
        ] {
            assert!(matches!(
                Sampler::new(bad),
                Err(BitTttError::InvalidInput(_))
            ));
        }
    }
}
