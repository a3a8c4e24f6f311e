//! The BitLlama model: configuration, blocks, mixers and the model itself.

mod bit_llama;
mod block;
mod config;
pub mod files;
mod packed;
pub mod random;
mod soul;
#[cfg(test)]
pub(crate) mod test_util;

pub use crate::mixer::{Mixer, MixerState};
pub use bit_llama::{BitLlama, ModelState};
pub use block::Block;
pub use config::{BitLlamaConfig, MixerKind};
pub(crate) use packed::PackedPart;
