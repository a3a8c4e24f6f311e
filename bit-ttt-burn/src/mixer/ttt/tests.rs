//! Tests across the inner-loop implementations: agreement of the dual, autodiff and primal
//! forms, and outer gradients against finite differences (in f64).

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::test_util::{input, max_abs_diff, pseudo_random, values};
use super::{InnerLoopImpl, InnerModel, TttConfig, TttInner, TttLayer};

#[test]
fn autodiff_dual_and_primal_agree_on_outputs_and_final_weights() {
    let device = Default::default();
    for inner in [TttInner::Linear, TttInner::Mlp] {
        // d_model 16, 2 heads of 8, mini-batch 16 (the default). f32 projections: the inner
        // loops are compared; with int8 activations an `o_proj` input within a rounding error
        // of a code boundary can round differently after the implementations' different float
        // rounding (a ~3e-4 jump, seen about once in 40 random layers).
        let layer = TttConfig::new(16, 2)
            .with_inner(inner)
            .with_use_gate(true)
            .with_ternary(false)
            .init::<NdArray>(&device);
        let initial = layer.inner.init_state(2);
        for seq in [1, 15, 16, 37] {
            let x = input::<NdArray>([2, seq, 16], seq as u64, 1.0, &device);
            let (dual, dual_cache) = layer.forward_prefill(x.clone(), InnerLoopImpl::Dual);
            let dual_weights = layer.current_weights(&dual_cache);
            let moved = max_abs_diff(dual_weights[0].clone(), initial[0].clone());
            assert!(
                moved > 1e-3,
                "{inner:?}, {seq} tokens: W1 moved only {moved}"
            );
            for other in [InnerLoopImpl::Autodiff, InnerLoopImpl::Primal] {
                let (out, cache) = layer.forward_prefill(x.clone(), other);
                let diff = max_abs_diff(dual.clone(), out);
                assert!(
                    diff < 1e-4,
                    "{inner:?} {other:?}, {seq} tokens: outputs differ by {diff}"
                );
                for (index, (a, b)) in dual_weights
                    .iter()
                    .zip(layer.current_weights(&cache))
                    .enumerate()
                {
                    let diff = max_abs_diff(a.clone(), b);
                    assert!(
                        diff < 1e-4,
                        "{inner:?} {other:?}, {seq} tokens: fast weight {index} differs by {diff}"
                    );
                }
                for (a, b) in dual_cache.grads().iter().zip(cache.grads()) {
                    assert!(max_abs_diff(a.clone(), b.clone()) < 1e-4);
                }
            }
        }
    }
}

#[test]
fn whole_mini_batches_at_once_equal_them_one_by_one() {
    // One call of 48 tokens reads its three mini-batches at once (`dual_whole_mini_batches`);
    // calls of 5 + 43 tokens start off a boundary and go mini-batch by mini-batch; calls of
    // 16 + 29 + 3 read whole mini-batches from a later boundary, then a tail and a rest. Same
    // outputs and fast weights.
    let device = Default::default();
    for inner in [TttInner::Linear, TttInner::Mlp] {
        let layer = TttConfig::new(16, 2)
            .with_inner(inner)
            .with_use_gate(true)
            .with_ternary(false)
            .init::<NdArray>(&device);
        let x = input::<NdArray>([2, 48, 16], 3, 1.0, &device);
        let read = |splits: &[usize]| {
            let mut cache = layer.new_cache(2);
            let mut outputs = Vec::new();
            let mut start = 0;
            for &len in splits {
                let part = x.clone().narrow(1, start, len); // [2, len, 16]
                outputs.push(layer.forward_with_cache(part, &mut cache));
                start += len;
            }
            (Tensor::cat(outputs, 1), layer.current_weights(&cache))
        };
        let (at_once, at_once_weights) = read(&[48]);
        for splits in [&[5, 43][..], &[16, 29, 3]] {
            let (out, weights) = read(splits);
            let diff = max_abs_diff(at_once.clone(), out);
            assert!(
                diff < 1e-5,
                "{inner:?} {splits:?}: outputs differ by {diff}"
            );
            for (index, (a, b)) in at_once_weights.iter().zip(weights).enumerate() {
                let diff = max_abs_diff(a.clone(), b);
                assert!(
                    diff < 1e-5,
                    "{inner:?} {splits:?}: fast weight {index} differs by {diff}"
                );
            }
        }
        let moved = max_abs_diff(
            at_once_weights[0].clone(),
            layer.inner.init_state(2)[0].clone(),
        );
        assert!(moved > 1e-3, "{inner:?}: W1 moved only {moved}");
    }
}

/// A parameter's path, values and gradient.
struct Collected {
    path: String,
    values: Vec<f64>,
    grad: Vec<f64>,
}

/// Collects every float parameter with its gradient, in visiting order.
struct Collect<'a, B: burn::tensor::backend::AutodiffBackend> {
    path: Vec<String>,
    grads: &'a B::Gradients,
    out: Vec<Collected>,
}

impl<B: burn::tensor::backend::AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = values(param.val());
        let grad = param
            .grad(self.grads)
            .map(values_inner::<B, D>)
            .unwrap_or_else(|| vec![0.0; values.len()]);
        self.out.push(Collected {
            path: self.path.join("."),
            values,
            grad,
        });
    }
}

fn values_inner<B: burn::tensor::backend::AutodiffBackend, const D: usize>(
    t: Tensor<B::InnerBackend, D>,
) -> Vec<f64> {
    values(t)
}

/// Adds `delta` to entry `index` of the `target`-th float parameter (in visiting order).
struct Bump {
    target: usize,
    index: usize,
    delta: f64,
    count: usize,
}

impl<B: Backend> ModuleMapper<B> for Bump {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let this = self.count;
        self.count += 1;
        if this != self.target {
            return param;
        }
        let (index, delta) = (self.index, self.delta);
        param.map(|tensor| {
            let (shape, device) = (tensor.shape(), tensor.device());
            let mut data = values(tensor);
            data[index] += delta;
            Tensor::from_data(TensorData::new(data, shape), &device)
        })
    }
}

type B64 = NdArray<f64>;
type A64 = Autodiff<B64>;

/// Checks the gradients of `Σ c ⊙ layer(x)` with respect to every parameter against central
/// finite differences, for one inner model and implementation.
///
/// The projections are f32 `Linear`s (`ternary: false`): BitLinear rounds its weights and
/// activations, so finite differences of a ternary layer measure the rounding, not the
/// straight-through gradient.
fn check_outer_gradients(inner: TttInner, implementation: InnerLoopImpl) {
    let device = Default::default();
    B64::seed(&device, 7); // this test has its process to itself: reproducible init
    let (d_model, seq) = (8, 7);
    let layer = TttConfig::new(d_model, 2)
        .with_inner(inner)
        .with_mini_batch_size(3) // two full mini-batches and one token
        .with_use_gate(true)
        .with_ternary(false)
        .with_base_lr(Some(1.0))
        .with_init_std(0.3)
        .init::<A64>(&device);
    let x = input::<B64>([1, seq, d_model], 11, 1.0, &device);
    let c = Tensor::<B64, 3>::from_data(
        TensorData::new(pseudo_random(seq * d_model, 12), [1, seq, d_model]),
        &device,
    );
    let loss_a = (layer.forward_with_impl(Tensor::from_inner(x.clone()), implementation)
        * Tensor::from_inner(c.clone()))
    .sum();
    let grads = loss_a.backward();
    let mut collect = Collect::<A64> {
        path: Vec::new(),
        grads: &grads,
        out: Vec::new(),
    };
    layer.visit(&mut collect);
    let params = collect.out;

    let plain = layer.valid();
    let loss = |layer: &TttLayer<B64>| -> f64 {
        values((layer.forward_with_impl(x.clone(), implementation) * c.clone()).sum())[0]
    };
    let mut report = Vec::new();
    for (target, param) in params.iter().enumerate() {
        // The η gate too: the layer's sigmoid is computed in the backend's precision (Burn's own
        // runs in f32, which would limit it to about 1e-3).
        let (h, tolerance) = (1e-5, 1e-4);
        let max_grad = param.grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        let required = [
            "q_proj",
            "k_proj",
            "v_proj",
            "learnable_ttt_lr",
            "w1",
            "b1",
            "ttt_norm",
            "post_norm",
        ];
        if required.iter().any(|r| param.path.contains(r)) {
            assert!(
                max_grad > 1e-6,
                "{inner:?} {implementation:?}: {} has no gradient",
                param.path
            );
        }
        // The two largest entries and three spread over the tensor.
        let n = param.values.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| param.grad[b].abs().total_cmp(&param.grad[a].abs()));
        let mut entries: Vec<usize> = order.into_iter().take(2).collect();
        entries.extend([0, n / 2, n - 1]);
        entries.sort_unstable();
        entries.dedup();
        let mut worst = 0.0f64;
        for index in entries {
            let bumped = |delta: f64| {
                plain.clone().map(&mut Bump {
                    target,
                    index,
                    delta,
                    count: 0,
                })
            };
            let fd = (loss(&bumped(h)) - loss(&bumped(-h))) / (2.0 * h);
            let analytic = param.grad[index];
            let error = (analytic - fd).abs() / fd.abs().max(analytic.abs()).max(1e-2 * max_grad);
            worst = worst.max(error);
            assert!(
                error <= tolerance,
                "{inner:?} {implementation:?}: d loss / d {}[{index}] = {analytic}, finite differences {fd} (relative error {error:e})",
                param.path
            );
        }
        report.push(format!("{} {worst:.1e}", param.path));
    }
    println!(
        "{inner:?} {implementation:?} worst relative errors: {}",
        report.join(", ")
    );
    assert!(
        params.len() >= 14,
        "only {} parameters visited",
        params.len()
    );
}

f64_test! {
    fn outer_gradients_match_finite_differences_linear_dual() {
        check_outer_gradients(TttInner::Linear, InnerLoopImpl::Dual);
    }
}

f64_test! {
    fn outer_gradients_match_finite_differences_linear_autodiff() {
        check_outer_gradients(TttInner::Linear, InnerLoopImpl::Autodiff);
    }
}

f64_test! {
    fn outer_gradients_match_finite_differences_mlp_dual() {
        check_outer_gradients(TttInner::Mlp, InnerLoopImpl::Dual);
    }
}

f64_test! {
    fn outer_gradients_match_finite_differences_mlp_autodiff() {
        check_outer_gradients(TttInner::Mlp, InnerLoopImpl::Autodiff);
    }
}
