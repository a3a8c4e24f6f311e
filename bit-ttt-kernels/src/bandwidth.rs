//! The machine's read bandwidth, the ceiling of a memory-bound decode.
//!
//! Decoding one token reads every weight once, so the best a kernel can do is the rate at which
//! the cores can stream memory. The benchmarks (`gemv_bench`, `bit-ttt-train bench`) measure it
//! in the same run as the kernels and report their speed as a share of it.

use std::hint::black_box;
use std::time::Instant;

/// One pass over `data`: a wrapping sum, split into `threads` contiguous parts, one scoped
/// thread each, each part read as one sequential stream. Returns the sum so the compiler
/// cannot drop the reads.
pub fn read_pass(data: &[u64], threads: usize) -> u64 {
    read_pass_with(data, threads, 1)
}

/// [`read_pass`] with each thread's part read as `streams` contiguous pieces side by side
/// (with AVX2; one stream without it). Which reads faster moves with the machine and the
/// minute: one stream per core, or several as the kernels read several rows at once.
pub fn read_pass_with(data: &[u64], threads: usize, streams: usize) -> u64 {
    let part = data.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks(part)
            .map(|c| s.spawn(move || sum(c, streams)))
            .collect();
        handles.into_iter().fold(0u64, |a, h| {
            a.wrapping_add(h.join().expect("read thread panicked"))
        })
    })
}

/// The wrapping sum of `data`, read as fast as this CPU can stream it: with AVX2 as `streams`
/// contiguous pieces side by side, 256 bytes of each per step into eight 256-bit accumulators
/// (a plain loop compiled for the baseline x86_64 measures its adder chain, not the memory);
/// else the plain loop.
fn sum(data: &[u64], streams: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { sum_avx2(data, streams.max(1)) };
    }
    let _ = streams;
    sum_scalar(data)
}

fn sum_scalar(data: &[u64]) -> u64 {
    data.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// Pieces the bandwidth tests also read side by side (see [`read_pass_with`]).
pub const STREAMS: usize = 8;

/// [`sum`] with AVX2: `streams` pieces of whole 32-value steps read side by side into eight
/// accumulators, the rest scalar.
///
/// # Safety
/// The CPU must have AVX2; `streams` ≥ 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(data: &[u64], streams: usize) -> u64 {
    use std::arch::x86_64::*;
    const LANES: usize = 4; // u64 per 256-bit register
    const ACCUMULATORS: usize = 8;
    const STEP: usize = LANES * ACCUMULATORS;
    // Each piece holds `piece` values, a whole number of steps; the rest goes to the tail.
    let piece = data.len() / streams / STEP * STEP;
    let (pieces, tail) = data.split_at(piece * streams);
    let mut acc = [_mm256_setzero_si256(); ACCUMULATORS];
    for i in (0..piece).step_by(STEP) {
        for s in 0..streams {
            let at = &pieces[s * piece + i..s * piece + i + STEP];
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: `at` holds STEP values, so lanes k·4..k·4+4 are in it; unaligned
                // loads need no alignment.
                let v = unsafe { _mm256_loadu_si256(at.as_ptr().add(k * LANES).cast()) };
                *a = _mm256_add_epi64(*a, v);
            }
        }
    }
    let mut lanes = [0u64; LANES];
    let mut total = sum_scalar(tail);
    for a in acc {
        // SAFETY: `lanes` is 32 bytes; unaligned store.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), a) };
        total = total.wrapping_add(sum_scalar(&lanes));
    }
    total
}

/// Read bandwidth in bytes per second: [`best_read_bytes_per_second`] of `passes` rounds over
/// a fresh array of `bytes` bytes (use far more than the last-level cache, e.g. 512 MiB).
pub fn read_bytes_per_second(bytes: usize, threads: usize, passes: usize) -> f64 {
    let data: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    black_box(read_pass(&data, threads)); // fault the pages in and warm up
    best_read_bytes_per_second(&data, threads, passes)
}

/// The best of `passes` rounds over `data`, in bytes per second, each round one
/// [`read_pass`] and one [`read_pass_with`] [`STREAMS`] streams (the machine's ceiling is the
/// faster of the two); for measuring again and again without allocating a fresh array (whose
/// pages the first pass must fault in).
pub fn best_read_bytes_per_second(data: &[u64], threads: usize, passes: usize) -> f64 {
    (0..passes.max(1))
        .flat_map(|_| [1, STREAMS])
        .map(|streams| {
            let started = Instant::now();
            black_box(read_pass_with(data, threads, streams));
            std::mem::size_of_val(data) as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_pass_sums_every_element_whatever_the_split() {
        let data: Vec<u64> = (1..=1001).collect();
        for threads in [1, 2, 3, 7, 2000] {
            assert_eq!(
                read_pass(&data, threads),
                1001 * 1002 / 2,
                "{threads} threads"
            );
            assert_eq!(read_pass_with(&data, threads, STREAMS), 1001 * 1002 / 2);
        }
        assert_eq!(read_pass(&[], 2), 0);
    }

    /// The fast sum equals the plain one, on lengths around its 32-value steps and with
    /// values that wrap.
    #[test]
    fn the_fast_sum_equals_the_plain_one() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx2") {
            println!("this CPU has no AVX2: only the plain sum is in use, nothing to compare");
        }
        for n in [0, 1, 31, 32, 33, 255, 256, 257, 1000, 4099] {
            let data: Vec<u64> = (0..n as u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            for streams in [1, 2, 3, STREAMS] {
                assert_eq!(
                    sum(&data, streams),
                    sum_scalar(&data),
                    "{n} values, {streams}"
                );
            }
        }
    }

    #[test]
    fn bandwidth_is_a_positive_rate() {
        let data: Vec<u64> = (0..1 << 16).collect();
        for threads in [1, 2] {
            let rate = best_read_bytes_per_second(&data, threads, 2);
            assert!(rate.is_finite() && rate > 0.0, "{threads} threads: {rate}");
        }
    }
}
