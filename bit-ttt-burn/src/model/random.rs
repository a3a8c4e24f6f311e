//! Random packed models drawn directly in their packed form, for benchmarks of shapes too large
//! to initialise through Burn: a 70B-shaped model's latent f32 weights would take 280 GB and
//! minutes to draw, its valid 2-bit codes are drawn at memory speed.
//!
//! Every block is a function of `(seed, block index)` alone, so the same block built on two
//! backends (the CPU side and the GPU side of a split model) holds the same weights.

use std::ops::Range;

use bit_ttt_kernels::packing::{blocks_per_row, QK_TERNARY};
use bit_ttt_kernels::{BlockTernary, PackedTernary};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use burn::nn::{EmbeddingConfig, RmsNorm, RmsNormConfig};

use crate::model::{BitLlama, BitLlamaConfig, Block};
use crate::packed_bit_linear::{TernaryParam, TernaryWeights};
use crate::{BitTttError, PackedBitLinear, Projection, ProjectionConfig, TernaryBackend};

/// Replaces every randomly initialised float parameter by values of a fixed sequence (uniform
/// in `±1/sqrt(last dim)`), leaving constant ones (norm scales, zero biases) as they are. The
/// backend's seed cannot make a model reproducible: tests run in parallel threads and share
/// its generator, and two backends draw differently.
pub(crate) struct Deterministic(pub u64);

impl Deterministic {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

impl<B: Backend> ModuleMapper<B> for Deterministic {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let old: Vec<f32> = tensor
            .to_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 values");
        if old.iter().all(|v| *v == old[0]) {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let scale = 1.0 / (dims[D - 1] as f32).sqrt();
        let new: Vec<f32> = old.iter().map(|_| self.next() * scale).collect();
        let tensor = Tensor::from_data(TensorData::new(new, dims), &tensor.device());
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// A mixing of two numbers into a seed (SplitMix64's finaliser), so that neighbouring
/// `(seed, index)` pairs give unrelated streams.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A `rows × cols` matrix of uniformly random ternary weights (each code `-1, 0, +1` equally
/// likely, padding at zero) with scale `1 / sqrt(cols)`, which keeps a product's outputs at
/// about the size of its inputs. Rows are drawn on all cores.
pub fn random_ternary(rows: usize, cols: usize, seed: u64) -> Result<PackedTernary, BitTttError> {
    // The 81 bytes whose four 2-bit fields are each a valid code (0, 1 or 2).
    let valid: Vec<u8> = (0u8..=255)
        .filter(|b| (0..4).all(|g| (b >> (2 * g)) & 3 != 3))
        .collect();
    if rows == 0 || cols == 0 {
        return Err(BitTttError::InvalidInput(format!(
            "a random {rows} x {cols} matrix: both sizes must be at least 1"
        )));
    }
    let per_row = blocks_per_row(cols);
    let mut blocks = vec![BlockTernary::ZERO; rows * per_row];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows_per_chunk = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (chunk, part) in blocks.chunks_mut(rows_per_chunk * per_row).enumerate() {
            let valid = &valid;
            scope.spawn(move || {
                for (i, row) in part.chunks_mut(per_row).enumerate() {
                    // One stream a row: the codes do not depend on how rows meet threads.
                    let mut state = mix(seed, (chunk * rows_per_chunk + i) as u64) | 1;
                    for byte in row.iter_mut().flat_map(|block| block.qs.iter_mut()) {
                        // xorshift64*: one of the 81 valid bytes, from the high bits.
                        state ^= state >> 12;
                        state ^= state << 25;
                        state ^= state >> 27;
                        let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32;
                        *byte = valid[(r % 81) as usize];
                    }
                    if !cols.is_multiple_of(QK_TERNARY) {
                        // The weights past `cols` in the row's last block at code 1 (zero).
                        let last = &mut row[per_row - 1];
                        for p in cols % QK_TERNARY..QK_TERNARY {
                            let (byte, shift) = (p % 32, 2 * (p / 32));
                            last.qs[byte] = (last.qs[byte] & !(3 << shift)) | (1 << shift);
                        }
                    }
                }
            });
        }
    });
    Ok(PackedTernary::from_blocks(
        blocks,
        rows,
        cols,
        1.0 / (cols as f32).sqrt(),
    )?)
}

/// Block `index` of a random packed model of `config`'s shape on `device`: every ternary
/// projection packed from [`random_ternary`] and made resident on the device, every other
/// random parameter drawn by a fixed sequence; a function of `(seed, index)` only.
///
/// # Errors
/// As [`TernaryBackend::upload_ternary`].
pub fn random_packed_block<B: TernaryBackend>(
    config: &BitLlamaConfig,
    index: usize,
    seed: u64,
    device: &B::Device,
) -> Result<Block<B>, BitTttError> {
    let block_seed = mix(seed, index as u64 + 1);
    let mut block = Block::<B>::init(config, device);
    let mut projections = block.mixer.projections_mut();
    projections.extend(block.ffn.projections_mut());
    for (k, (_, p)) in projections.into_iter().enumerate() {
        pack_random(p, mix(block_seed, k as u64), device)?;
    }
    // The rest (TTT parameters; norms stay at one) from the block's own sequence.
    Ok(block.map(&mut Deterministic(block_seed)))
}

/// A random packed model of `config`'s shape on `device`: the embedding and an f32 head drawn
/// directly as f32 values, the blocks of [`random_packed_block`], the final norm and head of
/// [`random_head`].
///
/// # Errors
/// As [`random_packed_block`]; [`BitTttError::InvalidInput`] for an invalid configuration.
pub fn random_packed_model<B: TernaryBackend>(
    config: &BitLlamaConfig,
    seed: u64,
    device: &B::Device,
) -> Result<BitLlama<B>, BitTttError> {
    config.validate().map_err(BitTttError::InvalidInput)?;
    let blocks = blocks_of(config, 0..config.n_layers, seed, device)?;
    let (norm, lm_head) = random_head(config, seed, device)?;
    let mut embedding = EmbeddingConfig::new(config.vocab_size, config.d_model).init(device);
    // [vocab_size, d_model]
    embedding.weight = Param::from_tensor(random_f32(
        [config.vocab_size, config.d_model],
        mix(seed, 0),
        device,
    ));
    Ok(BitLlama {
        embedding,
        blocks,
        norm,
        lm_head,
    })
}

/// The final norm (at one) and the head of the random model of `config` and `seed`: packed
/// when `config.ternary_head`, drawn as f32 values otherwise; the same whatever the backend.
///
/// # Errors
/// As [`TernaryBackend::upload_ternary`].
pub fn random_head<B: TernaryBackend>(
    config: &BitLlamaConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(RmsNorm<B>, Projection<B>), BitTttError> {
    let norm = RmsNormConfig::new(config.d_model)
        .with_epsilon(config.norm_eps)
        .init(device);
    let mut head = ProjectionConfig::new(config.d_model, config.vocab_size)
        .with_ternary(config.ternary_head)
        .init(device);
    match &mut head {
        Projection::Float(linear) => {
            // Burn's Linear holds `[d_input, d_output]`.
            linear.weight = Param::from_tensor(random_f32(
                [config.d_model, config.vocab_size],
                mix(seed, u64::MAX),
                device,
            ));
        }
        other => pack_random(other, mix(seed, u64::MAX), device)?,
    }
    Ok((norm, head))
}

/// A tensor of values uniform in `±1/sqrt(last dim)` from `seed`'s sequence, drawn on the host
/// without Burn's initialiser (which would first draw values to be replaced).
fn random_f32<B: Backend>(shape: [usize; 2], seed: u64, device: &B::Device) -> Tensor<B, 2> {
    let mut rng = Deterministic(seed);
    let scale = 1.0 / (shape[1] as f32).sqrt();
    let values: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| rng.next() * scale)
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Blocks `range` of the random model of `config` and `seed` (see [`random_packed_block`]).
///
/// # Errors
/// As [`random_packed_block`].
pub fn blocks_of<B: TernaryBackend>(
    config: &BitLlamaConfig,
    range: Range<usize>,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<Block<B>>, BitTttError> {
    range
        .map(|i| random_packed_block(config, i, seed, device))
        .collect()
}

/// Replaces a ternary projection by a random packed one of its shape (f32 ones are left).
fn pack_random<B: TernaryBackend>(
    p: &mut Projection<B>,
    seed: u64,
    device: &B::Device,
) -> Result<(), BitTttError> {
    let Projection::Ternary(layer) = p else {
        return Ok(());
    };
    // `lazy_shape`: the latent weights are never drawn.
    let [rows, cols] = layer.weight.lazy_shape().dims();
    let packed = PackedBitLinear {
        weight: TernaryParam::new(TernaryWeights::owned(random_ternary(rows, cols, seed)?)),
        bias: None,
        quantize_activations: layer.quantize_activations,
        eps: layer.eps,
    };
    packed.upload(device)?;
    *p = Projection::Packed(packed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_decode::CpuDecoder;
    use burn::backend::NdArray;

    #[test]
    fn random_codes_are_valid_balanced_and_padded_with_zeros() {
        let packed = random_ternary(37, 300, 9).unwrap();
        let values = packed.unpack();
        assert_eq!(values.len(), 37 * 300);
        let count = |v: i8| values.iter().filter(|&&x| x == v).count() as f64;
        for v in [-1, 0, 1] {
            let share = count(v) / values.len() as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.03, "{v}: {share}");
        }
        // Padding (300 = 2 blocks + 44): every weight past column 300 of a row is zero.
        for r in 0..37 {
            let last = packed.row_blocks(r)[2];
            for p in 44..128 {
                assert_eq!(
                    (last.qs[p % 32] >> (2 * (p / 32))) & 3,
                    1,
                    "row {r} weight {p}"
                );
            }
        }
        assert_eq!(packed.scale(), 1.0 / 300f32.sqrt());
        // Same seed, same codes; another seed, others.
        assert_eq!(random_ternary(37, 300, 9).unwrap(), packed);
        assert_ne!(random_ternary(37, 300, 10).unwrap(), packed);
        assert!(random_ternary(0, 300, 9).is_err());
        assert!(random_ternary(3, 0, 9).is_err());
    }

    #[test]
    fn a_block_is_the_same_alone_and_inside_a_model() {
        type B = NdArray;
        let device = Default::default();
        let config = BitLlamaConfig::new(50, 32, 3, 4, 48).with_mini_batch_size(4);
        let model = random_packed_model::<B>(&config, 7, &device).unwrap();
        assert_eq!(model.blocks.len(), 3);
        assert!(model
            .projections()
            .iter()
            .filter(|(name, _)| name.starts_with("blocks."))
            .all(|(_, p)| matches!(p, Projection::Packed(_))));
        let alone = blocks_of::<B>(&config, 1..3, 7, &device).unwrap();
        // The fused decoder of the whole model and one of its last two blocks alone give the
        // same hidden state out of them.
        let whole = CpuDecoder::new(&model, 1).unwrap();
        let mut part_model = random_packed_model::<B>(&config, 7, &device).unwrap();
        part_model.blocks = alone;
        let part = CpuDecoder::new(&part_model, 1).unwrap();
        let x: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        use crate::decode::{step_blocks, BlockStep};
        let mut s1: Vec<_> = whole.blocks()[1..]
            .iter()
            .map(BlockStep::new_state)
            .collect();
        let mut s2: Vec<_> = part.blocks().iter().map(BlockStep::new_state).collect();
        let a = step_blocks(&whole.blocks()[1..], &mut s1, &x).unwrap();
        let b = step_blocks(part.blocks(), &mut s2, &x).unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.is_finite()));
        // Another seed is another model.
        let other =
            CpuDecoder::new(&random_packed_model::<B>(&config, 8, &device).unwrap(), 1).unwrap();
        let mut s3: Vec<_> = other.blocks()[1..]
            .iter()
            .map(BlockStep::new_state)
            .collect();
        assert_ne!(step_blocks(&other.blocks()[1..], &mut s3, &x).unwrap(), a);
    }
}
