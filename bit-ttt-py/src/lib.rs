//! `bit_ttt`, the Python module of bit-ttt (PyO3, built with maturin): load a model, get its
//! logits as numpy arrays, generate or stream text, and keep what it has read (its TTT state)
//! in `.soul` files.
//!
//! The crate has two layers: [`engine`], plain Rust and tested with `cargo test`, and the
//! PyO3 bindings over it, compiled only with the `python` feature (maturin turns it on), so
//! that the workspace builds and tests without Python.
#![warn(missing_docs)]

pub mod engine;
#[cfg(feature = "python")]
mod python;
