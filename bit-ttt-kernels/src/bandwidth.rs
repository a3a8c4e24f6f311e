//! The machine's read bandwidth, the ceiling of a memory-bound decode.
//!
//! Decoding one token reads every weight once, so the best a kernel can do is the rate at which
//! the cores can stream memory. The benchmarks (`gemv_bench`, `bit-ttt-train bench`) measure it
//! in the same run as the kernels and report their speed as a share of it.

use std::hint::black_box;
use std::time::Instant;

/// One pass over `data`: a wrapping sum, split into `threads` contiguous parts, one scoped
/// thread each. Returns the sum so the compiler cannot drop the reads.
pub fn read_pass(data: &[u64], threads: usize) -> u64 {
    let part = data.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks(part)
            .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &b| a.wrapping_add(b))))
            .collect();
        handles.into_iter().fold(0u64, |a, h| {
            a.wrapping_add(h.join().expect("read thread panicked"))
        })
    })
}

/// Read bandwidth in bytes per second: the best of `passes` [`read_pass`]es over a fresh
/// array of `bytes` bytes (use far more than the last-level cache, e.g. 512 MiB).
pub fn read_bytes_per_second(bytes: usize, threads: usize, passes: usize) -> f64 {
    let data: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    black_box(read_pass(&data, threads)); // fault the pages in and warm up
    best_read_bytes_per_second(&data, threads, passes)
}

/// The best of `passes` [`read_pass`]es over `data`, in bytes per second; for measuring again
/// and again without allocating a fresh array (whose pages the first pass must fault in).
pub fn best_read_bytes_per_second(data: &[u64], threads: usize, passes: usize) -> f64 {
    (0..passes.max(1))
        .map(|_| {
            let started = Instant::now();
            black_box(read_pass(data, threads));
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
        }
        assert_eq!(read_pass(&[], 2), 0);
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
