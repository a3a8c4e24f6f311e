//! Checkpoints: `checkpoints/step-000200/` holds the model as a model directory
//! (`config.json` + `model.safetensors`, usable by `eval` and `generate`), the model and
//! optimizer records for an exact resume (`model.mpk`, `optimizer.mpk`, which keep Burn's
//! parameter ids so the AdamW moments find their parameters again) and `trainer_state.json`
//! (step, RNG = data position, schedule, settings, metrics so far).
//!
//! A checkpoint is written into a temporary directory beside its final place, every file of it
//! synced to disk, and renamed into place; the checkpoint directory is synced, then the
//! `latest` file is replaced atomically. A crash (not only a kill) at any point leaves the
//! previous checkpoint and `latest` intact. Should `latest` still name a broken or missing
//! checkpoint (a disk that lied about syncing, a hand-deleted file), [`latest`] falls back to
//! the newest complete one, with a warning. Complete means every file present and not empty
//! and `trainer_state.json` parsing; a record that is present but damaged inside is found
//! when it is loaded and reported as [`TrainError::BadCheckpoint`] naming it.
//!
//! A training run holds [`RunLock`] on its run directory, so two trainers never write the
//! same run; taking it also removes the temporary files and directories that crashed runs
//! left behind.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use bit_ttt_burn::files::{read_file, write_atomic};
use bit_ttt_burn::model::files::{CONFIG_FILE, WEIGHTS_FILE};
use bit_ttt_burn::{BitLlama, BitLlamaConfig};
use burn::module::Module;
use burn::module::ParamId;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{AdamW, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
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
/// Name of the lock file in a run directory (see [`RunLock`]).
pub const LOCK_FILE: &str = ".lock";
/// The model record inside a checkpoint.
const MODEL_RECORD: &str = "model.mpk";
/// The optimizer record inside a checkpoint.
const OPTIMIZER_RECORD: &str = "optimizer.mpk";
/// Prefix of the checkpoint directories, followed by the step.
const STEP_PREFIX: &str = "step-";

/// The same named MessagePack as Burn's `NamedMpkFileRecorder` (older checkpoints load
/// unchanged), but to and from bytes, so the files can be written atomically and synced.
type Rec = NamedMpkBytesRecorder<FullPrecisionSettings>;

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
    /// Training processes the run is shared by (each with `settings.batch_size` sequences
    /// of every step's batch); the data order depends on it.
    #[serde(default = "one_process")]
    pub processes: usize,
}

/// Runs saved before groups existed were trained by one process.
fn one_process() -> usize {
    1
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

/// The step of a checkpoint directory name (`step-000200` → 200).
fn step_of(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    // `parse` alone would accept a sign.
    digits.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
    digits.parse().ok()
}

/// The `step-*` directories of checkpoint directory `root`, newest (highest step) first.
fn step_dirs(root: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut steps: Vec<(usize, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let step = step_of(e.file_name().to_str()?)?;
            let path = e.path();
            path.is_dir().then_some((step, path))
        })
        .collect();
    // By number: as strings, step-1000000 would sort before step-999999.
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    steps
}

/// Makes the entries of directory `dir` (creations, renames) durable. Not every platform can
/// open a directory; there the rename is as durable as the OS makes it.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
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
    let name = format!("{STEP_PREFIX}{:06}", state.step);
    let target = root.join(&name);
    let pid = std::process::id();
    let tmp = root.join(format!(".{name}.tmp-{pid}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;

    // Every file goes through `write_atomic`, which syncs it and then `tmp` itself.
    model.save(&state.model, &tmp)?;
    let model_bytes = Rec::new()
        .record(model.clone().into_record(), ())
        .map_err(|e| bad(&tmp, format!("encoding the model record: {e}")))?;
    write_atomic(&tmp.join(MODEL_RECORD), &model_bytes)?;
    drop(model_bytes);
    let optim_bytes = Rec::new()
        .record(optim.to_record(), ())
        .map_err(|e| bad(&tmp, format!("encoding the optimizer record: {e}")))?;
    write_atomic(&tmp.join(OPTIMIZER_RECORD), &optim_bytes)?;
    drop(optim_bytes);
    let json = serde_json::to_vec_pretty(state).expect("the state always serializes");
    write_atomic(&tmp.join(STATE_FILE), &json)?;

    if target.exists() {
        // The same step saved again (a resumed run interrupted at once). Move the old one aside
        // rather than deleting it first, so that one of the two complete copies exists at
        // every moment.
        let old = root.join(format!(".{name}.old-{pid}"));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        fs::rename(&target, &old).map_err(|e| TrainError::io(&target, e))?;
        if let Err(e) = fs::rename(&tmp, &target) {
            let _ = fs::rename(&old, &target);
            return Err(TrainError::io(&target, e));
        }
        sync_dir(&root);
        // Best effort: a leftover is removed by the next run that takes the lock.
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, &target).map_err(|e| TrainError::io(&target, e))?;
    }
    // The rename must be on disk before `latest` names the new directory.
    sync_dir(&root);
    write_atomic(&root.join(LATEST_FILE), name.as_bytes())?;
    prune(&root, keep, &target);
    Ok(target)
}

/// Removes every `step-*` directory of `root` older than its `keep` newest complete ones
/// (best effort), never `protect` (the one `latest` names, even if newer-numbered ones exist).
/// A broken checkpoint does not count toward `keep`: a run whose newest directories are
/// broken keeps enough complete ones to resume from.
fn prune(root: &Path, keep: usize, protect: &Path) {
    let mut complete = 0;
    for (_, dir) in step_dirs(root) {
        if complete >= keep.max(1) {
            if dir != protect {
                let _ = fs::remove_dir_all(dir);
            }
        } else if incomplete(&dir).is_none() {
            complete += 1;
        }
    }
}

/// Why checkpoint `dir` cannot be resumed from, or `None` if it is complete: its trainer
/// state parses and its model and optimizer records and model directory files are non-empty.
fn incomplete(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        return Some("it does not exist".into());
    }
    if let Err(e) = load_state(dir) {
        return Some(match e {
            TrainError::BadCheckpoint { reason, .. } => reason,
            other => other.to_string(),
        });
    }
    for file in [MODEL_RECORD, OPTIMIZER_RECORD, WEIGHTS_FILE, CONFIG_FILE] {
        match fs::metadata(dir.join(file)) {
            Ok(m) if m.is_file() && m.len() > 0 => {}
            Ok(_) => return Some(format!("{file} is empty")),
            Err(_) => return Some(format!("{file} is missing")),
        }
    }
    None
}

/// The checkpoint to resume from, and what was wrong if it is not the one `latest` names.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Set when `latest` was missing or named a broken checkpoint and `dir` is the newest
    /// complete one instead: says what was wrong.
    pub fallback: Option<String>,
}

/// The checkpoint to resume from, without printing anything: the one `latest` names if it is
/// complete, else the newest complete `step-*` directory (see [`Latest::fallback`]).
///
/// # Errors
/// [`TrainError::NoCheckpoint`] if there is no complete checkpoint.
pub fn find_latest(run_dir: &Path) -> Result<Latest, TrainError> {
    let root = checkpoint_root(run_dir);
    if !run_dir.is_dir() {
        return Err(TrainError::NoCheckpoint {
            dir: run_dir.to_path_buf(),
            reason: "the run directory does not exist".into(),
        });
    }
    let (named, problem) = match fs::read_to_string(root.join(LATEST_FILE)) {
        Ok(name) => {
            let dir = root.join(name.trim());
            match incomplete(&dir) {
                None => {
                    return Ok(Latest {
                        dir,
                        fallback: None,
                    })
                }
                Some(why) => (
                    Some(dir.clone()),
                    format!(
                        "{LATEST_FILE} names {}, which is broken ({why})",
                        dir.display()
                    ),
                ),
            }
        }
        Err(_) => (None, format!("there is no {LATEST_FILE} file")),
    };
    let mut skipped = Vec::new();
    for (_, dir) in step_dirs(&root) {
        if named.as_ref() == Some(&dir) {
            continue;
        }
        match incomplete(&dir) {
            None => {
                let mut fallback = problem;
                if !skipped.is_empty() {
                    fallback.push_str(&format!("; skipped {}", skipped.join(", ")));
                }
                return Ok(Latest {
                    dir,
                    fallback: Some(fallback),
                });
            }
            Some(why) => skipped.push(format!("{} ({why})", dir.display())),
        }
    }
    let reason = match (named.is_some(), skipped.is_empty()) {
        (false, true) => format!("no {LATEST_FILE} file; was this run started?"),
        (true, true) => format!("{problem}, and there is no other checkpoint"),
        (false, false) => format!(
            "{problem}, and no checkpoint is complete: {}",
            skipped.join(", ")
        ),
        (true, false) => format!(
            "{problem}; no other checkpoint is complete either: {}",
            skipped.join(", ")
        ),
    };
    Err(TrainError::NoCheckpoint { dir: root, reason })
}

/// The newest complete checkpoint of `run_dir`, normally the one `latest` names. When that
/// one is missing or broken, the newest complete `step-*` directory, with a warning on stderr
/// naming what was broken.
///
/// # Errors
/// [`TrainError::NoCheckpoint`] if there is no complete checkpoint.
pub fn latest(run_dir: &Path) -> Result<PathBuf, TrainError> {
    let found = find_latest(run_dir)?;
    if let Some(why) = &found.fallback {
        eprintln!(
            "warning: {why}; using the newest complete checkpoint, {}",
            found.dir.display()
        );
    }
    Ok(found.dir)
}

/// Reads the trainer state of checkpoint `dir`.
///
/// # Errors
/// [`TrainError::BadCheckpoint`].
pub fn load_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let bytes =
        fs::read(dir.join(STATE_FILE)).map_err(|e| bad(dir, format!("{STATE_FILE}: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(dir, format!("{STATE_FILE}: {e}")))
}

/// The optimizer the trainer uses, whose record [`load_tensors`] checks.
pub type TrainOptimizer<B> = OptimizerAdaptor<AdamW, BitLlama<B>, B>;

/// The record of [`TrainOptimizer`]: AdamW's state by parameter id.
type TrainOptimizerRecord<B> = <TrainOptimizer<B> as Optimizer<BitLlama<B>, B>>::Record;

/// Restores the model and the optimizer of checkpoint `dir` into freshly built ones.
///
/// # Errors
/// [`TrainError::BadCheckpoint`], also for a record whose tensors do not fit the model (a
/// parameter or an AdamW moment of another shape, a moment count beyond reason).
pub fn load_tensors<B: AutodiffBackend>(
    dir: &Path,
    model: BitLlama<B>,
    optim: TrainOptimizer<B>,
    device: &B::Device,
) -> Result<(BitLlama<B>, TrainOptimizer<B>), TrainError> {
    let bytes = read_file(&dir.join(MODEL_RECORD)).map_err(|e| bad(dir, e))?;
    // Burn panics on some corrupt records (tensor data that does not fit its shape) instead
    // of returning an error (found by the loader fuzzer): such a panic is this file's error.
    let panicked = |what: &'static str| move |e: String| bad(dir, format!("{what}: {e}"));
    let record = crate::catch::catch_quietly(|| Rec::new().load(bytes, device))
        .map_err(panicked("model record"))?
        .map_err(|e| bad(dir, format!("model record: {e}")))?;
    let bytes = read_file(&dir.join(OPTIMIZER_RECORD)).map_err(|e| bad(dir, e))?;
    let optim_record: TrainOptimizerRecord<B> =
        crate::catch::catch_quietly(|| Rec::new().load(bytes, device))
            .map_err(panicked("optimizer record"))?
            .map_err(|e| bad(dir, format!("optimizer record: {e}")))?;
    // Burn loads a parameter of any shape: one that differs from the model's would panic in
    // the first forward pass instead.
    let expected = parameter_shapes(&model);
    // A record of another mixer kind makes Burn's enum records panic.
    let model = crate::catch::catch_quietly(|| model.load_record(record))
        .map_err(panicked("model record"))?;
    let loaded = parameter_shapes(&model);
    if let Some((name, (_, shape))) = expected
        .iter()
        .find(|(name, (_, shape))| loaded.get(*name).map(|(_, s)| s) != Some(shape))
    {
        return Err(bad(
            dir,
            format!(
                "model record: {name} has shape {}, the model {shape:?}",
                loaded
                    .get(name)
                    .map_or("none".to_string(), |(_, s)| format!("{s:?}"))
            ),
        ));
    }
    // AdamW takes a moment of another shape (or rank) without a word and panics in the
    // first step; a moment count near `usize::MAX` overflows there.
    check_moments(&optim_record, &loaded)
        .map_err(|e| bad(dir, format!("optimizer record: {e}")))?;
    let optim = crate::catch::catch_quietly(|| optim.load_record(optim_record))
        .map_err(panicked("optimizer record"))?;
    Ok((model, optim))
}

/// The most AdamW steps a moment may have counted: Burn raises β to this power as an `i32`.
const MAX_MOMENT_STEPS: usize = i32::MAX as usize - 1;

/// Checks that every AdamW state of `record` belongs to a parameter of `shapes` (by id), has
/// its rank and shape, and a step count in `1..=MAX_MOMENT_STEPS`. States of unknown ids are
/// allowed: the optimizer never looks them up.
fn check_moments<B: AutodiffBackend>(
    record: &TrainOptimizerRecord<B>,
    shapes: &std::collections::BTreeMap<String, (ParamId, Vec<usize>)>,
) -> Result<(), String> {
    let by_id: std::collections::HashMap<ParamId, (&String, &Vec<usize>)> = shapes
        .iter()
        .map(|(name, (id, shape))| (*id, (name, shape)))
        .collect();
    for (id, state) in record {
        let Some((name, shape)) = by_id.get(id) else {
            continue;
        };
        let AdaptorRecord::V1(state) = state;
        // (step count, the shapes of the first, second and maximal second moments)
        macro_rules! moments {
            ($s:expr) => {{
                let m = &$s.momentum;
                (
                    m.time,
                    m.moment_1.dims().to_vec(),
                    m.moment_2.dims().to_vec(),
                    m.max_moment_2.as_ref().map(|t| t.dims().to_vec()),
                )
            }};
        }
        let (time, first, second, max_second) = match state {
            AdaptorRecordV1::Rank0(s) => moments!(s),
            AdaptorRecordV1::Rank1(s) => moments!(s),
            AdaptorRecordV1::Rank2(s) => moments!(s),
            AdaptorRecordV1::Rank3(s) => moments!(s),
            AdaptorRecordV1::Rank4(s) => moments!(s),
            AdaptorRecordV1::Rank5(s) => moments!(s),
            AdaptorRecordV1::Rank6(s) => moments!(s),
            AdaptorRecordV1::Rank7(s) => moments!(s),
            AdaptorRecordV1::Rank8(s) => moments!(s),
        };
        for moment in [Some(&first), Some(&second), max_second.as_ref()]
            .into_iter()
            .flatten()
        {
            if moment != *shape {
                return Err(format!(
                    "the moments of {name} have shape {moment:?}, the parameter {shape:?}"
                ));
            }
        }
        if !(1..=MAX_MOMENT_STEPS).contains(&time) {
            return Err(format!("the moments of {name} count {time} steps"));
        }
    }
    Ok(())
}

/// The id and shape of every parameter of `model`, by its path (read without drawing the
/// initial values of a fresh model).
fn parameter_shapes<B: burn::tensor::backend::Backend>(
    model: &BitLlama<B>,
) -> std::collections::BTreeMap<String, (ParamId, Vec<usize>)> {
    #[derive(Default)]
    struct Shapes {
        path: Vec<String>,
        shapes: std::collections::BTreeMap<String, (ParamId, Vec<usize>)>,
    }
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) {
            self.shapes
                .insert(self.path.join("."), (param.id, param.lazy_shape().to_vec()));
        }
    }
    let mut shapes = Shapes::default();
    model.visit(&mut shapes);
    shapes.shapes
}

/// Exclusive right to train in a run directory, held for the whole run and released when
/// dropped (or when the process dies: the OS drops the lock with the process).
#[derive(Debug)]
pub struct RunLock {
    /// Holding the open, locked file is what holds the lock.
    _file: File,
}

impl RunLock {
    /// Locks `run_dir` (which must exist) through its [`LOCK_FILE`], then removes the
    /// temporary files and directories that dead processes left in it and in its checkpoint
    /// directory (an interrupted save, an interrupted atomic write).
    ///
    /// # Errors
    /// [`TrainError::RunLocked`] if another trainer holds the lock; [`TrainError::Io`] if the
    /// lock file cannot be opened or locked.
    pub fn acquire(run_dir: &Path) -> Result<Self, TrainError> {
        let path = run_dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(TrainError::RunLocked {
                    dir: run_dir.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(e)) if cannot_lock_here(&e) => {
                // Some network file systems cannot lock; training there still works, but
                // nothing keeps a second trainer out, so leave others' temporaries alone too.
                eprintln!(
                    "warning: cannot lock {} ({e}); make sure no other trainer uses this run directory",
                    path.display()
                );
                return Ok(Self { _file: file });
            }
            Err(fs::TryLockError::Error(e)) => return Err(TrainError::io(&path, e)),
        }
        remove_stale_temporaries(run_dir);
        remove_stale_temporaries(&checkpoint_root(run_dir));
        Ok(Self { _file: file })
    }
}

/// Whether a lock error means the file system has no locks (some network file systems),
/// rather than a failure: `Unsupported`, or Linux's `ENOLCK` (NFS without its lock daemon).
fn cannot_lock_here(e: &std::io::Error) -> bool {
    const ENOLCK_LINUX: i32 = 37;
    e.kind() == std::io::ErrorKind::Unsupported
        || (cfg!(target_os = "linux") && e.raw_os_error() == Some(ENOLCK_LINUX))
}

/// The process id in the name of a temporary entry: `.X.tmp-<pid>` (a checkpoint being
/// written), `.X.tmp-<pid>-<n>` (an atomic file write) or `.X.old-<pid>` (a checkpoint being
/// replaced).
fn temporary_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest
        .rsplit_once(".tmp-")
        .or_else(|| rest.rsplit_once(".old-"))?;
    let mut parts = tail.split('-');
    let pid = parts.next()?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !numeric(pid) || !parts.all(numeric) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` may still be writing its temporary entry. Called with the run lock
/// held: this process writes nothing into the run directory except through the lock holder,
/// so its own entries are stale. Where `/proc` is missing every other owner counts as dead
/// too (an `export` into the run directory at that moment would then fail, not corrupt
/// anything).
fn may_be_writing(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    let proc = Path::new("/proc");
    proc.join("self").exists() && proc.join(pid.to_string()).exists()
}

/// Removes (best effort) the temporary entries of dead processes in `dir`.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else {
            continue;
        };
        if may_be_writing(pid) {
            continue;
        }
        let path = entry.path();
        // A checkpoint set aside by `save` (`.step-N.old-PID`) whose replacement never arrived
        // (a crash between the two renames) is the only copy of that step: put it back.
        if let Some(original) = name
            .to_str()
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.rsplit_once(".old-"))
            .map(|(original, _)| dir.join(original))
        {
            if !original.exists() && fs::rename(&path, &original).is_ok() {
                continue;
            }
        }
        // Not following symlinks: a stale entry is removed itself, never what it points to.
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::lm_loss;
    use burn::backend::{Autodiff, NdArray};
    use burn::optim::{AdamWConfig, GradientsParams};
    use burn::record::NamedMpkFileRecorder;
    use burn::tensor::{Int, Tensor};

    type B = Autodiff<NdArray>;

    /// A process id above Linux's largest (2^22): no live process has it.
    const DEAD_PID: u32 = 4_194_305;

    fn state(step: usize) -> TrainerState {
        TrainerState {
            step,
            rng: SplitMix64::new(1),
            settings: TrainSettings::default(),
            model: BitLlamaConfig::tiny(50),
            tokens_seen: 0,
            elapsed_s: 0.0,
            data_fingerprint: 0,
            metrics: Vec::new(),
            processes: 1,
        }
    }

    /// A checkpoint directory that passes the completeness check (its records are not real).
    fn fake_checkpoint(root: &Path, step: usize) -> PathBuf {
        let dir = root.join(format!("step-{step:06}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(STATE_FILE),
            serde_json::to_vec(&state(step)).unwrap(),
        )
        .unwrap();
        for file in [MODEL_RECORD, OPTIMIZER_RECORD, WEIGHTS_FILE, CONFIG_FILE] {
            fs::write(dir.join(file), b"x").unwrap();
        }
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn prune_sorts_steps_as_numbers() {
        let root = tempfile::tempdir().unwrap();
        for step in [5, 999_999, 1_000_000] {
            fake_checkpoint(root.path(), step);
        }
        let newest = root.path().join("step-1000000");
        prune(root.path(), 1, &newest);
        // As strings, "step-999999" > "step-1000000" and the newest would go.
        assert_eq!(names(root.path()), ["step-1000000"]);
    }

    #[test]
    fn prune_counts_only_complete_checkpoints() {
        let root = tempfile::tempdir().unwrap();
        for step in [2, 4, 6, 8] {
            fake_checkpoint(root.path(), step);
        }
        // The two newest are broken: they must not push out the complete ones.
        fs::write(root.path().join("step-000008").join(MODEL_RECORD), b"").unwrap();
        fs::remove_file(root.path().join("step-000006").join(STATE_FILE)).unwrap();
        let newest = root.path().join("step-000008");
        prune(root.path(), 2, &newest);
        assert_eq!(
            names(root.path()),
            ["step-000002", "step-000004", "step-000006", "step-000008"]
        );
        fake_checkpoint(root.path(), 10);
        prune(root.path(), 2, &root.path().join("step-000010"));
        // Complete: 10 and 4 kept; the broken 8 and 6 between them stay; 2 goes.
        assert_eq!(
            names(root.path()),
            ["step-000004", "step-000006", "step-000008", "step-000010"]
        );
    }

    #[test]
    fn prune_never_removes_the_checkpoint_latest_names() {
        let root = tempfile::tempdir().unwrap();
        for step in [2, 4, 6, 8] {
            fake_checkpoint(root.path(), step);
        }
        // A run resumed from step 4 of an abandoned longer one just saved step 4 again.
        let named = root.path().join("step-000004");
        prune(root.path(), 2, &named);
        assert_eq!(
            names(root.path()),
            ["step-000004", "step-000006", "step-000008"]
        );
    }

    #[test]
    fn latest_prefers_the_named_checkpoint_when_it_is_complete() {
        let run = tempfile::tempdir().unwrap();
        let root = checkpoint_root(run.path());
        let four = fake_checkpoint(&root, 4);
        fake_checkpoint(&root, 6);
        fs::write(root.join(LATEST_FILE), "step-000004").unwrap();
        let found = find_latest(run.path()).unwrap();
        assert_eq!(
            found,
            Latest {
                dir: four,
                fallback: None
            }
        );
    }

    #[test]
    fn latest_falls_back_to_the_newest_complete_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let root = checkpoint_root(run.path());
        let two = fake_checkpoint(&root, 2);
        let four = fake_checkpoint(&root, 4);
        let six = fake_checkpoint(&root, 6);
        fs::write(root.join(LATEST_FILE), "step-000006").unwrap();
        // A crash after a rename the disk had not yet made durable: an empty record.
        fs::write(six.join(OPTIMIZER_RECORD), b"").unwrap();
        let found = find_latest(run.path()).unwrap();
        assert_eq!(found.dir, four);
        let why = found.fallback.unwrap();
        assert!(
            why.contains("step-000006") && why.contains("optimizer.mpk is empty"),
            "{why}"
        );
        assert_eq!(latest(run.path()).unwrap(), four);

        // Step 4 unusable too: step 2, and both problems are named.
        fs::remove_file(four.join(WEIGHTS_FILE)).unwrap();
        let found = find_latest(run.path()).unwrap();
        assert_eq!(found.dir, two);
        let why = found.fallback.unwrap();
        assert!(why.contains("model.safetensors is missing"), "{why}");

        // No `latest` file at all: the newest complete checkpoint still.
        fs::remove_file(root.join(LATEST_FILE)).unwrap();
        let found = find_latest(run.path()).unwrap();
        assert_eq!(found.dir, two);
        assert!(found.fallback.unwrap().contains("no latest file"));

        // Nothing complete: an error that names what is wrong.
        fs::write(two.join(STATE_FILE), b"{ not json").unwrap();
        let err = find_latest(run.path()).unwrap_err();
        assert!(matches!(err, TrainError::NoCheckpoint { .. }), "{err}");
        assert!(err.to_string().contains("trainer_state.json"), "{err}");
    }

    #[test]
    fn temporary_names_are_recognised() {
        assert_eq!(temporary_owner(".step-000004.tmp-123"), Some(123));
        assert_eq!(temporary_owner(".model.safetensors.tmp-77-3"), Some(77));
        assert_eq!(temporary_owner(".step-000004.old-9"), Some(9));
        for other in [
            "step-000004",
            ".lock",
            ".notes.tmp-",
            ".a.tmp-12x",
            "a.tmp-1",
            ".a.tmp-1-",
        ] {
            assert_eq!(temporary_owner(other), None, "{other}");
        }
    }

    #[test]
    fn taking_the_lock_removes_stale_temporaries() {
        let run = tempfile::tempdir().unwrap();
        let root = checkpoint_root(run.path());
        fake_checkpoint(&root, 4);
        let half_saved = root.join(format!(".step-000006.tmp-{DEAD_PID}"));
        fs::create_dir_all(&half_saved).unwrap();
        fs::write(half_saved.join(MODEL_RECORD), b"partial").unwrap();
        let stale = [
            half_saved,
            root.join(format!(".step-000004.old-{DEAD_PID}")),
            root.join(format!(".latest.tmp-{DEAD_PID}-0")),
            run.path().join(format!(".metrics.csv.tmp-{DEAD_PID}-3")),
        ];
        for path in &stale[1..] {
            fs::write(path, b"x").unwrap();
        }
        fs::write(run.path().join(".notes"), b"mine").unwrap();
        let _lock = RunLock::acquire(run.path()).unwrap();
        for path in &stale {
            assert!(!path.exists(), "{} left", path.display());
        }
        assert_eq!(names(&root), ["step-000004"]);
        assert_eq!(names(run.path()), [".lock", ".notes", "checkpoints"]);
    }

    #[test]
    fn a_set_aside_checkpoint_without_its_replacement_is_put_back() {
        let run = tempfile::tempdir().unwrap();
        let root = checkpoint_root(run.path());
        fake_checkpoint(&root, 4);
        // A crash between `save`'s two renames: only the set-aside copy of step 4 exists.
        fs::rename(
            root.join("step-000004"),
            root.join(format!(".step-000004.old-{DEAD_PID}")),
        )
        .unwrap();
        let _lock = RunLock::acquire(run.path()).unwrap();
        assert_eq!(names(&root), ["step-000004"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn taking_the_lock_keeps_temporaries_of_live_processes() {
        let run = tempfile::tempdir().unwrap();
        // Process 1 is always alive: perhaps an `export` writing into the run directory.
        let live = run.path().join(".model.packed.safetensors.tmp-1-0");
        fs::write(&live, b"x").unwrap();
        let _lock = RunLock::acquire(run.path()).unwrap();
        assert!(live.exists());
    }

    #[test]
    fn a_second_trainer_is_refused_while_the_lock_is_held() {
        let run = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(run.path()).unwrap();
        let err = RunLock::acquire(run.path()).unwrap_err();
        assert!(matches!(err, TrainError::RunLocked { .. }), "{err}");
        assert!(err.to_string().contains("another trainer"), "{err}");
        drop(first);
        RunLock::acquire(run.path()).unwrap();
    }

    /// A tiny model after one AdamW step, so the optimizer has moments to save.
    fn trained() -> (BitLlama<B>, TrainOptimizer<B>) {
        let device = Default::default();
        let model = BitLlamaConfig::tiny(50).init::<B>(&device);
        let mut optim = AdamWConfig::new().init::<B, BitLlama<B>>();
        let tokens = Tensor::<B, 2, Int>::from_ints([[1, 2, 3, 4, 5, 6, 7, 8, 9]], &device);
        let grads = GradientsParams::from_grads(lm_loss(&model, tokens).backward(), &model);
        let model = optim.step(1e-3, model, grads);
        (model, optim)
    }

    /// The encoded size of an optimizer's record: the moments' order in it varies, their
    /// size does not.
    fn optim_size(optim: &impl Optimizer<BitLlama<B>, B>) -> usize {
        Rec::new().record(optim.to_record(), ()).unwrap().len()
    }

    fn model_bytes(model: &BitLlama<B>) -> Vec<u8> {
        Rec::new().record(model.clone().into_record(), ()).unwrap()
    }

    #[test]
    fn save_twice_at_one_step_replaces_it_and_loads_back() {
        let run = tempfile::tempdir().unwrap();
        let (model, optim) = trained();
        save(run.path(), &model, &optim, &state(3), 2).unwrap();
        let dir = save(run.path(), &model, &optim, &state(3), 2).unwrap();
        let root = checkpoint_root(run.path());
        // No temporary or set-aside copy is left.
        assert_eq!(names(&root), [LATEST_FILE, "step-000003"]);
        assert_eq!(
            find_latest(run.path()).unwrap(),
            Latest {
                dir: dir.clone(),
                fallback: None
            }
        );
        let (fresh, fresh_optim) = trained();
        let (loaded, loaded_optim) =
            load_tensors(&dir, fresh, fresh_optim, &Default::default()).unwrap();
        assert_eq!(model_bytes(&loaded), model_bytes(&model));
        assert_eq!(optim_size(&loaded_optim), optim_size(&optim));
    }

    #[test]
    fn records_of_another_shape_are_an_error_not_a_later_panic() {
        let run = tempfile::tempdir().unwrap();
        let (model, optim) = trained();
        let dir = save(run.path(), &model, &optim, &state(1), 2).unwrap();
        // A model with a larger vocabulary: the embedding and the head differ in shape.
        let device = Default::default();
        let other = BitLlamaConfig::tiny(60).init::<B>(&device);
        let fresh_optim = AdamWConfig::new().init::<B, BitLlama<B>>();
        let Err(err) = load_tensors(&dir, other, fresh_optim, &device) else {
            panic!("a record of another shape loaded");
        };
        assert!(
            matches!(&err, TrainError::BadCheckpoint { reason, .. } if reason.contains("has shape [50, 64], the model [60, 64]")),
            "{err}"
        );
        // A record whose bytes were cut: an error whatever Burn does with it.
        let record = dir.join(MODEL_RECORD);
        let bytes = fs::read(&record).unwrap();
        for cut in [0, 1, bytes.len() / 3, bytes.len() - 1] {
            fs::write(&record, &bytes[..cut]).unwrap();
            let (fresh, fresh_optim) = trained();
            let Err(err) = load_tensors(&dir, fresh, fresh_optim, &device) else {
                panic!("a record cut at {cut} loaded");
            };
            assert!(matches!(err, TrainError::BadCheckpoint { .. }), "{err}");
        }
    }

    #[test]
    fn moments_of_another_shape_or_a_wild_step_count_are_an_error() {
        let run = tempfile::tempdir().unwrap();
        let device = Default::default();
        let (model, optim) = trained();
        let dir = save(run.path(), &model, &optim, &state(1), 2).unwrap();
        // Rewrites one rank-2 moment state of the saved record with `change`.
        let rewrite = |change: &dyn Fn(&mut burn::optim::AdaptiveMomentumState<_, 2>)| {
            let mut record: TrainOptimizerRecord<B> = optim.to_record();
            let rank2 = record
                .values_mut()
                .find_map(|state| match state {
                    AdaptorRecord::V1(AdaptorRecordV1::Rank2(s)) => Some(s),
                    _ => None,
                })
                .unwrap();
            change(&mut rank2.momentum);
            fs::write(
                dir.join(OPTIMIZER_RECORD),
                Rec::new().record(record, ()).unwrap(),
            )
            .unwrap();
            let (fresh, fresh_optim) = trained();
            match load_tensors(&dir, fresh, fresh_optim, &device) {
                Ok(_) => None,
                Err(TrainError::BadCheckpoint { reason, .. }) => Some(reason),
                Err(other) => panic!("another error: {other}"),
            }
        };
        // The record as saved loads.
        assert_eq!(rewrite(&|_| ()), None);
        // What the fuzzer found: a moment with no rows (it panicked in the first step).
        let reason = rewrite(&|m| {
            let columns = m.moment_1.dims()[1];
            m.moment_1 = m.moment_1.clone().slice([0..0, 0..columns]);
        });
        assert!(reason.unwrap().contains("have shape [0, "));
        let reason = rewrite(&|m| m.time = usize::MAX).unwrap();
        assert!(
            reason.contains(&format!("count {} steps", usize::MAX)),
            "{reason}"
        );
        let reason = rewrite(&|m| m.time = 0).unwrap();
        assert!(reason.contains("count 0 steps"), "{reason}");
    }

    #[test]
    fn a_record_of_another_mixer_is_an_error() {
        let run = tempfile::tempdir().unwrap();
        let device = Default::default();
        let attention = BitLlamaConfig::tiny(50)
            .with_mixer(bit_ttt_burn::MixerKind::Attention)
            .init::<B>(&device);
        let optim = AdamWConfig::new().init::<B, BitLlama<B>>();
        let dir = save(run.path(), &attention, &optim, &state(1), 2).unwrap();
        let (ttt, ttt_optim) = trained();
        let Err(err) = load_tensors(&dir, ttt, ttt_optim, &device) else {
            panic!("an attention record loaded into a TTT model");
        };
        assert!(
            matches!(&err, TrainError::BadCheckpoint { reason, .. } if reason.starts_with("model record")),
            "{err}"
        );
    }

    #[test]
    fn checkpoints_written_by_the_file_recorder_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let (model, optim) = trained();
        // How checkpoints were written before: the file recorder adds `.mpk`.
        let file = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        file.record(model.clone().into_record(), dir.path().join("model"))
            .unwrap();
        file.record(optim.to_record(), dir.path().join("optimizer"))
            .unwrap();
        let (fresh, fresh_optim) = trained();
        let (loaded, loaded_optim) =
            load_tensors(dir.path(), fresh, fresh_optim, &Default::default()).unwrap();
        assert_eq!(model_bytes(&loaded), model_bytes(&model));
        // The step left moments to restore: more than an unused optimizer holds.
        assert!(optim_size(&optim) > optim_size(&AdamWConfig::new().init::<B, BitLlama<B>>()));
        assert_eq!(optim_size(&loaded_optim), optim_size(&optim));
    }
}
