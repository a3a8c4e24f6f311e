//! Burn modules of bit-ttt: ternary [`BitLinear`] layers (BitNet b1.58), their packed
//! inference form [`PackedBitLinear`], and Test-Time-Training layers ([`ttt`]: [`TttLayer`],
//! TTT-Linear and TTT-MLP).
//!
//! Every module is generic over the Burn backend `B`; wrap it in `Autodiff<B>` to train.
#![warn(missing_docs)]

pub mod bit_linear;
pub mod error;
pub mod packed_bit_linear;
pub mod projection;
pub mod quantize;
pub mod ttt;

pub use bit_linear::{BitLinear, BitLinearConfig};
pub use error::BitTttError;
pub use packed_bit_linear::PackedBitLinear;
pub use projection::{Projection, ProjectionConfig};
pub use ttt::{InnerLoopImpl, TttCache, TttConfig, TttInner, TttLayer};
