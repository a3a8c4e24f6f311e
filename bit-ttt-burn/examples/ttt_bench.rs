//! Benchmark of a 125M-sized TTT layer on ndarray (f32, CPU).
//!
//! `cargo run --release -p bit-ttt-burn --example ttt_bench [-- --mlp] [--f32] [--quick]`
//!
//! `--mlp`: TTT-MLP instead of TTT-Linear; `--f32`: f32 projections instead of ternary
//! (BitLinear re-quantizes its latent weights on every call, which dominates decoding);
//! `--quick`: 256-token prefill and 2k context, for a smoke test.
//!
//! Prints prefill throughput at 2,048 tokens for the dual form and the autodiff inner loop,
//! and the decode time per token after 1k and 16k tokens of context (the context is prefilled
//! with the dual form, then tokens are decoded one at a time with the cache, primal form), and
//! beside it the decode time of causal attention with a KV cache of the same lengths.

use std::time::{Duration, Instant};

use bit_ttt_burn::attention::{AttentionConfig, KvCache};
use bit_ttt_burn::ttt::{primal_mini_batch, MiniBatch};
use bit_ttt_burn::{InnerLoopImpl, TttCache, TttConfig, TttInner, TttLayer};
use burn::backend::NdArray;
use burn::tensor::{backend::Backend, Distribution, Tensor};

type B = NdArray<f32>;

/// d_model 768, 12 heads of 64, mini-batch 16: the layer of the paper's 125M model.
fn layer(inner: TttInner, ternary: bool) -> TttLayer<B> {
    TttConfig::new(768, 12)
        .with_inner(inner)
        .with_ternary(ternary)
        .init(&Default::default())
}

fn tokens(len: usize) -> Tensor<B, 3> {
    Tensor::random(
        [1, len, 768],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    )
}

/// Runs `f` and returns its wall time, after making sure the result is computed.
fn time<const D: usize>(f: impl FnOnce() -> Tensor<B, D>) -> Duration {
    let start = Instant::now();
    let out = f();
    B::sync(&Default::default()).unwrap();
    drop(out);
    start.elapsed()
}

fn prefill_tokens_per_s(layer: &TttLayer<B>, implementation: InnerLoopImpl, len: usize) -> f64 {
    let x = tokens(len);
    let elapsed = time(|| layer.forward_with_impl(x, implementation));
    len as f64 / elapsed.as_secs_f64()
}

/// Mean time of the TTT state update alone (one token, primal form, all 12 heads), without
/// the projections, post-norm and output projection around it.
fn inner_step_ms(layer: &TttLayer<B>, cache: &TttCache<B>, steps: usize) -> f64 {
    let device = Default::default();
    let head = || Tensor::<B, 4>::random([1, 12, 1, 64], Distribution::Normal(0.0, 1.0), &device);
    let position = cache.position_in_mini_batch();
    let mini_batch = MiniBatch {
        xq: head(),
        xk: head(),
        xv: head(),
        token_eta: layer.token_eta().narrow(0, position, 1),
        ttt_lr_eta: Tensor::full([1, 12, 1], 0.5 / 64.0, &device),
    };
    let start = Instant::now();
    for _ in 0..steps {
        let _ = primal_mini_batch(
            &layer.inner,
            cache.state(),
            cache.earlier_grads(),
            &mini_batch,
        );
    }
    start.elapsed().as_secs_f64() * 1e3 / steps as f64
}

/// Mean decode time per token over `steps` tokens, continuing from `cache`.
fn decode_ms_per_token(layer: &TttLayer<B>, cache: &mut TttCache<B>, steps: usize) -> f64 {
    // One untimed step: the first call after a prefill allocates.
    layer.forward_with_cache(tokens(1), cache);
    let inputs: Vec<Tensor<B, 3>> = (0..steps).map(|_| tokens(1)).collect();
    let start = Instant::now();
    for x in inputs {
        let _ = layer.forward_with_cache(x, cache);
    }
    B::sync(&Default::default()).unwrap();
    start.elapsed().as_secs_f64() * 1e3 / steps as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let inner = if args.iter().any(|a| a == "--mlp") {
        TttInner::Mlp
    } else {
        TttInner::Linear
    };
    let quick = args.iter().any(|a| a == "--quick");
    let ternary = !args.iter().any(|a| a == "--f32");
    let (prefill_len, long_context, decode_steps) = if quick {
        (256, 2048, 10)
    } else {
        (2048, 16_384, 50)
    };
    B::seed(&Default::default(), 0);
    let layer = layer(inner, ternary);
    println!(
        "TTT-{} layer, d_model 768, 12 heads x 64, mini-batch 16, {} projections, ndarray f32, batch 1, {} threads",
        match inner {
            TttInner::Linear => "Linear",
            TttInner::Mlp => "MLP",
        },
        if ternary { "ternary (BitLinear)" } else { "f32" },
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // Warm-up (allocations, thread pool).
    let _ = layer.forward(tokens(32));

    for implementation in [InnerLoopImpl::Dual, InnerLoopImpl::Autodiff] {
        let rate = prefill_tokens_per_s(&layer, implementation, prefill_len);
        println!(
            "prefill {prefill_len:>5} tokens, {:<8}: {rate:>8.0} tokens/s",
            format!("{implementation:?}")
        );
    }

    for context in [1024, long_context] {
        let start = Instant::now();
        let (_, mut cache) = layer.forward_prefill(tokens(context), InnerLoopImpl::Dual);
        let prefill_s = start.elapsed().as_secs_f64();
        let inner_ms = inner_step_ms(&layer, &cache, decode_steps);
        let ms = decode_ms_per_token(&layer, &mut cache, decode_steps);
        println!(
            "decode after {context:>5} tokens of context: {ms:>6.2} ms/token, of which the TTT state \
             update {inner_ms:.2} ms (means of {decode_steps}; context prefilled with the dual form \
             in {prefill_s:.1} s; state {} KiB)",
            cache.size_bytes() / 1024
        );
    }

    // The baseline TTT replaces: causal attention with a KV cache of the same width. Its decode
    // cost depends only on the cache length, so the cache is filled with random keys and values
    // of the right shape instead of a (quadratic) 16k-token prefill.
    let attention = AttentionConfig::new(768, 12)
        .with_ternary(ternary)
        .init::<B>(&Default::default());
    for context in [1024, long_context] {
        let kv = || {
            Tensor::<B, 4>::random(
                [1, 12, context, 64],
                Distribution::Normal(0.0, 1.0),
                &Default::default(),
            )
        };
        let mut cache = KvCache {
            keys: Some(kv()),
            values: Some(kv()),
        };
        let _ = attention.forward_with_cache(tokens(1), &mut cache);
        let inputs: Vec<Tensor<B, 3>> = (0..decode_steps).map(|_| tokens(1)).collect();
        let start = Instant::now();
        for x in inputs {
            let _ = attention.forward_with_cache(x, &mut cache);
        }
        B::sync(&Default::default()).unwrap();
        let ms = start.elapsed().as_secs_f64() * 1e3 / decode_steps as f64;
        println!(
            "attention decode after {context:>5} tokens of context: {ms:>6.2} ms/token (KV cache {} KiB, grows with the context)",
            cache.num_elements() * 4 / 1024
        );
    }
}
