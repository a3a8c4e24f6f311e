//! BitNet b1.58 quantizers as Burn tensor functions, with and without the straight-through estimator.
//!
//! - Weights, per tensor (absmean): `gamma = max(mean|W|, eps)`, `Wq = clamp(round(W / gamma), -1, 1)`;
//!   the effective weight is `Wq · gamma`.
//! - Activations, per token (absmax over the last dimension): `s = 127 / max(max|x|, eps)`,
//!   `xq = clamp(round(x · s), -128, 127) / s`.
//!
//! `round` is Burn's round-half-to-even, the rounding `bit-ttt-kernels` uses too, so the packed
//! inference path sees exactly the codes training saw.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use burn::module::ParamId;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

use crate::TernaryBackend;

/// Ternary codes of a weight matrix and its absmean scale.
///
/// # Shapes
/// - `weight`: `[d_output, d_input]`
/// - returns: codes `[d_output, d_input]` with values in {-1, 0, +1}, and `gamma` `[1]`
pub fn ternary_codes<B: Backend>(weight: Tensor<B, 2>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let gamma = absmean_scale(weight.clone(), eps); // [1]
    let codes = weight
        .div(gamma.clone().unsqueeze::<2>()) // [d_output, d_input] / [1, 1]
        .round()
        .clamp(-1.0, 1.0);
    (codes, gamma)
}

/// The absmean scale `gamma = max(mean|W|, eps)` of a weight, `[1]`.
pub fn absmean_scale<B: Backend>(weight: Tensor<B, 2>, eps: f64) -> Tensor<B, 1> {
    weight.abs().mean().clamp_min(eps)
}

/// The effective ternary weight `Wq · gamma` (no gradient trick).
///
/// # Shapes
/// - `weight`, returns: `[d_output, d_input]`
pub fn quantize_weight<B: Backend>(weight: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let (codes, gamma) = ternary_codes(weight, eps);
    codes.mul(gamma.unsqueeze::<2>())
}

/// Activations quantized to int8 levels per token and returned dequantized (no gradient trick).
///
/// # Shapes
/// - `x`, returns: `[..., d]`, quantized over the last dimension
pub fn quantize_activations<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let scale = activation_scale(x.clone(), eps); // [..., 1]
    x.mul(scale.clone()).round().clamp(-128.0, 127.0).div(scale)
}

/// The per-token scale `s = 127 / max(max|x|, eps)`, computed as `(1 / m) · 127`.
///
/// # Shapes
/// - `x`: `[..., d]`; returns `[..., 1]`
pub fn activation_scale<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    x.abs()
        .max_dim(D - 1)
        .clamp_min(eps)
        .recip()
        .mul_scalar(127.0)
}

/// Straight-through estimator: the forward value of `quantized`, the gradient of `v` (identity).
///
/// `v + (q(v) - v).detach()`
pub fn straight_through<B: Backend, const D: usize>(
    v: Tensor<B, D>,
    quantized: Tensor<B, D>,
) -> Tensor<B, D> {
    // Both detached first: the subtraction is not recorded by autodiff.
    let offset = quantized.detach().sub(v.clone().detach());
    v.add(offset)
}

/// A ternary weight prepared for the straight-through estimator: what its forward needs
/// besides the latent weight itself, computed once on detached tensors.
///
/// [`apply`](Self::apply) returns `W · (1/gamma) + offset` with `offset = Wq − W · (1/gamma)`
/// (the same product both times, so the sum is exactly the codes `Wq` for every weight below
/// `2²⁴ · gamma` in magnitude): autodiff records the product and the sum, so the gradient to
/// `W` is the codes' times `1/gamma`, the straight-through gradient of `W / gamma`. A backend
/// without a fused pass ([`TernaryBackend::ternary_ste_offset`]) divides by `gamma` instead,
/// as the op-by-op forward always did. Preparing once and applying many times is what lets
/// several threads share one quantization of a step's weights ([`SharedWeightCodes`]).
#[derive(Debug, Clone)]
pub struct TernaryWeightCodes<B: Backend> {
    /// `Wq` minus the scaled weight (`W · (1/gamma)` or `W / gamma`), `[d_output, d_input]`,
    /// detached.
    offset: Tensor<B, 2>,
    /// How `W` is scaled to the codes' range.
    scale: WeightScale<B>,
    /// The absmean scale `gamma`, `[1]`, detached.
    gamma: Tensor<B, 1>,
}

/// How `W` is scaled: by a host `1/gamma` where the backend computed the offset in one pass
/// (reading `gamma` there is free, and ndarray multiplies by a scalar faster than it divides
/// by a broadcast tensor); elsewhere divided by the `[1, 1]` tensor `gamma`, so a GPU never
/// waits for a number to come back.
#[derive(Debug, Clone)]
enum WeightScale<B: Backend> {
    HostInverse(f32),
    Device(Tensor<B, 2>),
}

impl<B: TernaryBackend> TernaryWeightCodes<B> {
    /// Quantizes `weight` (the codes of [`ternary_codes`]) and keeps what
    /// [`apply`](Self::apply) adds to it.
    ///
    /// # Shapes
    /// - `weight`: `[d_output, d_input]`
    pub fn new(weight: Tensor<B, 2>, eps: f64) -> Self {
        let weight = weight.detach();
        let gamma = absmean_scale(weight.clone(), eps); // [1]
        let fused = B::ternary_ste_offset(
            weight.clone().into_primitive().tensor(),
            gamma.clone().into_primitive().tensor(),
        );
        match fused {
            Some((offset, inv_gamma)) => Self {
                offset: Tensor::from_primitive(TensorPrimitive::Float(offset)),
                scale: WeightScale::HostInverse(inv_gamma),
                gamma,
            },
            None => Self::op_by_op(weight, gamma),
        }
    }

    /// [`new`](Self::new) with Burn's ops, for backends without a fused pass: the codes of
    /// [`ternary_codes`] and `offset = Wq − W / gamma`.
    fn op_by_op(weight: Tensor<B, 2>, gamma: Tensor<B, 1>) -> Self {
        let gamma_2d = gamma.clone().unsqueeze::<2>(); // [1, 1]
        let scaled = weight.div(gamma_2d.clone()); // [d_output, d_input]
        let codes = scaled.clone().round().clamp(-1.0, 1.0);
        Self {
            offset: codes.sub(scaled),
            scale: WeightScale::Device(gamma_2d),
            gamma,
        }
    }

    /// The codes `Wq` in value, the straight-through gradient of `W / gamma` to `weight`, which
    /// must hold the values this was prepared from (stale codes are not detected).
    ///
    /// # Shapes
    /// - `weight`, returns: `[d_output, d_input]`
    pub fn apply(&self, weight: Tensor<B, 2>) -> Tensor<B, 2> {
        let scaled = match &self.scale {
            WeightScale::HostInverse(inv_gamma) => weight.mul_scalar(*inv_gamma),
            WeightScale::Device(gamma) => weight.div(gamma.clone().detach()),
        };
        // A fresh detached node per use, so each thread's graph holds only its own nodes: a
        // first version that shared the offset's node deadlocked in Burn's autodiff (one
        // thread's backward held its graph while another, holding the graph locator, waited
        // for that graph).
        scaled.add(self.offset.clone().detach())
    }

    /// The absmean scale `gamma`, `[1]`.
    pub fn gamma(&self) -> Tensor<B, 1> {
        self.gamma.clone().detach()
    }
}

/// The [`TernaryWeightCodes`] of a set of weights, computed once and shared by every
/// [`BitLinear`](crate::BitLinear) forward run inside [`scope`](Self::scope), on any thread.
///
/// Training on several threads runs one copy of the model per thread (same parameter ids):
/// without sharing, each copy would quantize every weight again, work that does not shrink
/// with the threads. A forward inside a scope looks its weight up by parameter id and
/// quantizes it itself when it is not there, so the values are the same in and out of a
/// scope. The contract: inside a scope, a parameter id stands for the values the codes were
/// made from, i.e. copies of one model between two optimizer steps.
#[derive(Debug)]
pub struct SharedWeightCodes<B: Backend> {
    codes: HashMap<ParamId, TernaryWeightCodes<B>>,
}

thread_local! {
    /// The scope's codes on this thread (`Arc<SharedWeightCodes<B>>` for one backend `B`).
    static SCOPE: RefCell<Option<Arc<dyn Any + Send + Sync>>> = const { RefCell::new(None) };
}

impl<B: TernaryBackend> SharedWeightCodes<B> {
    /// Codes of `weights` (parameter id, latent weight, `eps`), quantized on `threads`
    /// threads (each takes every `threads`-th weight).
    pub fn new(weights: Vec<(ParamId, Tensor<B, 2>, f64)>, threads: usize) -> Self {
        let threads = threads.clamp(1, weights.len().max(1));
        let quantize = |part: Vec<(ParamId, Tensor<B, 2>, f64)>| {
            part.into_iter()
                .map(|(id, weight, eps)| (id, TernaryWeightCodes::new(weight, eps)))
                .collect::<Vec<_>>()
        };
        let mut parts: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, weight) in weights.into_iter().enumerate() {
            parts[i % threads].push(weight);
        }
        let codes = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| scope.spawn(move || quantize(part)))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        Self { codes }
    }

    /// Weights held.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// Whether no weight is held.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// Runs `f` with these codes visible to every forward on this thread (nested scopes
    /// restore the outer one).
    pub fn scope<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<dyn Any + Send + Sync>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let outer = self.0.take();
                SCOPE.with(|s| *s.borrow_mut() = outer);
            }
        }
        let shared: Arc<dyn Any + Send + Sync> = self.clone();
        let _restore = Restore(SCOPE.with(|s| s.borrow_mut().replace(shared)));
        f()
    }

    /// The codes of parameter `id` in the scope active on this thread, if any.
    pub(crate) fn lookup(id: &ParamId) -> Option<TernaryWeightCodes<B>> {
        SCOPE.with(|s| {
            let scope = s.borrow();
            let shared = scope.as_ref()?.downcast_ref::<Self>()?;
            shared.codes.get(id).cloned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{ElementConversion, TensorData};

    type B = NdArray;

    #[test]
    fn ternary_codes_by_hand() {
        let device = Default::default();
        // mean|W| = (0.9 + 0.1 + 0.5 + 1.5) / 4 = 0.75.
        // W / gamma = [1.2, -0.133, -0.667, 2.0] → round → [1, 0, -1, 2] → clamp → [1, 0, -1, 1].
        let w = Tensor::<B, 2>::from_floats([[0.9, -0.1], [-0.5, 1.5]], &device);
        let (codes, gamma) = ternary_codes(w, 1e-5);
        codes
            .into_data()
            .assert_eq(&TensorData::from([[1.0f32, 0.0], [-1.0, 1.0]]), false);
        assert_eq!(gamma.into_scalar(), 0.75);
    }

    /// Latent weights `[37, 23]`: `ties` gives values on the rounding ties of `W / gamma`
    /// (a cycle whose mean magnitude is exactly 1, so gamma = 1 and ±0.5, ±1.5 round half to
    /// even), else spread values with an inexact gamma.
    fn odd_weight<C: Backend>(ties: bool, device: &C::Device) -> Tensor<C, 2> {
        let cycle = [0.5f32, -1.5, 1.0, -0.5, 1.5, -1.0]; // Σ|w| = 6; 851 = 6 · 141 + 5
        let values: Vec<f32> = (0..37 * 23)
            .map(|i| match ties {
                true => cycle[i % 6],
                false => ((i * 7919 % 1013) as f32 - 506.0) * 1e-3,
            })
            .collect();
        Tensor::from_data(TensorData::new(values, [37, 23]), device)
    }

    #[test]
    fn weight_codes_apply_to_the_ternary_codes_fused_and_op_by_op() {
        let device = Default::default();
        for ties in [true, false] {
            let weight = odd_weight::<B>(ties, &device);
            let (codes, gamma) = ternary_codes(weight.clone(), 1e-5);
            if ties {
                assert_eq!(gamma.clone().into_scalar(), 1.0);
                let first: Vec<f32> = codes.clone().narrow(0, 0, 1).into_data().to_vec().unwrap();
                assert_eq!(first[..6], [0.0, -1.0, 1.0, 0.0, 1.0, -1.0], "half to even");
            }
            let codes = codes.into_data();
            let fused = TernaryWeightCodes::new(weight.clone(), 1e-5);
            assert!(
                matches!(fused.scale, WeightScale::HostInverse(_)),
                "ndarray fuses"
            );
            let op_by_op = TernaryWeightCodes::op_by_op(weight.clone(), gamma.clone());
            // Both give exactly the codes of `ternary_codes`, ties rounded half to even included.
            for prepared in [&fused, &op_by_op] {
                prepared
                    .apply(weight.clone())
                    .into_data()
                    .assert_eq(&codes, true);
                prepared
                    .gamma()
                    .into_data()
                    .assert_eq(&gamma.to_data(), true);
            }
        }
    }

    #[test]
    fn weight_codes_give_the_straight_through_gradient() {
        type A = Autodiff<NdArray>;
        let device = Default::default();
        let weight = odd_weight::<A>(false, &device).require_grad();
        let gamma: f32 = absmean_scale(weight.clone(), 1e-5).into_scalar().elem();
        let c = Tensor::<A, 2>::from_data(
            TensorData::new(
                (0..37 * 23).map(|i| (i as f32 * 0.37).sin()).collect(),
                [37, 23],
            ),
            &device,
        );
        // L = Σ c ⊙ codes: dL/dW = c / gamma.
        let prepared = TernaryWeightCodes::new(weight.clone(), 1e-5);
        let grads = prepared
            .apply(weight.clone())
            .mul(c.clone())
            .sum()
            .backward();
        let got: Vec<f32> = weight.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let c: Vec<f32> = c.into_data().to_vec().unwrap();
        for (g, c) in got.iter().zip(&c) {
            assert!(
                (g - c / gamma).abs() <= 1e-6 * (c / gamma).abs().max(1.0),
                "{g} vs {}",
                c / gamma
            );
        }
    }

    #[test]
    fn shared_codes_are_used_in_scope_and_give_the_same_forward() {
        type A = Autodiff<NdArray>;
        let device = Default::default();
        let layer = crate::BitLinearConfig::new(23, 37).init::<A>(&device);
        let x = Tensor::<A, 2>::from_data(
            TensorData::new(
                (0..5 * 23).map(|i| (i as f32 * 0.71).cos()).collect(),
                [5, 23],
            ),
            &device,
        );
        let alone = layer.forward(x.clone()).into_data();
        let shared = Arc::new(SharedWeightCodes::new(
            vec![(layer.weight.id, layer.weight.val(), layer.eps)],
            1,
        ));
        assert_eq!(shared.len(), 1);
        let in_scope = shared.scope(|| {
            assert!(SharedWeightCodes::<A>::lookup(&layer.weight.id).is_some());
            layer.forward(x.clone()).into_data()
        });
        assert!(
            SharedWeightCodes::<A>::lookup(&layer.weight.id).is_none(),
            "scope ended"
        );
        in_scope.assert_eq(&alone, true);
        // Another thread sees the scope only inside its own `scope` call.
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(SharedWeightCodes::<A>::lookup(&layer.weight.id).is_none());
                shared
                    .scope(|| assert!(SharedWeightCodes::<A>::lookup(&layer.weight.id).is_some()));
            });
        });
    }

    #[test]
    fn activations_by_hand() {
        let device = Default::default();
        // absmax 2 → s = 63.5: [63.5, -127, 0.635] → [64, -127, 1] (half to even) → / 63.5.
        let x = Tensor::<B, 2>::from_floats([[1.0, -2.0, 0.01]], &device);
        let q = quantize_activations(x, 1e-5)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let expected = [64.0 / 63.5, -127.0 / 63.5, 1.0 / 63.5];
        for (a, e) in q.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{q:?} vs {expected:?}");
        }
    }
}
