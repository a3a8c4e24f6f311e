//! Data-parallel training across processes (on one machine or several): every process trains
//! on its own rows of each step's batch, the gradients are summed over the group before
//! clipping and AdamW, so every process holds the same weights after every step.
//!
//! The network sits behind [`AllReduce`], a trait of ours with one operation (an element-wise
//! sum of `f32` values over the group): the trainer neither knows nor cares what moves the
//! bytes. [`TcpGroup`] implements it on plain TCP. Burn 0.21's `burn-collective` was the
//! intended transport, but its multi-node all-reduce can run only once per process (its barrier
//! never forgets the previous round's peers, so the second all-reduce waits forever), it binds
//! every interface whatever address is given, and it has no timeouts; later Burn versions
//! dropped the crate. Another transport implements the trait in its own file.
//!
//! What the trainer sums, per step, is one flat buffer: every parameter's gradient in the
//! model's visiting order (the same in every process, unlike Burn's parameter ids, which are
//! random per process), then the batch loss and a stop vote: one network round per step.

mod tcp;

use std::net::SocketAddr;
use std::time::Duration;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

pub use tcp::TcpGroup;

/// What can go wrong in a group of training processes.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// The group's settings are unusable.
    #[error("{0}")]
    InvalidSetting(String),
    /// Another process did not answer in time (it died, hangs, or cannot be reached).
    #[error("{what}: no answer from the group within {} s; a process has stopped or cannot be reached (see its own output); --collective-timeout sets the wait", .timeout.as_secs())]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// Another process closed its connection.
    #[error(
        "rank {rank} closed its connection ({detail}): that process stopped; see its own output"
    )]
    PeerLost {
        /// Its rank.
        rank: usize,
        /// What the socket said.
        detail: String,
    },
    /// The transport failed otherwise.
    #[error("group communication failed: {0}")]
    Collective(String),
    /// The processes do not hold the same thing where they must.
    #[error("the {processes} processes of the group hold different {what}; {hint}")]
    Mismatch {
        /// What differs (weights, data, model, settings).
        what: String,
        /// Group size.
        processes: usize,
        /// What to do about it.
        hint: String,
    },
}

/// An element-wise sum over a group of processes: the one operation data-parallel training
/// needs from the network.
pub trait AllReduce: Send {
    /// This process's rank, `0..processes()`. Rank 0 writes checkpoints and outputs.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn processes(&self) -> usize;
    /// Replaces `values` with their element-wise sum over all processes. Every process calls
    /// it with the same number of values, in the same order of calls.
    ///
    /// # Errors
    /// [`DistributedError`] when the group fails or does not answer in time; the group is then
    /// unusable.
    fn sum(&mut self, values: &mut [f32]) -> Result<(), DistributedError>;
}

/// The largest group: [`check_same`]'s sums stay exact in `f32` up to here.
pub const MAX_PROCESSES: usize = 256;

/// The longest wait for the group, seconds (a week).
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;

/// Where a process of a group listens and whom it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// Processes in the group.
    pub processes: usize,
    /// This process's rank, `0..processes`.
    pub rank: usize,
    /// Rank 0's address: it listens there, the other ranks connect to it.
    pub coordinator: SocketAddr,
    /// How long an all-reduce waits for the group before failing.
    pub timeout: Duration,
    /// How long joining waits for every process to start.
    pub join_timeout: Duration,
}

impl GroupConfig {
    /// Checks the ranks and addresses.
    ///
    /// # Errors
    /// [`DistributedError::InvalidSetting`] naming the bad value.
    pub fn validate(&self) -> Result<(), DistributedError> {
        let bad = |m: String| Err(DistributedError::InvalidSetting(m));
        if !(2..=MAX_PROCESSES).contains(&self.processes) {
            return bad(format!(
                "--processes must be 2 to {MAX_PROCESSES} for a group, got {}",
                self.processes
            ));
        }
        if self.rank >= self.processes {
            return bad(format!(
                "--rank {} is outside 0..{} (--processes {})",
                self.rank, self.processes, self.processes
            ));
        }
        if self.coordinator.port() == 0 {
            return bad("--coordinator needs a port other than 0".into());
        }
        if self.rank > 0 && self.coordinator.ip().is_unspecified() {
            return bad(format!(
                "--coordinator {}: the other ranks need the address of rank 0's machine",
                self.coordinator
            ));
        }
        let longest = Duration::from_secs(MAX_TIMEOUT_S);
        if self.timeout.is_zero()
            || self.join_timeout.is_zero()
            || self.timeout > longest
            || self.join_timeout > longest
        {
            return bad(format!(
                "--collective-timeout must be 1 to {MAX_TIMEOUT_S} seconds"
            ));
        }
        Ok(())
    }
}

/// Values the trainer sums besides the gradients, at the end of the buffer.
const EXTRA_VALUES: usize = 2;

/// One step's result of [`average_gradients`].
#[derive(Debug)]
pub struct GroupStep {
    /// The gradients averaged over the group.
    pub grads: GradientsParams,
    /// The mean of the processes' batch losses (the loss of the whole batch).
    pub loss: f64,
    /// Whether any process asked to stop after this step (Ctrl-C), so all stop together.
    pub stop: bool,
}

/// Averages `grads` (of `model`) over the group, with the processes' losses and stop votes in
/// the same round.
///
/// # Errors
/// The group's [`DistributedError`].
pub fn average_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    loss: f64,
    stop: bool,
    group: &mut dyn AllReduce,
) -> Result<GroupStep, DistributedError> {
    let mut gather = GatherGrads {
        grads,
        flat: Vec::new(),
        parts: Vec::new(),
    };
    model.visit(&mut gather);
    let GatherGrads {
        grads,
        mut flat,
        parts,
    } = gather;
    flat.extend([loss as f32, f32::from(u8::from(stop))]);
    group.sum(&mut flat)?;

    let n = group.processes() as f32;
    let extra = flat.len() - EXTRA_VALUES;
    let loss = f64::from(flat[extra]) / f64::from(n);
    let stop = flat[extra + 1] > 0.0;
    let mut scatter = ScatterGrads {
        grads,
        flat: &flat[..extra],
        parts: parts.into_iter(),
        scale: 1.0 / n,
        offset: 0,
    };
    model.visit(&mut scatter);
    Ok(GroupStep {
        grads: scatter.grads,
        loss,
        stop,
    })
}

/// Where one parameter's gradient lies in the flat buffer (`None`: it has none this step).
struct Part {
    id: ParamId,
    len: Option<usize>,
}

/// Takes the gradients out of [`GradientsParams`] into one flat buffer, in visiting order.
struct GatherGrads {
    grads: GradientsParams,
    flat: Vec<f32>,
    parts: Vec<Part>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GatherGrads {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = self.grads.remove::<B::InnerBackend, D>(param.id);
        let len = grad.map(|g| {
            // Flattened first: many gradients come out of the backward pass transposed, and
            // reading those element by element is several times slower than this reshape's
            // copy into row-major order (ndarray).
            let n = g.shape().num_elements();
            let values = g.reshape([n]).into_data();
            let values = values.convert::<f32>();
            let values = values
                .as_slice::<f32>()
                .expect("converted to f32 just above");
            self.flat.extend_from_slice(values);
            values.len()
        });
        self.parts.push(Part { id: param.id, len });
    }
}

/// Puts the averaged gradients back, parameter by parameter, in the same order.
struct ScatterGrads<'a> {
    grads: GradientsParams,
    flat: &'a [f32],
    parts: std::vec::IntoIter<Part>,
    scale: f32,
    offset: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScatterGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let part = self.parts.next().expect("the same parameters as gathered");
        debug_assert_eq!(part.id, param.id);
        let Some(len) = part.len else {
            return;
        };
        let values: Vec<f32> = self.flat[self.offset..self.offset + len]
            .iter()
            .map(|v| v * self.scale)
            .collect();
        self.offset += len;
        let param = param.val();
        let grad = Tensor::<B::InnerBackend, D>::from_data(
            TensorData::new(values, param.shape()),
            &param.inner().device(),
        );
        self.grads.register::<B::InnerBackend, D>(part.id, grad);
    }
}

/// FNV-1a over every parameter's values (bit patterns), in visiting order.
pub fn weights_fingerprint<B: Backend, M: Module<B>>(model: &M) -> u64 {
    struct Hash(u64);
    impl<B: Backend> ModuleVisitor<B> for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            for v in data.as_slice::<f32>().expect("converted to f32 just above") {
                self.0 = fnv(self.0, &v.to_bits().to_le_bytes());
            }
        }
    }
    let mut hash = Hash(FNV_OFFSET);
    model.visit(&mut hash);
    hash.0
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of `bytes` continuing from `hash`.
pub fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Checks that every process of the group holds the same 64-bit `value`.
///
/// Each process contributes the value's 8 bytes `c` and their squares; with sums `S1 = Σc` and
/// `S2 = Σc²` over `n` processes, `n·S2 = S1²` holds exactly when all `c` are equal
/// (Cauchy–Schwarz), and every sum is an integer below 2^24, exact in `f32`.
///
/// # Errors
/// [`DistributedError::Mismatch`] naming `what` when they differ; the group's own errors.
pub fn check_same(
    group: &mut dyn AllReduce,
    value: u64,
    what: &str,
    hint: &str,
) -> Result<(), DistributedError> {
    let mut values: Vec<f32> = value
        .to_le_bytes()
        .iter()
        .map(|&c| f32::from(c))
        .chain(
            value
                .to_le_bytes()
                .iter()
                .map(|&c| f32::from(c) * f32::from(c)),
        )
        .collect();
    group.sum(&mut values)?;
    let n = group.processes() as f64;
    let (s1, s2) = values.split_at(8);
    let same = s1
        .iter()
        .zip(s2)
        .all(|(&a, &b)| n * f64::from(b) == f64::from(a) * f64::from(a));
    if same {
        Ok(())
    } else {
        Err(DistributedError::Mismatch {
            what: what.to_string(),
            processes: group.processes(),
            hint: hint.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, Mutex};

    /// A group of threads in one process: sums through shared memory.
    struct Threads {
        rank: usize,
        processes: usize,
        barrier: Arc<Barrier>,
        total: Arc<Mutex<Vec<f32>>>,
    }

    impl AllReduce for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn processes(&self) -> usize {
            self.processes
        }
        fn sum(&mut self, values: &mut [f32]) -> Result<(), DistributedError> {
            if self.barrier.wait().is_leader() {
                self.total.lock().unwrap().clear();
            }
            self.barrier.wait();
            {
                let mut total = self.total.lock().unwrap();
                if total.is_empty() {
                    total.resize(values.len(), 0.0);
                }
                for (t, v) in total.iter_mut().zip(values.iter()) {
                    *t += v;
                }
            }
            self.barrier.wait();
            values.copy_from_slice(&self.total.lock().unwrap());
            Ok(())
        }
    }

    fn group(processes: usize) -> Vec<Threads> {
        let barrier = Arc::new(Barrier::new(processes));
        let total = Arc::new(Mutex::new(Vec::new()));
        (0..processes)
            .map(|rank| Threads {
                rank,
                processes,
                barrier: barrier.clone(),
                total: total.clone(),
            })
            .collect()
    }

    /// Runs `f` on every member of a group of `processes` threads.
    fn on_group<T: Send + 'static>(
        processes: usize,
        f: impl Fn(&mut Threads) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = group(processes)
            .into_iter()
            .map(|mut member| {
                let f = f.clone();
                std::thread::spawn(move || f(&mut member))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn equal_values_pass_and_one_differing_byte_fails() {
        for processes in [2, 3, 5] {
            let same = on_group(processes, |g| {
                check_same(g, 0xDEAD_BEEF_0123_4567, "weights", "").is_ok()
            });
            assert!(same.iter().all(|&ok| ok), "{processes}: {same:?}");
            // One process's value differs in a single bit of one byte.
            let differ = on_group(processes, |g| {
                let v = 0xDEAD_BEEF_0123_4567 ^ u64::from(g.rank == 1) << 17;
                check_same(g, v, "weights", "").is_err()
            });
            assert!(
                differ.iter().all(|&failed| failed),
                "{processes}: {differ:?}"
            );
        }
    }

    #[test]
    fn gradients_are_averaged_with_the_losses_and_stop_votes() {
        use bit_ttt_burn::BitLlamaConfig;
        use burn::backend::{Autodiff, NdArray};
        type B = Autodiff<NdArray>;
        let results = on_group(2, |g| {
            let device = Default::default();
            let config = BitLlamaConfig::tiny(16);
            let model = {
                let _guard = crate::train::INIT_LOCK
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                B::seed(&device, 5);
                let model = config.init::<B>(&device);
                model.visit(&mut crate::train::Materialize);
                model
            };
            // Each process its own batch: gradients differ.
            let ids: Vec<i64> = (0..9).map(|i| ((i * 7 + g.rank * 3) % 16) as i64).collect();
            let windows =
                Tensor::<B, 2, burn::tensor::Int>::from_data(TensorData::new(ids, [1, 9]), &device);
            let loss = crate::evaluation::lm_loss(&model, windows);
            let loss_value: f64 = burn::tensor::ElementConversion::elem(loss.clone().into_scalar());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let own: Vec<f32> = grads
                .get::<NdArray, 2>(model.embedding.weight.id)
                .unwrap()
                .into_data()
                .to_vec()
                .unwrap();
            let step = average_gradients(&model, grads, loss_value, g.rank == 1, g).unwrap();
            let averaged: Vec<f32> = step
                .grads
                .get::<NdArray, 2>(model.embedding.weight.id)
                .unwrap()
                .into_data()
                .to_vec()
                .unwrap();
            (loss_value, own, step.loss, step.stop, averaged)
        });
        let (l0, g0, mean0, stop0, avg0) = &results[0];
        let (l1, g1, mean1, stop1, avg1) = &results[1];
        assert!(
            (mean0 - (l0 + l1) / 2.0).abs() < 1e-5,
            "{mean0} vs {l0}, {l1}"
        );
        assert_eq!(mean0, mean1);
        // Rank 1 voted to stop: both stop.
        assert!(*stop0 && *stop1);
        assert_eq!(avg0, avg1);
        assert_ne!(g0, g1, "the two batches should give different gradients");
        for ((a, x), y) in avg0.iter().zip(g0).zip(g1) {
            assert!(
                (a - (x + y) / 2.0).abs() <= 1e-6 * (1.0 + a.abs()),
                "{a} vs {x}, {y}"
            );
        }
    }
}
