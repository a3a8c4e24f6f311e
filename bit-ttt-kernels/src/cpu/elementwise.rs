//! Element-wise activations of a decode step, vectorized where the CPU allows.

/// `x · sigmoid(x) = x / (1 + e^(-x))`, the scalar reference (Burn's `silu` recipe).
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU's gating, in place: `gate[i] = silu(gate[i]) · up[i]`.
///
/// With AVX2 and FMA, eight values at a time with a polynomial `e^x` (Cephes' `expf` scheme;
/// the result agrees with [`silu_mul_scalar`] within 4 ulp, tested; for `gate` below -87
/// it is a tiny negative number instead of `-0`, and `-inf` gives `-inf` instead of NaN). A
/// decode step gates the whole FFN width on one thread; with `f32::exp` per value that was
/// about 3% of a 1b model's step.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
