//! An attention layer's state in the portable form of `.soul` files ([`LayerSoul`]): Burn's
//! [`KvCache`] to and from it. (The fused CPU decoder's form converts in `decode.rs`.)
//!
//! Names: `keys` and `values`, `[batch, kv_heads, kv_len, head_dim]` each (absent while the cache
//! is empty), and the counter `kv_len`.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::{Attention, KvCache};
use crate::soul::{HostTensor, LayerSoul};
use crate::BitTttError;

/// The counter an attention layer keeps of the tokens it has read.
pub(crate) const TOKENS_READ: &str = "kv_len";

impl<B: Backend> KvCache<B> {
    /// This cache as block `index`'s part of a `.soul` file.
    ///
    /// # Errors
    /// [`BitTttError::Data`] if a tensor cannot be read as f32.
    pub fn to_soul(&self, index: usize) -> Result<LayerSoul, BitTttError> {
        let mut soul = LayerSoul::new(index);
        soul.fields.insert(TOKENS_READ.into(), self.len());
        if let (Some(keys), Some(values)) = (&self.keys, &self.values) {
            for (name, t) in [("keys", keys), ("values", values)] {
                let host = t.to_data().convert::<f32>().into_vec::<f32>()?;
                soul.tensors
                    .insert(name.into(), HostTensor::new(t.dims().to_vec(), host)?);
            }
        }
        Ok(soul)
    }
}

impl<B: Backend> Attention<B> {
    /// Restores the KV cache of `batch` sequences that have read `position` tokens from its
    /// part of a `.soul` file (taking its tensors out of `soul`). `d_model` is the model width.
    ///
    /// # Errors
    /// [`BitTttError::InvalidCache`] naming the tensor or counter that is missing, of another
    /// shape than this layer's keys and values, or disagrees with `position`.
    pub fn state_from_soul(
        &self,
        soul: &mut LayerSoul,
        position: usize,
        batch: usize,
        d_model: usize,
        device: &B::Device,
    ) -> Result<KvCache<B>, BitTttError> {
        let kv_len = soul.field(TOKENS_READ)?;
        // The cache holds one key and value per token read; any other count would put the
        // next token's RoPE and causal mask at the wrong position.
        if kv_len != position {
            return Err(soul.position_error(TOKENS_READ, kv_len, position));
        }
        if kv_len == 0 {
            return Ok(KvCache::default());
        }
        // The next forward concatenates new keys of this shape to the cached ones along the
        // token axis: another batch, head count or head size, or values of another length than
        // the keys, would panic there.
        let expected = [batch, self.num_kv_heads, kv_len, d_model / self.num_heads];
        let mut load = |name: &str| -> Result<Tensor<B, 4>, BitTttError> {
            let host = soul.take_tensor(name, Some(&expected))?;
            Ok(Tensor::from_data(
                TensorData::new(host.values, expected),
                device,
            ))
        };
        let keys = load("keys")?;
        let values = load("values")?;
        Ok(KvCache {
            keys: Some(keys),
            values: Some(values),
        })
    }
}
