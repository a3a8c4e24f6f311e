//! Learning-rate schedule: linear warm-up, then cosine decay to a floor.

use serde::{Deserialize, Serialize};

/// Warm-up + cosine schedule over `total_steps` updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate, reached at the end of the warm-up.
    pub peak_lr: f64,
    /// The floor the cosine decays to.
    pub min_lr: f64,
    /// Updates of linear warm-up.
    pub warmup_steps: usize,
    /// All updates of the run.
    pub total_steps: usize,
}

impl Schedule {
    /// The learning rate of update `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.peak_lr - self.min_lr) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule {
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12); // half way: the mean of peak and floor
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert!((1..110).all(|i| s.lr(i) <= s.lr(i - 1) + 1e-15 || i < 10));
        let no_warmup = Schedule {
            warmup_steps: 0,
            ..s
        };
        assert!((no_warmup.lr(0) - 1e-3).abs() < 1e-12);
    }
}
