//! Next-token cross-entropy: the training loss of a batch, its gradients computed on several
//! threads, and evaluations of token streams by position within the window.

use bit_ttt_burn::{BitLlama, TernaryBackend};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

/// Position buckets of [`Evaluation::buckets`]: tokens 0–16, 16–64, 64–256 and 256 on of a
/// window (the position of the token that predicts; position 0 has no context before it).
pub const POSITION_EDGES: [usize; 3] = [16, 64, 256];

/// Compute threads by default: `RAYON_NUM_THREADS` when set (`--launch-local` sets it to 1
/// for each process), else one per available CPU.
pub fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Cross-entropy (nats) of every next-token prediction of windows `[batch, n + 1]`,
/// `[batch, n]`.
pub fn token_losses<B: TernaryBackend>(
    model: &BitLlama<B>,
    windows: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let [batch, len] = windows.dims();
    let n = len - 1;
    let inputs = windows.clone().narrow(1, 0, n);
    let targets = windows.narrow(1, 1, n).reshape([batch * n, 1]);
    let logits = model.forward(inputs); // [batch, n, vocab]
    let vocab = logits.dims()[2];
    let log_probs = log_softmax(logits.reshape([batch * n, vocab]), 1);
    log_probs.gather(1, targets).neg().reshape([batch, n])
}

/// Mean next-token cross-entropy (nats) of windows `[batch, n + 1]`.
pub fn lm_loss<B: TernaryBackend>(model: &BitLlama<B>, windows: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    token_losses(model, windows).mean()
}

/// The mean loss of a batch of windows `[rows, n + 1]` and its gradients, the rows split in
/// `threads` nearly equal parts computed at the same time (Burn's ndarray backend runs each
/// operation on one core). Each part runs on its own copy of the model (same parameter ids,
/// fresh autodiff leaves, so the parts' graphs stay apart); its loss is weighted by its share
/// of the rows, and the parts' gradients are added in row order, so the result depends on the
/// thread count only through floating-point rounding. `threads` ≤ 1, or a single row, runs the
/// batch as one graph on the calling thread.
pub fn batch_gradients<B: AutodiffBackend + TernaryBackend>(
    model: &BitLlama<B>,
    windows: Tensor<B, 2, Int>,
    threads: usize,
) -> (f64, GradientsParams) {
    let rows = windows.dims()[0];
    let parts = threads.clamp(1, rows.max(1));
    if parts == 1 {
        let loss = lm_loss(model, windows);
        let value: f64 = loss.clone().into_scalar().elem();
        return (value, GradientsParams::from_grads(loss.backward(), model));
    }
    let device = windows.device();
    // Each weight quantized once for all parts, on all threads.
    let shared = std::sync::Arc::new(model.shared_weight_codes(parts));
    let bounds: Vec<(usize, usize)> = (0..parts)
        .map(|p| (p * rows / parts, (p + 1) * rows / parts))
        .collect();
    let results: Vec<(f64, GradientsParams)> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds
            .iter()
            .map(|&(start, end)| {
                let part = windows.clone().narrow(0, start, end - start); // [end - start, n + 1]
                let local = model.clone().fork(&device);
                let shared = shared.clone();
                scope.spawn(move || {
                    let weight = (end - start) as f64 / rows as f64;
                    let loss = shared.scope(|| lm_loss(&local, part)).mul_scalar(weight);
                    let value: f64 = loss.clone().into_scalar().elem();
                    (value, GradientsParams::from_grads(loss.backward(), &local))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut results = results.into_iter();
    let (mut loss, mut total) = results.next().expect("at least one part");
    for (value, grads) in results {
        loss += value;
        model.visit(&mut AddGrads {
            into: &mut total,
            from: grads,
        });
    }
    (loss, total)
}

/// Adds the gradients of `from` into `into`, parameter by parameter.
struct AddGrads<'a> {
    into: &'a mut GradientsParams,
    from: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for AddGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.from.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let sum = match self.into.remove::<B::InnerBackend, D>(param.id) {
            Some(acc) => acc.add(grad),
            None => grad,
        };
        self.into.register(param.id, sum);
    }
}

/// Cross-entropy of a token stream, by position within the evaluation windows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Sum of the cross-entropies (nats) of the predictions made at each position of a window.
    pub loss_by_position: Vec<f64>,
    /// Number of predictions made at each position.
    pub count_by_position: Vec<usize>,
}

/// The mean cross-entropy of the predictions made at positions `start..end` of a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionBucket {
    /// First position.
    pub start: usize,
    /// One past the last position (at most the longest window's length).
    pub end: usize,
    /// Mean cross-entropy, nats/token (NaN without predictions).
    pub mean: f64,
    /// Predictions counted.
    pub count: usize,
}

impl PositionBucket {
    /// `16–64`: its positions.
    pub fn label(&self) -> String {
        format!("{}–{}", self.start, self.end)
    }
}

impl Evaluation {
    /// Counts a prediction made at `position` with cross-entropy `loss`.
    pub fn add(&mut self, position: usize, loss: f64) {
        if self.loss_by_position.len() <= position {
            self.loss_by_position.resize(position + 1, 0.0);
            self.count_by_position.resize(position + 1, 0);
        }
        self.loss_by_position[position] += loss;
        self.count_by_position[position] += 1;
    }

    /// The losses of a stream's predictions (loss `i` predicts token `i + 1`) placed as
    /// [`evaluate_positions`] places them in windows of `window` tokens: at position `i % window`.
    pub fn of_stream(losses: &[f64], window: usize) -> Self {
        let mut evaluation = Self::default();
        for (i, &loss) in losses.iter().enumerate() {
            evaluation.add(i % window.max(1), loss);
        }
        evaluation
    }

    /// Predictions counted.
    pub fn tokens(&self) -> usize {
        self.count_by_position.iter().sum()
    }

    /// Mean cross-entropy, nats/token.
    pub fn mean(&self) -> f64 {
        self.loss_by_position.iter().sum::<f64>() / self.tokens() as f64
    }

    /// The mean cross-entropy of the positions between consecutive `edges` (0 before the first,
    /// the end of the window after the last); buckets past the longest window are left out.
    pub fn buckets(&self, edges: &[usize]) -> Vec<PositionBucket> {
        let len = self.count_by_position.len();
        let mut starts = vec![0];
        starts.extend(edges.iter().copied().filter(|&e| e > 0));
        let mut out = Vec::new();
        for (i, &start) in starts.iter().enumerate() {
            if start >= len {
                break;
            }
            let end = starts.get(i + 1).copied().unwrap_or(usize::MAX);
            let range = start..end.min(len);
            let count: usize = self.count_by_position[range.clone()].iter().sum();
            let sum: f64 = self.loss_by_position[range].iter().sum();
            out.push(PositionBucket {
                start,
                end: end.min(len),
                mean: sum / count as f64,
                count,
            });
        }
        out
    }
}

/// Cross-entropy of `tokens` cut into consecutive windows of `seq_len` predictions (each window
/// starts with no context; the last one may be shorter), `batch_size` windows per forward
/// pass, the batches spread over `threads` threads. Every token but the first is predicted
/// once. The sums are made in window order, so the result does not depend on `threads`.
/// `max_batches` limits the work to the first batches (0: all).
///
/// # Panics
/// If `tokens` has fewer than 2 tokens, `seq_len` or `batch_size` is 0, or `tokens` holds ids
/// outside the model's vocabulary.
pub fn evaluate_positions<B: TernaryBackend>(
    model: &BitLlama<B>,
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
    max_batches: usize,
    threads: usize,
) -> Evaluation {
    assert!(tokens.len() >= 2, "nothing to evaluate");
    let starts: Vec<usize> = (0..tokens.len() - 1).step_by(seq_len).collect();
    let (full, last): (Vec<usize>, Vec<usize>) = starts
        .into_iter()
        .partition(|&s| s + seq_len < tokens.len());
    let mut batches: Vec<(Vec<usize>, usize)> = full
        .chunks(batch_size)
        .map(|c| (c.to_vec(), seq_len))
        .collect();
    if let Some(&s) = last.first() {
        batches.push((vec![s], tokens.len() - 1 - s));
    }
    if max_batches > 0 {
        batches.truncate(max_batches);
    }
    let score = |model: &BitLlama<B>, (starts, n): &(Vec<usize>, usize)| -> Vec<f32> {
        let ids: Vec<i64> = starts
            .iter()
            .flat_map(|&s| tokens[s..=s + n].iter().map(|&t| t as i64))
            .collect();
        let device = model.embedding.weight.device();
        let windows =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [starts.len(), n + 1]), &device);
        let losses = token_losses(model, windows).into_data(); // [windows, n]
        losses.convert::<f32>().into_vec().expect("f32 losses")
    };
    let threads = threads.clamp(1, batches.len().max(1));
    let losses: Vec<Vec<f32>> = if threads == 1 {
        batches.iter().map(|b| score(model, b)).collect()
    } else {
        // Thread t scores batches t, t + threads, …; the results go back in batch order.
        let mut per_thread: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let local = model.clone();
                    let batches = &batches;
                    let score = &score;
                    scope.spawn(move || {
                        batches
                            .iter()
                            .skip(t)
                            .step_by(threads)
                            .map(|b| score(&local, b))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut iters: Vec<_> = per_thread.iter_mut().map(|v| v.drain(..)).collect();
        (0..batches.len())
            .map(|i| iters[i % threads].next().expect("one result per batch"))
            .collect()
    };
    let mut evaluation = Evaluation::default();
    for ((_, n), batch) in batches.iter().zip(&losses) {
        for window in batch.chunks_exact(*n) {
            for (position, &loss) in window.iter().enumerate() {
                evaluation.add(position, loss as f64);
            }
        }
    }
    evaluation
}

/// Mean next-token cross-entropy, nats/token, of [`evaluate_positions`].
///
/// # Panics
/// As [`evaluate_positions`].
pub fn evaluate<B: TernaryBackend>(
    model: &BitLlama<B>,
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
    max_batches: usize,
    threads: usize,
) -> f64 {
    evaluate_positions(model, tokens, seq_len, batch_size, max_batches, threads).mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bit_ttt_burn::BitLlamaConfig;
    use burn::backend::{Autodiff, NdArray};

    type Ad = Autodiff<NdArray>;

    /// Every gradient of `grads`, in visiting order, flattened.
    fn flat_grads(model: &BitLlama<Ad>, grads: &GradientsParams) -> Vec<f32> {
        struct Flat<'a>(&'a GradientsParams, Vec<f32>);
        impl ModuleVisitor<Ad> for Flat<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ad, D>>) {
                let g = self.0.get::<NdArray, D>(param.id).expect("a gradient");
                self.1
                    .extend(g.into_data().convert::<f32>().into_vec::<f32>().unwrap());
            }
        }
        let mut flat = Flat(grads, Vec::new());
        model.visit(&mut flat);
        flat.1
    }

    #[test]
    fn a_batch_split_over_threads_has_the_whole_batch_gradients() {
        let device = Default::default();
        let model = BitLlamaConfig::new(40, 16, 2, 2, 32)
            .with_mini_batch_size(4)
            .init::<Ad>(&device);
        let ids: Vec<i64> = (0..5 * 9).map(|i| (i * 7 + 3) % 40).collect();
        let windows = Tensor::<Ad, 2, Int>::from_data(TensorData::new(ids, [5, 9]), &device);
        let (loss_one, grads_one) = batch_gradients(&model, windows.clone(), 1);
        let want = flat_grads(&model, &grads_one);
        // 3 threads split 5 rows 1 + 2 + 2; 8 threads run 5 parts of one row.
        for threads in [2, 3, 8] {
            let (loss, grads) = batch_gradients(&model, windows.clone(), threads);
            assert!(
                (loss - loss_one).abs() < 1e-5,
                "{threads} threads: {loss} vs {loss_one}"
            );
            let got = flat_grads(&model, &grads);
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f32, |m, g| m.max(g.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * scale,
                    "{threads} threads: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn evaluation_does_not_depend_on_the_thread_count() {
        let device = Default::default();
        let model = BitLlamaConfig::new(40, 16, 2, 2, 32)
            .with_mini_batch_size(4)
            .init::<NdArray>(&device);
        let tokens: Vec<u32> = (0..100).map(|i| (i * 11 + 5) % 40).collect();
        let one = evaluate_positions(&model, &tokens, 8, 3, 0, 1);
        assert_eq!(one.tokens(), 99, "every token but the first");
        assert_eq!(one.count_by_position.len(), 8);
        // A stream's losses placed by position land where the windows put them.
        let stream: Vec<f64> = (0..99).map(|i| i as f64).collect();
        let placed = Evaluation::of_stream(&stream, 8);
        assert_eq!(placed.count_by_position, one.count_by_position);
        assert_eq!(
            placed.loss_by_position[3],
            (0..99).filter(|i| i % 8 == 3).sum::<usize>() as f64
        );
        for threads in [2, 3] {
            assert_eq!(evaluate_positions(&model, &tokens, 8, 3, 0, threads), one);
        }
    }

    #[test]
    fn buckets_average_their_positions() {
        let mut e = Evaluation::default();
        for p in 0..20 {
            e.add(p, p as f64);
        }
        e.add(0, 2.0);
        let b = e.buckets(&POSITION_EDGES);
        assert_eq!(b.len(), 2, "no bucket past the longest window");
        // Positions 0..16: 0 + 1 + ... + 15 + 2 over 17 predictions.
        assert_eq!(b[0].count, 17);
        assert!((b[0].mean - 122.0 / 17.0).abs() < 1e-12);
        // Positions 16..20: (16 + 17 + 18 + 19) / 4.
        assert_eq!((b[1].start, b[1].end, b[1].count), (16, 20, 4));
        assert_eq!(b[1].label(), "16–20");
        assert!((b[1].mean - 17.5).abs() < 1e-12);
        assert_eq!(e.tokens(), 21);
        assert!((e.mean() - (190.0 + 2.0) / 21.0).abs() < 1e-12);
    }
}
