//! Hugging Face BitNet b1.58 import against transformers: the tiny random `BitNetForCausalLM`
//! of `tests/fixtures/bitnet-tiny` (made once by `tools/make_bitnet_fixture.py`) in its three
//! weight forms, with the logits transformers computed for each.
//!
//! Every form is imported, saved as our packed file, loaded again (memory-mapped) and run on
//! Burn's op-by-op path and on the fused CPU decoder: the logits of every position of every
//! prompt equal transformers' within 1e-3 of the largest, and greedy decoding continues with
//! transformers' 32 tokens. Broken checkpoints are typed errors.

use std::path::{Path, PathBuf};

use bit_ttt::bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt::bit_ttt_burn::hf_bitnet::{self, ScaleConvention};
use bit_ttt::bit_ttt_burn::model::FfnActivation;
use bit_ttt::bit_ttt_burn::{BitLlama, BitTttError, MixerKind};
use burn::backend::NdArray;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

type B = NdArray;

/// Relative to the largest logit of a position's reference.
const TOLERANCE: f32 = 1e-3;

fn fixture(form: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bitnet-tiny")
        .join(form)
}

struct Reference {
    prompts: Vec<Vec<u32>>,
    /// Per prompt, `[len · vocab]`.
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn reference(form: &str) -> Reference {
    let bytes = std::fs::read(fixture(form).join("reference.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        let t = file.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64);
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    let floats = |name: &str| -> Vec<f32> {
        let t = file.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    Reference {
        prompts: (0..3).map(|k| ints(&format!("prompt.{k}"))).collect(),
        logits: (0..3).map(|k| floats(&format!("logits.{k}"))).collect(),
        greedy: ints("greedy.tokens"),
    }
}

/// Checks every position's logits against transformers'; returns the largest difference
/// relative to the position's largest logit.
fn assert_close(got: &[f32], expected: &[f32], vocab: usize, what: &str) -> f32 {
    assert_eq!(got.len(), expected.len(), "{what}");
    let mut worst = 0.0f32;
    for (pos, (g, e)) in got
        .chunks_exact(vocab)
        .zip(expected.chunks_exact(vocab))
        .enumerate()
    {
        let scale = e.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = g
            .iter()
            .zip(e)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= TOLERANCE * scale,
            "{what}, position {pos}: logits differ from transformers' by {diff} (largest {scale})"
        );
        worst = worst.max(diff / scale);
    }
    worst
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn every_weight_form_gives_transformers_logits_and_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for (form, convention) in [
        ("bf16", ScaleConvention::Multiply),
        ("packed", ScaleConvention::Multiply),
        ("packed-bitlinear", ScaleConvention::Divide),
    ] {
        let (model, hf) = hf_bitnet::import::<B>(&fixture(form), &Default::default()).unwrap();
        let c = &hf.config;
        assert_eq!(
            (
                c.vocab_size,
                c.d_model,
                c.n_layers,
                c.n_heads,
                c.kv_heads(),
                c.d_ffn
            ),
            (300, 64, 2, 4, 2, 96),
            "{form}"
        );
        assert_eq!(c.mixer, MixerKind::Attention);
        assert_eq!(c.ffn_activation(), FfnActivation::Relu2);
        assert!(c.has_sub_norms() && hf.tied);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), Some(vec![2]))
        );
        assert_eq!((c.rope_theta, c.norm_eps), (500_000.0, 1e-5));
        if form != "bf16" {
            assert_eq!(hf.scale, convention, "{form}");
        }

        // Through our packed file, as `convert` writes it and every engine reads it.
        let path = dir.path().join(format!("{form}.packed.safetensors"));
        model.save_packed(c, &path).unwrap();
        let (loaded, saved_config) =
            BitLlama::<B>::load_packed(&path, &Default::default()).unwrap();
        assert_eq!(&saved_config, c);
        let decoder = CpuDecoder::new(&loaded, 1).unwrap();
        let expected = reference(form);
        let mut worst = [0.0f32; 2];
        for (prompt, logits) in expected.prompts.iter().zip(&expected.logits) {
            let what = format!("{form} prompt of {}", prompt.len());
            let burn = loaded.read_all(prompt, &mut loaded.new_state()).unwrap();
            worst[0] = worst[0].max(assert_close(&burn, logits, 300, &format!("{what} (Burn)")));
            let fused = decoder.read_all(prompt, &mut decoder.new_state()).unwrap();
            worst[1] = worst[1].max(assert_close(
                &fused,
                logits,
                300,
                &format!("{what} (fused)"),
            ));
        }

        // Greedy: 32 tokens after the longest prompt, one step at a time (the KV cache).
        let prompt = &expected.prompts[2];
        let mut state = decoder.new_state();
        let mut logits = decoder.read(prompt, &mut state).unwrap();
        let mut tokens = Vec::new();
        for _ in 0..expected.greedy.len() {
            let next = argmax(&logits);
            tokens.push(next);
            logits = decoder.step(next, &mut state).unwrap();
        }
        assert_eq!(tokens, expected.greedy, "{form}: greedy continuation");

        // The head 8 bits a weight: the logits move by its rounding, reported and bounded.
        let int8 = CpuDecoder::new(&loaded, 1)
            .unwrap()
            .with_int8_head()
            .unwrap();
        assert!(int8.has_int8_head());
        let mut int8_worst = 0.0f32;
        for (prompt, logits) in expected.prompts.iter().zip(&expected.logits) {
            let got = int8.read_all(prompt, &mut int8.new_state()).unwrap();
            for (g, e) in got.chunks_exact(300).zip(logits.chunks_exact(300)) {
                let scale = e.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = g
                    .iter()
                    .zip(e)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                int8_worst = int8_worst.max(diff / scale);
            }
        }
        assert!(
            int8_worst > worst[1] && int8_worst < 3e-2,
            "{form}: int8 head moves the logits by {int8_worst:.2e} of the largest"
        );
        println!(
            "{form}: largest logit difference / largest logit: Burn {:.2e}, fused {:.2e}, fused with int8 head {int8_worst:.2e}",
            worst[0], worst[1]
        );
    }
}

/// Copies the packed fixture to a temporary directory, with `edit` applied to its tensors
/// (name → dtype, shape, bytes) and `config` to its `config.json` text.
fn broken_copy(
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
    config: impl FnOnce(String) -> String,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("packed");
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(source.join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), config(text)).unwrap();
    dir
}

fn import_error(dir: &Path) -> BitTttError {
    hf_bitnet::import::<B>(dir, &Default::default()).unwrap_err()
}

#[test]
fn broken_checkpoints_are_typed_errors() {
    const Q: &str = "model.layers.1.self_attn.q_proj.weight";
    let keep = |t: String| t;

    let missing = broken_copy(|t| t.retain(|(n, ..)| n != Q), keep);
    assert!(
        matches!(import_error(missing.path()), BitTttError::MissingTensor { ref name, .. } if name == Q),
        "{}",
        import_error(missing.path())
    );

    let narrow = broken_copy(
        |t| {
            let q = t.iter_mut().find(|(n, ..)| n == Q).unwrap();
            q.2 = vec![8, 64];
            q.3.truncate(8 * 64);
        },
        keep,
    );
    match import_error(narrow.path()) {
        BitTttError::ShapeMismatch {
            name,
            expected,
            actual,
            ..
        } => {
            assert_eq!(
                (name.as_str(), expected, actual),
                (Q, vec![16, 64], vec![8, 64])
            );
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }

    let code_three = broken_copy(
        |t| t.iter_mut().find(|(n, ..)| n == Q).unwrap().3[5] = 0b1100_0000,
        keep,
    );
    let err = import_error(code_three.path());
    assert!(
        matches!(err, BitTttError::CorruptFile { ref reason, .. } if reason.contains("code 3")),
        "{err}"
    );

    let int_scale = broken_copy(
        |t| {
            let s = t
                .iter_mut()
                .find(|(n, ..)| n == "model.layers.0.mlp.up_proj.weight_scale")
                .unwrap();
            s.1 = Dtype::I16;
        },
        keep,
    );
    let err = import_error(int_scale.path());
    assert!(matches!(err, BitTttError::DtypeMismatch { .. }), "{err}");

    let llama = broken_copy(
        |_| {},
        |c| c.replace("\"model_type\": \"bitnet\"", "\"model_type\": \"llama\""),
    );
    let err = import_error(llama.path());
    assert!(
        matches!(err, BitTttError::UnsupportedCheckpoint { ref reason, .. } if reason.contains("llama")),
        "{err}"
    );

    let odd_heads = broken_copy(
        |_| {},
        |c| c.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    );
    let err = import_error(odd_heads.path());
    assert!(
        matches!(err, BitTttError::InvalidConfig { ref reason, .. } if reason.contains("n_kv_heads")),
        "{err}"
    );

    let not_json = broken_copy(|_| {}, |c| c[..c.len() / 2].to_string());
    assert!(matches!(
        import_error(not_json.path()),
        BitTttError::InvalidConfig { .. }
    ));

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        import_error(empty.path()),
        BitTttError::MissingFile(_)
    ));
}

/// What `config.json` leaves to other files or to defaults: EOS ids from
/// `generation_config.json` join the config's; offline float weights are read as the ternary
/// values they must be (the packed fixture unpacked gives its logits), and latent ones under
/// an offline config are refused; layers kept in full precision are refused.
#[test]
fn generation_eos_offline_float_weights_and_full_precision_layers() {
    // The packed fixture with every projection unpacked into f32 ternary values.
    let unpacked = broken_copy(
        |t| {
            for (name, dtype, shape, bytes) in t.iter_mut() {
                if *dtype != Dtype::U8 {
                    continue;
                }
                let (quarter, cols) = (shape[0], shape[1]);
                let mut values = vec![0f32; 4 * quarter * cols];
                for (j, row) in bytes.chunks_exact(cols).enumerate() {
                    for (c, &byte) in row.iter().enumerate() {
                        for i in 0..4 {
                            let code = (byte >> (2 * i)) & 3;
                            values[(i * quarter + j) * cols + c] = f32::from(code) - 1.0;
                        }
                    }
                }
                assert!(name.ends_with(".weight"));
                *dtype = Dtype::F32;
                *shape = vec![4 * quarter, cols];
                *bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            }
        },
        |c| c,
    );
    std::fs::write(
        unpacked.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 5]}"#,
    )
    .unwrap();
    let (model, hf) = hf_bitnet::import::<B>(unpacked.path(), &Default::default()).unwrap();
    assert!(hf.offline);
    assert_eq!(hf.config.eos_token_ids, Some(vec![2, 5]));
    let decoder = CpuDecoder::new(&model, 1).unwrap();
    let expected = reference("packed");
    let got = decoder
        .read_all(&expected.prompts[2], &mut decoder.new_state())
        .unwrap();
    assert_close(
        &got,
        &expected.logits[2],
        300,
        "offline f32 ternary weights",
    );

    // Latent (non-ternary) weights under an offline config.
    let dir = tempfile::tempdir().unwrap();
    let weights = "model.safetensors";
    std::fs::copy(fixture("bf16").join(weights), dir.path().join(weights)).unwrap();
    let config = std::fs::read_to_string(fixture("bf16").join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"online\"", "\"offline\""),
    )
    .unwrap();
    let err = import_error(dir.path());
    assert!(
        matches!(err, BitTttError::UnsupportedCheckpoint { ref reason, .. } if reason.contains("must be -1, 0 or 1")),
        "{err}"
    );

    let kept = broken_copy(
        |_| {},
        |c| {
            c.replace(
                "\"quant_method\": \"bitnet\",",
                "\"quant_method\": \"bitnet\", \"modules_to_not_convert\": [\"lm_head\", \"model.layers.0.mlp.up_proj\"],",
            )
        },
    );
    let err = import_error(kept.path());
    assert!(
        matches!(err, BitTttError::UnsupportedCheckpoint { ref reason, .. } if reason.contains("up_proj")),
        "{err}"
    );
}
