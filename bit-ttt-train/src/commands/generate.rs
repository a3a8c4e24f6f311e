//! `generate`: streams a continuation of a prompt.

use std::path::PathBuf;

use crate::with_backend;
use anyhow::Result;
use bit_ttt_burn::hybrid::HybridDecoder;
use bit_ttt_burn::inference::{Decoder, DecoderChoice};
use bit_ttt_burn::BitLlama;
use clap::Args;

use super::{
    find_tokenizer, generate_text, report_split, sampling, DeviceArgs, Exit, SpecialTokens,
    SplitArgs,
};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json), or a packed file
    /// (`export`'s model.packed.safetensors, memory-mapped).
    #[arg(long)]
    model: PathBuf,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// tokenizer.json (default: the model directory's, or its run directory's; for a packed
    /// file, the directory's that holds it).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches p (1: all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Store the f32 head 8 bits a weight (a scale per vocabulary row) for decoding: a quarter
    /// of its bytes per token, at the cost of one rounding per weight and of its input (fused CPU
    /// decoder only).
    #[arg(long)]
    int8_head: bool,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    split: SplitArgs,
}

/// `generate`: streams a continuation of a prompt.
pub fn run(args: GenerateArgs) -> Result<Exit> {
    let device = args.device.device.check()?;
    let split = args.split.layers(device)?;
    let tokenizer = find_tokenizer(args.tokenizer.as_deref(), &args.model)?;
    let sampling = sampling(args.temperature, args.top_k, args.top_p, args.seed);
    sampling.validate()?;
    with_backend!(device, |B, dev| {
        if args.int8_head && split.is_some() {
            anyhow::bail!("--int8-head runs on the fused CPU decoder, not with --n-gpu-layers");
        }
        let (decoder, special) = match split {
            Some(layers) => {
                let hybrid =
                    HybridDecoder::<B>::open(&args.model, layers, args.split.context, &dev, 0)?;
                report_split(&hybrid.plan(), hybrid.cpu().blocks().len(), device);
                let config = bit_ttt_burn::model::packed_config(&args.model)?;
                (Decoder::hybrid(hybrid), SpecialTokens::of(&config))
            }
            None => {
                let (model, config) = BitLlama::<B>::open(&args.model, &dev)?;
                // The library picks the engine: the fused decoder where the model computes on
                // the CPU (the same logits without Burn's per-op overhead), Burn's ops on a GPU.
                let decoder = Decoder::new(model, DecoderChoice::Auto, 0)?;
                let decoder = if args.int8_head {
                    decoder.with_int8_head()?
                } else {
                    decoder
                };
                (decoder, SpecialTokens::of(&config))
            }
        };
        generate_text(
            &mut |ids, config, on_token| {
                decoder.generate(ids, config, &mut decoder.new_state(), on_token)
            },
            &tokenizer,
            special,
            &args.prompt,
            args.max_tokens,
            sampling,
            "",
        )?;
        Ok(Exit::Ok)
    })
}
