//! The typed error of `bit-ttt-burn`.

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
    /// The parts of a TTT cache do not fit together.
    #[error("invalid TTT cache: {0}")]
    InvalidCache(String),
}

impl From<burn::tensor::DataError> for BitTttError {
    fn from(e: burn::tensor::DataError) -> Self {
        Self::Data(e)
    }
}
