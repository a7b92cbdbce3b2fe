"""Cost of one SGLD step on LeNet-300-100 (266,610 weights), batch 128: pyrobnn vs hand-written PyTorch
vs the ``posteriors`` library, in one process, interleaved rounds, medians.

All contenders do the same mathematics on the same data (MNIST-5k training split, N = 4,000):
a minibatch of M = 128 drawn without replacement (``torch.randperm(N)[:M]``, what ``pyro.plate``'s
subsampling does), U = (N/M)·Σ_batch cross-entropy + ½‖θ‖² (N(0, 1) prior), ∇U by autograd, and
θ ← θ − (η/2)∇U + N(0, η). Contenders:

* ``hand``: plain PyTorch — functional forward, ``torch.autograd.grad``, in-place update;
* ``pyrobnn-kernel``: ``SGLD(bnn.model).sample(params)`` — the Pyro model re-run on full data with
  ``bnn.subsample_size = 128`` (the plate draws the minibatch), what ``pyro.infer.MCMC`` calls per step;
* ``pyro-module-kernel``: ``SGLD(model).sample(params)`` on the same network written the Pyro way — a
  ``PyroModule`` LeNet-300-100 whose weights are ``PyroSample(dist.Normal(0., 1.).expand(shape).to_event(k))``,
  a ``pyro.plate("data", N, subsample_size=128)`` drawing the minibatch (the network run under
  ``block_plate``, its weights being global), ``dist.Categorical(logits=...)`` at the observation site.
  Nothing pyrobnn-specific in the model: the kernel's speed on any user's Pyro model;
* ``pyrobnn-stream``: ``kernel.step(params, xb, yb)`` on a batch indexed by the caller — the hot path
  of ``pyrobnn.inference.sample(bnn, loader)``;
* ``posteriors``: ``posteriors.sgmcmc.sgld`` (lr = η/2, T = 1) with a ``torch.func.functional_call``
  log posterior, ``inplace=True``;
* ``mcmc-driver``: ``pyro.infer.MCMC(SGLD(bnn.model), ...).run(x, y)`` per step, everything kept
  (includes the driver's per-run set-up — one model trace — amortised over ``--driver-steps`` steps,
  its per-draw flatten/copy of all 266k numbers, its logging hook and the final stacking);
  ``mcmc-driver-lean``: the same keeping one small site (``save_params``). The difference to
  ``pyrobnn-kernel`` is the driver's overhead, reported separately.

Timed per contender and round: wall-clock time and the CPU time of the calling thread
(``time.thread_time``, immune to waiting for a core on a shared machine; run with ``--threads 1`` so
that all compute happens in that thread). Reported: medians over rounds, their ratios to ``hand``, and
the median of per-round ratios.

Before timing, one step of ``hand``, of ``pyrobnn-kernel`` and of ``pyro-module-kernel`` from the same
state and RNG state are checked to agree (same minibatch, same noise), so all really compute the same
update.

    python benchmarks/sgld_step.py --rounds 15 --steps 10 --threads 1 --runs 3
    python benchmarks/sgld_step.py --breakdown     # where the kernel's extra time goes (forward only)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from pyro.poutine.plate_messenger import block_plate

import pyrobnn
from pyrobnn.data import load_mnist5k
from pyrobnn.inference import SGLD
from pyrobnn.models import build

from _timing import add_pyro_lenet300_layers, log_speeds  # benchmarks/ is the script directory

N_BATCH = 128
ETA = 1e-6


def make_data():
    ds = load_mnist5k()
    return ds.x_train.reshape(len(ds.x_train), 784).contiguous(), ds.y_train.long()


def make_hand(x, y, params0):
    n = x.shape[0]
    state = [p.detach().clone() for p in params0]

    def step():
        idx = torch.randperm(n)[:N_BATCH]
        xb, yb = x[idx], y[idx]
        ps = [p.requires_grad_() for p in state]
        h = F.linear(xb, ps[0], ps[1]).relu()
        h = F.linear(h, ps[2], ps[3]).relu()
        out = F.linear(h, ps[4], ps[5])
        U = F.cross_entropy(out, yb, reduction="sum") * (n / N_BATCH) + 0.5 * sum((p * p).sum() for p in ps)
        grads = torch.autograd.grad(U, ps)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(ps, grads)):
                p = p.detach()
                p.add_(g, alpha=-0.5 * ETA).add_(torch.randn_like(p), alpha=math.sqrt(ETA))
                state[i] = p

    return step, state


def make_bnn(x, y):
    bnn = pyrobnn.bayesian(build("lenet300"), prior="gaussian", likelihood="categorical", dataset_size=x.shape[0])
    return bnn


def make_kernel(bnn, x, y, params0):
    bnn.subsample_size = N_BATCH
    return _kernel_step(bnn.model, x, y, params0)


def _kernel_step(model, x, y, params0):
    """One ``SGLD(model).sample`` per call, from ``params0`` (in the order of the kernel's sites)."""
    k = SGLD(model, step_size=ETA)
    k.setup(0, x, y)
    names = [n for n, _ in k._sites]
    holder = {"p": dict(zip(names, [p.detach().clone() for p in params0]))}

    def step():
        holder["p"] = k.sample(holder["p"])

    return step, holder, names


class PyroLeNet300(PyroModule):
    """LeNet-300-100 written the Pyro way: N(0, 1) ``PyroSample`` weights, a subsampled plate."""

    def __init__(self, dataset_size, subsample_size):
        super().__init__()
        self.dataset_size, self.subsample_size = dataset_size, subsample_size
        add_pyro_lenet300_layers(self)

    def forward(self, x, y):
        with pyro.plate("data", self.dataset_size, subsample_size=self.subsample_size) as idx:
            with block_plate("data"):    # the weights are global, not per example
                logits = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x[idx])))))
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y[idx])
        return logits


def make_pyro_module_kernel(x, y, params0):
    return _kernel_step(PyroLeNet300(x.shape[0], N_BATCH), x, y, params0)


def make_stream(bnn, x, y, params0):
    n = x.shape[0]
    k = SGLD(bnn.model, step_size=ETA)
    bnn.subsample_size = None
    k.setup(0, x[:N_BATCH], y[:N_BATCH])
    names = [n_ for n_, _ in k._sites]
    holder = {"p": dict(zip(names, [p.detach().clone() for p in params0]))}

    def step():
        idx = torch.randperm(n)[:N_BATCH]
        holder["p"] = k.step(holder["p"], x[idx], y[idx])

    return step, holder


def make_posteriors(x, y, params0):
    import posteriors
    n = x.shape[0]
    net = build("lenet300")
    names = [k for k, _ in net.named_parameters()]
    params = {k: p.detach().clone() for k, p in zip(names, params0)}

    def log_posterior(p, batch):
        xb, yb = batch
        out = torch.func.functional_call(net, p, (xb,))
        log_lik = -F.cross_entropy(out, yb, reduction="sum") * (n / N_BATCH)
        log_prior = -0.5 * sum((v * v).sum() for v in p.values())
        return log_lik + log_prior, out

    transform = posteriors.sgmcmc.sgld.build(log_posterior, lr=0.5 * ETA, temperature=1.0)
    state = transform.init(params)

    def step():
        idx = torch.randperm(n)[:N_BATCH]
        transform.update(state, (x[idx], y[idx]), inplace=True)

    return step


def make_mcmc(bnn, x, y, params0, steps, lean):
    from pyro.infer import MCMC
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    init = dict(zip(names, [p.detach().clone() for p in params0]))

    def run():
        bnn.subsample_size = N_BATCH
        mcmc = MCMC(SGLD(bnn.model, step_size=ETA), num_samples=steps, warmup_steps=0, initial_params=init,
                    disable_progbar=True, save_params=["fc3.bias"] if lean else None)
        mcmc.run(x, y)
        return mcmc

    return run


def check_same_update(x, y, params0):
    """One hand-written step and one step of each kernel route from the same state and RNG state agree;
    returns the largest |difference| per route."""
    hand, hand_state = make_hand(x, y, params0)
    torch.manual_seed(123)
    hand()
    scale = max(h.abs().max().item() for h in hand_state)
    errors = {}
    for route in ("pyrobnn-kernel", "pyro-module-kernel"):
        if route == "pyrobnn-kernel":
            kstep, holder, names = make_kernel(make_bnn(x, y), x, y, params0)
        else:
            kstep, holder, names = make_pyro_module_kernel(x, y, params0)
        torch.manual_seed(123)
        kstep()
        err = max((holder["p"][n] - h).abs().max().item() for n, h in zip(names, hand_state))
        if err > 1e-5 * scale:
            raise AssertionError(f"hand-written and {route} SGLD steps differ by {err:.3g}")
        errors[route] = err
    return errors


def forward_breakdown(x, y, params0, repeats=300):
    """Thread CPU time of the forward pass alone (potential, no backward): hand-written, a plain Pyro model
    with the same sites, and ``bnn.model`` — both Pyro models under the kernel's log-joint handler."""
    from pyrobnn.inference.log_joint import LogJoint as _LogJoint
    n = x.shape[0]
    bnn = make_bnn(x, y)
    bnn.subsample_size = N_BATCH
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    leaves = [p.detach().clone().requires_grad_() for p in params0]
    values = dict(zip(names, leaves))
    priors = {k: dist.Normal(0.0, 1.0).expand(v.shape).to_event(v.dim()) for k, v in values.items()}

    def pyro_model(x, y):
        plate = pyro.plate("data", n, subsample_size=N_BATCH)
        idx = plate._indices
        w = [pyro.sample(k, priors[k]) for k in names]
        h = F.linear(F.linear(x[idx], w[0], w[1]).relu(), w[2], w[3]).relu()
        with plate:
            pyro.sample("obs", dist.Categorical(logits=F.linear(h, w[4], w[5]), validate_args=False), obs=y[idx])

    def hand():
        idx = torch.randperm(n)[:N_BATCH]
        h = F.linear(F.linear(x[idx], leaves[0], leaves[1]).relu(), leaves[2], leaves[3]).relu()
        out = F.linear(h, leaves[4], leaves[5])
        return F.cross_entropy(out, y[idx], reduction="sum") * (n / N_BATCH) + 0.5 * sum((p * p).sum() for p in leaves)

    def under(model):
        def run():
            joint = _LogJoint(values)
            with joint:
                model(x, y)
            return -joint.log_joint()
        return run

    fns = {"hand_forward": hand, "pyro_model_forward": under(pyro_model), "bnn_model_forward": under(bnn.model)}
    times = {k: [] for k in fns}
    for i in range(repeats):
        for k, f in fns.items():
            c0 = time.thread_time()
            f()
            if i >= 20:
                times[k].append((time.thread_time() - c0) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=10, help="steps per contender per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--driver-steps", type=int, default=50,
                   help="steps per MCMC run for the driver contenders (its per-run set-up is amortised over them)")
    p.add_argument("--runs", type=int, default=1,
                   help="repeat the whole measurement; also reports per contender the median over runs")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--breakdown", action="store_true",
                   help="only time the forward pass (hand / plain Pyro model / bnn.model), thread CPU ms")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    pyro.enable_validation(False)  # what pyro.infer.MCMC does by default (disable_validation=True)

    x, y = make_data()
    torch.manual_seed(0)
    params0 = [p.detach().clone() for p in build("lenet300").parameters()]
    if args.breakdown:
        result = {"forward_thread_cpu_ms_median": forward_breakdown(x, y, params0)}
        print(json.dumps(result, indent=2))
        return result
    err = check_same_update(x, y, params0)

    steps = {"hand": make_hand(x, y, params0)[0]}
    bnn = make_bnn(x, y)
    steps["pyrobnn-kernel"] = make_kernel(bnn, x, y, params0)[0]
    steps["pyro-module-kernel"] = make_pyro_module_kernel(x, y, params0)[0]
    bnn_stream = make_bnn(x, y)
    steps["pyrobnn-stream"] = make_stream(bnn_stream, x, y, params0)[0]
    steps["posteriors"] = make_posteriors(x, y, params0)
    bnn_mcmc = make_bnn(x, y)
    drivers = {"mcmc-driver": make_mcmc(bnn_mcmc, x, y, params0, args.driver_steps, lean=False),
               "mcmc-driver-lean": make_mcmc(bnn_mcmc, x, y, params0, args.driver_steps, lean=True)}

    for f in steps.values():
        for _ in range(args.warmup):
            f()
    for run in drivers.values():
        run()
    clocks = {"wall_time": time.perf_counter, "thread_cpu_time": time.thread_time,
              "process_cpu_time": time.process_time}
    order = list(steps) + list(drivers)

    def measure():
        times = {c: {name: [] for name in order} for c in clocks}
        for r in range(args.rounds):
            rotated = order[r % len(order):] + order[:r % len(order)]
            for name in rotated:
                if name in steps:
                    f, count = steps[name], args.steps
                else:
                    f, count = drivers[name], args.driver_steps
                start = {c: now() for c, now in clocks.items()}
                if name in steps:
                    for _ in range(count):
                        f()
                else:
                    f()
                for c, now in clocks.items():
                    times[c][name].append((now() - start[c]) / count)
        return times

    def summary(times):
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        return {
            "median_ms_per_step": {k: round(v, 3) for k, v in med.items()},
            "ratio_to_hand": {k: round(v / med["hand"], 3) for k, v in med.items()},
            # the ratio taken within each round first (contention drifting between rounds cancels)
            "median_of_round_ratios": {k: round(statistics.median(a / b for a, b in zip(v, times["hand"])), 3)
                                       for k, v in times.items()},
            "mcmc_driver_overhead_ms_per_step": round(med["mcmc-driver"] - med["pyrobnn-kernel"], 3),
            "mcmc_driver_lean_overhead_ms_per_step": round(med["mcmc-driver-lean"] - med["pyrobnn-kernel"], 3),
        }

    runs = [{c: summary(t) for c, t in measure().items()} for _ in range(args.runs)]
    result = {
        "config": {"rounds": args.rounds, "steps": args.steps, "driver_steps": args.driver_steps,
                   "threads": args.threads, "runs": args.runs, "batch": N_BATCH, "dataset_size": x.shape[0],
                   "weights": sum(q.numel() for q in params0), "torch": torch.__version__, "pyro": pyro.__version__},
        "same_update_max_abs_diff": err,
        # thread CPU time: what the step costs in this (single compute) thread, without the time the
        # process waits for a core on a shared machine (meaningful with --threads 1 only); process CPU
        # time: all threads' (with --threads 2 it includes the second thread's work and its spin-waits);
        # wall time: what a user waits for
        **({c: runs[0][c] for c in clocks} if args.runs == 1 else {"runs": runs}),
        "median_over_runs_of_ratio_to_hand": {
            c: {k: {"median": round(statistics.median(r[c]["ratio_to_hand"][k] for r in runs), 3),
                    "min": min(r[c]["ratio_to_hand"][k] for r in runs),
                    "max": max(r[c]["ratio_to_hand"][k] for r in runs)} for k in order}
            for c in clocks},
    }
    print(json.dumps(result, indent=2))
    host = result["host"] = log_speeds()
    print(f"\nLeNet-300-100, batch {N_BATCH}, torch {torch.__version__}, threads {args.threads}, torch CPU kernels "
          f"{host['cpu_capability']}, log1p {host['log1p']} ns/element, log {host['log']} ns/element: ratio to hand-written, "
          f"median over {args.runs} run(s) of the ratio of medians over {args.rounds} rounds [min–max over runs]")
    for c, rows in result["median_over_runs_of_ratio_to_hand"].items():
        print(f"  {c}: " + ", ".join(f"{k} ×{v['median']:.3f} [{v['min']:.3f}–{v['max']:.3f}]" for k, v in rows.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
