//! `bit-ttt-train`: the command line of bit-ttt.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Train, evaluate and run ternary TTT language models.
#[derive(Parser, Debug)]
#[command(name = "bit-ttt-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the compiled-in backends and versions.
    Info,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => {
            println!("bit-ttt-train {}", env!("CARGO_PKG_VERSION"));
            println!("burn 0.21.0");
            let backends: Vec<&str> = [
                (cfg!(feature = "ndarray"), "ndarray"),
                (cfg!(feature = "wgpu"), "wgpu"),
                (cfg!(feature = "cuda"), "cuda"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            println!("backends: {}", backends.join(", "));
        }
    }
    Ok(())
}
