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
pub use config::{
    BitLlamaConfig, FfnActivation, MixerKind, MAX_LAYERS, MAX_MATRIX_WEIGHTS, MAX_MINI_BATCH_SIZE,
    MAX_ROPE_TABLE,
};
pub use packed::packed_config;
pub(crate) use packed::PackedPart;
