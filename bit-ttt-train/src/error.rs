//! The typed error of the training library.

use std::path::PathBuf;

use bit_ttt_burn::BitTttError;
use thiserror::Error;

use crate::train::SettingChange;

/// Everything that can go wrong while preparing data, training, or evaluating.
#[derive(Debug, Error)]
pub enum TrainError {
    /// An error of the model library (loading, saving, generation).
    #[error(transparent)]
    Model(#[from] BitTttError),
    /// An error of the group of training processes.
    #[error(transparent)]
    Distributed(#[from] crate::distributed::DistributedError),
    /// A data file does not exist.
    #[error("data file {} does not exist", .0.display())]
    MissingFile(PathBuf),
    /// A tokenizer file does not exist.
    #[error("tokenizer file {} does not exist", .0.display())]
    MissingTokenizer(PathBuf),
    /// No tokenizer was given and none lies next to the model (where it was looked for).
    #[error("no tokenizer.json {0}; pass a tokenizer file")]
    NoTokenizerFor(String),
    /// A data file exists but holds no text.
    #[error("data file {} is empty", .0.display())]
    EmptyFile(PathBuf),
    /// A data file is not UTF-8 text.
    #[error("data file {} is not UTF-8 text (invalid byte at offset {offset})", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Training or loading the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A setting is out of range or settings contradict each other.
    #[error("{0}")]
    InvalidSetting(String),
    /// The data is too short for the requested sequence length.
    #[error("{split} split has {tokens} tokens, too few for sequences of {seq_len} tokens (need at least {} tokens); use a shorter --seq-len or more data", seq_len + 1)]
    NotEnoughData {
        /// `train` or `validation`.
        split: &'static str,
        /// Tokens in the split.
        tokens: usize,
        /// Requested sequence length.
        seq_len: usize,
    },
    /// `--resume` was given but the run directory holds no checkpoint.
    #[error("cannot resume: {} holds no checkpoint ({reason})", dir.display())]
    NoCheckpoint {
        /// The checkpoint directory looked in.
        dir: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A checkpoint exists but cannot be read.
    #[error("checkpoint {} is unreadable: {reason}", dir.display())]
    BadCheckpoint {
        /// The checkpoint directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another trainer holds the run directory's lock (see
    /// [`RunLock`](crate::checkpoint::RunLock)).
    #[error("another trainer is using {} (it holds {}); wait for it to finish, or choose another --out", dir.display(), dir.join(crate::checkpoint::LOCK_FILE).display())]
    RunLocked {
        /// The run directory.
        dir: PathBuf,
    },
    /// A resumed run was given settings or a model shape that differ from the run's own, and
    /// resuming would silently ignore them or cannot apply them.
    #[error("cannot resume {}: {}", run_dir.display(), describe_changes(changes))]
    ResumeMismatch {
        /// The run directory.
        run_dir: PathBuf,
        /// The differences that stop the resume.
        changes: Vec<SettingChange>,
    },
    /// The loss or the weights became NaN or infinite; training stopped before saving them.
    #[error("training diverged at step {step}: {what}; stopped without saving it. {}", match last_checkpoint { Some(p) => format!("The last good checkpoint is {}", p.display()), None => "No checkpoint had been written yet".to_string() })]
    Diverged {
        /// The step (1-based update number) that went wrong.
        step: usize,
        /// What is not finite, e.g. "the loss is NaN".
        what: String,
        /// The last checkpoint written, if any.
        last_checkpoint: Option<PathBuf>,
    },
}

impl TrainError {
    /// An [`Io`](Self::Io) error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// "--lr 0.001 differs from the run's 0.003; pass --extend to apply it", for all `changes`:
/// the ones `--extend` could apply first, then those no resume can.
fn describe_changes(changes: &[SettingChange]) -> String {
    let list = |extendable: bool| -> Vec<String> {
        changes
            .iter()
            .filter(|c| c.extendable == extendable)
            .map(|c| format!("{} {} differs from the run's {}", c.flag, c.given, c.run))
            .collect()
    };
    let mut parts = Vec::new();
    let schedule = list(true);
    if !schedule.is_empty() {
        let them = if schedule.len() == 1 { "it" } else { "them" };
        parts.push(format!(
            "{}; pass --extend to apply {them}",
            schedule.join("; ")
        ));
    }
    let fixed = list(false);
    if !fixed.is_empty() {
        let what = if fixed.len() == 1 { "this" } else { "these" };
        parts.push(format!(
            "{}; a resumed run cannot change {what} (start a new run with another --out)",
            fixed.join("; ")
        ));
    }
    parts.join("; ")
}
