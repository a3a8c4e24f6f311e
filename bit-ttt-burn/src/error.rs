//! The typed error of `bit-ttt-burn`.

use std::path::PathBuf;

use thiserror::Error;

/// Errors of the bit-ttt model library.
#[derive(Debug, Error)]
pub enum BitTttError {
    /// Packing or running a kernel failed.
    #[error(transparent)]
    Kernel(#[from] bit_ttt_kernels::KernelError),
    /// Tensor data could not be read in the expected element type.
    #[error("tensor data: {0:?}")]
    Data(burn::tensor::DataError),
    /// A file that should exist does not.
    #[error("missing file {}", .0.display())]
    MissingFile(PathBuf),
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A checkpoint of another architecture, or one using a feature this engine does not run.
    #[error("unsupported checkpoint {}: {reason}", path.display())]
    UnsupportedCheckpoint {
        /// The file that says so.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },
    /// A configuration file does not parse or describes an impossible model.
    #[error("invalid config {}: {reason}", path.display())]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weights or state file is truncated or its header is corrupt.
    #[error("corrupt file {}: {reason}", path.display())]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model needs a tensor the file lacks.
    #[error("tensor {name:?} is missing from {}", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// The file holds a tensor the model does not have.
    #[error("unexpected tensor {name:?} in {}", path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor's shape differs from the model's.
    #[error("tensor {name:?} in {} has shape {actual:?}, the model expects {expected:?}", path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Shape in the file.
        actual: Vec<usize>,
    },
    /// A tensor's element type differs from the model's.
    #[error("tensor {name:?} in {} is {actual}, the model expects {expected}", path.display())]
    DtypeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Element type the model expects.
        expected: String,
        /// Element type in the file.
        actual: String,
    },
    /// The weights and the configuration disagree in several tensors (for example the config
    /// names another number of layers or another width).
    #[error("{} does not fit its config: {}", path.display(), problems.join("; "))]
    WeightsDoNotFitConfig {
        /// The weights file.
        path: PathBuf,
        /// Every disagreement found.
        problems: Vec<String>,
    },
    /// A caller-supplied value is out of range (a token id, a length, a sampling parameter).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A computation gave NaN or infinite values (a model or state that went bad).
    #[error("not finite: {0}")]
    NonFinite(String),
    /// The parts of a TTT cache do not fit together.
    #[error("invalid TTT cache: {0}")]
    InvalidCache(String),
    /// A path given as a model is neither a model directory nor a file (it does not exist).
    #[error(
        "no model at {}: expected a model directory (config.json, model.safetensors) or a packed model file (*.packed.safetensors)",
        .0.display()
    )]
    NotAModel(PathBuf),
}

impl From<burn::tensor::DataError> for BitTttError {
    fn from(e: burn::tensor::DataError) -> Self {
        Self::Data(e)
    }
}

impl BitTttError {
    /// An [`Io`](Self::Io) error for `path`, or [`MissingFile`](Self::MissingFile) if it does not exist.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::MissingFile(path)
        } else {
            Self::Io { path, source }
        }
    }
}
