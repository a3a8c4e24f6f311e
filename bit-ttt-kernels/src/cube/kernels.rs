//! The CubeCL kernel sources: one source compiles to WGSL/SPIR-V (`wgpu`) and to CUDA C++.
//!
//! Integer arithmetic only where the CPU's is integer: the int8 path accumulates `i32` exactly
//! as the scalar reference does and multiplies by a float once at the end.

use cubecl::prelude::*;

/// The int8 code of `v` at scale `scale`: `clamp(round_half_even(v · scale), -128, 127)`, NaN to 0,
/// the same float operations as the CPU's `code_of` (a product, then exact rounding steps).
// `y == y` is the NaN test every target keeps (WGSL lets a compiler assume `isNan` away);
// the explicit comparisons pin the clamp to plain selects on every target.
#[allow(clippy::eq_op, clippy::manual_clamp)]
#[cube]
fn code_of(v: f32, scale: f32) -> i32 {
    let y = v * scale;
    let mut code = 0i32;
    // NaN compares false with everything: it keeps code 0, as `NaN as i8` does on the CPU.
    if y == y {
        // floor(y + 0.5) rounds half up; `y + 0.5` and `r - y` are exact for |y| < 2^22, and
        // larger |y| (only possible past the clamp) is clamped either way.
        let mut r = f32::floor(y + 0.5);
        if r - y == 0.5 {
            // A tie rounded up: keep it only when even.
            let half = r * 0.5;
            if f32::floor(half) != half {
                r -= 1.0;
            }
        }
        if r < -128.0 {
            r = -128.0;
        }
        if r > 127.0 {
            r = 127.0;
        }
        code = i32::cast_from(r);
    }
    code
}

/// Per-token absmax int8 quantization, one cube per token (`CUBE_POS_X`), `cube_size` threads.
///
/// Writes `[tokens_padded, cols_padded]` codes (zero past `cols` and for tokens past `tokens`),
/// the scale `s_t = (1 / max(absmax, eps)) · 127` and the sum of the codes of each token.
#[cube(launch)]
pub fn quantize_i8_kernel(
    x: &Array<f32>,
    codes: &mut Array<i32>,
    code_sums: &mut Array<i32>,
    scales: &mut Array<f32>,
    tokens: u32,
    cols: u32,
    cols_padded: u32,
    eps: f32,
    #[comptime] cube_size: u32,
) {
    let t = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let threads = CUBE_DIM_X as usize;
    let cols = cols as usize;
    let cols_padded = cols_padded as usize;
    let is_token = t < tokens as usize;

    // absmax over the token; NaN never compares greater, so it is skipped as `f32::max` does.
    let mut partial_max = SharedMemory::<f32>::new(cube_size as usize);
    let mut m = 0.0f32;
    if is_token {
        let mut c = unit;
        while c < cols {
            let a = f32::abs(x[t * cols + c]);
            if a > m {
                m = a;
            }
            c += threads;
        }
    }
    partial_max[unit] = m;
    sync_cube();
    let mut stride = threads / 2;
    while stride > 0 {
        if unit < stride {
            let other = partial_max[unit + stride];
            if other > partial_max[unit] {
                partial_max[unit] = other;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let mut bound = partial_max[0];
    if eps > bound {
        bound = eps;
    }
    let scale = (1.0 / bound) * 127.0;

    let mut partial_sum = SharedMemory::<i32>::new(cube_size as usize);
    let mut sum = 0i32;
    let mut c = unit;
    while c < cols_padded {
        let mut code = 0i32;
        if is_token && c < cols {
            code = code_of(x[t * cols + c], scale);
        }
        codes[t * cols_padded + c] = code;
        sum += code;
        c += threads;
    }
    partial_sum[unit] = sum;
    sync_cube();
    let mut stride = threads / 2;
    while stride > 0 {
        if unit < stride {
            partial_sum[unit] += partial_sum[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    if unit == 0 {
        code_sums[t] = partial_sum[0];
        scales[t] = scale;
    }
}

/// f32 activations laid out as the product reads them: `[tokens_padded, cols_padded]` with
/// zeros past `cols` and past `tokens`, the sum of each token's values, and a scale of 1.
#[cube(launch)]
pub fn pad_f32_kernel(
    x: &Array<f32>,
    padded: &mut Array<f32>,
    value_sums: &mut Array<f32>,
    scales: &mut Array<f32>,
    tokens: u32,
    cols: u32,
    cols_padded: u32,
    #[comptime] cube_size: u32,
) {
    let t = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let threads = CUBE_DIM_X as usize;
    let cols = cols as usize;
    let cols_padded = cols_padded as usize;
    let is_token = t < tokens as usize;

    let mut partial_sum = SharedMemory::<f32>::new(cube_size as usize);
    let mut sum = 0.0f32;
    let mut c = unit;
    while c < cols_padded {
        let mut v = 0.0f32;
        if is_token && c < cols {
            v = x[t * cols + c];
        }
        padded[t * cols_padded + c] = v;
        sum += v;
        c += threads;
    }
    partial_sum[unit] = sum;
    sync_cube();
    let mut stride = threads / 2;
    while stride > 0 {
        if unit < stride {
            partial_sum[unit] += partial_sum[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    if unit == 0 {
        value_sums[t] = partial_sum[0];
        scales[t] = 1.0;
    }
}

/// `output[t, r] = (Σ_k c[r, k] · x[t, k] − Σ_k x[t, k]) · (gamma / scales[t])` with the weight
/// codes `c = w + 1` read from the device layout ([`super::layout`]), so the bracket is
/// `Σ_k w[r, k] · x[t, k]`.
///
/// Threads: a cube is `rows_per_cube` rows (x) by `slices` slices of the row's words (y); cube
/// `(i, j)` computes rows `i · rows_per_cube ..` for the tokens `j · tile_tokens ..`. Slice `s`
/// sums the words `s, s + slices, …`; the slices meet in shared memory, and slice 0 writes.
/// `N` is `i32` for int8 codes (exact integer sums) or `f32` for plain activations.
///
/// # Shapes
/// - weights: `[words_per_row, rows]` (`u32`)
/// - x: `[tokens_padded, 16 · words_per_row]` as 4-wide vectors; `tokens_padded` a multiple of
///   `tile_tokens`
/// - x_sums, scales: `[tokens_padded]`
/// - output: `[tokens, rows]`
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn ternary_matmul_kernel<N: Numeric>(
    weights: &Array<u32>,
    x: &Array<Vector<N, Const<4>>>,
    x_sums: &Array<N>,
    scales: &Array<f32>,
    output: &mut Array<f32>,
    rows: u32,
    tokens: u32,
    words_per_row: u32,
    gamma: f32,
    #[comptime] rows_per_cube: u32,
    #[comptime] slices: u32,
    #[comptime] tile_tokens: u32,
) {
    let rows = rows as usize;
    let words_per_row = words_per_row as usize;
    let row = (CUBE_POS_X * rows_per_cube + UNIT_POS_X) as usize;
    let slice = UNIT_POS_Y as usize;
    let token0 = (CUBE_POS_Y * tile_tokens) as usize;
    // Rows past the end read row 0 (every thread must reach the barrier) and write nothing.
    let mut read_row = row;
    if row >= rows {
        read_row = 0;
    }
    // Vectors of one token's activations: 16 values per word, 4 per vector.
    let vectors_per_token = 4 * words_per_row;

    let mut acc = Array::<N>::new(tile_tokens as usize);
    #[unroll]
    for t in 0..tile_tokens as usize {
        acc[t] = N::from_int(0);
    }

    let mut k = slice;
    while k < words_per_row {
        let word = weights[k * rows + read_row];
        // Word k = 8 · block + m covers the block's weights 4m + j + 32g: the vectors
        // 32 · block + m + 8g of the token's activations.
        let first_vector = (k / 8) * 32 + (k % 8);
        #[unroll]
        for g in 0..4u32 {
            #[unroll]
            for t in 0..tile_tokens as usize {
                let xs = x[(token0 + t) * vectors_per_token + first_vector + 8 * g as usize];
                #[unroll]
                for j in 0..4u32 {
                    let code = (word >> (8 * j + 2 * g)) & 3u32;
                    acc[t] += N::cast_from(code) * xs[j as usize];
                }
            }
        }
        k += slices as usize;
    }

    let mut partial = SharedMemory::<N>::new((rows_per_cube * slices * tile_tokens) as usize);
    #[unroll]
    for t in 0..tile_tokens as usize {
        partial[(t * slices as usize + slice) * rows_per_cube as usize + UNIT_POS_X as usize] =
            acc[t];
    }
    sync_cube();

    if slice == 0 && row < rows {
        #[unroll]
        for t in 0..tile_tokens as usize {
            let token = token0 + t;
            if token < tokens as usize {
                let mut sum = N::from_int(0);
                #[unroll]
                for s in 0..slices as usize {
                    sum += partial
                        [(t * slices as usize + s) * rows_per_cube as usize + UNIT_POS_X as usize];
                }
                let exact = sum - x_sums[token];
                output[token * rows + row] = f32::cast_from(exact) * (gamma / scales[token]);
            }
        }
    }
}

/// A plain copy, one `u32` vector per thread: the bandwidth a kernel reading `input` once can
/// reach on this device, measured beside the ternary product.
#[cube(launch)]
pub fn copy_kernel(
    input: &Array<Vector<u32, Const<4>>>,
    output: &mut Array<Vector<u32, Const<4>>>,
) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        output[i] = input[i];
    }
}
