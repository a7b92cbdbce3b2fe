"""Throughput of data-parallel SVI (examples per second) with 1 and 2 processes, and scaling efficiency.

    python benchmarks/data_parallel.py                        # LeNet-300-100 on MNIST-5k, 1 and 2 processes
    python benchmarks/data_parallel.py --procs 1 2 4 --threads 1 --epochs 3 --batch-size 128

Each configuration is a real ``torchrun`` job (gloo on CPU, nccl on GPU) running
:func:`pyrobnn.inference.fit_distributed` — the same code path as ``torchrun ... pyrobnn fit`` — with a
per-process batch of ``--batch-size`` (weak scaling: the global batch is K·B, so every process does
the same work per step and an ideal K-process job finishes an epoch K times faster). The first epoch is
a warm-up and not timed; throughput is the examples of the timed epochs divided by their wall time on
rank 0 (all ranks advance in lock-step, one gradient all-reduce per parameter per step).
Scaling efficiency of K processes = throughput(K) / (K · throughput(1)). Every process gets
``--threads`` intra-op threads (torchrun's default is 1), so with K·threads ≤ cores the processes do
not compete for cores — on a machine shared with other jobs they do, and the numbers say so.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args):
    import torch

    import pyrobnn
    from pyrobnn import data, models
    from pyrobnn.inference import DataParallel, fit_distributed

    torch.set_num_threads(args.threads)
    dp = DataParallel.from_env(seed=0)
    ds = data.load(args.data)
    torch.manual_seed(0)
    net = models.build(args.model) if args.model != "mlp" else models.build(
        "mlp", in_features=int(torch.tensor(ds.x_train.shape[1:]).prod()), out_features=10, hidden=[100])
    bnn = pyrobnn.bayesian(net, likelihood="categorical")
    h = fit_distributed(bnn, (ds.x_train, ds.y_train), args.epochs + 1, distributed=dp, batch_size=args.batch_size,
                        seed=0, lr=1e-3, progress=False)
    allreduce_ms = _allreduce_ms(bnn, dp)
    if dp.is_main:
        per_rank = len(ds.x_train) // dp.world_size
        seconds = [r["seconds"] for r in h.records[1:]]
        result = {"processes": dp.world_size, "threads": args.threads, "backend": torch.distributed.get_backend()
                  if torch.distributed.is_initialized() else "none", "device": str(dp.device),
                  "examples_per_epoch": per_rank * dp.world_size, "epoch_seconds": seconds,
                  "examples_per_s": per_rank * dp.world_size * len(seconds) / sum(seconds),
                  "steps_per_epoch": -(-per_rank // args.batch_size), "allreduce_ms_per_step": allreduce_ms,
                  "loss_last_epoch": h.records[-1]["loss"]}
        Path(args.out).write_text(json.dumps(result))
    dp.close()


def _allreduce_ms(bnn, dp, repeats=20):
    """Milliseconds per step spent in the gradient all-reduce alone (the same tensors, the same calls)."""
    import torch
    import torch.distributed as dist
    if dp.world_size == 1:
        return 0.0
    grads = [torch.zeros_like(p) for p in bnn.parameters() if p.requires_grad]
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for g in grads:
            dist.all_reduce(g)
    return (time.perf_counter() - t0) / repeats * 1e3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs, threads, args):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
               "--out", str(out), "--threads", str(threads), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--model", args.model, "--data", args.data]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
        result["job_seconds"] = time.perf_counter() - t0
        return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="also run 1 process with this many threads (what one process makes of all cores)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=128, help="per-process batch")
    p.add_argument("--model", default="lenet300")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    runs = [launch(k, args.threads, args) for k in args.procs]
    if args.baseline_threads:
        runs.append(launch(1, args.baseline_threads, args))
    base = next((r for r in runs if r["processes"] == 1 and r["threads"] == args.threads), None)
    print(f"data-parallel SVI, {args.model} on {args.data}, per-process batch {args.batch_size}, "
          f"{args.epochs} timed epochs; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'processes':>9} {'threads':>7} {'backend':>7} {'examples/s':>11} {'efficiency':>10} {'ms/step':>8} "
          f"{'all-reduce ms/step':>18}  epoch seconds")
    for r in runs:
        eff = r["examples_per_s"] / (r["processes"] * base["examples_per_s"]) if base else float("nan")
        r["scaling_efficiency"] = eff
        step_ms = 1e3 * sum(r["epoch_seconds"]) / len(r["epoch_seconds"]) / r["steps_per_epoch"]
        print(f"{r['processes']:>9} {r['threads']:>7} {r['backend']:>7} {r['examples_per_s']:>11.1f} {eff:>10.2f} "
              f"{step_ms:>8.1f} {r['allreduce_ms_per_step']:>18.1f}  " + " ".join(f"{s:.2f}" for s in r["epoch_seconds"]))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
