//! Generate text with a trained model directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`), e.g. the one the demo writes:
//!
//! ```text
//! cargo run --release -p bit-ttt-train -- demo          # writes runs/demo
//! cargo run --release --example generate -- runs/demo "Call me Ishmael" 200
//! ```
//!
//! Arguments: model directory, prompt, number of tokens (defaults: runs/demo, "Call me
//! Ishmael", 200). Sampling: temperature 0.8, top-k 40, top-p 0.95, seed 0.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use bit_ttt::bit_ttt_burn::model::files::TOKENIZER_FILE;
use bit_ttt::bit_ttt_burn::{BitLlama, GenerationConfig, SamplingConfig};
use burn::backend::NdArray;
use tokenizers::Tokenizer;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "runs/demo".into()));
    let prompt = args.next().unwrap_or_else(|| "Call me Ishmael".into());
    let max_new_tokens = args.next().map_or(Ok(200), |n| n.parse())?;

    let device = Default::default();
    let (model, config) = BitLlama::<NdArray>::load(&dir, &device).map_err(|e| {
        format!("{e}\n(train a model first: cargo run --release -p bit-ttt-train -- demo)")
    })?;
    let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE))?;
    eprintln!(
        "{}: {} mixer, d_model {}, {} layers, vocabulary {}",
        dir.display(),
        config.mixer.name(),
        config.d_model,
        config.n_layers,
        config.vocab_size
    );

    let prompt_ids = tokenizer.encode(prompt.as_str(), false)?.get_ids().to_vec();
    let generation = GenerationConfig {
        max_new_tokens,
        sampling: SamplingConfig::default(),
        stop_tokens: tokenizer.token_to_id("<|endoftext|>").into_iter().collect(),
    };
    // Decode the whole continuation each time and print what is new, so multi-byte
    // characters split across tokens come out whole.
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    let (mut ids, mut printed) = (Vec::new(), 0);
    model.generate(&prompt_ids, &generation, &mut model.new_state(), |token| {
        ids.push(token);
        if let Ok(text) = tokenizer.decode(&ids, false) {
            if !text.ends_with('\u{FFFD}') && text.len() > printed {
                let _ = write!(out, "{}", &text[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
        }
        ControlFlow::Continue(())
    })?;
    writeln!(out)?;
    Ok(())
}
