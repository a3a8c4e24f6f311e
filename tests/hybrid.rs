//! The hybrid decoder with wgpu (on CI: lavapipe) as its GPU side and the fused CPU decoder as
//! its CPU side: every split of every mixer gives the fused decoder's logits, token by token
//! across mini-batch boundaries, and a state saved mid-run continues exactly.

mod common;

use bit_ttt::bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt::bit_ttt_burn::hybrid::{GpuLayers, HybridDecoder};
use bit_ttt::bit_ttt_burn::{BitLlama, BitLlamaConfig, MixerKind};
use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::NdArray;

/// Tolerance, relative to the largest logit: the projections quantize their activations to
/// int8, and an activation within a float rounding of a code boundary can take the
/// neighbouring code on the other side (see `tests/wgpu_agreement.rs`); 5e-2 allows for that
/// and still catches a wrong block, state or position.
const TOLERANCE: f32 = 5e-2;

fn assert_close(got: &[f32], expected: &[f32], what: &str) {
    let diff = common::max_abs_diff(got, expected);
    let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    assert!(
        diff <= TOLERANCE * scale,
        "{what}: hybrid and fused logits differ by {diff} (largest {scale})"
    );
}

#[test]
fn hybrid_wgpu_and_cpu_decodes_like_the_fused_decoder() {
    if !common::wgpu_available("hybrid_wgpu_and_cpu_decodes_like_the_fused_decoder") {
        return;
    }
    let gpu = WgpuDevice::default();
    let tokens: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 40).collect();
    for mixer in [
        MixerKind::TttLinear,
        MixerKind::TttMlp,
        MixerKind::Attention,
    ] {
        // 3 blocks, mini-batch 4: 11 tokens cross two mini-batch boundaries.
        let config = BitLlamaConfig::new(40, 32, 3, 4, 48)
            .with_mini_batch_size(4)
            .with_mixer(mixer);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.packed.safetensors");
        config
            .init::<NdArray>(&Default::default())
            .save_packed(&config, &path)
            .unwrap();
        let (on_host, _) = BitLlama::<NdArray>::load_packed(&path, &Default::default()).unwrap();
        let fused = CpuDecoder::new(&on_host, 1).unwrap();
        for n in [0, 1, 2, 3] {
            let what = format!("{} N={n}", mixer.name());
            let hybrid =
                HybridDecoder::<Wgpu>::open(&path, GpuLayers::Count(n), 64, &gpu, 1).unwrap();
            let (mut state, mut reference) = (hybrid.new_state(), fused.new_state());
            // A prompt at once (the GPU blocks' batched forward), then token by token.
            let got = hybrid.read(&tokens[..5], &mut state).unwrap();
            let expected = fused.read(&tokens[..5], &mut reference).unwrap();
            assert_close(&got, &expected, &format!("{what} prompt"));
            let mut previous = got;
            for (i, &token) in tokens[5..8].iter().enumerate() {
                let got = hybrid.read(&[token], &mut state).unwrap();
                let expected = fused.step(token, &mut reference).unwrap();
                assert_close(&got, &expected, &format!("{what} token {}", 5 + i));
                // The tolerance tells positions apart: the logits one token earlier are
                // farther from these than it allows.
                let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                assert!(
                    common::max_abs_diff(&previous, &expected) > TOLERANCE * scale,
                    "{what}: the tolerance cannot tell token {} from the one before",
                    5 + i
                );
                previous = got;
            }
            // Saved mid-run and restored: continues exactly as the uninterrupted run.
            let soul = dir.path().join(format!("n{n}.soul"));
            hybrid.save_state(&state, &soul).unwrap();
            let mut restored = hybrid.load_state(&soul).unwrap();
            for &token in &tokens[8..] {
                let uninterrupted = hybrid.read(&[token], &mut state).unwrap();
                let again = hybrid.read(&[token], &mut restored).unwrap();
                assert_eq!(again, uninterrupted, "{what}: restored state");
                let expected = fused.step(token, &mut reference).unwrap();
                assert_close(&uninterrupted, &expected, &what);
            }
        }
    }
}
