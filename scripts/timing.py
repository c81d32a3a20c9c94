"""The CPU bench scripts' timing: the best of `repeat` runs of `inner` calls each."""

from __future__ import annotations

import time


def best_ms(fn, repeat: int, inner: int = 1, clock=time.perf_counter, warm_up: bool = True) -> float:
    """Milliseconds per call of `fn` in the fastest of `repeat` runs of `inner` calls (after one call to warm
    up, unless the caller did); `clock` is time.perf_counter (wall) or time.process_time (this process's CPU)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeat):
        start = clock()
        for _ in range(inner):
            fn()
        times.append((clock() - start) / inner)
    return 1000 * min(times)
