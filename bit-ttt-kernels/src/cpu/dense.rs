//! Dense f32 products of one token, for the projections a model keeps in full precision.

use rayon::prelude::*;

use super::math::{add_vec_mat, axpy};

/// Below this many f32 weights a product stays on one thread (splitting costs more).
const MIN_PARALLEL_F32: usize = 1 << 16;

/// `out = x W` for a row-major `W` of `x.len()` rows (Burn's `Linear` orientation,
/// `[d_input, d_output]`), split into column chunks over the current rayon pool when
/// `threads > 1` and the matrix is large enough.
///
/// Call it inside [`install`](super::install) to run on this crate's pool. Every output sums
/// the rows in the same order whatever the thread count, so the result does not depend on it.
///
/// # Shapes
/// - x: `[d_input]`, weight: `[d_input, d_output]`, out: `[d_output]`
///
/// # Panics
/// If `weight` does not hold `x.len() · out.len()` values (a programmer error).
pub fn gemv_f32_dense(x: &[f32], weight: &[f32], out: &mut [f32], threads: usize) {
    let d_output = out.len();
    assert_eq!(
        weight.len(),
        x.len() * d_output,
        "weight holds {} values, expected [d_input={}, d_output={d_output}]",
        weight.len(),
        x.len()
    );
    if d_output == 0 {
        return;
    }
    if threads > 1 && weight.len() >= MIN_PARALLEL_F32 {
        let chunk = d_output.div_ceil(threads * 4).max(16);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, part)| {
            let columns = c * chunk..c * chunk + part.len();
            part.fill(0.0);
            for (xr, row) in x.iter().zip(weight.chunks_exact(d_output)) {
                axpy(*xr, &row[columns.clone()], part);
            }
        });
    } else {
        out.fill(0.0);
        add_vec_mat(x, weight, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_by_hand() {
        // [1, 2] · [[1, 2, 3], [4, 5, 6]] = [9, 12, 15]; `out` is overwritten.
        let mut out = [7.0; 3];
        gemv_f32_dense(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut out, 1);
        assert_eq!(out, [9.0, 12.0, 15.0]);
    }

    /// Odd shapes above and below the parallel threshold: every thread count gives the
    /// one-thread result bit for bit, inside the pool and outside.
    #[test]
    fn split_gemv_equals_one_thread() {
        for (d_input, d_output) in [(3, 5), (257, 255), (301, 1001)] {
            let x: Vec<f32> = (0..d_input)
                .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 3.0)
                .collect();
            let w: Vec<f32> = (0..d_input * d_output)
                .map(|i| ((i as f32 * 0.414_213_5).fract() - 0.5) * 0.2)
                .collect();
            let mut want = vec![0.0; d_output];
            gemv_f32_dense(&x, &w, &mut want, 1);
            // The first output by hand, in the same row order.
            let first = (0..d_input).fold(0.0f32, |acc, r| acc + x[r] * w[r * d_output]);
            assert_eq!(want[0], first, "[{d_input}, {d_output}]");
            for threads in [2, 3] {
                let mut got = vec![f32::NAN; d_output];
                gemv_f32_dense(&x, &w, &mut got, threads);
                assert_eq!(got, want, "[{d_input}, {d_output}], {threads} threads");
                let in_pool = super::super::install(threads, || {
                    let mut got = vec![f32::NAN; d_output];
                    gemv_f32_dense(&x, &w, &mut got, threads);
                    got
                });
                assert_eq!(
                    in_pool, want,
                    "[{d_input}, {d_output}], {threads} threads in pool"
                );
            }
        }
    }
}
