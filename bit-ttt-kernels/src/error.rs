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
    /// The GPU runtime reported a failure (a kernel that failed, a lost device).
    #[error("GPU runtime error: {0}")]
    Device(String),
}
