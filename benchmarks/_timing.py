"""Shared timing harness: interleaved rounds, medians, ratios — all in one process."""
import statistics
import time


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def interleaved(fns: dict, rounds: int = 15, steps: int = 10, warmup: int = 10, clock: str = "wall",
                samples: bool = False):
    """Median seconds per call of each function, measured round-robin so drift hits all alike.

    Each round runs every function ``steps`` times; the order is rotated from round to round, so no
    function always runs right after the same other one (whose cache footprint it would inherit).
    ``clock="thread"`` counts the CPU time of the calling thread: with ``torch.set_num_threads(1)`` all
    the work runs there, so the numbers hold up on a machine that other jobs keep busy.

    :returns: ``{name: median seconds}``; with ``samples=True`` also ``{name: [seconds per call, per round]}``
        (for ratios taken within each round, see :func:`median_round_ratios`)."""
    now = CLOCKS[clock]
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        shift = r % len(order)
        for k in order[shift:] + order[:shift]:
            f = fns[k]
            t = now()
            for _ in range(steps):
                f()
            times[k].append((now() - t) / steps)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return (medians, times) if samples else medians


def median_round_ratios(times: dict, reference: str) -> dict:
    """Per function, the median over rounds of (its time / the reference's time in the same round):
    load that drifts between rounds cancels."""
    ref = times[reference]
    return {k: statistics.median(a / b for a, b in zip(v, ref)) for k, v in times.items()}
