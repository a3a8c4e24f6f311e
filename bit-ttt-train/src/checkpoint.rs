//! Checkpoints: `checkpoints/step-000200/` holds the model as a model directory
//! (`config.json` + `model.safetensors`, usable by `eval` and `generate`), the model and
//! optimizer records for an exact resume (`model.mpk`, `optimizer.mpk`, which keep Burn's
//! parameter ids so the AdamW moments find their parameters again) and `trainer_state.json`
//! (step, RNG = data position, schedule, settings, metrics so far).
//!
//! A checkpoint is written into a temporary directory beside its final place and renamed
//! into place; then the `latest` file is replaced atomically. A crash at any point leaves the
//! previous checkpoint and `latest` intact.

use std::fs;
use std::path::{Path, PathBuf};

use bit_ttt_burn::files::write_atomic;
use bit_ttt_burn::{BitLlama, BitLlamaConfig};
use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::metrics::MetricRow;
use crate::rng::SplitMix64;
use crate::train::TrainSettings;
use crate::TrainError;

/// Name of the file in the checkpoint directory that names the newest checkpoint.
pub const LATEST_FILE: &str = "latest";
/// Name of the trainer state file inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
const MODEL_RECORD: &str = "model";
const OPTIMIZER_RECORD: &str = "optimizer";

type Rec = NamedMpkFileRecorder<FullPrecisionSettings>;

/// Everything besides the tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Updates done.
    pub step: usize,
    /// The batch sampler's RNG: the position in the data.
    pub rng: SplitMix64,
    /// Training settings (schedule, batch, …) of the run.
    pub settings: TrainSettings,
    /// The model's shape.
    pub model: BitLlamaConfig,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// Training time so far, seconds.
    pub elapsed_s: f64,
    /// Fingerprint of the token streams, so a resume on other data is refused.
    pub data_fingerprint: u64,
    /// Metrics so far.
    pub metrics: Vec<MetricRow>,
}

/// The checkpoint directory of run directory `run_dir`.
pub fn checkpoint_root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn bad(dir: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::BadCheckpoint {
        dir: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes a checkpoint for `state.step` and points `latest` at it; keeps the `keep` newest.
///
/// # Errors
/// [`TrainError::Io`] or [`TrainError::BadCheckpoint`] if a record cannot be written.
pub fn save<B: AutodiffBackend, O: Optimizer<BitLlama<B>, B>>(
    run_dir: &Path,
    model: &BitLlama<B>,
    optim: &O,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = checkpoint_root(run_dir);
    fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let name = format!("step-{:06}", state.step);
    let target = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;

    model.save(&state.model, &tmp)?;
    Rec::new()
        .record(model.clone().into_record(), tmp.join(MODEL_RECORD))
        .map_err(|e| bad(&tmp, e))?;
    Rec::new()
        .record(optim.to_record(), tmp.join(OPTIMIZER_RECORD))
        .map_err(|e| bad(&tmp, e))?;
    let json = serde_json::to_vec_pretty(state).expect("the state always serializes");
    write_atomic(&tmp.join(STATE_FILE), &json)?;

    if target.exists() {
        // The same step saved again (a resumed run interrupted at once): replace it.
        fs::remove_dir_all(&target).map_err(|e| TrainError::io(&target, e))?;
    }
    fs::rename(&tmp, &target).map_err(|e| TrainError::io(&target, e))?;
    write_atomic(&root.join(LATEST_FILE), name.as_bytes())?;
    prune(&root, keep);
    Ok(target)
}

/// Removes all but the `keep` newest `step-*` directories (best effort).
fn prune(root: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let mut steps: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    let n = steps.len();
    for old in steps.into_iter().take(n.saturating_sub(keep.max(1))) {
        let _ = fs::remove_dir_all(old);
    }
}

/// The newest checkpoint of `run_dir`, as named by `latest`.
///
/// # Errors
/// [`TrainError::NoCheckpoint`] if there is none.
pub fn latest(run_dir: &Path) -> Result<PathBuf, TrainError> {
    let root = checkpoint_root(run_dir);
    let latest = root.join(LATEST_FILE);
    let no = |reason: String| TrainError::NoCheckpoint {
        dir: root.clone(),
        reason,
    };
    if !run_dir.is_dir() {
        return Err(TrainError::NoCheckpoint {
            dir: run_dir.to_path_buf(),
            reason: "the run directory does not exist".into(),
        });
    }
    let name = fs::read_to_string(&latest)
        .map_err(|_| no(format!("no {LATEST_FILE} file; was this run started?")))?;
    let dir = root.join(name.trim());
    if !dir.join(STATE_FILE).is_file() {
        return Err(no(format!(
            "{LATEST_FILE} names {}, which has no {STATE_FILE}",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Reads the trainer state of checkpoint `dir`.
///
/// # Errors
/// [`TrainError::BadCheckpoint`].
pub fn load_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let bytes = fs::read(dir.join(STATE_FILE)).map_err(|e| bad(dir, e))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(dir, format!("{STATE_FILE}: {e}")))
}

/// Restores the model and the optimizer of checkpoint `dir` into freshly built ones.
///
/// # Errors
/// [`TrainError::BadCheckpoint`].
pub fn load_tensors<B: AutodiffBackend, O: Optimizer<BitLlama<B>, B>>(
    dir: &Path,
    model: BitLlama<B>,
    optim: O,
    device: &B::Device,
) -> Result<(BitLlama<B>, O), TrainError> {
    let record = Rec::new()
        .load(dir.join(MODEL_RECORD), device)
        .map_err(|e| bad(dir, format!("model record: {e}")))?;
    let optim_record = Rec::new()
        .load(dir.join(OPTIMIZER_RECORD), device)
        .map_err(|e| bad(dir, format!("optimizer record: {e}")))?;
    Ok((model.load_record(record), optim.load_record(optim_record)))
}
