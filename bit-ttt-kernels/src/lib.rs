//! Packed ternary weights and the kernels that read them.
//!
//! - [`packing`]: the 2-bit packed layout of ternary (BitNet b1.58) weight matrices, with
//!   [`pack`](packing::PackedTernary::pack) and [`unpack`](packing::PackedTernary::unpack).
//! - [`cpu`]: matrix products of packed weights with int8 or f32 activations, and the f32 slice
//!   math of the fused decoder (norms, LayerNorm backward, GELU, SiLU, RoPE, dense GEMV, the TTT
//!   head step). A scalar reference always exists; faster kernels (AVX2) are chosen at run time
//!   and checked against it, and the work is split over output rows on the crate's own thread
//!   pool.
//! - `cube` (feature `cubecl`): the same products as CubeCL kernels for GPUs (wgpu, CUDA),
//!   over weights resident on the device in a word-major layout.
//! - [`bandwidth`]: the machine's read bandwidth, the bound a decode step is measured against.
//!
//! This crate has no dependency on the other bit-ttt crates: `bit-ttt-burn` uses it, never the reverse.
#![warn(missing_docs)]

pub mod bandwidth;
pub mod cpu;
#[cfg(feature = "cubecl")]
pub mod cube;
pub mod error;
pub mod packing;

pub use error::KernelError;
pub use packing::{BlockTernary, PackedTernary, TernaryView, QK_TERNARY};
