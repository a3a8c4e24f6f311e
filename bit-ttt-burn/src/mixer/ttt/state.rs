//! A TTT layer's state in the portable form of `.soul` files ([`LayerSoul`]): Burn's
//! [`TttCache`] to and from it. (The fused CPU decoder's form converts in `decode.rs`.)
//!
//! Names: `state.{k}` (the fast weights at the start of the current mini-batch) and
//! `grads.{k}` (the learning-rate-weighted gradient sum of the unfinished mini-batch), each
//! `[batch, heads, rows, cols]`, `k` over W1, b1 (and W2, b2 for TTT-MLP); counters
//! `seq_len_offset` (tokens read) and `mini_batch_size`.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::{TttCache, TttLayer};
use crate::soul::{HostTensor, LayerSoul};
use crate::BitTttError;

/// The counter a TTT layer keeps of the tokens it has read.
pub(crate) const TOKENS_READ: &str = "seq_len_offset";

/// Reads a tensor back to the host.
fn to_host<B: Backend>(t: &Tensor<B, 4>) -> Result<HostTensor, BitTttError> {
    let values = t.to_data().convert::<f32>().into_vec::<f32>()?;
    HostTensor::new(t.dims().to_vec(), values)
}

impl<B: Backend> TttCache<B> {
    /// This state as block `index`'s part of a `.soul` file.
    ///
    /// # Errors
    /// [`BitTttError::Data`] if a tensor cannot be read as f32.
    pub fn to_soul(&self, index: usize) -> Result<LayerSoul, BitTttError> {
        let mut soul = LayerSoul::new(index);
        soul.fields
            .insert(TOKENS_READ.into(), self.seq_len_offset());
        soul.fields
            .insert("mini_batch_size".into(), self.mini_batch_size());
        for (k, t) in self.state().iter().enumerate() {
            soul.tensors.insert(format!("state.{k}"), to_host(t)?);
        }
        for (k, t) in self.grads().iter().enumerate() {
            soul.tensors.insert(format!("grads.{k}"), to_host(t)?);
        }
        Ok(soul)
    }
}

impl<B: Backend> TttLayer<B> {
    /// Restores the state of `batch` sequences that have read `position` tokens from its part
    /// of a `.soul` file (taking its tensors out of `soul`).
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming the tensor or counter that is missing, of another
    /// shape than this layer's state, or disagrees with `position` or the layer's mini-batch.
    pub fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
        batch: usize,
    ) -> Result<TttCache<B>, BitTttError> {
        let expected = self.state_dims(batch);
        let device = self.learnable_token_idx.device();
        let mut load = |kind: &str| -> Result<Vec<Tensor<B, 4>>, BitTttError> {
            expected
                .iter()
                .enumerate()
                .map(|(k, &dims)| {
                    let host = soul.take_tensor(&format!("{kind}.{k}"), Some(&dims))?;
                    Ok(Tensor::from_data(
                        TensorData::new(host.values, dims),
                        &device,
                    ))
                })
                .collect()
        };
        let state = load("state")?;
        let grads = load("grads")?;
        let offset = soul.field(TOKENS_READ)?;
        // Every forward advances the position and each layer's offset by the same count, so a
        // difference means an edited or mixed-up file; the offset picks the RoPE and step-size
        // positions, the model's position would disagree.
        if offset != position {
            return Err(soul.position_error(TOKENS_READ, offset, position));
        }
        let mini_batch = soul.field("mini_batch_size")?;
        if mini_batch != self.mini_batch_size {
            return Err(BitTttError::InvalidCache(format!(
                "layer {} was saved with mini-batch size {mini_batch}, the model uses {}",
                soul.index, self.mini_batch_size
            )));
        }
        TttCache::from_parts(state, grads, offset, mini_batch)
    }
}
