//! `export`: writes the packed inference file of a model directory and checks it by reloading.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use bit_ttt_burn::BitLlama;
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
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};
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
    // Load it back and compare the logits on a few tokens.
    let (packed, _) = BitLlama::<NdArray>::load_packed(&out, &device)?;
    let ids: Vec<i64> = (0..16)
        .map(|i| (i * 37 % config.vocab_size) as i64)
        .collect();
    let logits = |m: &BitLlama<NdArray>| -> Result<Vec<f32>> {
        let input =
            Tensor::<NdArray, 2, Int>::from_data(TensorData::new(ids.clone(), [1, 16]), &device);
        m.forward(input)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let diff = logits(&model)?
        .iter()
        .zip(&logits(&packed)?)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
    println!(
        "wrote {} ({} bytes; model.safetensors {} bytes) in {:.1} s; reloaded by memory map, max logit difference {diff:.2e}",
        out.display(),
        format_count(size(&out)),
        format_count(size(&args.model.join(bit_ttt_burn::model::files::WEIGHTS_FILE))),
        started.elapsed().as_secs_f64()
    );
    Ok(Exit::Ok)
}
