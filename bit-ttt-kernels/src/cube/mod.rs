//! GPU kernels for packed ternary weights, written once in CubeCL for every runtime it
//! compiles to (`wgpu`: Vulkan, Metal, DirectX, WebGPU, and CPU Vulkan such as lavapipe;
//! `cuda`). Feature `cubecl`.
//!
//! A product `y = x · (gamma · W)ᵀ` is two launches:
//! 1. the activations are prepared per token: [`quantize_i8`] (int8 codes, the scale
//!    `s_t = 127 / max(absmax, eps)` and the sum of the codes, the CPU's codes and scale bit
//!    for bit) or [`pad_f32`] (the values and their sum);
//! 2. [`ternary_matmul`] reads the weights, resident in the device layout of [`layout`]
//!    ([`CubeTernary::upload`], once per matrix), and writes `y` in f32.
//!
//! # The product kernel
//! One thread per output row and token tile, the row's words split into 8 slices over the
//! cube's y dimension (32 rows × 8 slices = 256 threads a cube), so even a decode GEMV of a few
//! thousand rows keeps tens of thousands of threads reading. The 32 threads of a warp read word
//! `k` of 32 neighbouring rows: 128 consecutive bytes, since the words are stored word-major.
//! Each 2-bit code `c = w + 1` is shifted out of its word and multiplied with its activation;
//! the int8 path accumulates in `i32` and subtracts the token's code sum at the end
//! (`Σ c·x − Σ x = Σ w·x`, exact), then multiplies once by `gamma / s_t`, as the CPU kernels
//! do ([`crate::cpu::finish_i8`]). CubeCL 0.10 has no 4×i8 dot-product instruction (its `dot`
//! is expanded into scalar products on every target), so the sums are plain `i32` multiply-adds.
//! Prefill multiplies a tile of 4 tokens per thread, so each weight word read serves 4 tokens.
//!
//! Launches per product: 2 (prepare, multiply). Scratch buffers come from the runtime's
//! memory pool.

// The `#[cube(launch)]` macro generates undocumented helper items for each kernel.
#[allow(missing_docs)]
pub mod kernels;
pub mod layout;
#[cfg(test)]
mod tests;

use cubecl::prelude::*;
use cubecl::server::Handle;

/// The CubeCL this module is written in, for naming runtimes (`cubecl::wgpu::WgpuRuntime`, and
/// `cubecl::cuda::CudaRuntime` where its `cuda` feature is on).
pub use cubecl;

use crate::cpu::QuantizedActivations;
use crate::packing::TernaryView;
use crate::KernelError;

/// Threads of the per-token preparation kernels (a power of two: they reduce by halving).
const PREPARE_THREADS: u32 = 256;
/// Output rows a product cube computes (the x dimension: a warp's worth).
const ROWS_PER_CUBE: u32 = 32;
/// Slices a row's words are split into (the y dimension). Every row has at least 8 words
/// (one block), so no slice is ever empty of work for every row.
const SLICES: u32 = 8;
/// Tokens a thread multiplies per weight read when there is more than one token.
const PREFILL_TILE: u32 = 4;

/// A packed ternary matrix resident on a device, in the word-major [`layout`].
#[derive(Clone, Debug)]
pub struct CubeTernary {
    words: Handle,
    rows: usize,
    cols: usize,
    words_per_row: usize,
    scale: f32,
}

impl CubeTernary {
    /// Copies `weights` to the device of `client`, reordered into the device layout.
    pub fn upload<R: Runtime>(client: &ComputeClient<R>, weights: TernaryView<'_>) -> Self {
        let words = layout::device_words(weights);
        Self {
            words: client.create_from_slice(&u32_bytes(&words)),
            rows: weights.rows(),
            cols: weights.cols(),
            words_per_row: layout::WORDS_PER_BLOCK * weights.blocks_per_row(),
            scale: weights.scale(),
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The per-tensor scale `gamma`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Bytes the weights occupy on the device.
    pub fn size_in_bytes(&self) -> usize {
        4 * self.words_per_row * self.rows
    }

    /// The device words (for a bandwidth probe that reads the same bytes).
    pub fn words(&self) -> &Handle {
        &self.words
    }

    /// Input width the product reads: whole blocks of 128.
    fn cols_padded(&self) -> usize {
        16 * self.words_per_row
    }
}

/// Activations prepared for [`ternary_matmul`]: padded values, one sum and one scale per token.
#[derive(Clone, Debug)]
pub struct CubeActivations {
    /// `[tokens_padded, cols_padded]`: `i32` codes or `f32` values.
    values: Handle,
    /// `[tokens_padded]`: the sum of each token's values (`i32` or `f32`, as `values`).
    sums: Handle,
    /// `[tokens_padded]`: `s_t` (int8) or 1.
    scales: Handle,
    tokens: usize,
    tokens_padded: usize,
    cols_padded: usize,
    int8: bool,
}

impl CubeActivations {
    /// Tokens (rows of the input).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Uploads activations quantized on the host, with their own scales: lets a test feed the
    /// product kernel the CPU's codes (scales of 1 make its output the exact integer sums).
    ///
    /// # Errors
    /// [`KernelError::LengthMismatch`] if the codes are not `[tokens, cols]` blocks of 128 wide
    /// or a scale per token is missing.
    pub fn from_quantized<R: Runtime>(
        client: &ComputeClient<R>,
        x: &QuantizedActivations,
        cols_padded: usize,
    ) -> Result<Self, KernelError> {
        check_len("activation scales", x.tokens, x.scales.len())?;
        check_len("activation codes", x.tokens * x.cols, x.values.len())?;
        if cols_padded < x.cols || !cols_padded.is_multiple_of(128) {
            return Err(KernelError::LengthMismatch {
                what: "padded activation width",
                expected: x.cols.div_ceil(128) * 128,
                actual: cols_padded,
            });
        }
        let tokens_padded = padded_tokens(x.tokens);
        let mut codes = vec![0i32; tokens_padded * cols_padded];
        let mut sums = vec![0i32; tokens_padded];
        let mut scales = vec![1.0f32; tokens_padded];
        for t in 0..x.tokens {
            for (c, &q) in x.row(t).iter().enumerate() {
                codes[t * cols_padded + c] = i32::from(q);
                sums[t] += i32::from(q);
            }
            scales[t] = x.scales[t];
        }
        Ok(Self {
            values: client.create_from_slice(&i32_bytes(&codes)),
            sums: client.create_from_slice(&i32_bytes(&sums)),
            scales: client.create_from_slice(&f32_bytes(&scales)),
            tokens: x.tokens,
            tokens_padded,
            cols_padded,
            int8: true,
        })
    }
}

/// Token rows are padded to a whole tile when there is more than one token.
fn padded_tokens(tokens: usize) -> usize {
    if tokens <= 1 {
        tokens.max(1)
    } else {
        tokens.div_ceil(PREFILL_TILE as usize) * PREFILL_TILE as usize
    }
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), KernelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Quantizes `x` (`[tokens, cols]` f32 on the device of `client`) per token to int8 for a
/// product with `weights`: the CPU's [`QuantizedActivations::quantize`], codes and scales
/// identical.
///
/// # Errors
/// [`KernelError::LengthMismatch`] if `cols` is not the weights' input width or `x` is not
/// `tokens · cols` long.
pub fn quantize_i8<R: Runtime>(
    client: &ComputeClient<R>,
    x: Handle,
    x_len: usize,
    tokens: usize,
    weights: &CubeTernary,
    eps: f32,
) -> Result<CubeActivations, KernelError> {
    check_len("activation width", weights.cols, x_len / tokens.max(1))?;
    check_len("activations", tokens * weights.cols, x_len)?;
    let tokens_padded = padded_tokens(tokens);
    let cols_padded = weights.cols_padded();
    let codes = client.empty(4 * tokens_padded * cols_padded);
    let sums = client.empty(4 * tokens_padded);
    let scales = client.empty(4 * tokens_padded);
    // SAFETY (each `from_raw_parts`): the lengths are those of the buffers just allocated or
    // checked above, so the kernel's bounds are the buffers' bounds.
    unsafe {
        kernels::quantize_i8_kernel::launch::<R>(
            client,
            CubeCount::Static(tokens_padded as u32, 1, 1),
            CubeDim::new_1d(PREPARE_THREADS),
            ArrayArg::from_raw_parts(x, x_len),
            ArrayArg::from_raw_parts(codes.clone(), tokens_padded * cols_padded),
            ArrayArg::from_raw_parts(sums.clone(), tokens_padded),
            ArrayArg::from_raw_parts(scales.clone(), tokens_padded),
            tokens as u32,
            weights.cols as u32,
            cols_padded as u32,
            eps,
            PREPARE_THREADS,
        );
    }
    Ok(CubeActivations {
        values: codes,
        sums,
        scales,
        tokens,
        tokens_padded,
        cols_padded,
        int8: true,
    })
}

/// Lays out f32 activations (`[tokens, cols]` on the device) for a product with `weights`
/// without quantizing them (W1.58A16).
///
/// # Errors
/// As [`quantize_i8`].
pub fn pad_f32<R: Runtime>(
    client: &ComputeClient<R>,
    x: Handle,
    x_len: usize,
    tokens: usize,
    weights: &CubeTernary,
) -> Result<CubeActivations, KernelError> {
    check_len("activation width", weights.cols, x_len / tokens.max(1))?;
    check_len("activations", tokens * weights.cols, x_len)?;
    let tokens_padded = padded_tokens(tokens);
    let cols_padded = weights.cols_padded();
    let values = client.empty(4 * tokens_padded * cols_padded);
    let sums = client.empty(4 * tokens_padded);
    let scales = client.empty(4 * tokens_padded);
    // SAFETY: as in `quantize_i8`.
    unsafe {
        kernels::pad_f32_kernel::launch::<R>(
            client,
            CubeCount::Static(tokens_padded as u32, 1, 1),
            CubeDim::new_1d(PREPARE_THREADS),
            ArrayArg::from_raw_parts(x, x_len),
            ArrayArg::from_raw_parts(values.clone(), tokens_padded * cols_padded),
            ArrayArg::from_raw_parts(sums.clone(), tokens_padded),
            ArrayArg::from_raw_parts(scales.clone(), tokens_padded),
            tokens as u32,
            weights.cols as u32,
            cols_padded as u32,
            PREPARE_THREADS,
        );
    }
    Ok(CubeActivations {
        values,
        sums,
        scales,
        tokens,
        tokens_padded,
        cols_padded,
        int8: false,
    })
}

/// `y = x · (gamma · W)ᵀ` on the device: `[tokens, rows]` f32, in a new buffer.
///
/// # Errors
/// [`KernelError::LengthMismatch`] if the activations were prepared for another input width.
pub fn ternary_matmul<R: Runtime>(
    client: &ComputeClient<R>,
    weights: &CubeTernary,
    x: &CubeActivations,
) -> Result<Handle, KernelError> {
    check_len(
        "prepared activation width",
        weights.cols_padded(),
        x.cols_padded,
    )?;
    let output = client.empty(4 * x.tokens * weights.rows);
    let tile = if x.tokens_padded == 1 {
        1
    } else {
        PREFILL_TILE
    };
    let count = CubeCount::Static(
        weights.rows.div_ceil(ROWS_PER_CUBE as usize) as u32,
        (x.tokens_padded / tile as usize) as u32,
        1,
    );
    let dim = CubeDim::new_2d(ROWS_PER_CUBE, SLICES);
    let values_len = x.tokens_padded * x.cols_padded;
    // SAFETY: the lengths are the buffers' own (allocated above or by the preparation).
    unsafe {
        let (w, xs, sums, scales, out) = (
            ArrayArg::from_raw_parts(weights.words.clone(), weights.words_per_row * weights.rows),
            ArrayArg::from_raw_parts(x.values.clone(), values_len),
            ArrayArg::from_raw_parts(x.sums.clone(), x.tokens_padded),
            ArrayArg::from_raw_parts(x.scales.clone(), x.tokens_padded),
            ArrayArg::from_raw_parts(output.clone(), x.tokens * weights.rows),
        );
        let (rows, tokens, words) = (
            weights.rows as u32,
            x.tokens as u32,
            weights.words_per_row as u32,
        );
        if x.int8 {
            kernels::ternary_matmul_kernel::launch::<i32, R>(
                client,
                count,
                dim,
                w,
                xs,
                sums,
                scales,
                out,
                rows,
                tokens,
                words,
                weights.scale,
                ROWS_PER_CUBE,
                SLICES,
                tile,
            );
        } else {
            kernels::ternary_matmul_kernel::launch::<f32, R>(
                client,
                count,
                dim,
                w,
                xs,
                sums,
                scales,
                out,
                rows,
                tokens,
                words,
                weights.scale,
                ROWS_PER_CUBE,
                SLICES,
                tile,
            );
        }
    }
    Ok(output)
}

/// Copies `words` (`u32`, a multiple of 4 long) into a new buffer with the plain copy kernel:
/// the reference bandwidth of a benchmark.
pub fn copy_words<R: Runtime>(client: &ComputeClient<R>, words: &Handle, len: usize) -> Handle {
    let output = client.empty(4 * len);
    let vectors = len / 4;
    // SAFETY: both buffers hold `len` words.
    unsafe {
        kernels::copy_kernel::launch::<R>(
            client,
            CubeCount::Static(vectors.div_ceil(256) as u32, 1, 1),
            CubeDim::new_1d(256),
            ArrayArg::from_raw_parts(words.clone(), len),
            ArrayArg::from_raw_parts(output.clone(), len),
        );
    }
    output
}

/// Reads a device buffer of f32 back to the host (blocking).
///
/// # Errors
/// [`KernelError::Device`] when the runtime fails (a kernel that failed, a lost device).
pub fn read_f32<R: Runtime>(
    client: &ComputeClient<R>,
    handle: Handle,
) -> Result<Vec<f32>, KernelError> {
    let bytes = read_bytes(client, handle)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Reads a device buffer of i32 back to the host (blocking).
///
/// # Errors
/// As [`read_f32`].
pub fn read_i32<R: Runtime>(
    client: &ComputeClient<R>,
    handle: Handle,
) -> Result<Vec<i32>, KernelError> {
    let bytes = read_bytes(client, handle)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn read_bytes<R: Runtime>(
    client: &ComputeClient<R>,
    handle: Handle,
) -> Result<Vec<u8>, KernelError> {
    client
        .read_one(handle)
        .map(|bytes| bytes.to_vec())
        .map_err(|e| KernelError::Device(format!("{e:?}")))
}

fn u32_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl CubeActivations {
    /// The prepared values, sums and scales read back (tests and diagnostics): `(codes or
    /// values, sums, scales)` as f64 for both kinds, one row per padded token.
    ///
    /// # Errors
    /// As [`read_f32`].
    pub fn read_back<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
    ) -> Result<PreparedOnHost, KernelError> {
        let widen_i32 = |v: Vec<i32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let widen_f32 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let (values, sums) = if self.int8 {
            (
                widen_i32(read_i32(client, self.values.clone())?),
                widen_i32(read_i32(client, self.sums.clone())?),
            )
        } else {
            (
                widen_f32(read_f32(client, self.values.clone())?),
                widen_f32(read_f32(client, self.sums.clone())?),
            )
        };
        Ok(PreparedOnHost {
            values,
            sums,
            scales: read_f32(client, self.scales.clone())?,
            cols_padded: self.cols_padded,
        })
    }
}

/// Prepared activations on the host (see [`CubeActivations::read_back`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedOnHost {
    /// `[tokens_padded, cols_padded]` codes or values.
    pub values: Vec<f64>,
    /// One sum per padded token.
    pub sums: Vec<f64>,
    /// One scale per padded token.
    pub scales: Vec<f32>,
    /// Row length of `values`.
    pub cols_padded: usize,
}
