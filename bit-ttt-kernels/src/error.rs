//! The typed error of the kernel crate.

use thiserror::Error;

/// Everything that can go wrong when packing, unpacking or multiplying ternary weights.
#[derive(Debug, Error, PartialEq)]
pub enum KernelError {
    /// A weight that is not -1, 0 or +1 was given to [`pack`](crate::PackedTernary::pack).
    #[error("weight {value} at index {index} is not ternary (-1, 0 or +1)")]
    NotTernary {
        /// Flat index of the offending weight.
        index: usize,
        /// Its value.
        value: i8,
    },
    /// A buffer's length does not match the shape it is said to hold.
    #[error("{what}: expected {expected} elements, got {actual}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// Length the shape implies.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// A packed block holds the code `0b11`, which no ternary value maps to (corrupt data).
    #[error("corrupt packed weights: invalid 2-bit code 0b11 in row {row}, column {col}")]
    InvalidCode {
        /// Row of the weight.
        row: usize,
        /// Column of the weight.
        col: usize,
    },
    /// A scale that is not a finite positive number.
    #[error("invalid scale {0}: must be finite and > 0")]
    InvalidScale(f32),
    /// A kernel was asked for that this CPU cannot run (for example AVX2 on a CPU without it).
    #[error("the {0} kernel is not available on this CPU")]
    KernelUnavailable(&'static str),
    /// Reading or writing a packed file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The kind of the I/O error.
        kind: std::io::ErrorKind,
        /// Its message.
        message: String,
    },
    /// A file that does not start with the packed-file magic bytes.
    #[error("{path}: not a bit-ttt packed ternary file (bad magic)")]
    BadMagic {
        /// The file.
        path: std::path::PathBuf,
    },
    /// A packed file of a format version this crate cannot read.
    #[error("{path}: unsupported packed file version {version}")]
    UnsupportedVersion {
        /// The file.
        path: std::path::PathBuf,
        /// The version in its header.
        version: u32,
    },
    /// A file shorter than its header says: something it describes lies past its end.
    #[error("{path}: truncated: {what} needs {needed} bytes, the file has {len}")]
    Truncated {
        /// The file.
        path: std::path::PathBuf,
        /// What lies past the end.
        what: String,
        /// The file length that part needs.
        needed: u64,
        /// The actual file length.
        len: u64,
    },
    /// A packed file whose header is inconsistent (misaligned offset, bad name, overflow, ...).
    #[error("{path}: malformed packed file: {reason}")]
    Malformed {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}
