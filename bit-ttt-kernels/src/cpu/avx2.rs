//! AVX2 kernels (x86_64 only), selected at run time when the CPU has AVX2 and FMA.
//!
//! # W1.58A8 (int8 activations)
//! A [`BlockTernary`] is one 32-byte load. Byte `j` holds the codes of weights `j`, `j+32`,
//! `j+64` and `j+96`, so `(v >> 2g) & 3` (a 16-bit shift, then a byte mask) gives the 32 codes of
//! group `g` in the byte order of the activations `x[32g .. 32g+32]` of that block. The codes are
//! unsigned (`c = w + 1` in 0..=2), which is what `vpmaddubsw` wants as its first operand:
//! `maddubs(c, x)` gives 16 sums of two `c·x` products, each in -512..=508, so no saturation. The
//! four groups of a block add up to -2048..=2032 per 16-bit lane, and [`FLUSH_BLOCKS`] = 8 blocks
//! stay within `i16` before they are widened with `vpmaddwd` (by ones) into 32-bit accumulators.
//! At the end `Σ c·x = Σ w·x + Σ x`, so the per-token activation sum (computed once per call) is
//! subtracted. The activations are zero-padded to whole blocks once per call, so the loop has no
//! tail and padded weights meet zero activations.
//!
//! Several tokens share each decoded block (register blocking over tokens, up to 4), which is
//! what makes the prefill GEMM faster per weight than the GEMV. Rows are processed in tiles whose
//! weights fit in L2, with the token groups inside a tile, so a tile is read from memory once.
//!
//! # W1.58A16 (f32 activations)
//! Codes are decoded to `i8` weights, widened to `f32` eight at a time and multiplied with FMA.
//! The sum order differs from the scalar reference, so results agree only to rounding.

// The register tiles are indexed by row and token in lockstep over several arrays; index loops
// say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::packing::{BlockTernary, TernaryView, QK_TERNARY};

use super::{finish_f32, finish_i8};

/// Blocks accumulated in 16-bit lanes before widening to 32 bits (at most 15 are safe).
pub(crate) const FLUSH_BLOCKS: usize = 8;

/// Weight bytes of a row tile, sized so a tile stays in L2 while every token group reads it.
const TILE_BYTES: usize = 128 * 1024;

/// Whether the CPU can run these kernels (AVX2 and FMA).
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Horizontal sum of eight `i32` lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Horizontal sum of eight `f32` lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `Σ c·x` (codes, not weights) of `R` rows with `T` tokens over `bpr` blocks.
///
/// # Safety
/// Row `r` is `bpr` blocks at `w + r·bpr`; token `t` is `bpr·128` bytes at `x + t·kp`; all of
/// them must be readable.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn code_dots<const R: usize, const T: usize>(
    w: *const BlockTernary,
    bpr: usize,
    x: *const i8,
    kp: usize,
) -> [[i32; T]; R] {
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = [[_mm256_setzero_si256(); T]; R];
    let mut b = 0;
    while b < bpr {
        let end = (b + FLUSH_BLOCKS).min(bpr);
        let mut acc16 = [[_mm256_setzero_si256(); T]; R];
        while b < end {
            for r in 0..R {
                // SAFETY: block b < bpr of row r < R, readable by the caller's contract.
                let v = unsafe { _mm256_loadu_si256(w.add(r * bpr + b).cast::<__m256i>()) };
                let c0 = _mm256_and_si256(v, mask);
                let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(v), mask);
                let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
                let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(v), mask);
                for t in 0..T {
                    // SAFETY: bytes b·128 .. b·128+128 of token t < T, readable by the contract.
                    let (x0, x1, x2, x3) = unsafe {
                        let xp = x.add(t * kp + b * QK_TERNARY).cast::<__m256i>();
                        (
                            _mm256_loadu_si256(xp),
                            _mm256_loadu_si256(xp.add(1)),
                            _mm256_loadu_si256(xp.add(2)),
                            _mm256_loadu_si256(xp.add(3)),
                        )
                    };
                    let p01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c0, x0),
                        _mm256_maddubs_epi16(c1, x1),
                    );
                    let p23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c2, x2),
                        _mm256_maddubs_epi16(c3, x3),
                    );
                    acc16[r][t] = _mm256_add_epi16(acc16[r][t], _mm256_add_epi16(p01, p23));
                }
            }
            b += 1;
        }
        for r in 0..R {
            for t in 0..T {
                acc32[r][t] = _mm256_add_epi32(acc32[r][t], _mm256_madd_epi16(acc16[r][t], ones));
            }
        }
    }
    let mut dots = [[0i32; T]; R];
    for r in 0..R {
        for t in 0..T {
            dots[r][t] = hsum_epi32(acc32[r][t]);
        }
    }
    dots
}

/// The activations and per-token constants of one W1.58A8 call.
pub(crate) struct I8Inputs<'a> {
    /// `[tokens, kp]` codes, zero-padded to whole blocks.
    pub x: &'a [i8],
    /// Padded row length, `blocks_per_row · 128`.
    pub kp: usize,
    /// `Σ_k x[t, k]` per token.
    pub sums: &'a [i32],
    /// `gamma / s_t` per token.
    pub factors: &'a [f32],
}

/// Rows `r0 .. r0 + n` of a W1.58A8 product; `outs[t]` holds the `n` outputs of token `t`.
///
/// # Safety
/// The CPU must have AVX2 ([`available`]). `inputs.x` must hold `outs.len()` tokens of
/// `inputs.kp = w.blocks_per_row() · 128` codes, and `r0 + n <= w.rows()`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemm_i8_rows(
    w: TernaryView<'_>,
    inputs: &I8Inputs<'_>,
    r0: usize,
    outs: &mut [&mut [f32]],
) {
    let tokens = outs.len();
    let Some(n) = outs.first().map(|o| o.len()) else {
        return;
    };
    let bpr = w.blocks_per_row();
    let kp = inputs.kp;
    assert!(r0 + n <= w.rows() && inputs.x.len() >= tokens * kp && kp == bpr * QK_TERNARY);
    let blocks = w.blocks().as_ptr();
    let tile = (TILE_BYTES / (bpr * 32).max(1)).clamp(4, 1 << 20) / 4 * 4;
    let mut tile_start = 0;
    while tile_start < n {
        let tile_end = (tile_start + tile).min(n);
        let mut t0 = 0;
        while t0 < tokens {
            let tn = (tokens - t0).min(4);
            let x = inputs.x[t0 * kp..].as_ptr();
            let mut i = tile_start;
            // SAFETY (all calls): rows r0 + i .. r0 + i + R are < w.rows() (checked above), so
            // their blocks are inside `w.blocks()`; tokens t0 .. t0 + tn are inside `inputs.x`.
            macro_rules! run {
                ($r:literal, $t:literal) => {{
                    let dots =
                        unsafe { code_dots::<$r, $t>(blocks.add((r0 + i) * bpr), bpr, x, kp) };
                    for r in 0..$r {
                        for t in 0..$t {
                            let tok = t0 + t;
                            outs[tok][i + r] =
                                finish_i8(dots[r][t] - inputs.sums[tok], inputs.factors[tok]);
                        }
                    }
                    i += $r;
                }};
            }
            match tn {
                1 => {
                    while i + 4 <= tile_end {
                        run!(4, 1);
                    }
                    while i < tile_end {
                        run!(1, 1);
                    }
                }
                2 => {
                    while i + 2 <= tile_end {
                        run!(2, 2);
                    }
                    while i < tile_end {
                        run!(1, 2);
                    }
                }
                3 => {
                    while i < tile_end {
                        run!(1, 3);
                    }
                }
                _ => {
                    while i < tile_end {
                        run!(1, 4);
                    }
                }
            }
            t0 += tn;
        }
        tile_start = tile_end;
    }
}

/// Decodes group `G` (weights `32G .. 32G+32`) of a block to four vectors of eight f32 weights.
#[inline]
#[target_feature(enable = "avx2")]
fn decode_f32<const SHIFT: i32>(v: __m256i) -> [__m256; 4] {
    let c = _mm256_and_si256(_mm256_srli_epi16::<SHIFT>(v), _mm256_set1_epi8(3));
    let wv = _mm256_sub_epi8(c, _mm256_set1_epi8(1));
    let lo = _mm256_castsi256_si128(wv);
    let hi = _mm256_extracti128_si256::<1>(wv);
    [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))),
    ]
}

/// `Σ w·x` of one row with `T` f32 tokens.
///
/// # Safety
/// The row is `bpr` blocks at `w`; token `t` is `bpr·128` floats at `x + t·kp`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_dots<const T: usize>(
    w: *const BlockTernary,
    bpr: usize,
    x: *const f32,
    kp: usize,
) -> [f32; T] {
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    for b in 0..bpr {
        // SAFETY: block b < bpr of the row.
        let v = unsafe { _mm256_loadu_si256(w.add(b).cast::<__m256i>()) };
        let groups = [
            decode_f32::<0>(v),
            decode_f32::<2>(v),
            decode_f32::<4>(v),
            decode_f32::<6>(v),
        ];
        for (g, ws) in groups.iter().enumerate() {
            for t in 0..T {
                // SAFETY: floats b·128 + 32g .. + 32 of token t < T.
                let xp = unsafe { x.add(t * kp + b * QK_TERNARY + g * 32) };
                for (k, &wk) in ws.iter().enumerate() {
                    // SAFETY: as above, 8 floats at offset 8k < 32.
                    let xv = unsafe { _mm256_loadu_ps(xp.add(8 * k)) };
                    acc[t][k] = _mm256_fmadd_ps(wk, xv, acc[t][k]);
                }
            }
        }
    }
    let mut dots = [0.0f32; T];
    for t in 0..T {
        let a = _mm256_add_ps(
            _mm256_add_ps(acc[t][0], acc[t][1]),
            _mm256_add_ps(acc[t][2], acc[t][3]),
        );
        dots[t] = hsum_ps(a);
    }
    dots
}

/// Rows `r0 .. r0 + n` of a W1.58A16 product over `[tokens, kp]` zero-padded f32 activations.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]). `x` must hold `outs.len()` tokens of
/// `kp = w.blocks_per_row() · 128` floats, and `r0 + n <= w.rows()`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemm_f32_rows(
    w: TernaryView<'_>,
    x: &[f32],
    kp: usize,
    r0: usize,
    outs: &mut [&mut [f32]],
) {
    let tokens = outs.len();
    let Some(n) = outs.first().map(|o| o.len()) else {
        return;
    };
    let bpr = w.blocks_per_row();
    assert!(r0 + n <= w.rows() && x.len() >= tokens * kp && kp == bpr * QK_TERNARY);
    let blocks = w.blocks().as_ptr();
    let tile = (TILE_BYTES / (bpr * 32).max(1)).max(1);
    let mut tile_start = 0;
    while tile_start < n {
        let tile_end = (tile_start + tile).min(n);
        let mut t0 = 0;
        while t0 < tokens {
            let tn = (tokens - t0).min(2);
            let xp = x[t0 * kp..].as_ptr();
            for i in tile_start..tile_end {
                // SAFETY: row r0 + i < w.rows(); tokens t0 .. t0 + tn are inside `x`.
                let row = unsafe { blocks.add((r0 + i) * bpr) };
                if tn == 2 {
                    let d = unsafe { f32_dots::<2>(row, bpr, xp, kp) };
                    outs[t0][i] = finish_f32(d[0], w.scale());
                    outs[t0 + 1][i] = finish_f32(d[1], w.scale());
                } else {
                    let d = unsafe { f32_dots::<1>(row, bpr, xp, kp) };
                    outs[t0][i] = finish_f32(d[0], w.scale());
                }
            }
            t0 += tn;
        }
        tile_start = tile_end;
    }
}
