//! The hybrid decoder with Burn's `ndarray` backend as the "GPU" side: every split of every
//! mixer against the fused CPU decoder; the plan; `.soul` round trips; bad input. (The same
//! splits with wgpu as the GPU side are tested in the facade's `tests/hybrid.rs`.)

use super::*;
use crate::inference::{Decoder, DecoderKind};
use crate::model::test_util::{assert_logits_close as assert_close, Deterministic};
use crate::model::{BitLlamaConfig, MixerKind};
use burn::backend::NdArray;
use burn::module::Module;

type G = NdArray;

const MIXERS: [MixerKind; 3] = [
    MixerKind::TttLinear,
    MixerKind::TttMlp,
    MixerKind::Attention,
];

/// A seeded ternary model of 3 blocks (4 heads of 8, mini-batch 4) saved as a packed file.
fn packed_model(mixer: MixerKind, ternary_head: bool) -> (tempfile::TempDir, std::path::PathBuf) {
    packed_model_of(config(mixer), ternary_head)
}

fn config(mixer: MixerKind) -> BitLlamaConfig {
    BitLlamaConfig::new(61, 32, 3, 4, 48)
        .with_mini_batch_size(4)
        .with_mixer(mixer)
}

/// Every mixer's config, and BitNet b1.58's block (see `model::test_util::variants`).
fn variants() -> Vec<(String, BitLlamaConfig)> {
    crate::model::test_util::variants(config)
}

fn packed_model_of(
    config: BitLlamaConfig,
    ternary_head: bool,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.packed.safetensors");
    let config = config.with_ternary_head(ternary_head);
    config
        .init::<G>(&Default::default())
        .map(&mut Deterministic(23))
        .save_packed(&config, &path)
        .unwrap();
    (dir, path)
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 11 + 5) % 61).collect()
}

fn open(path: &std::path::Path, n: usize) -> HybridDecoder<G> {
    HybridDecoder::<G>::open(path, GpuLayers::Count(n), 64, &Default::default(), 1).unwrap()
}

// As in the fused decoder's tests, the ternary models agree within 1e-4 only while no int8
// activation code differs between the paths; the models are deterministic and none does here.
#[test]
fn every_split_of_every_mixer_decodes_like_the_fused_decoder() {
    let all = tokens(13);
    for (name, config) in variants() {
        for ternary_head in [false, true] {
            let (_dir, path) = packed_model_of(config.clone(), ternary_head);
            let (model, _) = BitLlama::<G>::load_packed(&path, &Default::default()).unwrap();
            let fused = CpuDecoder::new(&model, 1).unwrap();
            for n in 0..=3 {
                let what = format!("{name} head {ternary_head} N={n}");
                let hybrid = open(&path, n);
                assert_eq!(hybrid.plan().n_gpu_layers, n, "{what}");
                assert_eq!(hybrid.plan().head_on_gpu, n == 3, "{what}");
                let (mut state, mut reference) = (hybrid.new_state(), fused.new_state());
                // A prompt of 6 tokens read at once (across a mini-batch boundary), then one
                // token at a time across two more.
                let got = hybrid.read(&all[..6], &mut state).unwrap();
                let expected = fused.read(&all[..6], &mut reference).unwrap();
                assert_close(&got, &expected, &format!("{what} prompt"));
                for (i, &token) in all[6..].iter().enumerate() {
                    let got = hybrid.read(&[token], &mut state).unwrap();
                    let expected = fused.step(token, &mut reference).unwrap();
                    assert_close(&got, &expected, &format!("{what} token {}", 6 + i));
                }
                assert_eq!(state.position(), all.len());
            }
        }
    }
}

/// A state saved at a mini-batch boundary continues bit for bit on the same split; saved in
/// the middle of a mini-batch it continues within float rounding (the fused CPU blocks keep
/// the mini-batch's gradient as rank-one terms, and the `.soul` file holds their sum, as Burn
/// keeps it); on another split or the fused decoder within the usual 1e-4.
#[test]
fn a_saved_state_continues_exactly_on_the_same_split_and_closely_on_another() {
    let all = tokens(13);
    for mixer in MIXERS {
        let (dir, path) = packed_model(mixer, false);
        let hybrid = open(&path, 1);
        let other = open(&path, 3);
        let fused = Decoder::new(
            BitLlama::<G>::load_packed(&path, &Default::default())
                .unwrap()
                .0,
            crate::inference::DecoderChoice::Fused,
            1,
        )
        .unwrap();
        // 8 tokens: the end of the second mini-batch of 4; 7: inside it.
        for saved_at in [8, 7] {
            let what = format!("{} saved at {saved_at}", mixer.name());
            let soul = dir.path().join(format!("context-{saved_at}.soul"));
            let mut state = hybrid.new_state();
            hybrid.read(&all[..saved_at], &mut state).unwrap();
            hybrid.save_state(&state, &soul).unwrap();

            let mut restored = hybrid.load_state(&soul).unwrap();
            assert_eq!(restored.position(), saved_at);
            let mut moved = other.load_state(&soul).unwrap();
            let mut on_fused = fused.load_state(&soul).unwrap();
            for &token in &all[saved_at..] {
                let uninterrupted = hybrid.read(&[token], &mut state).unwrap();
                let again = hybrid.read(&[token], &mut restored).unwrap();
                if saved_at % 4 == 0 || mixer == MixerKind::Attention {
                    assert_eq!(again, uninterrupted, "{what}: same split");
                } else {
                    let scale = uninterrupted.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    let diff = again
                        .iter()
                        .zip(&uninterrupted)
                        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff <= 1e-5 * scale, "{what}: same split, {diff}");
                }
                let elsewhere = other.read(&[token], &mut moved).unwrap();
                assert_close(&elsewhere, &uninterrupted, &format!("{what}, N=3"));
                let cpu = fused.read(&[token], &mut on_fused).unwrap();
                assert_close(&cpu, &uninterrupted, &format!("{what}, fused"));
            }
        }
    }
}

#[test]
fn auto_takes_the_most_blocks_that_fit_the_budget() {
    let (_dir, path) = packed_model(MixerKind::TttLinear, false);
    let hybrid = open(&path, 0);
    let cpu = hybrid.cpu();
    let context = 64;
    let block: Vec<u64> = cpu
        .blocks()
        .iter()
        .map(|b| block_bytes(b, context))
        .collect();
    assert!(block.iter().all(|&b| b > 0));
    let head = cpu.head_bytes() as u64;
    let auto = |budget_bytes| plan(cpu, GpuLayers::Auto { budget_bytes }, context).unwrap();
    let two: u64 = block[..2].iter().sum();
    let all: u64 = block.iter().sum();
    assert_eq!(auto(0).n_gpu_layers, 0);
    assert_eq!(auto(block[0] - 1).n_gpu_layers, 0);
    assert_eq!(auto(block[0]).n_gpu_layers, 1);
    assert_eq!(auto(two - 1).n_gpu_layers, 1);
    let p = auto(two);
    assert_eq!(
        (p.n_gpu_layers, p.head_on_gpu, p.gpu_bytes),
        (2, false, two)
    );
    let p = auto(all + head - 1);
    assert_eq!(
        (p.n_gpu_layers, p.head_on_gpu, p.gpu_bytes),
        (3, false, all)
    );
    let p = auto(all + head);
    assert_eq!(
        (p.n_gpu_layers, p.head_on_gpu, p.gpu_bytes),
        (3, true, all + head)
    );
    assert_eq!(
        plan(cpu, GpuLayers::Count(2), context).unwrap().gpu_bytes,
        two
    );
    assert!(matches!(
        plan(cpu, GpuLayers::Count(4), context),
        Err(BitTttError::InvalidInput(_))
    ));

    // A KV cache grows with the context a plan leaves room for; a TTT state does not.
    let (_dir, attention) = packed_model(MixerKind::Attention, false);
    let hybrid = open(&attention, 0);
    let b = &hybrid.cpu().blocks()[0];
    assert!(block_bytes(b, 1024) > block_bytes(b, 16));
    let ttt = &cpu.blocks()[0];
    assert_eq!(block_bytes(ttt, 1024), block_bytes(ttt, 16));
}

#[test]
fn bad_tokens_foreign_states_and_bad_splits_are_errors_and_change_nothing() {
    let (_dir, path) = packed_model(MixerKind::TttLinear, false);
    let (one, two) = (open(&path, 1), open(&path, 2));
    let mut state = one.new_state();
    one.read(&tokens(3), &mut state).unwrap();
    let before = one.state_to_soul(&state).unwrap();
    let unchanged = |state: &HybridState<G>| {
        let now = one.state_to_soul(state).unwrap();
        assert_eq!(now.position, before.position);
        assert_eq!(now.layers, before.layers);
    };
    assert!(matches!(
        one.read(&[], &mut state),
        Err(BitTttError::InvalidInput(_))
    ));
    assert!(matches!(
        one.read(&[3, 61], &mut state),
        Err(BitTttError::InvalidInput(_))
    ));
    unchanged(&state);
    // A state of another split of the same model.
    assert!(matches!(
        two.read(&[3], &mut state),
        Err(BitTttError::InvalidCache(_))
    ));
    unchanged(&state);
    assert!(matches!(
        HybridDecoder::<G>::open(&path, GpuLayers::Count(4), 64, &Default::default(), 1),
        Err(BitTttError::InvalidInput(_))
    ));
    // A head on the GPU with blocks left on the CPU.
    let (model, _) = BitLlama::<G>::load_packed(&path, &Default::default()).unwrap();
    let cpu = CpuDecoder::new(&model, 1).unwrap();
    let BitLlama {
        blocks,
        norm,
        lm_head,
        ..
    } = model;
    let first = blocks.into_iter().take(1).collect();
    assert!(matches!(
        HybridDecoder::<G>::new(cpu, first, Some((norm, lm_head)), &Default::default()),
        Err(BitTttError::InvalidInput(_))
    ));
}

#[test]
fn a_decoder_runs_the_hybrid_engine_and_a_model_directory_is_refused() {
    let (dir, path) = packed_model(MixerKind::TttLinear, false);
    let hybrid = open(&path, 2);
    let decoder = Decoder::hybrid(hybrid);
    assert_eq!(decoder.kind(), DecoderKind::Hybrid);
    let (model, _) = BitLlama::<G>::load_packed(&path, &Default::default()).unwrap();
    let fused = Decoder::new(model, crate::inference::DecoderChoice::Fused, 1).unwrap();
    let (mut a, mut b) = (decoder.new_state(), fused.new_state());
    let all = tokens(9);
    let got = decoder.read(&all, &mut a).unwrap();
    let expected = fused.read(&all, &mut b).unwrap();
    assert_close(&got, &expected, "N=2 through Decoder");
    // A state of another engine is an error, not a panic.
    assert!(matches!(
        decoder.read(&[1], &mut b),
        Err(BitTttError::InvalidCache(_))
    ));
    let config = GenerationConfig {
        max_new_tokens: 5,
        sampling: crate::SamplingConfig::greedy(),
        stop_tokens: vec![],
    };
    let keep = |_| ControlFlow::Continue(());
    let got = decoder
        .generate(&all, &config, &mut decoder.new_state(), keep)
        .unwrap();
    let expected = fused
        .generate(&all, &config, &mut fused.new_state(), keep)
        .unwrap();
    assert_eq!(got, expected);

    // A model directory holds latent f32 weights, not the packed form a split plans with.
    let model_dir = dir.path().join("model");
    let config = BitLlamaConfig::new(61, 32, 3, 4, 48).with_mini_batch_size(4);
    config
        .init::<G>(&Default::default())
        .map(&mut Deterministic(5))
        .save(&config, &model_dir)
        .unwrap();
    let err = HybridDecoder::<G>::open(&model_dir, GpuLayers::Count(1), 64, &Default::default(), 1)
        .unwrap_err();
    assert!(
        matches!(&err, BitTttError::InvalidInput(m) if m.contains("export")),
        "{err}"
    );
}

#[test]
fn read_all_gives_the_logits_after_every_token() {
    let all = tokens(7);
    for mixer in MIXERS {
        let (_dir, path) = packed_model(mixer, false);
        let (model, _) = BitLlama::<G>::load_packed(&path, &Default::default()).unwrap();
        let fused = CpuDecoder::new(&model, 1).unwrap();
        for n in [0, 2, 3] {
            let hybrid = open(&path, n);
            let rows = hybrid.read_all(&all, &mut hybrid.new_state()).unwrap();
            assert_eq!(rows.len(), all.len() * 61);
            let mut reference = fused.new_state();
            for (t, &token) in all.iter().enumerate() {
                let expected = fused.step(token, &mut reference).unwrap();
                let what = format!("{} N={n} row {t}", mixer.name());
                assert_close(&rows[t * 61..(t + 1) * 61], &expected, &what);
            }
        }
    }
}
