"""One training step of sparse VD on LeNet-300-100 (batch 128): pyrobnn vs hand-written PyTorch.

Three step implementations doing the same mathematics (log-uniform prior with the Molchanov KL on
log α clipped from above at 8 (pyrobnn's default ``log_alpha_clip=(None, 8)``) for every weight *and* bias, additive-noise posterior with free θ and log σ²,
local reparameterisation b ~ N(xθ + θ_b, x²σ² + σ_b²), categorical likelihood scaled by N/B, Adam):

* ``pyro-svi``: ``pyro.infer.SVI(bnn.model, bnn.guide, pyro.optim.Adam, TraceMeanField_ELBO()).step(x, y)``;
* ``pyro-svi-mfelbo``: the same with ``pyrobnn.inference.MeanFieldELBO()`` (same loss and gradients);
* ``fit-step``: ``pyrobnn.inference.fit``'s step (``SVIStep``: ``MeanFieldELBO().differentiable_loss``
  + ``torch.optim.Adam`` over ``bnn.parameters()``);
* ``torch``: a hand-written ``nn.Module`` (the reference).

Rounds are interleaved (each round times ``--steps`` steps of every implementation, in rotating
order); the reported number per implementation is the median over rounds of the mean step time, and
the ratio is pyrobnn's median / the reference's median, all from the same process.

    python benchmarks/sparse_vd_step.py --rounds 30 --steps 20 --threads 1

``--clock thread`` (the default) times with the calling thread's CPU clock (with 1 torch thread all
the work runs there, so other jobs on the machine inflate it less); ``--clock wall`` with perf_counter.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import pyro
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO

import pyrobnn
from pyrobnn.inference import MeanFieldELBO
from pyrobnn.inference.fit import SVIStep
from pyrobnn.models import build

from _timing import log_speeds  # benchmarks/ is the script directory

K1, K2, K3 = 0.63576, 1.87320, 1.48695


class HandSVDLinear(nn.Module):
    """Sparse-VD Linear with local reparameterisation; bias is variational too (as in pyrobnn)."""

    def __init__(self, linear: nn.Linear, init_log_sigma2=-10.0):
        super().__init__()
        self.theta = nn.Parameter(linear.weight.detach().clone())
        self.log_sigma2 = nn.Parameter(torch.full_like(self.theta, init_log_sigma2))
        self.theta_b = nn.Parameter(linear.bias.detach().clone())
        self.log_sigma2_b = nn.Parameter(torch.full_like(self.theta_b, init_log_sigma2))

    def forward(self, x):
        mean = F.linear(x, self.theta, self.theta_b)
        var = F.linear(x * x, self.log_sigma2.exp(), self.log_sigma2_b.exp())
        return mean + (var + 1e-16).sqrt() * torch.randn_like(mean)

    def kl(self):
        total = 0.0
        for theta, log_s2 in ((self.theta, self.log_sigma2), (self.theta_b, self.log_sigma2_b)):
            la = (log_s2 - (theta * theta + 1e-16).log()).clamp(max=8.0)
            total = total + (K1 * torch.sigmoid(-K2 - K3 * la) + 0.5 * F.softplus(-la)).sum()
        return total


class HandLeNet300(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = HandSVDLinear(net.fc1), HandSVDLinear(net.fc2), HandSVDLinear(net.fc3)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())

    def kl(self):
        return self.fc1.kl() + self.fc2.kl() + self.fc3.kl()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-validation", action="store_true",
                   help="pyro.enable_validation(False): drop Pyro's per-site NaN/shape checks (on by default)")
    p.add_argument("--clock", choices=["thread", "wall"], default="thread",
                   help="thread: time.thread_time (CPU time of this thread); wall: time.perf_counter")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.no_validation:
        pyro.enable_validation(False)
    torch.manual_seed(0)
    N = 60000
    x = torch.rand(a.batch, 1, 28, 28)
    y = torch.randint(0, 10, (a.batch,))

    net = build("lenet300")
    # pyrobnn: the same model, once per driver, so optimiser states stay separate
    bnn_svi, bnn_svi_fast, bnn_fit = (pyrobnn.bayesian(net, prior="log-uniform", guide="additive-noise",
                                                       dataset_size=N) for _ in range(3))
    for b in (bnn_svi, bnn_svi_fast, bnn_fit):
        b.initialize(x)
    svi = SVI(bnn_svi.model, bnn_svi.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    svi_fast = SVI(bnn_svi_fast.model, bnn_svi_fast.guide, pyro.optim.Adam({"lr": 1e-3}), MeanFieldELBO())
    elbo = TraceMeanField_ELBO()
    fit_step = SVIStep(bnn_fit, torch.optim.Adam([q for q in bnn_fit.parameters() if q.requires_grad], lr=1e-3))

    hand = HandLeNet300(net)
    opt_hand = torch.optim.Adam(hand.parameters(), lr=1e-3)

    def step_svi():
        svi.step(x, y)

    def step_svi_fast():
        svi_fast.step(x, y)

    def step_fit():
        fit_step(x, y).item()

    def step_torch():
        out = hand(x)
        loss = F.cross_entropy(out, y, reduction="sum") * (N / a.batch) + hand.kl()
        opt_hand.zero_grad(set_to_none=True)
        loss.backward()
        opt_hand.step()
        loss.item()

    impls = {"pyro-svi": step_svi, "pyro-svi-mfelbo": step_svi_fast, "fit-step": step_fit, "torch": step_torch}
    # sanity: the three losses agree at the same parameters (pyrobnn's ELBO is the hand-written loss)
    with torch.no_grad():
        torch.manual_seed(1)
        l_pyro = elbo.loss(bnn_fit.model, bnn_fit.guide, x, y)
        torch.manual_seed(1)
        l_hand = (F.cross_entropy(hand(x), y, reduction="sum") * (N / a.batch) + hand.kl()).item()
    for f in impls.values():
        for _ in range(a.warmup):
            f()
    times = {k: [] for k in impls}
    names = list(impls)
    now = time.thread_time if a.clock == "thread" else time.perf_counter
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            f = impls[k]
            t0 = now()
            for _ in range(a.steps):
                f()
            times[k].append((now() - t0) / a.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"median_step_ms": {k: 1e3 * v for k, v in med.items()},
              "ratio_pyro_svi_vs_torch": med["pyro-svi"] / med["torch"],
              "ratio_pyro_svi_mfelbo_vs_torch": med["pyro-svi-mfelbo"] / med["torch"],
              "ratio_fit_step_vs_torch": med["fit-step"] / med["torch"],
              "loss_check": {"pyrobnn_elbo_loss": l_pyro, "hand_loss": l_hand},
              "config": {"rounds": a.rounds, "steps": a.steps, "batch": a.batch, "threads": a.threads, "clock": a.clock,
                         "pyro_validation": not a.no_validation,
                         "torch": torch.__version__, "pyro": pyro.__version__},
              "host": log_speeds()}
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
