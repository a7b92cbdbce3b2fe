"""Shared timing harness: interleaved rounds, medians, ratios — all in one process."""
import statistics
import time


def interleaved(fns: dict, rounds: int = 15, steps: int = 10, warmup: int = 10) -> dict:
    """Median seconds per call of each function, measured round-robin so drift hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                f()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}
