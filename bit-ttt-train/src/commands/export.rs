//! `export`: writes the packed inference file of a model directory and checks it by reloading.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use bit_ttt_burn::{BitLlama, LogitCheck};
use burn::backend::NdArray;
use clap::Args;

use super::{format_count, Exit};

// No doc comment: clap would show it in place of the subcommand's own (in main.rs).
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Output file (default: MODEL/model.packed.safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// File name of the packed inference file `export` writes by default.
pub const PACKED_FILE: &str = "model.packed.safetensors";

/// `export`: writes the packed inference file of a model directory and checks it by reloading.
pub fn run(args: ExportArgs) -> Result<Exit> {
    if args.model.is_file() {
        bail!(
            "--model {} is a file; export reads a model directory (config.json, model.safetensors)",
            args.model.display()
        );
    }
    let device = Default::default();
    let (model, config) = BitLlama::<NdArray>::load(&args.model, &device)?;
    let out = args.out.unwrap_or_else(|| args.model.join(PACKED_FILE));
    // Never write the packed file over one of the model's own files.
    let model_files = [
        bit_ttt_burn::model::files::WEIGHTS_FILE,
        bit_ttt_burn::model::files::CONFIG_FILE,
        bit_ttt_burn::model::files::TOKENIZER_FILE,
    ];
    for name in model_files {
        let existing = args.model.join(name);
        if existing.exists()
            && std::fs::canonicalize(&existing).ok() == std::fs::canonicalize(&out).ok()
        {
            bail!(
                "--out {} is the model's own {name}; choose another file",
                out.display()
            );
        }
    }
    let started = Instant::now();
    model.save_packed(&config, &out)?;
    // Load it back by memory map, as generate and eval will, and compare the logits.
    let (packed, _) = BitLlama::<NdArray>::load_packed(&out, &device)?;
    let check = model.check_packed_logits(&packed, &LogitCheck::probe_tokens(config.vocab_size))?;
    let diff = check.max_abs_diff;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
    println!(
        "wrote {} ({} bytes; model.safetensors {} bytes) in {:.1} s; reloaded by memory map, max logit difference {diff:.2e}",
        out.display(),
        format_count(size(&out)),
        format_count(size(&args.model.join(bit_ttt_burn::model::files::WEIGHTS_FILE))),
        started.elapsed().as_secs_f64()
    );
    // The packed logits equal the training-mode ones up to float rounding; anything more (or
    // a NaN) means the file does not hold this model.
    if !check.within(1e-4 * check.max_abs_logit.max(1.0)) {
        bail!(
            "the packed file's logits differ from the model's by {diff:.2e} (largest logit {:.2e}): {} does not hold this model",
            check.max_abs_logit,
            out.display()
        );
    }
    Ok(Exit::Ok)
}
