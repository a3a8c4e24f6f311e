#!/usr/bin/env python3
"""Time of handing 1M token ids to `BitLlama.forward`, by dtype.

The ids end with one out of range, so forward stops with a ValueError right after taking
the ids over and checking them, before any computing: the time measured is the hand-over
(a C-contiguous uint32 array is read in place; other dtypes are converted) plus the range
check every input gets. Usage: py-handover-bench.py MODEL [N]
"""

import sys
import time

import numpy as np

import bit_ttt


def best_of(f, runs=7):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    model = bit_ttt.BitLlama.load(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    ids = np.random.default_rng(0).integers(0, model.vocab_size, size=n).astype(np.uint32)
    ids[-1] = model.vocab_size  # out of range: forward stops after the hand-over

    def handover(x):
        def run():
            try:
                model.forward(x)
            except ValueError as e:
                assert "out of range" in str(e), e
            else:
                raise AssertionError("forward computed")
        return run

    cases = [
        ("uint32, C-contiguous (in place)", ids),
        ("int64 (converted)", ids.astype(np.int64)),
        ("int32 (converted)", ids.astype(np.int32)),
        ("uint32, strided view (copied)", np.repeat(ids, 2)[::2]),
        ("Python list (numpy.asarray, converted)", ids.tolist()),
    ]
    copy = best_of(lambda: ids.copy())
    print(f"{n:,} ids; numpy's own copy of the uint32 array: {copy * 1e3:.2f} ms")
    print("| ids | hand-over + check (ms, best of 7) |")
    print("|---|---|")
    for name, x in cases:
        print(f"| {name} | {best_of(handover(x)) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
