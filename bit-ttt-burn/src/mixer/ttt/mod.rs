//! Test-Time-Training layers (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with
//! Expressive Hidden States"): TTT-Linear and TTT-MLP.
//!
//! A TTT layer's hidden state is the weights `W` of a small inner model `f(z; W)`; reading a
//! token is one gradient step on a self-supervised reconstruction loss
//! `ℓ = ½ ‖f(XK; W) − XV‖²`, and the output is `f(XQ; W)`. Tokens are processed in mini-batches
//! of `b`: inside a mini-batch every gradient is taken at the weights from its start, token `i`
//! reads with `W_i = W_start − Σ_{j≤i} eta[i, j] ∇ℓ_j(W_start)`, and the mini-batch ends at
//! `W_end = W_start − Σ_j eta[last, j] ∇ℓ_j(W_start)`.
//!
//! Three implementations of the inner loop compute the same function ([`InnerLoopImpl`]):
//! - the dual form ([`dual_mini_batch`]): closed form, matmuls only; the default for training
//!   and prefill;
//! - autodiff ([`autodiff_mini_batch`]): the inner gradient by Burn's autodiff, for any
//!   [`InnerModel`]; second order when the backend is itself an autodiff backend;
//! - the primal form ([`primal_mini_batch`]): materialises every token's weights; decoding
//!   with a [`TttCache`] uses it, one token at a time.
//!
//! Files: [`config`] (configuration), [`layer`] (the layer), [`inner`] (TTT-Linear/TTT-MLP
//! inner models), [`ln`] and [`gelu`] (their math), [`mini_batch`] (the inputs of a step),
//! [`dual`], [`autodiff`] and [`cache`] (the three inner loops and the decoding state);
//! `state.rs` (the state's `.soul` form) and `decode.rs` (the layer's fused CPU form, one token
//! on plain slices, equal to the primal form).

#[cfg(test)]
#[macro_use]
mod test_util;

pub mod autodiff;
pub mod cache;
pub mod config;
pub(crate) mod decode;
pub mod dual;
pub mod gelu;
pub mod inner;
pub mod layer;
pub mod ln;
pub mod mini_batch;
mod state;

#[cfg(test)]
mod tests;

pub use autodiff::{autodiff_mini_batch, InnerModel, Lift};
pub use cache::{primal_mini_batch, TttCache};
pub use config::{InnerLoopImpl, TttConfig, TttInner};
pub use dual::{dual_linear, dual_mini_batch, dual_mlp, dual_whole_mini_batches};
pub use inner::{InnerLinear, InnerMlp, InnerModule};
pub use layer::TttLayer;
pub use mini_batch::{MiniBatch, MiniBatchOutput, WholeMiniBatches};
