//! The library behind the `bit-ttt-train` command line: tokenizer training, data preparation,
//! count-based baselines, the training loop with checkpoints and exact resume, data-parallel
//! training across processes ([`distributed`]), evaluation, metrics and plots, backend
//! selection, and the command line itself ([`commands`]).
//!
//! Everything here returns the typed [`TrainError`]; the binary adds context with `anyhow`.
#![warn(missing_docs)]

pub mod baselines;
pub mod bench;
mod catch;
pub mod checkpoint;
// The subcommands' argument structs carry their help text on their fields (clap shows a doc
// comment on the type in place of the subcommand's own).
#[allow(missing_docs)]
pub mod commands;
pub mod data;
pub mod device;
pub mod distributed;
pub mod error;
pub mod evaluation;
pub mod fuzz;
pub mod hybrid_bench;
pub mod metrics;
pub mod rng;
pub mod schedule;
pub mod study;
pub mod tokenizer;
pub mod train;
pub mod train_bench;

pub use error::TrainError;
