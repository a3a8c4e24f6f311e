//! The fused decoder against the op-by-op Burn forward it replaces.

use super::*;
use crate::model::test_util::{assert_logits_close as assert_close, Deterministic};
use crate::model::{BitLlamaConfig, MixerKind};
use burn::backend::NdArray;
use burn::module::Module;

type B = NdArray;

const MIXERS: [MixerKind; 3] = [
    MixerKind::TttLinear,
    MixerKind::TttMlp,
    MixerKind::Attention,
];

/// A small seeded model: 2 layers, 4 heads of 8, mini-batch 4 (so 11 tokens cross two
/// mini-batch boundaries). Ternary models are packed first, so that both paths multiply by
/// the same packed weights.
fn model(mixer: MixerKind, ternary: bool) -> BitLlama<B> {
    model_of(config(mixer), ternary)
}

fn config(mixer: MixerKind) -> BitLlamaConfig {
    BitLlamaConfig::new(61, 32, 2, 4, 48)
        .with_mini_batch_size(4)
        .with_mixer(mixer)
}

/// Every mixer's config, and BitNet b1.58's block (see `model::test_util::variants`).
fn variants() -> Vec<(String, BitLlamaConfig)> {
    crate::model::test_util::variants(config)
}

fn model_of(config: BitLlamaConfig, ternary: bool) -> BitLlama<B> {
    let device = Default::default();
    let model = config
        .with_ternary(ternary)
        .with_ternary_head(ternary)
        .init::<B>(&device)
        .map(&mut Deterministic(17));
    if ternary {
        model.into_packed().unwrap()
    } else {
        model
    }
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + 3) % 61).collect()
}

/// Feeds the same `n` tokens one at a time to `model` (Burn, op by op) and to a fused decoder
/// of it with `threads` threads, comparing the logits after every token.
fn assert_decoders_agree(model: &BitLlama<B>, threads: usize, n: usize, what: &str) {
    let decoder = CpuDecoder::new(model, threads).unwrap();
    let (mut burn_state, mut state) = (model.new_state(), decoder.new_state());
    for (i, &token) in tokens(n).iter().enumerate() {
        let burn = model.read(&[token], &mut burn_state).unwrap();
        let fused = decoder.step(token, &mut state).unwrap();
        assert_close(&fused, &burn, &format!("{what} token {i}"));
    }
    assert_eq!(state.position(), n);
    // The same growth as Burn's state: none for TTT, one key and value per token for attention.
    let fused_growth = state.num_elements() - decoder.new_state().num_elements();
    let burn_growth = burn_state.num_elements() - model.new_state().num_elements();
    assert_eq!(fused_growth, burn_growth, "{what}");
    assert!(state.num_elements() >= burn_state.num_elements(), "{what}");
}

// The ternary cases can only agree within 1e-4 if no int8 activation code differs between the
// two paths: a value within a rounding error of a quantization boundary could round either
// way (see `examples/backend_swap.rs`). The models are deterministic, so such a flip would show
// on every run, not now and then; none does on these inputs.
#[test]
fn fused_decode_matches_burn_token_by_token() {
    for (name, config) in variants() {
        for ternary in [false, true] {
            let model = model_of(config.clone(), ternary);
            for threads in [1, 2] {
                let what = format!("{name} ternary={ternary} threads={threads}");
                assert_decoders_agree(&model, threads, 11, &what);
            }
        }
    }
}

#[test]
fn fused_decode_continues_a_burn_prefill() {
    for mixer in MIXERS {
        let model = model(mixer, false);
        let decoder = CpuDecoder::new(&model, 1).unwrap();
        let all = tokens(12);
        // 6 prompt tokens end inside a mini-batch: the state carries unfinished gradient sums.
        let mut burn_state = model.new_state();
        model.read(&all[..6], &mut burn_state).unwrap();
        let mut state = decoder.state_from_model(&burn_state).unwrap();
        assert_eq!(state.position(), 6);
        for &token in &all[6..] {
            let burn = model.read(&[token], &mut burn_state).unwrap();
            let fused = decoder.step(token, &mut state).unwrap();
            assert_close(&fused, &burn, mixer.name());
        }
    }
}

#[test]
fn memory_mapped_packed_file_decodes_like_the_model_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.packed.safetensors");
    let device = Default::default();
    let config = BitLlamaConfig::new(61, 32, 2, 4, 48)
        .with_mini_batch_size(4)
        .with_ternary_head(true);
    // A fresh model, never read before saving: the file must hold this model (Burn's lazy
    // parameters draw new values in a clone that was never read).
    let model = config.init::<B>(&device);
    model.save_packed(&config, &path).unwrap();
    let (mapped, _) = BitLlama::<B>::load_packed(&path, &device).unwrap();

    let in_memory = CpuDecoder::new(&model, 1).unwrap();
    let from_file = CpuDecoder::new(&mapped, 1).unwrap();
    let (mut a, mut b) = (in_memory.new_state(), from_file.new_state());
    for token in tokens(6) {
        assert_eq!(
            in_memory.step(token, &mut a).unwrap(),
            from_file.step(token, &mut b).unwrap()
        );
    }
    assert_eq!(a, b);
}

#[test]
fn bad_tokens_and_foreign_states_are_errors_and_change_nothing() {
    let ttt = model(MixerKind::TttLinear, false);
    let decoder = CpuDecoder::new(&ttt, 1).unwrap();
    let mut state = decoder.new_state();
    decoder.read(&[1, 2], &mut state).unwrap();
    let before = state.clone();

    let err = decoder.step(61, &mut state).unwrap_err();
    assert!(
        matches!(&err, BitTttError::InvalidInput(m) if m.contains("token id 61")),
        "{err}"
    );
    assert!(matches!(
        decoder.read(&[], &mut state),
        Err(BitTttError::InvalidInput(_))
    ));
    // Every id is checked before any token is read.
    assert!(matches!(
        decoder.read(&[3, 4, 99, 5], &mut state),
        Err(BitTttError::InvalidInput(_))
    ));
    // A state of an attention model, and a Burn state of two sequences.
    let attention = CpuDecoder::new(&model(MixerKind::Attention, false), 1).unwrap();
    let mut foreign = attention.new_state();
    assert!(matches!(
        decoder.step(1, &mut foreign),
        Err(BitTttError::InvalidCache(_))
    ));
    assert!(matches!(
        decoder.state_from_model(&ttt.new_batch_state(2)),
        Err(BitTttError::InvalidCache(_))
    ));
    // A Burn state whose position disagrees with its layers.
    let mut burn_state = ttt.new_state();
    ttt.read(&[1, 2], &mut burn_state).unwrap();
    burn_state.position = 3;
    assert!(matches!(
        decoder.state_from_model(&burn_state),
        Err(BitTttError::InvalidCache(_))
    ));
    assert_eq!(state, before);

    // A KV cache of another head count (same layers, same width).
    let two_heads = BitLlamaConfig::new(61, 32, 2, 2, 48)
        .with_mixer(MixerKind::Attention)
        .with_ternary(false)
        .init::<B>(&Default::default());
    let two_heads = CpuDecoder::new(&two_heads, 1).unwrap();
    let mut foreign = two_heads.new_state();
    two_heads.read(&[1, 2], &mut foreign).unwrap();
    assert!(matches!(
        attention.step(1, &mut foreign),
        Err(BitTttError::InvalidCache(_))
    ));
}

#[test]
fn a_model_whose_projections_do_not_chain_is_an_error() {
    let mut model = model(MixerKind::TttLinear, false);
    model.lm_head = crate::ProjectionConfig::new(32, 60)
        .with_ternary(false)
        .init(&Default::default());
    let err = CpuDecoder::new(&model, 1).unwrap_err();
    assert!(
        matches!(&err, BitTttError::InvalidInput(m) if m.contains("LM head")),
        "{err}"
    );
}

#[test]
fn fused_generation_equals_burn_generation() {
    use crate::{GenerationConfig, SamplingConfig};
    for mixer in MIXERS {
        let model = model(mixer, false);
        let decoder = CpuDecoder::new(&model, 2).unwrap();
        for sampling in [
            SamplingConfig::greedy(),
            SamplingConfig {
                temperature: 0.8,
                top_k: Some(20),
                top_p: Some(0.9),
                seed: 3,
            },
        ] {
            let config = GenerationConfig {
                max_new_tokens: 20,
                sampling,
                stop_tokens: vec![],
            };
            let (mut burn_streamed, mut fused_streamed) = (Vec::new(), Vec::new());
            let burn = model
                .generate(&[5, 9, 2], &config, &mut model.new_state(), |t| {
                    burn_streamed.push(t);
                    ControlFlow::Continue(())
                })
                .unwrap();
            let fused = decoder
                .generate(&[5, 9, 2], &config, &mut decoder.new_state(), |t| {
                    fused_streamed.push(t);
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(fused.len(), 20);
            assert_eq!(fused, burn, "{}", mixer.name());
            assert_eq!(fused_streamed, burn_streamed);
        }
    }
}

/// The reference's head size and mini-batch (head_dim 64, b = 16), f32 projections: only float
/// rounding separates the two paths.
#[test]
fn fused_decode_matches_burn_with_reference_head_size() {
    let device = Default::default();
    for mixer in MIXERS {
        let model = BitLlamaConfig::new(61, 128, 2, 2, 96)
            .with_mixer(mixer)
            .with_ternary(false)
            .init::<B>(&device)
            .map(&mut Deterministic(3));
        assert_decoders_agree(&model, 2, 20, mixer.name());
    }
}

/// Ternary weights with f32 activations (W1.58A16) at the reference head size: no int8 code can
/// flip, so the fused and Burn paths agree to float rounding even with 4 layers of width 256.
#[test]
fn fused_decode_matches_burn_with_ternary_weights_and_f32_activations() {
    let device = Default::default();
    for mixer in MIXERS {
        let mut model = BitLlamaConfig::new(61, 256, 4, 4, 384)
            .with_mixer(mixer)
            .with_ternary_head(true)
            .init::<B>(&device)
            .map(&mut Deterministic(11))
            .into_packed()
            .unwrap();
        model
            .for_each_projection(&mut |_, p| {
                if let crate::Projection::Packed(layer) = p {
                    layer.quantize_activations = false;
                }
                Ok(())
            })
            .unwrap();
        assert_decoders_agree(&model, 1, 20, mixer.name());
    }
}

#[test]
fn bytes_per_token_count_every_parameter_and_the_state_a_step_reads() {
    // d_model 32, 2 blocks, 4 heads of 8, mini-batch 4. Beyond the projections and the
    // embedding row (`BitLlama::weight_bytes_per_token`), a step reads two RMSNorm scales per
    // block (64 values) and the final one (32); a TTT layer also its inner LayerNorm (2 · 4 · 8),
    // the η gate (4 · 32 + 4), `token_eta` (4), the RoPE tables of a mini-batch (2 · 4 · 4) and
    // its post-norm scale and shift (2 · 32): 296 values.
    for (mixer, extra_values) in [
        (MixerKind::TttLinear, 2 * (64 + 296) + 32),
        (MixerKind::TttMlp, 2 * (64 + 296) + 32),
        (MixerKind::Attention, 2 * 64 + 32),
    ] {
        let model = model(mixer, true);
        let decoder = CpuDecoder::new(&model, 1).unwrap();
        assert_eq!(
            decoder.weight_bytes_per_token(),
            model.weight_bytes_per_token() + 4 * extra_values,
            "{mixer:?}"
        );
    }

    // Per layer, TTT-Linear: W1 (4 · 8 · 8) and b1 (4 · 8), b1's gradient sum (4 · 8), and per
    // earlier token of the mini-batch a term of 8 + 8 values per head. TTT-MLP (hidden 32):
    // W1, b1, W2, b2 (1024 + 128 + 1024 + 32), the bias sums (160), terms of 40 + 40 per head.
    // Attention: the keys and values of the tokens so far and this one, 32 each.
    let per_layer = |mixer: MixerKind, position: usize| -> usize {
        match mixer {
            MixerKind::TttLinear => 256 + 32 + 32 + 4 * (position % 4) * 16,
            MixerKind::TttMlp => 2208 + 160 + 4 * (position % 4) * 80,
            MixerKind::Attention => 2 * (position + 1) * 32,
        }
    };
    for mixer in MIXERS {
        let decoder = CpuDecoder::new(&model(mixer, true), 1).unwrap();
        for position in [0, 1, 3, 4, 6] {
            assert_eq!(
                decoder.state_bytes_read(position),
                2 * 4 * per_layer(mixer, position),
                "{mixer:?} at {position}"
            );
        }
    }
}

/// The TTT heads compiled for AVX2 (where the CPU has it; see `TttStep::run_head`) and the generic
/// build give the same logits and states bit for bit, across two mini-batch boundaries, for
/// both inner models. Heads of 32 and a `d_model` of 96 run the vector loops and their tails.
#[test]
fn simd_and_generic_ttt_heads_are_bit_identical() {
    bit_ttt_kernels::cpu::avx2_under_test("the TTT heads' AVX2 build in the decoder");
    let device = Default::default();
    for mixer in [MixerKind::TttLinear, MixerKind::TttMlp] {
        let model = BitLlamaConfig::new(61, 96, 2, 3, 48)
            .with_mini_batch_size(4)
            .with_mixer(mixer)
            .init::<B>(&device)
            .map(&mut Deterministic(5));
        // One thread: the steps run on this thread, where the switch is set.
        let decoder = CpuDecoder::new(&model, 1).unwrap();
        let decode = |generic: bool| {
            crate::mixer::ttt::decode::GENERIC_HEADS.set(generic);
            let mut state = decoder.new_state();
            let logits: Vec<Vec<f32>> = tokens(11)
                .iter()
                .map(|&t| decoder.step(t, &mut state).unwrap())
                .collect();
            crate::mixer::ttt::decode::GENERIC_HEADS.set(false);
            (logits, state)
        };
        let (simd, generic) = (decode(false), decode(true));
        assert!(simd.0.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(simd, generic, "{}", mixer.name());
    }
}

/// Reads `split` tokens with the fused decoder, saves its state to a `.soul` file, restores it
/// in Burn and in a fresh fused decoder, and continues both: each gives the logits of an
/// uninterrupted Burn run within `assert_close`.
#[test]
fn a_fused_state_saved_to_soul_continues_in_burn_and_in_the_fused_decoder() {
    let dir = tempfile::tempdir().unwrap();
    for (name, config) in variants() {
        let mixer = config.mixer;
        let model = model_of(config, false);
        let decoder = CpuDecoder::new(&model, 1).unwrap();
        let all = tokens(11);
        // 6 tokens end inside a mini-batch of 4 (unfinished gradient terms), 8 on a boundary.
        for split in [6, 8] {
            let mut uninterrupted = model.new_state();
            let mut fused = decoder.new_state();
            decoder.read(&all[..split], &mut fused).unwrap();
            model.read(&all[..split], &mut uninterrupted).unwrap();
            let path = dir.path().join(format!("{name}-{split}.soul"));
            decoder.save_state(&fused, &path).unwrap();

            let mut in_burn = model.load_state(&path).unwrap();
            let mut restored = decoder.load_state(&path).unwrap();
            assert_eq!(in_burn.position, split);
            assert_eq!(restored.position(), split);
            let mut kept = fused.clone();
            for &token in &all[split..] {
                let expected = model.read(&[token], &mut uninterrupted).unwrap();
                let what = format!("{name} split {split}");
                let burn = model.read(&[token], &mut in_burn).unwrap();
                assert_close(
                    &burn,
                    &expected,
                    &format!("{what}: Burn from the fused state"),
                );
                let again = decoder.step(token, &mut restored).unwrap();
                assert_close(&again, &expected, &format!("{what}: fused from the file"));
                let same = decoder.step(token, &mut kept).unwrap();
                if split % 4 == 0 || mixer == MixerKind::Attention {
                    // Saved on a mini-batch boundary (or a KV cache): the very same state.
                    assert_eq!(again, same, "{what}: restored and kept states differ");
                }
                // A restored state holds dense gradient sums beside new rank-one terms: save
                // it again after each token, restore that in Burn, and it continues alike.
                decoder.save_state(&restored, &path).unwrap();
                let mut burn_again = model.load_state(&path).unwrap();
                let (mut probe, mut burn_probe) = (restored.clone(), uninterrupted.clone());
                let next = (token + 5) % 61;
                let fused_next = decoder.step(next, &mut probe).unwrap();
                let burn_next = model.read(&[next], &mut burn_again).unwrap();
                let expected_next = model.read(&[next], &mut burn_probe).unwrap();
                assert_close(
                    &fused_next,
                    &expected_next,
                    &format!("{what}: re-saved, fused"),
                );
                assert_close(
                    &burn_next,
                    &expected_next,
                    &format!("{what}: re-saved, Burn"),
                );
            }
        }
    }
}

#[test]
fn a_soul_of_another_model_or_of_two_sequences_is_an_error_for_the_fused_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.soul");
    let ttt = model(MixerKind::TttLinear, false);
    let mut state = ttt.new_state();
    ttt.read(&tokens(3), &mut state).unwrap();
    state.save(&path).unwrap();

    let attention = CpuDecoder::new(&model(MixerKind::Attention, false), 1).unwrap();
    let err = attention.load_state(&path).unwrap_err();
    assert!(
        matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("layers.0.kv_len")),
        "{err}"
    );

    // Two sequences: Burn reads them, the fused decoder (one sequence) says why it does not.
    let mut two = ttt.new_batch_state(2);
    let batch = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_ints(
        [[1, 2, 3], [4, 5, 6]],
        &Default::default(),
    );
    ttt.forward_with_state(batch, &mut two).unwrap();
    two.save(&path).unwrap();
    let decoder = CpuDecoder::new(&ttt, 1).unwrap();
    let err = decoder.load_state(&path).unwrap_err();
    assert!(
        matches!(&err, BitTttError::CorruptFile { reason, .. } if reason.contains("2 sequences")),
        "{err}"
    );
}

/// A model whose mixers are of another kind than `mixer`'s.
fn model_of_other_kind(mixer: MixerKind) -> BitLlama<B> {
    model(
        match mixer {
            MixerKind::Attention => MixerKind::TttLinear,
            _ => MixerKind::Attention,
        },
        false,
    )
}

/// A chain split between Burn blocks and fused CPU blocks (the seam the GPU/CPU split uses):
/// the first `k` blocks run in Burn, the rest fused, the hidden state crossing once per token.
/// Every split gives the fused decoder's logits within `assert_close`.
#[test]
fn a_chain_of_burn_and_fused_blocks_decodes_like_either() {
    use crate::decode::{step_blocks, BurnBlock};
    for mixer in MIXERS {
        for ternary in [false, true] {
            let model = model(mixer, ternary);
            let decoder = CpuDecoder::new(&model, 1).unwrap();
            let device = Default::default();
            let burn_blocks: Vec<BurnBlock<'_, B>> = model
                .blocks
                .iter()
                .map(|b| BurnBlock::new(b, &device))
                .collect();
            let n = model.blocks.len();
            for k in 0..=n {
                let mut fused_state = decoder.new_state();
                let mut burn_states: Vec<_> =
                    burn_blocks[..k].iter().map(BlockStep::new_state).collect();
                let mut cpu_states: Vec<_> = decoder.blocks()[k..]
                    .iter()
                    .map(BlockStep::new_state)
                    .collect();
                for (i, token) in tokens(7).into_iter().enumerate() {
                    let expected = decoder.step(token, &mut fused_state).unwrap();
                    let x = decoder.embed(token).unwrap();
                    let x = step_blocks(&burn_blocks[..k], &mut burn_states, &x).unwrap();
                    let x = step_blocks(&decoder.blocks()[k..], &mut cpu_states, &x).unwrap();
                    let got = decoder.logits(&x).unwrap();
                    let what = format!(
                        "{} ternary={ternary}, {k} Burn blocks, token {i}",
                        mixer.name()
                    );
                    assert_close(&got, &expected, &what);
                }
            }
            // A state of the wrong block is refused before anything runs: too few states, a
            // state of another kind of mixer, a Burn state of two sequences.
            let mut wrong: Vec<_> = decoder.blocks()[..1]
                .iter()
                .map(BlockStep::new_state)
                .collect();
            let x = decoder.embed(1).unwrap();
            assert!(step_blocks(&decoder.blocks()[..2], &mut wrong, &x).is_err());
            let other = CpuDecoder::new(&model_of_other_kind(mixer), 1).unwrap();
            let mut foreign: Vec<_> = other.blocks().iter().map(BlockStep::new_state).collect();
            assert!(step_blocks(decoder.blocks(), &mut foreign, &x).is_err());
            assert!(decoder.blocks()[0].state_to_soul(&foreign[0], 0).is_err());
            // (An empty KV cache fits any batch: read two sequences first.)
            let mut two = model.new_batch_state(2);
            let batch = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_ints(
                [[1, 2], [3, 4]],
                &Default::default(),
            );
            model.forward_with_state(batch, &mut two).unwrap();
            assert!(step_blocks(&burn_blocks, &mut two.layers, &x).is_err());
        }
    }
}

/// The fused prefill (`read`) of prompts of 1, 15, 16, 17 and 100 tokens, then five tokens of
/// decode: bit for bit what stepping each token gives, and within the tolerance of Burn's
/// batched forward (its dual form) on the same prompt, for every mixer, f32 and ternary, 1
/// and 2 threads. `read_all` gives every position's logits, again bit for bit.
#[test]
fn fused_prefill_equals_token_by_token_decode_and_burn() {
    for (name, config) in variants() {
        for ternary in [false, true] {
            let model = model_of(config.clone(), ternary);
            for threads in [1, 2] {
                let decoder = CpuDecoder::new(&model, threads).unwrap();
                for len in [1, 15, 16, 17, 100] {
                    let what = format!("{name} ternary={ternary} threads={threads} prompt {len}");
                    let all = tokens(len + 5);
                    let (prompt, rest) = all.split_at(len);
                    let mut stepped = decoder.new_state();
                    let per_token: Vec<Vec<f32>> = prompt
                        .iter()
                        .map(|&t| decoder.step(t, &mut stepped).unwrap())
                        .collect();
                    let mut prefilled = decoder.new_state();
                    let logits = decoder.read(prompt, &mut prefilled).unwrap();
                    assert_eq!(&logits, per_token.last().unwrap(), "{what}");
                    assert_eq!(prefilled, stepped, "{what}: the states");
                    let every = decoder.read_all(prompt, &mut decoder.new_state()).unwrap();
                    assert_eq!(every, per_token.concat(), "{what}: read_all");

                    let mut burn_state = model.new_state();
                    let burn = model.read(prompt, &mut burn_state).unwrap();
                    assert_near_burn(&logits, &burn, ternary, &what);
                    for &t in rest {
                        let fused = decoder.step(t, &mut prefilled).unwrap();
                        assert_eq!(fused, decoder.step(t, &mut stepped).unwrap(), "{what}");
                        let burn = model.read(&[t], &mut burn_state).unwrap();
                        assert_near_burn(&fused, &burn, ternary, &format!("{what}, then {t}"));
                    }
                }
            }
        }
    }
}

/// The fused logits against Burn's: within 1e-4 of the largest with f32 activations; with
/// int8 activations within 2e-2, the module docs' bound for an activation that the two paths'
/// float rounding puts on either side of a code boundary (over a hundred tokens one does, in
/// the ternary attention model; token by token too, so it is not the prefill's doing).
fn assert_near_burn(fused: &[f32], burn: &[f32], int8: bool, what: &str) {
    if !int8 {
        return assert_close(fused, burn, what);
    }
    let scale = burn.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = fused
        .iter()
        .zip(burn)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 2e-2 * scale, "{what}: logits differ by {diff}");
}

/// A prompt longer than [`PREFILL_CHUNK`] goes through in chunks and still equals stepping
/// each token, bit for bit; so does a prefill that continues a Burn state left in the middle of
/// a mini-batch (dense gradient sums), and one that continues a fused prefill.
#[test]
fn fused_prefill_across_chunks_and_after_a_burn_prefill_equals_stepping() {
    for mixer in MIXERS {
        let model = model(mixer, true);
        let decoder = CpuDecoder::new(&model, 2).unwrap();
        let all = tokens(PREFILL_CHUNK + 90);
        let mut stepped = decoder.new_state();
        let mut expected = Vec::new();
        for &t in &all {
            expected = decoder.step(t, &mut stepped).unwrap();
        }
        let mut prefilled = decoder.new_state();
        decoder.read(&all[..7], &mut prefilled).unwrap();
        let logits = decoder.read(&all[7..], &mut prefilled).unwrap();
        assert_eq!(logits, expected, "{}", mixer.name());
        assert_eq!(prefilled, stepped, "{}", mixer.name());

        let mut burn_state = model.new_state();
        model.read(&all[..6], &mut burn_state).unwrap();
        let mut from_burn = decoder.state_from_model(&burn_state).unwrap();
        let mut from_burn_stepped = from_burn.clone();
        let logits = decoder.read(&all[6..20], &mut from_burn).unwrap();
        let mut expected = Vec::new();
        for &t in &all[6..20] {
            expected = decoder.step(t, &mut from_burn_stepped).unwrap();
        }
        assert_eq!(logits, expected, "{} after a Burn prefill", mixer.name());
        assert_eq!(from_burn, from_burn_stepped, "{}", mixer.name());
    }
}

/// A state stretched to a depth: a KV cache of that many rows (its rows repeated), a TTT
/// state at that position with its fast weights; both decode on, and what a step reads is what
/// it reads at that depth. Bad depths are errors and change nothing.
#[test]
fn a_stretched_state_reads_what_a_state_at_that_depth_reads() {
    for mixer in MIXERS {
        let model = model(mixer, true);
        let decoder = CpuDecoder::new(&model, 1).unwrap();
        let mut state = decoder.new_state();
        decoder.read(&tokens(6), &mut state).unwrap();
        let stretched = decoder.stretch_state(&state, 6 + 4 * 5).unwrap();
        assert_eq!(stretched.position(), 26, "{}", mixer.name());
        let mut deep = decoder.new_state();
        decoder.read(&tokens(26), &mut deep).unwrap();
        // The same sizes as a state that read 26 tokens.
        assert_eq!(
            stretched.num_elements(),
            deep.num_elements(),
            "{}",
            mixer.name()
        );
        let mut stretched_copy = stretched.clone();
        let logits = decoder.step(3, &mut stretched_copy).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
        assert_eq!(stretched_copy.position(), 27);
        if mixer == MixerKind::Attention {
            // Rows 0..6 and then 0..6 again, and so on.
            let MixerDecodeState::Attention(kv) = &stretched.blocks[0].0 else {
                unreachable!()
            };
            let head_dim = 8;
            assert_eq!(kv.keys[1].len(), 26 * head_dim);
            assert_eq!(
                kv.keys[1][6 * head_dim..12 * head_dim],
                kv.keys[1][..6 * head_dim]
            );
            assert_eq!(kv.values[2][24 * head_dim..], kv.values[2][..2 * head_dim]);
        } else {
            // Only the counters move.
            for (a, b) in stretched.blocks.iter().zip(&state.blocks) {
                let (MixerDecodeState::Ttt(a), MixerDecodeState::Ttt(b)) = (&a.0, &b.0) else {
                    unreachable!()
                };
                assert_eq!(
                    (&a.weights, &a.grads, &a.terms),
                    (&b.weights, &b.grads, &b.terms)
                );
                assert_eq!(a.seq_len_offset, 26);
            }
            assert!(matches!(
                decoder.stretch_state(&state, 9),
                Err(BitTttError::InvalidInput(_))
            ));
        }
        assert!(matches!(
            decoder.stretch_state(&state, 5),
            Err(BitTttError::InvalidInput(_))
        ));
        let empty = decoder.new_state();
        let at_zero = decoder.stretch_state(&empty, 8);
        assert_eq!(
            at_zero.is_err(),
            mixer == MixerKind::Attention,
            "{}",
            mixer.name()
        );
    }
}

/// A block reads a chunk of tokens as it steps them one by one, bit for bit; a hidden state
/// of partial rows or a state of another block is an error that changes nothing.
#[test]
fn a_block_reads_a_chunk_as_it_steps_its_tokens() {
    let model = model(MixerKind::TttMlp, true);
    let decoder = CpuDecoder::new(&model, 2).unwrap();
    let block = &decoder.blocks()[1];
    let d = block.d_model();
    let mut hidden: Vec<f32> = (0..7 * d)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
        .collect();
    let mut stepped_state = block.new_state();
    let stepped: Vec<f32> = hidden
        .chunks_exact(d)
        .flat_map(|row| block.step(row.to_vec(), &mut stepped_state))
        .collect();
    let mut state = block.new_state();
    block.read(&mut hidden, &mut state).unwrap();
    assert_eq!(hidden, stepped);
    assert_eq!(state, stepped_state);

    let before = state.clone();
    let mut partial = vec![0.5; d + 1];
    assert!(matches!(
        block.read(&mut partial, &mut state),
        Err(BitTttError::InvalidInput(_))
    ));
    let attention = CpuDecoder::new(&model_of_other_kind(MixerKind::TttMlp), 1).unwrap();
    let mut foreign = attention.blocks()[1].new_state();
    assert!(matches!(
        block.read(&mut hidden.clone(), &mut foreign),
        Err(BitTttError::InvalidCache(_))
    ));
    assert_eq!(state, before);
    assert!(block.read(&mut [], &mut state).is_ok());
    assert_eq!(state, before);
}

/// With an FFN width that is not a multiple of the SiLU's 8 lanes, a prefill still equals
/// stepping each token bit for bit (every row's tail takes the same scalar path).
#[test]
fn fused_prefill_equals_stepping_with_an_odd_ffn_width() {
    for mixer in MIXERS {
        let model = BitLlamaConfig::new(61, 32, 2, 4, 44)
            .with_mini_batch_size(4)
            .with_mixer(mixer)
            .with_ternary(true)
            .with_ternary_head(true)
            .init::<B>(&Default::default())
            .map(&mut Deterministic(5))
            .into_packed()
            .unwrap();
        for threads in [1, 2] {
            let decoder = CpuDecoder::new(&model, threads).unwrap();
            let prompt = tokens(21);
            let mut stepped = decoder.new_state();
            let mut expected = Vec::new();
            for &t in &prompt {
                expected.extend(decoder.step(t, &mut stepped).unwrap());
            }
            let mut state = decoder.new_state();
            let all = decoder.read_all(&prompt, &mut state).unwrap();
            assert_eq!(all, expected, "{} threads={threads}", mixer.name());
            assert_eq!(state, stepped);
        }
    }
}
