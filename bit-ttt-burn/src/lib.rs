//! Burn modules of bit-ttt: ternary [`BitLinear`] layers (BitNet b1.58), their packed
//! inference form [`PackedBitLinear`], and Test-Time-Training layers ([`ttt`]: [`TttLayer`],
//! TTT-Linear and TTT-MLP).
//!
//! Every module is generic over the Burn backend `B`; wrap it in `Autodiff<B>` to train.
#![warn(missing_docs)]

pub mod bit_linear;
pub mod cpu_decode;
pub mod decode;
pub mod error;
pub mod files;
pub mod generate;
pub mod hf_bitnet;
pub mod hybrid;
pub mod inference;
pub mod logit_check;
pub mod mixer;
pub mod model;
pub mod packed_bit_linear;
pub mod projection;
pub mod quantize;
pub mod rope;
pub mod sampling;
pub mod soul;
pub mod swiglu;
pub mod ternary_backend;

pub use mixer::{attention, ttt};

/// The packed layout and CPU kernels this crate runs on, for callers that tune them (threads,
/// kernel choice) without depending on `bit-ttt-kernels` themselves.
pub use bit_ttt_kernels as kernels;

pub use bit_linear::{BitLinear, BitLinearConfig};
pub use error::BitTttError;
pub use generate::GenerationConfig;
pub use logit_check::LogitCheck;
pub use model::{BitLlama, BitLlamaConfig, MixerKind, ModelState};
pub use packed_bit_linear::{PackedBitLinear, TernaryParam, TernaryWeights};
pub use projection::{Projection, ProjectionConfig};
pub use sampling::SamplingConfig;
pub use ternary_backend::{ternary_linear_on_host, ActivationPrecision, TernaryBackend};
pub use ttt::{InnerLoopImpl, TttCache, TttConfig, TttInner, TttLayer};
