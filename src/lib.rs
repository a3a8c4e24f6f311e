//! bit-ttt: ternary (BitNet b1.58) language models with Test-Time-Training layers, on Burn.
//!
//! This facade re-exports the workspace's crates:
//! - [`bit_ttt_burn`]: the Burn modules (BitLinear, …), generic over the backend;
//! - [`bit_ttt_kernels`]: the packed ternary layout and the kernels that read it.
#![warn(missing_docs)]

pub use bit_ttt_burn;
pub use bit_ttt_kernels;
