//! Test helpers: f64 tests in their own process.
//!
//! Burn 0.21 fixes the default float dtype of a device the first time a tensor is created on
//! it, per process, and `NdArray<f32>` and `NdArray<f64>` share one device. A test on
//! `NdArray<f64>` that runs after an f32 test in the same process would then silently compute
//! in f32 (and an f32 test after it would read f64 data). [`f64_test!`] therefore runs each f64
//! test body in a fresh process of this test binary, where it is the first to use the device.

use std::process::Command;

/// Set in the child process that runs one f64 test body.
const CHILD_ENV: &str = "BIT_TTT_F64_TEST_CHILD";

/// Whether this process is the child that should run the body.
pub(crate) fn in_f64_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the test `name` (its path without the crate name) alone in a new process of this
/// test binary and fails with its output if it fails or does not run.
pub(crate) fn run_in_f64_child(name: &str) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let output = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("spawning the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "f64 test {name} failed in its own process:\n{stdout}\n{stderr}"
    );
}

/// Declares a test whose body runs in its own process (see the module docs); use it for every
/// test on `NdArray<f64>`.
macro_rules! f64_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            if $crate::ttt::test_util::in_f64_child() {
                $body
            } else {
                let path = concat!(module_path!(), "::", stringify!($name));
                let name = path.split_once("::").map_or(path, |(_, rest)| rest);
                $crate::ttt::test_util::run_in_f64_child(name);
            }
        }
    };
}

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::Projection;

/// Deterministic values in `[-1, 1]`, different for every seed.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let t = (i as f64 + 1.0) * (0.618_033_988_75 + seed as f64 * 0.137) + seed as f64;
            (t * 12.9898).sin() * 0.5 + (t * 4.1414).cos() * 0.5
        })
        .collect()
}

/// A `[batch, seq, d_model]` input with [`pseudo_random`] values scaled by `scale`.
pub(crate) fn input<B: Backend>(
    shape: [usize; 3],
    seed: u64,
    scale: f64,
    device: &B::Device,
) -> Tensor<B, 3> {
    let values: Vec<f64> = pseudo_random(shape.iter().product(), seed)
        .into_iter()
        .map(|v| v * scale)
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// A tensor's values as f64, whatever its dtype.
pub(crate) fn values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f64> {
    tensor.into_data().convert::<f64>().to_vec().unwrap()
}

/// The largest absolute difference between two tensors of the same shape.
pub(crate) fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    assert_eq!(a.dims(), b.dims(), "comparing tensors of different shapes");
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Sets the weight (`[d_input, d_output]`, `y = x W`) of an f32 projection.
///
/// # Panics
/// If the projection is ternary.
pub(crate) fn set_projection<B: Backend>(projection: &mut Projection<B>, weight: Tensor<B, 2>) {
    match projection {
        Projection::Float(linear) => linear.weight = Param::from_tensor(weight),
        Projection::Ternary(_) | Projection::Packed(_) => {
            panic!("set_projection needs an f32 projection")
        }
    }
}
