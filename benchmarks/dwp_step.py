"""Extra cost of the deep-weight-prior bound per SVI step, as a ratio to the same step with a Gaussian prior.

fconv (conv 32@7×7 → pool → conv 64@5×5 → pool → fc 10) on ``[B, 1, 28, 28]``, mean-field guide,
``TraceMeanField_ELBO().differentiable_loss`` + ``torch.optim.Adam`` (what ``pyrobnn.inference.fit``
does per step). Configurations:

* ``gauss-lrt``: N(0, 1) on every site, local reparameterisation everywhere (closed-form KL) — what a
  user runs without the DWP;
* ``gauss-draw``: N(0, 1) everywhere, but weights drawn (``local_reparameterization=False``) — the same
  sampling scheme the DWP needs, so ``dwp / gauss-draw`` isolates the bound's cost;
* ``dwp``: deep weight prior on the conv weights (32 kernels of 7×7 and 64·32 = 2,048 kernels of
  5×5 through the VAE's encoder and decoder, forward and backward), N(0, 1) elsewhere, with local
  reparameterisation (the library default: the bound is taken at one fresh draw from q), so
  ``dwp / gauss-lrt`` is the bound's cost;
* ``dwp-draw``: the same with the conv weights drawn by the guide (``placeholders=False``, the
  older scheme), so ``dwp-draw / gauss-draw`` isolates the bound's cost for that scheme.

Rounds are interleaved (every round times ``--steps`` steps of each configuration in rotating order);
reported per configuration is the median over rounds of the mean step time, from one process. With
``--clock cpu`` (default) the time is this thread's CPU time (``time.thread_time``; with one torch
thread all work runs on it), which a shared, oversubscribed machine inflates far less than wall time.
The VAE is freshly initialised unless ``--prior FILE`` is given (its size, not its values, sets the cost); a
normalised prior file (``pyrobnn dwp train --normalize``) times the shape form, bound at w/‖w‖ plus N(0, I).

    python benchmarks/dwp_step.py --rounds 15 --steps 5 --batch 100 --threads 1 --clock cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from pyro.infer import TraceMeanField_ELBO

import pyrobnn
from pyrobnn.models import build
from pyrobnn.priors import DeepWeightPrior, KernelVAE


def make(config, prior):
    torch.manual_seed(0)
    net = build("fconv")
    if config == "gauss-lrt":
        bnn = pyrobnn.bayesian(net, prior="gaussian", dataset_size=1000)
    elif config == "gauss-draw":
        bnn = pyrobnn.bayesian(net, prior="gaussian", dataset_size=1000, local_reparameterization=False)
    else:
        if config == "dwp-draw":
            prior = DeepWeightPrior(prior.vaes, placeholders=False)
        bnn = pyrobnn.bayesian(net, prior={"conv*.weight": prior, "*": "gaussian"}, dataset_size=1000)
    return bnn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--prior", default=None, help="a DWP file (default: fresh VAEs, latent 2/4, hidden 16)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prior:
        prior = DeepWeightPrior(args.prior)
    else:
        torch.manual_seed(0)
        prior = DeepWeightPrior({"conv1": KernelVAE(7, 2, 16), "conv2": KernelVAE(5, 4, 16)})
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    elbo = TraceMeanField_ELBO()
    configs = ["gauss-lrt", "gauss-draw", "dwp", "dwp-draw"]
    runs = {}
    for c in configs:
        bnn = make(c, prior)
        bnn.initialize(x)
        opt = torch.optim.Adam(bnn.parameters(), lr=1e-3)

        def step(bnn=bnn, opt=opt):
            loss = elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        runs[c] = step
    # the bound alone: log p̂ of both conv weights, forward + backward to the weights
    w1 = (torch.randn(32, 1, 7, 7) * 0.1).requires_grad_()
    w2 = (torch.randn(64, 32, 5, 5) * 0.05).requires_grad_()
    p1, p2 = prior.for_kernel(7), prior.for_kernel(5)

    def bound_only():
        (p1.log_prob(w1).sum() + p2.log_prob(w2).sum()).backward()

    runs["bound-only"] = bound_only
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu needs --threads 1 (intra-op threads' CPU time is not on this thread)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    names = list(runs)
    times = {c: [] for c in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for c in order:
            t0 = clock()
            for _ in range(args.steps):
                runs[c]()
            times[c].append((clock() - t0) / args.steps)
    med = {c: statistics.median(v) for c, v in times.items()}
    result = {"batch": args.batch, "threads": args.threads, "clock": args.clock, "rounds": args.rounds, "steps": args.steps,
              "median_step_ms": {c: round(1000 * v, 2) for c, v in med.items()},
              "ratio_dwp_to_gauss_lrt": round(med["dwp"] / med["gauss-lrt"], 3),
              "ratio_dwp_draw_to_gauss_draw": round(med["dwp-draw"] / med["gauss-draw"], 3),
              "bound_share_of_dwp_step": round(med["bound-only"] / med["dwp"], 3)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
