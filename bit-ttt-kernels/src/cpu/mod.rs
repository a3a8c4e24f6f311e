//! CPU matrix products of packed ternary weights.
//!
//! `y[t, r] = Σ_k W[r, k] · x[t, k]` for a batch of `t` tokens, where `W` is a [`PackedTernary`]
//! matrix. Two activation formats:
//! - **W1.58A8** ([`QuantizedActivations`]): int8 activations with one scale per token,
//!   integer accumulation, one float multiply at the end: `y = acc · gamma / s_t`.
//! - **W1.58A16** (plain f32 activations), for experiments with activation quantization off.
//!
//! [`reference`] holds the scalar kernels every faster kernel is tested against.

pub mod activations;
pub mod reference;

pub use activations::QuantizedActivations;

use crate::PackedTernary;

/// Checks the shapes of a product and panics with a message naming them (a programmer error).
pub(crate) fn assert_product_shapes(
    w: &PackedTernary,
    x_len: usize,
    tokens: usize,
    out_len: usize,
) {
    assert_eq!(
        x_len,
        tokens * w.cols(),
        "activations hold {x_len} values, expected [tokens={tokens}, cols={}]",
        w.cols()
    );
    assert_eq!(
        out_len,
        tokens * w.rows(),
        "output holds {out_len} values, expected [tokens={tokens}, rows={}]",
        w.rows()
    );
}
