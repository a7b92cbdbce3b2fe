"""Shared timing harness: interleaved rounds, medians, ratios — all in one process."""
import statistics
import time


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def interleaved(fns: dict, rounds: int = 15, steps: int = 10, warmup: int = 10, clock: str = "wall") -> dict:
    """Median seconds per call of each function, measured round-robin so drift hits all alike.

    ``clock="thread"`` counts the CPU time of the calling thread: with ``torch.set_num_threads(1)`` all
    the work runs there, so the numbers hold up on a machine that other jobs keep busy."""
    now = CLOCKS[clock]
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = now()
            for _ in range(steps):
                f()
            times[k].append((now() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}
