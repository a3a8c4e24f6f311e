//! The small f32 operations of one decode step, on plain slices: norms, LayerNorm's fused L2
//! backward, the activations (SiLU, GELU, sigmoid), RoPE, and vector products.
//!
//! Each follows the floating-point recipe of the Burn op it stands in for in `bit-ttt-burn`
//! (Burn 0.21's `RmsNorm`, `LayerNorm` and `silu`; the crate's `gelu_tanh`, `ln_fused_l2_bwd`,
//! `apply_rope` and the TTT layer's η gate), so a fused decoder built on them agrees with the
//! op-by-op forward up to summation order. They are scalar loops that the compiler vectorizes
//! (and compiles for AVX2 where a caller such as the [TTT head step](super::ttt_head) is
//! compiled with it), except [`silu_mul`], which has its own AVX2 kernel.
//!
//! There are two sigmoids because the two Burn ops they must equal compute it differently:
//! [`silu`] is `x / (1 + e^(-x))` (Burn's `silu`, SwiGLU), [`sigmoid_tanh`] is
//! `½ (1 + tanh(x / 2))` (the TTT layer's η gate).

/// `sqrt(2 / π)`, as in `bit-ttt-burn`'s GELU (rounded to f32).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation of GELU.
const CUBIC: f32 = 0.044_715;

/// `out = x / sqrt(mean(x²) + eps) · gamma` (Burn's `RmsNorm`).
///
/// # Shapes
/// - x, gamma, out: `[d]`
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let rms = (mean_square + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(gamma) {
        *o = v / rms * g;
    }
}

/// `(x̂, std)` with `x̂ = (x − mean) / std`, `std = sqrt(var + eps)` (biased variance).
#[inline(always)]
fn normalize(x: &[f32], eps: f32, x_hat: &mut [f32]) -> f32 {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let std = (var + eps).sqrt();
    for (h, v) in x_hat.iter_mut().zip(x) {
        *h = (v - mean) / std;
    }
    std
}

/// `out = x̂ · gamma + beta` (Burn's `LayerNorm`; `beta` may be absent).
///
/// # Shapes
/// - x, gamma, beta, out: `[d]`
#[inline(always)]
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    normalize(x, eps, out);
    for (i, o) in out.iter_mut().enumerate() {
        *o = *o * gamma[i] + beta.map_or(0.0, |b| b[i]);
    }
}

/// `∂/∂z ½ ‖LN(z) − target‖²`, the analytic backward of LayerNorm fused with the L2 loss
/// (`bit-ttt-burn`'s `ln_fused_l2_bwd`): with `g = (LN(z) − target) · gamma`,
/// `(d·g − Σg − x̂ Σ(g x̂)) / (d · std)`.
///
/// # Shapes
/// - z, target, gamma, beta, grad: `[d]`
#[inline(always)]
pub fn ln_l2_bwd(
    z: &[f32],
    target: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    grad: &mut [f32],
) {
    let d = z.len() as f32;
    let mut x_hat = vec![0.0; z.len()];
    let std = normalize(z, eps, &mut x_hat);
    let mut sum_grad = 0.0;
    let mut sum_grad_x_hat = 0.0;
    for i in 0..z.len() {
        let y = x_hat[i] * gamma[i] + beta[i];
        let g = (y - target[i]) * gamma[i];
        grad[i] = g;
        sum_grad += g;
        sum_grad_x_hat += g * x_hat[i];
    }
    for (g, h) in grad.iter_mut().zip(&x_hat) {
        *g = (*g * d - sum_grad - h * sum_grad_x_hat) / (std * d);
    }
}

/// `x · sigmoid(x) = x / (1 + e^(-x))`, the scalar reference (Burn's `silu` recipe).
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU's gating, in place: `gate[i] = silu(gate[i]) · up[i]`.
///
/// With AVX2 and FMA, eight values at a time with a polynomial `e^x` (Cephes' `expf` scheme;
/// the result agrees with [`silu_mul_scalar`] within 4 ulp, tested; for `gate` below -87
/// it is a tiny negative number instead of `-0`, and `-inf` gives `-inf` instead of NaN). A
/// decode step gates the whole FFN width on one thread, and `f32::exp` per value made that a
/// visible part of a step.
///
/// # Panics
/// If the slices differ in length (a programmer error).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate has {} values, up {}",
        gate.len(),
        up.len()
    );
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA; the lengths are equal.
        return unsafe { super::avx2::silu_mul(gate, up) };
    }
    silu_mul_scalar(gate, up);
}

/// The scalar reference of [`silu_mul`].
pub fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `gate[i] = relu(gate[i])² · up[i]`: the gated squared-ReLU of BitNet b1.58's feed-forward
/// network. Plain arithmetic the compiler vectorizes, so there is no separate SIMD version.
///
/// # Panics
/// If the slices differ in length (a programmer error).
pub fn relu2_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "relu2_mul: gate has {} values, up {}",
        gate.len(),
        up.len()
    );
    for (g, u) in gate.iter_mut().zip(up) {
        let r = g.max(0.0);
        *g = r * r * u;
    }
}

/// GELU with the tanh approximation, `½ x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let inner = (x + x * x * x * CUBIC) * SQRT_2_OVER_PI;
    x * 0.5 * (inner.tanh() + 1.0)
}

/// The derivative of [`gelu_tanh`].
#[inline(always)]
pub fn gelu_tanh_bwd(x: f32) -> f32 {
    let x2 = x * x;
    let t = (x * (x2 * CUBIC + 1.0) * SQRT_2_OVER_PI).tanh();
    x * 0.5 * (1.0 - t * t) * ((x2 * 3.0 * CUBIC + 1.0) * SQRT_2_OVER_PI) + (t + 1.0) * 0.5
}

/// `sigmoid(x) = ½ (1 + tanh(x / 2))`, the form the TTT layer's η gate uses.
#[inline(always)]
pub fn sigmoid_tanh(x: f32) -> f32 {
    ((x * 0.5).tanh() + 1.0) * 0.5
}

/// Rotates the pairs `(x[2i], x[2i+1])` by the angles whose cosines and sines are given (the
/// RoFormer convention of RoPE).
///
/// # Shapes
/// - x: `[head_dim]`; cos, sin: `[head_dim / 2]`
#[inline(always)]
pub fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, c), s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (even, odd) = (pair[0], pair[1]);
        pair[0] = even * c - odd * s;
        pair[1] = even * s + odd * c;
    }
}

/// The RoPE angles `position · theta^(-2i / head_dim)` of `position`, as cosines and sines
/// (`bit-ttt-burn`'s `apply_rope` recipe: angles in f64, then cosine and sine rounded to f32).
///
/// # Shapes
/// - cos, sin: `[head_dim / 2]`
pub fn rope_angles(position: usize, theta: f64, cos: &mut [f32], sin: &mut [f32]) {
    let half = cos.len();
    for i in 0..half {
        let angle = position as f64 * theta.powf(-((2 * i) as f64) / (2 * half) as f64);
        cos[i] = angle.cos() as f32;
        sin[i] = angle.sin() as f32;
    }
}

/// `out += x · M` for a row-major `M` of `x.len()` rows.
///
/// # Shapes
/// - x: `[rows]`, m: `[rows, cols]`, out: `[cols]`
#[inline(always)]
pub fn add_vec_mat(x: &[f32], m: &[f32], out: &mut [f32]) {
    let cols = out.len();
    debug_assert_eq!(
        m.len(),
        x.len() * cols,
        "matrix is not [{}, {cols}]",
        x.len()
    );
    for (xr, row) in x.iter().zip(m.chunks_exact(cols)) {
        for (o, w) in out.iter_mut().zip(row) {
            *o += xr * w;
        }
    }
}

/// `y += alpha · x`.
#[inline(always)]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// `Σ a_i b_i`, in 32 interleaved partial sums: a single running sum cannot be vectorized
/// (float addition is not associative) and waits on the add latency at every element, which
/// made the η gate's dot products over `d_model` a visible part of a decode step.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for ((s, xv), yv) in acc.iter_mut().zip(x).zip(y) {
            *s += xv * yv;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `1.5 · 2²³`: adding and subtracting it rounds an f32 of magnitude below 2²² to an integer,
/// half to even (the default rounding mode), without a call to `rintf`.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// The straight-through offset of a ternary weight (training's BitLinear): with
/// `codes = clamp(round(w / gamma), -1, 1)` (round half to even, Burn's `round`, `/` as Burn's
/// division does it), `offset = codes − w · inv_gamma`, so that `w · inv_gamma + offset` is
/// exactly `codes` for the `w · inv_gamma` the caller computes the same way.
///
/// One pass in place of the op-by-op division, rounding, clamp, product and difference: the
/// codes equal those of `bit_ttt_burn::quantize::ternary_codes` for the same `gamma`.
///
/// # Shapes
/// - weight, offset: `[n]`
pub fn ternary_ste_offset(weight: &[f32], gamma: f32, inv_gamma: f32, offset: &mut [f32]) {
    assert_eq!(weight.len(), offset.len(), "ternary_ste_offset: lengths");
    for (o, &w) in offset.iter_mut().zip(weight) {
        // Clamped to ±2 first, so the magic-number rounding is exact; rounding then clamping to
        // ±1 gives the codes of rounding the unclamped value (NaN stays NaN).
        let v = (w / gamma).clamp(-2.0, 2.0);
        let code = ((v + ROUND_MAGIC) - ROUND_MAGIC).clamp(-1.0, 1.0);
        *o = code - w * inv_gamma;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ternary_ste_offset_gives_the_codes() {
        // gamma 0.5: w / gamma = [1.5, 0.5, -0.5, -1.5, 0.24, 3.0, -7.0, 0.0, -0.0, 1.0]
        // → half to even [2, 0, -0, -2, 0, 3, -7, 0, -0, 1] → clamp [1, 0, 0, -1, 0, 1, -1, 0, 0, 1].
        let w = [0.75f32, 0.25, -0.25, -0.75, 0.12, 1.5, -3.5, 0.0, -0.0, 0.5];
        let expected = [1.0f32, 0.0, 0.0, -1.0, 0.0, 1.0, -1.0, 0.0, 0.0, 1.0];
        let (gamma, inv_gamma) = (0.5f32, 2.0f32);
        let mut offset = [0.0; 10];
        ternary_ste_offset(&w, gamma, inv_gamma, &mut offset);
        for i in 0..w.len() {
            assert_eq!(w[i] * inv_gamma + offset[i], expected[i], "element {i}");
        }
        // An odd gamma whose reciprocal is inexact: the sum is still exactly the code, and the
        // code is the rounding of the division (as `f32::round_ties_even` gives it).
        let gamma = 0.3f32;
        let inv_gamma = 1.0 / gamma;
        let w: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) * 0.0013).collect();
        let mut offset = vec![0.0; w.len()];
        ternary_ste_offset(&w, gamma, inv_gamma, &mut offset);
        for (i, (&w, &o)) in w.iter().zip(&offset).enumerate() {
            let code = (w / gamma).round_ties_even().clamp(-1.0, 1.0);
            assert_eq!(w * inv_gamma + o, code, "element {i}");
        }
    }

    #[test]
    fn norms_by_hand() {
        // mean(x²) = (1 + 4 + 4 + 16) / 4 = 6.25, rms = sqrt(6.25 + 0) = 2.5.
        let mut out = [0.0; 4];
        rms_norm(&[1.0, -2.0, 2.0, 4.0], &[1.0, 1.0, 2.0, 0.5], 0.0, &mut out);
        assert_eq!(out, [0.4, -0.8, 1.6, 0.8]);
        // x = [1, 3]: mean 2, var 1, eps 3 → std 2, x̂ = [-0.5, 0.5].
        layer_norm(
            &[1.0, 3.0],
            &[2.0, 1.0],
            Some(&[0.0, 1.0]),
            3.0,
            &mut out[..2],
        );
        assert_eq!(out[..2], [-1.0, 1.5]);
    }

    #[test]
    fn ln_l2_bwd_matches_finite_differences() {
        let z = [0.3f32, -1.2, 2.0, 0.7, -0.4];
        let target = [0.1f32, 0.5, -0.3, 1.0, 0.0];
        let gamma = [1.1f32, 0.9, 1.3, 0.7, 1.0];
        let beta = [0.05f32, -0.1, 0.0, 0.2, 0.1];
        let loss = |z: &[f32]| {
            let mut y = [0.0; 5];
            layer_norm(z, &gamma, Some(&beta), 1e-5, &mut y);
            y.iter()
                .zip(&target)
                .map(|(a, b)| 0.5 * f64::from(a - b).powi(2))
                .sum::<f64>()
        };
        let mut grad = [0.0; 5];
        ln_l2_bwd(&z, &target, &gamma, &beta, 1e-5, &mut grad);
        for i in 0..5 {
            let h = 1e-2;
            let (mut up, mut down) = (z, z);
            up[i] += h;
            down[i] -= h;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(grad[i])).abs() < 2e-3,
                "element {i}: finite difference {numeric} vs analytic {}",
                grad[i]
            );
        }
    }

    #[test]
    fn activations_by_hand() {
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-6);
        assert!((gelu_tanh_bwd(0.0) - 0.5).abs() < 1e-7);
        let h = 1e-3;
        let numeric = (gelu_tanh(0.7 + h) - gelu_tanh(0.7 - h)) / (2.0 * h);
        assert!((gelu_tanh_bwd(0.7) - numeric).abs() < 1e-3);
        assert_eq!(sigmoid_tanh(0.0), 0.5);
    }

    #[test]
    fn silu_by_hand() {
        assert_eq!(silu(0.0), 0.0);
        // 1 / (1 + e^-1) = 0.7310586.
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        let mut gate = [1.0, 0.0, -2.0];
        silu_mul(&mut gate, &[2.0, 5.0, 1.0]);
        assert!((gate[0] - 1.462_117_2).abs() < 1e-6, "{gate:?}");
        assert_eq!(gate[1], 0.0);
        // -2 / (1 + e^2) = -0.23840584.
        assert!((gate[2] + 0.238_405_84).abs() < 1e-6, "{gate:?}");
    }

    #[test]
    fn vectorized_silu_agrees_with_the_reference() {
        crate::cpu::avx2_under_test("silu_mul's AVX2 build");
        // Odd lengths (tails), values from -100 to 100 and special ones.
        for len in [1, 7, 8, 9, 31, 1000, 5633] {
            let mut gate: Vec<f32> = (0..len)
                .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 200.0 / (1.0 + (i % 7) as f32))
                .collect();
            for (i, special) in [0.0, -0.0, 88.0, -88.0, 1e-30, f32::NAN].iter().enumerate() {
                if i < len {
                    gate[i] = *special;
                }
            }
            let up: Vec<f32> = (0..len).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
            let mut expected = gate.clone();
            silu_mul_scalar(&mut expected, &up);
            silu_mul(&mut gate, &up);
            for (i, (&a, &e)) in gate.iter().zip(&expected).enumerate() {
                if e.is_nan() {
                    assert!(a.is_nan(), "length {len}, value {i}: {a} vs NaN");
                } else {
                    let tolerance = (e.abs() * 4.0 * f32::EPSILON).max(1e-30);
                    assert!(
                        (a - e).abs() <= tolerance,
                        "length {len}, value {i}: {a} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_by_hand() {
        let (mut cos, mut sin) = ([0.0; 2], [0.0; 2]);
        // head_dim 4, theta 100: angles p·100^0 = p and p·100^(-1/2) = p / 10.
        rope_angles(3, 100.0, &mut cos, &mut sin);
        assert!((cos[0] - 3f32.cos()).abs() < 1e-7 && (sin[1] - 0.3f32.sin()).abs() < 1e-7);
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rotate_pairs(&mut x, &cos, &sin);
        let expected = [3f32.cos(), 3f32.sin(), -(0.3f32.sin()), 0.3f32.cos()];
        for (a, e) in x.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{x:?} vs {expected:?}");
        }
    }

    #[test]
    fn products_by_hand() {
        // [1, 2] · [[1, 2, 3], [4, 5, 6]] = [9, 12, 15].
        let mut out = [1.0, 0.0, 0.0];
        add_vec_mat(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut out);
        assert_eq!(out, [10.0, 12.0, 15.0]);
        assert_eq!(dot(&[1.0, 2.0], &[3.0, 4.0]), 11.0);
        // Whole 32-lane chunks and a tail: Σ_{i<70} i · 2 = 4830 (exact in f32).
        let (a, b): (Vec<f32>, Vec<f32>) = (0..70).map(|i| (i as f32, 2.0)).unzip();
        assert_eq!(dot(&a, &b), 4830.0);
        let mut y = [1.0, 1.0];
        axpy(0.5, &[2.0, 4.0], &mut y);
        assert_eq!(y, [2.0, 3.0]);
    }

    #[test]
    fn relu2_mul_squares_the_positive_part() {
        let mut gate = [-2.0, -0.0, 0.5, 3.0];
        relu2_mul(&mut gate, &[10.0, 10.0, 2.0, -1.0]);
        assert_eq!(gate, [0.0, 0.0, 0.5, -9.0]);
    }
}
