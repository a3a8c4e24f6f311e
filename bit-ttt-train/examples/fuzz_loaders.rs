//! The long run of the loader fuzzer (`bit_ttt_train::fuzz`): every loader, mutated inputs,
//! counts of accepted inputs, typed errors and panics.
//!
//! ```sh
//! cargo run --release -p bit-ttt-train --example fuzz_loaders -- --cases 1000000
//! cargo run --release -p bit-ttt-train --example fuzz_loaders -- --cases 100000 --target packed --seed 7
//! ```
//!
//! Exits 1 if any case panicked, printing the case numbers (the same `--seed` repeats them).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bit_ttt_train::fuzz::{self, Target};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let mut cases: u64 = 10_000;
    let mut seed: u64 = 1;
    let mut targets: Vec<Target> = Target::ALL.to_vec();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--cases" => cases = value()?.parse().context("--cases")?,
            "--seed" => seed = value()?.parse().context("--seed")?,
            "--target" => {
                targets = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, String>>()
                    .map_err(anyhow::Error::msg)?
            }
            other => bail!("unknown argument {other:?}: expected --cases N, --seed N, --target {{config,model,packed,soul,tokenizer,checkpoint}}"),
        }
    }
    let dir = tempfile::tempdir().context("a scratch directory")?;
    let mut clean = true;
    for target in targets {
        let scratch = dir.path().join(target.name());
        let report = fuzz::run(target, cases, seed, &scratch)?;
        println!("{report}");
        for (case, message) in &report.panics {
            println!("    case {case}: panicked: {message}");
        }
        clean &= report.panic_count == 0;
    }
    Ok(clean)
}
