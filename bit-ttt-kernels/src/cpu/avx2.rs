//! AVX2 kernels (x86_64 only), selected at run time when the CPU has AVX2 and FMA.
//!
//! # W1.58A8 (int8 activations)
//! A [`BlockTernary`] is one 32-byte load `v`. Byte `j` holds the codes of weights `j`, `j+32`,
//! `j+64` and `j+96` at bits 0, 2, 4 and 6, so a mask (after a 16-bit shift for the upper
//! fields) gives the 32 codes of group `g` in the byte order of the activations
//! `x[32g .. 32g+32]` of that block. The codes are unsigned (`c = w + 1` in 0..=2), which is what
//! `vpmaddubsw` wants as its first operand: `maddubs(c, x)` gives 16 sums of two `c·x` products.
//! At the end `Σ c·x = Σ w·x + Σ x`, so the per-token activation sum (computed once per call) is
//! subtracted. The activations are zero-padded to whole blocks once per call, so the loops have
//! no tail and padded weights meet zero activations. The integer sums are exact; the final
//! scaling is [`finish_i8`], the reference's expression, so outputs are bit-identical.
//!
//! - **Decode (one token)**, [`row_dot`]: groups 0 and 2 are `v & 3` and `(v >> 4) & 3`,
//!   groups 1 and 3 are read scaled by four, `v & 0xC` and `(v >> 4) & 0xC`, which saves two
//!   shifts: one shift, four ands, four `maddubs`, four adds per 128 weights. Rows are read in
//!   memory order (one stream) with a software prefetch 2 KiB ahead, each group of
//!   [`FLUSH_BLOCKS`] blocks is unrolled, and four rows share one vectorized horizontal sum and
//!   scaling ([`gemv_rows`]).
//! - **Prefill (several tokens)**, [`row_dots`]: each block is decoded once into four code
//!   vectors and multiplied with the activations of up to four tokens (register blocking), and
//!   rows are processed in tiles that stay in L2 while every group of tokens reads them.
//!
//! Both accumulate in 16-bit lanes for [`FLUSH_BLOCKS`] blocks before widening with
//! `vpmaddwd`; the bounds are given where the accumulators are.
//!
//! A code `0b11` (corrupt data, see [`TernaryView`]) cannot make these kernels read out of
//! bounds, but its result is unspecified (16-bit sums may wrap).
//!
//! # W1.58A16 (f32 activations)
//! Codes are decoded to `i8` weights, widened to `f32` eight at a time and multiplied with FMA.
//! The sum order differs from the scalar reference, so results agree only to rounding.
//!
//! # Decode math
//! [`silu_mul`] with a polynomial `e^x` ([`exp_ps`]); [`ttt_head`], the generic TTT head step
//! compiled with AVX2 and FMA (bit-identical to it).

// The register tiles are indexed by row and token in lockstep over several arrays; index loops
// say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::packing::{BlockTernary, TernaryView, QK_TERNARY};

use super::activations::{code_of, scale_of};
use super::ttt_head::{TttHeadInputs, TttHeadState, TttStep};
use super::{finish_f32, finish_i8};

/// Blocks accumulated in 16-bit lanes before widening to 32 bits. [`row_dot`]'s ×4 accumulator
/// allows at most 8, [`row_dots`]'s at most 15.
pub(crate) const FLUSH_BLOCKS: usize = 8;
// `row_dot` prefetches one 64-byte line per two blocks, from the first block of each group.
const _: () = assert!(FLUSH_BLOCKS.is_multiple_of(2) && FLUSH_BLOCKS <= 8);

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

/// Distance of the software prefetch of the decode kernel, in blocks (2 KiB) ahead of the block
/// being read. The hardware prefetchers alone left the single-thread GEMV at about 80% of the
/// read bandwidth; with this it streams at about the read bandwidth.
const PREFETCH_BLOCKS: usize = 64;

/// `Σ c·x` (codes, not weights) of one row with one token, as eight `i32` lanes.
///
/// The decode-path kernel. Groups 0 and 2 are read as `v & 3` and `(v >> 4) & 3`, groups 1 and
/// 3 as `v & 0xC` and `(v >> 4) & 0xC`, that is four times their codes, so a block costs one
/// shift, four ands, four `maddubs` and four adds. The ×4 sums go to their own 16-bit
/// accumulator (per block at most ±4096 per lane, so [`FLUSH_BLOCKS`] = 8 blocks reach at most
/// -32768..=32512); at the end of a group it is divided by 4 (exactly: its lanes are multiples
/// of 4) and added to the ×1 accumulator (then both are within ±8192, the sum within ±16384),
/// and one `vpmaddwd` widens the sum.
///
/// A full group is unrolled ([`group_dot`] with a constant count), so no loop control runs
/// between its blocks; the rest of a row takes the rolled loop. Always inlined (it has no
/// `target_feature` of its own, so it may be): a call per row, returning its vector through
/// memory, cost a large share of a call (`BENCH.md`).
///
/// # Safety
/// The CPU must have AVX2. The row is `bpr` blocks at `w`; the token is `bpr·128` bytes at `x`.
#[inline(always)]
unsafe fn row_dot(w: *const BlockTernary, bpr: usize, x: *const i8) -> __m256i {
    // SAFETY (all intrinsics): the caller guarantees AVX2.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let widen = |acc: [__m256i; 2]| {
            _mm256_madd_epi16(
                _mm256_add_epi16(acc[0], _mm256_srai_epi16::<2>(acc[1])),
                ones,
            )
        };
        let mut acc32 = _mm256_setzero_si256();
        let full = bpr - bpr % FLUSH_BLOCKS;
        let mut k = 0;
        while k < full {
            // SAFETY: blocks k .. k + FLUSH_BLOCKS <= full <= bpr.
            acc32 = _mm256_add_epi32(acc32, widen(group_dot(w, x, k, FLUSH_BLOCKS)));
            k += FLUSH_BLOCKS;
        }
        if k < bpr {
            // SAFETY: blocks k .. bpr.
            acc32 = _mm256_add_epi32(acc32, widen(group_dot(w, x, k, bpr - k)));
        }
        acc32
    }
}

/// The two 16-bit accumulators of [`row_dot`] over blocks `k .. k + n` of a row (`n` at most
/// [`FLUSH_BLOCKS`]), prefetching one line per two blocks. Inlined with a constant `n`, the loop
/// unrolls.
///
/// # Safety
/// The CPU must have AVX2. Blocks `k .. k + n` at `w` and their `n·128` activation bytes at
/// `x + 128·k` must be readable.
#[inline(always)]
unsafe fn group_dot(w: *const BlockTernary, x: *const i8, k: usize, n: usize) -> [__m256i; 2] {
    debug_assert!(
        n <= FLUSH_BLOCKS,
        "{n} blocks overflow the 16-bit accumulators"
    );
    let (wk, xk) = (w.wrapping_add(k), x.wrapping_add(k * QK_TERNARY));
    // SAFETY: the caller guarantees AVX2.
    let mut acc = unsafe { [_mm256_setzero_si256(); 2] };
    for j in 0..n {
        if j % 2 == 0 {
            prefetch_ahead(wk.wrapping_add(j));
        }
        // SAFETY: block k + j and its activations, by the contract.
        unsafe { block_dot(wk, xk, j, &mut acc) };
    }
    acc
}

/// Prefetches the 64-byte line [`PREFETCH_BLOCKS`] blocks after `block` (called once per two
/// blocks). Prefetches never fault, and `wrapping_add` keeps the address computation defined
/// when it lies past the matrix.
#[inline(always)]
fn prefetch_ahead(block: *const BlockTernary) {
    // SAFETY: SSE is part of x86_64; a prefetch reads nothing the program can observe.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_BLOCKS).cast::<i8>()) };
}

/// Adds block `k` of a row times its activations to the two 16-bit accumulators of
/// [`row_dot`]: `acc[0] += c0·x0 + c2·x2`, `acc[1] += 4·(c1·x1 + c3·x3)`.
///
/// # Safety
/// The CPU must have AVX2. Block `k` at `w + k` and the 128 bytes at `x + 128·k` must be
/// readable.
#[inline(always)]
unsafe fn block_dot(w: *const BlockTernary, x: *const i8, k: usize, acc: &mut [__m256i; 2]) {
    // SAFETY: by the contract.
    unsafe {
        let m_lo = _mm256_set1_epi8(0x03);
        let m_hi = _mm256_set1_epi8(0x0c);
        let v = _mm256_loadu_si256(w.add(k).cast::<__m256i>());
        let xp = x.add(k * QK_TERNARY).cast::<__m256i>();
        let h = _mm256_srli_epi16::<4>(v);
        let p0 = _mm256_maddubs_epi16(_mm256_and_si256(v, m_lo), _mm256_loadu_si256(xp));
        let p2 = _mm256_maddubs_epi16(_mm256_and_si256(h, m_lo), _mm256_loadu_si256(xp.add(2)));
        let p1 = _mm256_maddubs_epi16(_mm256_and_si256(v, m_hi), _mm256_loadu_si256(xp.add(1)));
        let p3 = _mm256_maddubs_epi16(_mm256_and_si256(h, m_hi), _mm256_loadu_si256(xp.add(3)));
        acc[0] = _mm256_add_epi16(acc[0], _mm256_add_epi16(p0, p2));
        acc[1] = _mm256_add_epi16(acc[1], _mm256_add_epi16(p1, p3));
    }
}

/// Horizontal sums of four vectors of eight `i32` lanes: `[Σa, Σb, Σc, Σd]`.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum4_epi32(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
    let abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    _mm_add_epi32(
        _mm256_castsi256_si128(abcd),
        _mm256_extracti128_si256::<1>(abcd),
    )
}

/// `Σ c·x` (codes, not weights) of one row with `T` tokens, each as eight `i32` lanes.
///
/// The prefill kernel: each block is decoded once (three shifts, four ands) and multiplied with
/// the activations of `T` tokens, so the decoding cost is shared. Each `maddubs` pair sum is in
/// -512..=508, a block adds four of them to a 16-bit lane (-2048..=2032), and
/// [`FLUSH_BLOCKS`] = 8 blocks stay far inside `i16`.
///
/// # Safety
/// The row is `bpr` blocks at `w`; token `t` is `bpr·128` bytes at `x + t·kp`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn row_dots<const T: usize>(
    w: *const BlockTernary,
    bpr: usize,
    x: *const i8,
    kp: usize,
) -> [i32; T] {
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = [_mm256_setzero_si256(); T];
    let mut b = 0;
    while b < bpr {
        let n = (bpr - b).min(FLUSH_BLOCKS);
        let mut acc16 = [_mm256_setzero_si256(); T];
        for k in b..b + n {
            // SAFETY: block k < bpr of the row.
            let v = unsafe { _mm256_loadu_si256(w.add(k).cast::<__m256i>()) };
            let c0 = _mm256_and_si256(v, mask);
            let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(v), mask);
            let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(v), mask);
            for t in 0..T {
                // SAFETY: bytes k·128 .. k·128+128 of token t < T, by the contract.
                let (x0, x1, x2, x3) = unsafe {
                    let xp = x.add(t * kp + k * QK_TERNARY).cast::<__m256i>();
                    (
                        _mm256_loadu_si256(xp),
                        _mm256_loadu_si256(xp.add(1)),
                        _mm256_loadu_si256(xp.add(2)),
                        _mm256_loadu_si256(xp.add(3)),
                    )
                };
                let p01 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(c0, x0), _mm256_maddubs_epi16(c1, x1));
                let p23 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(c2, x2), _mm256_maddubs_epi16(c3, x3));
                acc16[t] = _mm256_add_epi16(acc16[t], _mm256_add_epi16(p01, p23));
            }
        }
        for t in 0..T {
            acc32[t] = _mm256_add_epi32(acc32[t], _mm256_madd_epi16(acc16[t], ones));
        }
        b += n;
    }
    let mut dots = [0i32; T];
    for t in 0..T {
        dots[t] = hsum_epi32(acc32[t]);
    }
    dots
}

/// `Σ x` of int8 codes.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn sum_i8(x: &[i8]) -> i32 {
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    let chunks = x.chunks_exact(32);
    let tail: i32 = chunks.remainder().iter().map(|&v| v as i32).sum();
    for c in chunks {
        // SAFETY: `c` is 32 bytes.
        let v = unsafe { _mm256_loadu_si256(c.as_ptr().cast::<__m256i>()) };
        // 1·x pair sums (|.| <= 256) widened to i32 at once: no overflow for any length.
        acc = _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16),
        );
    }
    hsum_epi32(acc) + tail
}

/// [`quantize_row_scalar`](super::activations::quantize_row_scalar), eight values at a time,
/// with the same results: the absmax is an exact maximum (NaN ignored, as `maxps` with the
/// running maximum second does), `roundps` rounds half to even like `round_ties_even`, the clamp
/// happens in f32 before the conversion (so infinities saturate), and NaN lanes are zeroed.
/// Returns the scale.
///
/// # Safety
/// The CPU must have AVX2; `codes.len() == row.len()`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_row(row: &[f32], eps: f32, codes: &mut [i8]) -> f32 {
    debug_assert_eq!(row.len(), codes.len());
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut m = _mm256_setzero_ps();
    let chunks = row.chunks_exact(8);
    let tail_max = chunks
        .remainder()
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    for c in chunks {
        // SAFETY: `c` is 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        // `maxps` returns its second operand when either is NaN: the running maximum.
        m = _mm256_max_ps(_mm256_and_ps(v, abs_mask), m);
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: eight floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let scale = scale_of(lanes.iter().fold(tail_max, |a, &b| a.max(b)), eps);

    let s = _mm256_set1_ps(scale);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let code = |v: __m256| {
        let p = _mm256_mul_ps(v, s);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
        let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
        _mm256_cvttps_epi32(r)
    };
    // The two packs interleave 128-bit lanes; this permutation restores the order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut done = 0;
    for (c, out) in row.chunks_exact(32).zip(codes.chunks_exact_mut(32)) {
        // SAFETY: `c` is 32 floats, `out` 32 bytes.
        unsafe {
            let p = c.as_ptr();
            let ab = _mm256_packs_epi32(code(_mm256_loadu_ps(p)), code(_mm256_loadu_ps(p.add(8))));
            let cd = _mm256_packs_epi32(
                code(_mm256_loadu_ps(p.add(16))),
                code(_mm256_loadu_ps(p.add(24))),
            );
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            _mm256_storeu_si256(out.as_mut_ptr().cast::<__m256i>(), bytes);
        }
        done += 32;
    }
    for (c, &v) in codes[done..].iter_mut().zip(&row[done..]) {
        *c = code_of(v, scale);
    }
    scale
}

/// `e^x` in eight lanes, Cephes' `expf` scheme: `x = n·ln2 + r` with `|r| <= ln2/2` (`ln2` in
/// two parts, so `r` is nearly exact), Cephes' degree-7 polynomial for `e^r`, `2^n` through
/// the exponent bits (Cephes gives about 1-2 ulp; the SiLU test bounds the result it feeds to
/// 4 ulp). `x` is clamped to -87.3..=88, so the result stays finite and normal (a NaN lane
/// becomes `e^-87.3`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_ps(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
}

/// [`silu_mul`](super::math::silu_mul), eight values at a time: `g / (1 + e^(-g)) · u`
/// in the reference's order, with [`exp_ps`].
///
/// # Safety
/// The CPU must have AVX2 and FMA; `gate.len() == up.len()`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let mut done = 0;
    for (g, u) in gate.chunks_exact_mut(8).zip(up.chunks_exact(8)) {
        // SAFETY: `g` and `u` are 8 floats.
        unsafe {
            let x = _mm256_loadu_ps(g.as_ptr());
            let e = exp_ps(_mm256_xor_ps(x, sign));
            let y = _mm256_mul_ps(
                _mm256_div_ps(x, _mm256_add_ps(one, e)),
                _mm256_loadu_ps(u.as_ptr()),
            );
            _mm256_storeu_ps(g.as_mut_ptr(), y);
        }
        done += 8;
    }
    super::math::silu_mul_scalar(&mut gate[done..], &up[done..]);
}

/// One head of a TTT step ([`TttStep::run_head`](super::ttt_head::TttStep::run_head)): the
/// generic code, every helper of which is inlined here, compiled with AVX2 and FMA. The loops
/// over `head_dim` and `d_model` become eight wide; the operations and their order are the
/// generic code's (Rust contracts no multiply-add into an FMA), so the results are
/// bit-identical.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn ttt_head(
    step: &TttStep<'_>,
    h: usize,
    fast: &mut TttHeadState<'_, '_>,
    inputs: TttHeadInputs<'_>,
    out: &mut [f32],
) {
    step.run_generic(h, fast, inputs, out)
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

/// The decode product of `out.len()` consecutive rows starting at `w` with one token:
/// `out[i] = (Σ c·x − Σ x) · factor`. Rows in memory order (one stream for the prefetchers),
/// four at a time so the horizontal sums and the final scaling are vectorized. A function of
/// its own, apart from the prefill paths, so that its few live values stay in registers.
///
/// # Safety
/// AVX2; `out.len()` rows of `bpr` blocks at `w`; `bpr·128` codes at `x`.
#[inline(never)]
#[target_feature(enable = "avx2")]
unsafe fn gemv_rows(
    w: *const BlockTernary,
    bpr: usize,
    x: *const i8,
    out: &mut [f32],
    sum: i32,
    factor: f32,
) {
    let row = |i: usize| w.wrapping_add(i * bpr);
    let sums = _mm_set1_epi32(sum);
    let factors = _mm_set1_ps(factor);
    let mut quads = out.chunks_exact_mut(4);
    let mut i = 0;
    for quad in &mut quads {
        // SAFETY: rows i .. i + 4 are inside the `out.len()` rows of the contract.
        let d = unsafe {
            let a = row_dot(row(i), bpr, x);
            let b = row_dot(row(i + 1), bpr, x);
            let c = row_dot(row(i + 2), bpr, x);
            let d = row_dot(row(i + 3), bpr, x);
            hsum4_epi32(a, b, c, d)
        };
        // The same operations as `finish_i8`, four lanes at a time: exact i32 difference,
        // round-to-nearest conversion, one f32 multiply.
        let y = _mm_mul_ps(_mm_cvtepi32_ps(_mm_sub_epi32(d, sums)), factors);
        // SAFETY: `quad` is four floats.
        unsafe { _mm_storeu_ps(quad.as_mut_ptr(), y) };
        i += 4;
    }
    for y in quads.into_remainder() {
        // SAFETY: row i is inside the contract's rows.
        let d = hsum_epi32(unsafe { row_dot(row(i), bpr, x) });
        *y = finish_i8(d - sum, factor);
        i += 1;
    }
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
    // SAFETY (all kernel calls below): rows r0 + i < w.rows() (checked above), so their `bpr`
    // blocks lie inside `w.blocks()`; every token slice handed on is inside `inputs.x`.
    let row = |i: usize| unsafe { w.blocks().as_ptr().add((r0 + i) * bpr) };

    if tokens == 1 {
        let out = &mut *outs[0];
        // SAFETY: the `n` rows from r0 lie inside `w` and the token is `kp` codes (checked above).
        unsafe {
            gemv_rows(
                row(0),
                bpr,
                inputs.x.as_ptr(),
                out,
                inputs.sums[0],
                inputs.factors[0],
            )
        };
        return;
    }

    // Prefill: tiles of rows that stay in L2 while every group of up to four tokens reads them.
    let tile = (TILE_BYTES / (bpr * 32).max(1)).max(1);
    let mut tile_start = 0;
    while tile_start < n {
        let tile_end = (tile_start + tile).min(n);
        let mut t0 = 0;
        while t0 < tokens {
            let tn = (tokens - t0).min(4);
            let x = inputs.x[t0 * kp..].as_ptr();
            macro_rules! run {
                ($t:literal) => {{
                    for i in tile_start..tile_end {
                        let dots = unsafe { row_dots::<$t>(row(i), bpr, x, kp) };
                        for t in 0..$t {
                            let tok = t0 + t;
                            outs[tok][i] =
                                finish_i8(dots[t] - inputs.sums[tok], inputs.factors[tok]);
                        }
                    }
                }};
            }
            match tn {
                1 => run!(1),
                2 => run!(2),
                3 => run!(3),
                _ => run!(4),
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

/// `Σ a[i] · b[i]` of two int8 vectors ([`Int8Rows`](super::Int8Rows)), exactly: 32 pairs at
/// a time, `vpmaddubsw` of `|a|` with `b · sign(a)` (the llama.cpp way round its unsigned ×
/// signed operands; with both in -127..=127 a pair sum is at most 32,258, so the 16-bit lanes
/// never saturate), widened with `vpmaddwd`, the tail in scalar code. The integer sum is the
/// scalar reference's, bit for bit.
///
/// The codes must lie in -127..=127 for the result to be the scalar sum (a -128 in `b` against
/// a negative `a` flips sign in `vpsignb`): a condition of correctness, not of safety.
///
/// # Safety
/// The CPU must have AVX2 ([`available`]); `a` and `b` must be equally long.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    assert_eq!(a.len(), b.len());
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let ones = _mm256_set1_epi16(1);
    // Two accumulators, so that consecutive iterations do not wait on one add chain. The whole
    // sum is at most n · 127², which fits the i32 up to 133,143 codes (`MAX_INT8_COLS`, kept
    // by the callers).
    let mut acc = [_mm256_setzero_si256(); 2];
    let mut i = 0;
    // SAFETY (the loads): i + 32·k + 32 <= n for both slices, which are n long.
    while i + 64 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let va = _mm256_loadu_si256(ap.add(i + 32 * k) as *const __m256i);
            let vb = _mm256_loadu_si256(bp.add(i + 32 * k) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
        }
        i += 64;
    }
    while i + 32 <= n {
        let va = _mm256_loadu_si256(ap.add(i) as *const __m256i);
        let vb = _mm256_loadu_si256(bp.add(i) as *const __m256i);
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(pairs, ones));
        i += 32;
    }
    let mut sum = hsum_epi32(_mm256_add_epi32(acc[0], acc[1]));
    for j in i..n {
        sum += i32::from(a[j]) * i32::from(b[j]);
    }
    sum
}
