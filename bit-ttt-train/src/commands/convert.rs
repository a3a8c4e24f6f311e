//! `convert`: a Hugging Face BitNet b1.58 checkpoint into our packed file, checked by reloading.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bit_ttt_burn::hf_bitnet::{self, ScaleConvention};
use bit_ttt_burn::model::files::TOKENIZER_FILE;
use bit_ttt_burn::{BitLlama, LogitCheck};
use burn::backend::NdArray;
use clap::Args;

use super::{format_count, Exit};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The checkpoint's directory: config.json (model_type "bitnet"), model.safetensors (or a
    /// sharded model.safetensors.index.json), tokenizer.json. Packed (uint8 + weight_scale) and
    /// bf16/f32 weights are both read.
    #[arg(long)]
    hf: PathBuf,
    /// The packed file to write (conventionally DIR/model.packed.safetensors); the checkpoint's
    /// tokenizer.json is copied next to it, where `generate` looks.
    #[arg(long)]
    out: PathBuf,
}

/// `convert`: a Hugging Face BitNet b1.58 checkpoint into our packed file.
pub fn run(args: ConvertArgs) -> Result<Exit> {
    if !args.hf.is_dir() {
        bail!(
            "--hf {} is not a directory; give the checkpoint's directory (config.json, model.safetensors)",
            args.hf.display()
        );
    }
    if args.out.is_dir() {
        bail!(
            "--out {} is a directory; give the file to write, e.g. {}",
            args.out.display(),
            args.out.join("model.packed.safetensors").display()
        );
    }
    let started = Instant::now();
    let device = Default::default();
    let (model, hf) = hf_bitnet::import::<NdArray>(&args.hf, &device)?;
    let c = &hf.config;
    println!(
        "read {}: d_model {}, {} blocks, {} heads ({} key/value), FFN {} ({:?}), vocabulary {}, RoPE θ {}, {} head, {} scales",
        args.hf.display(),
        c.d_model,
        c.n_layers,
        c.n_heads,
        c.kv_heads(),
        c.d_ffn,
        c.ffn_activation(),
        format_count(c.vocab_size),
        c.rope_theta,
        if hf.tied { "tied" } else { "separate" },
        match hf.scale {
            ScaleConvention::Multiply => "multiplying (autobitlinear)",
            ScaleConvention::Divide => "dividing (bitlinear)",
        }
    );
    // The tokenizer (read once) before the large write: a conflict must stop us first.
    let tokenizer = args.hf.join(TOKENIZER_FILE);
    let out_dir = match args.out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tokenizer_out = out_dir.join(TOKENIZER_FILE);
    let tokenizer_bytes = if tokenizer.is_file() && !same_file(&tokenizer, &tokenizer_out) {
        let theirs = std::fs::read(&tokenizer).with_context(|| tokenizer.display().to_string())?;
        if tokenizer_out.exists() {
            let ours = std::fs::read(&tokenizer_out)
                .with_context(|| tokenizer_out.display().to_string())?;
            if ours != theirs {
                bail!(
                    "{} holds another tokenizer; write the model into its own directory",
                    tokenizer_out.display()
                );
            }
        }
        Some(theirs)
    } else {
        None
    };
    model.save_packed(c, &args.out)?;
    if let Some(bytes) = &tokenizer_bytes {
        bit_ttt_burn::files::write_atomic(&tokenizer_out, bytes)?;
    }
    // Load it back by memory map, as generate and eval will, and compare the logits.
    let (packed, _) = BitLlama::<NdArray>::load_packed(&args.out, &device)?;
    let check = model.check_packed_logits(&packed, &LogitCheck::probe_tokens(c.vocab_size))?;
    let size = std::fs::metadata(&args.out)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    println!(
        "wrote {} ({} bytes) in {:.1} s; reloaded by memory map, max logit difference {:.2e}",
        args.out.display(),
        format_count(size),
        started.elapsed().as_secs_f64(),
        check.max_abs_diff
    );
    if !check.within(1e-4 * check.max_abs_logit.max(1.0)) {
        bail!(
            "the packed file's logits differ from the imported model's by {:.2e}: {} does not hold this model",
            check.max_abs_diff,
            args.out.display()
        );
    }
    if tokenizer.is_file() {
        println!("tokenizer: {}", tokenizer_out.display());
    } else {
        println!(
            "no {TOKENIZER_FILE} in {}: give generate --tokenizer FILE",
            args.hf.display()
        );
    }
    Ok(Exit::Ok)
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!(
        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
        (Ok(x), Ok(y)) if x == y
    )
}
