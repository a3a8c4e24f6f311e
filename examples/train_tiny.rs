//! The library end to end: build a small ternary TTT-Linear model, train it on a toy text
//! (bytes as tokens), save it, load it back and generate.
//!
//! ```text
//! cargo run --release --example train_tiny
//! ```
//!
//! The command line (`bit-ttt-train`) does the same with a real tokenizer, checkpoints,
//! metrics and evaluation; this is the API it is built on.

use std::ops::ControlFlow;

use bit_ttt::bit_ttt_burn::cpu_decode::CpuDecoder;
use bit_ttt::bit_ttt_burn::{
    BitLlama, BitLlamaConfig, GenerationConfig, MixerKind, SamplingConfig, TernaryBackend,
};
use burn::backend::{Autodiff, NdArray};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

type B = Autodiff<NdArray>;

const TEXT: &str = "Call me Ishmael. Some years ago, never mind how long precisely, having little \
or no money in my purse, and nothing particular to interest me on shore, I thought I would sail \
about a little and see the watery part of the world. ";
const SEQ: usize = 32;
const BATCH: usize = 8;
const STEPS: usize = 150;

/// Mean next-token cross-entropy of windows `[batch, SEQ + 1]`.
fn loss<B: TernaryBackend>(model: &BitLlama<B>, windows: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, len] = windows.dims();
    let inputs = windows.clone().narrow(1, 0, len - 1);
    let targets = windows
        .narrow(1, 1, len - 1)
        .reshape([batch * (len - 1), 1]);
    let logits = model.forward(inputs).reshape([batch * (len - 1), 256]);
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    B::seed(&device, 0);
    // Bytes are the tokens: vocabulary 256. Ternary projections, TTT-Linear mixers.
    let config = BitLlamaConfig::new(256, 64, 2, 4, 128)
        .with_mixer(MixerKind::TttLinear)
        .with_mini_batch_size(8);
    let mut model: BitLlama<B> = config.init(&device);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init();

    let text: Vec<i64> = TEXT.repeat(8).bytes().map(i64::from).collect();
    let mut rng: u64 = 1;
    for step in 1..=STEPS {
        // Random windows of SEQ + 1 bytes (a tiny LCG keeps the example dependency-free).
        let mut ids = Vec::with_capacity(BATCH * (SEQ + 1));
        for _ in 0..BATCH {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (rng >> 33) as usize % (text.len() - SEQ - 1);
            ids.extend_from_slice(&text[start..=start + SEQ]);
        }
        let windows = Tensor::from_data(TensorData::new(ids, [BATCH, SEQ + 1]), &device);
        let loss = loss(&model, windows);
        if step % 25 == 0 || step == 1 {
            println!(
                "step {step:>3}: loss {:.3} nats/byte",
                loss.clone().into_scalar()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = 3e-3 * (1.0 - step as f64 / STEPS as f64).max(0.1);
        model = optim.step(lr, model, grads);
    }

    // Save as a model directory (config.json + model.safetensors) and load it back.
    let dir = std::env::temp_dir().join("bit-ttt-train-tiny");
    let model = model.valid(); // drop autodiff for inference
    model.save(&config, &dir)?;
    let (model, _) = BitLlama::<NdArray>::load(&dir, &device)?;
    println!("saved and reloaded {}", dir.display());

    // Generate, streaming each byte as it comes; the TTT state carries the context.
    let prompt: Vec<u32> = "Call me ".bytes().map(u32::from).collect();
    let generation = GenerationConfig {
        max_new_tokens: 80,
        sampling: SamplingConfig::greedy(),
        stop_tokens: vec![],
    };
    print!("Call me ");
    let mut state = model.new_state();
    let burn_tokens = model.generate(&prompt, &generation, &mut state, |token| {
        print!("{}", char::from(token as u8));
        ControlFlow::Continue(())
    })?;
    println!();

    // The same with the fused CPU decoder (packed weights, one token through the whole model
    // without Burn's per-op overhead): the same logits up to float rounding.
    let decoder = CpuDecoder::new(&model, 0)?;
    let fused_tokens = decoder.generate(&prompt, &generation, &mut decoder.new_state(), |_| {
        ControlFlow::Continue(())
    })?;
    let same = burn_tokens
        .iter()
        .zip(&fused_tokens)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "fused CPU decoder: {same} of {} greedy tokens equal to the Burn decode's",
        burn_tokens.len()
    );
    Ok(())
}
