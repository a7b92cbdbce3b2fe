"""Shared timing harness: interleaved rounds, medians, ratios — all in one process.

Page faults. On glibc, a freed block of a few hundred KB or more can go back to the OS (the heap top is
trimmed, or the block was mmap'ed), and the next allocation of that size then faults its pages in
again: about 2 µs per 4 KB page here, so up to 1.5 ms for the ~1 MB tensors of a LeNet-300-100 step.
Whether that happens depends on the process's allocation history and changes from round to round
(0 to 700 faults per step for the same step in one run), which is noise no contender controls.
:func:`interleaved` counts the minor faults per call; :data:`FIXED_MALLOC` is the environment that turns
glibc's dynamic trim/mmap thresholds off (read at process start: :func:`reexec_with_fixed_malloc`).
"""
import os
import resource
import statistics
import sys
import time

import torch


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time, "process": time.process_time}

#: glibc tunables that stop the allocator from returning freed tensors to the OS between steps
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def reexec_with_fixed_malloc():
    """Re-run this script with :data:`FIXED_MALLOC` in the environment (glibc reads it at start-up
    only), unless it is already set. Returns only when it is set."""
    if malloc_mode() == "fixed":
        return
    env = {**os.environ, **FIXED_MALLOC}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def malloc_mode() -> str:
    return "fixed" if all(os.environ.get(k) == v for k, v in FIXED_MALLOC.items()) else "default"


def interleaved(fns: dict, rounds: int = 15, steps: int = 10, warmup: int = 10, clock: str = "wall",
                samples: bool = False, faults: dict = None, sync=None):
    """Median seconds per call of each function, measured round-robin so drift hits all alike.

    Each round runs every function ``steps`` times; the order is rotated from round to round, so no
    function always runs right after the same other one (whose cache footprint it would inherit).
    ``clock="thread"`` counts the CPU time of the calling thread: with ``torch.set_num_threads(1)`` all
    the work runs there, so the numbers hold up on a machine that other jobs keep busy.
    ``faults``, if given a dict, receives per function the median minor page faults per call.
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each clock reading, so that work queued on an
    accelerator is counted in the round that queued it.

    :returns: ``{name: median seconds}``; with ``samples=True`` also ``{name: [seconds per call, per round]}``
        (for ratios taken within each round, see :func:`median_round_ratios`)."""
    clock_now = CLOCKS[clock]

    def now():
        if sync is not None:
            sync()
        return clock_now()

    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    pf = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        shift = r % len(order)
        for k in order[shift:] + order[:shift]:
            f = fns[k]
            f0 = _minor_faults()
            t = now()
            for _ in range(steps):
                f()
            times[k].append((now() - t) / steps)
            pf[k].append((_minor_faults() - f0) / steps)
    medians = {k: statistics.median(v) for k, v in times.items()}
    if faults is not None:
        faults.update({k: statistics.median(v) for k, v in pf.items()})
    return (medians, times) if samples else medians


def log_speeds(n: int = 1 << 18, reps: int = 20) -> dict:
    """ns per element of torch's CPU ``log1p``, ``log``, ``expm1`` and ELU here, on one thread (best of ``reps``),
    and the set of vectorised kernels torch dispatches to (``"AVX512"``, ``"AVX2"``, ...;
    ``ATEN_CPU_CAPABILITY=avx2`` selects the AVX2 set on an AVX-512 CPU): which kind of host a run was on. Where
    ``log1p`` is slow, ``F.softplus`` is too, and the hand-written reference steps get slower while MeanField's
    one-``log`` softplus does not; ``expm1`` and ELU (the deep weight prior's VAE) follow ``log1p``."""
    x = torch.rand(n) + 0.5      # the logs' argument
    z = torch.randn(n)           # expm1 and ELU: both signs (ELU is the identity above 0)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, fn, arg in (("log1p", torch.log1p, x), ("log", torch.log, x), ("expm1", torch.expm1, z),
                              ("elu", torch.nn.functional.elu, z)):
            fn(arg)
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                fn(arg)
                best = min(best, time.perf_counter() - t)
            out[name] = round(best / n * 1e9, 2)
    finally:
        torch.set_num_threads(threads)
    return out


def median_round_ratios(times: dict, reference: str) -> dict:
    """Per function, the median over rounds of (its time / the reference's time in the same round):
    load that drifts between rounds cancels."""
    ref = times[reference]
    return {k: statistics.median(a / b for a, b in zip(v, ref)) for k, v in times.items()}


def add_pyro_lenet300_layers(module) -> None:
    """Give a ``PyroModule`` LeNet-300-100's layers ``fc1``–``fc3``, written the Pyro way: every weight and
    bias a ``PyroSample`` with an N(0, 1) prior (the contender both step benchmarks time)."""
    import pyro.distributions as dist
    import torch.nn as nn
    from pyro.nn import PyroModule, PyroSample

    module.fc1 = PyroModule[nn.Linear](784, 300)
    module.fc2 = PyroModule[nn.Linear](300, 100)
    module.fc3 = PyroModule[nn.Linear](100, 10)
    for layer in (module.fc1, module.fc2, module.fc3):
        layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand(layer.weight.shape).to_event(2))
        layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand(layer.bias.shape).to_event(1))
