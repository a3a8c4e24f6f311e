//! `bit-ttt-train`: the command line of bit-ttt (its subcommands live in the library, in
//! `bit_ttt_train::commands`, so that the Python module runs the very same code).

use std::process::ExitCode;

fn main() -> ExitCode {
    bit_ttt_train::commands::main()
}
