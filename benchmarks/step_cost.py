"""Per-step cost of mean-field SVI on LeNet-300-100 (batch 128, local reparameterisation).

Measured in one process with interleaved rounds (medians):
  * hand-written PyTorch Bayes-by-backprop with local reparameterisation (the reference, ratio 1),
  * the same hand-written step with softplus from one ``log`` instead of torch's ``log1p`` — the trick pyrobnn's
    MeanField uses, because torch's CPU ``log1p`` is unvectorised on some CPUs (~10 ns per element on a
    2-core AMD EPYC with AVX-512, torch 2.14.1): the ratio to this row is pyrobnn's overhead with softplus's cost equal on both sides,
  * pyrobnn the way a Pyro user runs it: ``SVI(bnn.model, bnn.guide, pyro.optim.Adam, TraceMeanField_ELBO()).step``,
    and the same with ``pyrobnn.inference.MeanFieldELBO()`` (the same loss and gradients, less bookkeeping),
  * pyrobnn through ``fit``'s step (``pyrobnn.inference.fit.SVIStep``: same ELBO, one torch Adam),
  * a user's own Pyro model around ``pyrobnn.random_module`` (own plate and ``Categorical`` likelihood),
    ``SVI(model, MeanField(model), ...).step`` with each of the two ELBOs,
  * Pyro's floor: ``SVI.step`` with ``TraceMeanField_ELBO`` on a model with the same seven sample sites (six
    weight-shaped latent sites with Normal priors, a subsampled ``Categorical`` observation) whose tensors are
    of size 2, and a hand-written guide with one Normal per site: Pyro's per-step bookkeeping alone,
  * plain Pyro: ``PyroModule`` + ``PyroSample`` priors + ``AutoNormal`` (weights sampled, no LRT),
  * a deterministic PyTorch step (what the Bayesian machinery costs on top of plain training).
Each Pyro route is timed with Pyro's validation on (its default) and off. Before timing, one step of
each pyrobnn route and of the hand-written step from the same parameters and RNG state are checked to
give the same update (same loss, noise, gradients and Adam step), so they compute the same thing.
Reported: per contender the median over rounds, the ratio of medians to hand-written, and the median of
per-round ratios (load drifting between rounds cancels in the latter).

    python benchmarks/step_cost.py [--rounds 15] [--clock thread|process] [--threads 1|2] [--runs 3]
                                   [--malloc fixed] [--device cpu|cuda] [--json out.json]

``--device cuda`` runs every contender on the GPU (wall clock, synchronised before each reading); the plain-Pyro
and Pyro-floor rows, whose priors are built on the CPU, are left out there.

The header gives the set of CPU kernels torch runs (AVX512, AVX2, ...; ``ATEN_CPU_CAPABILITY`` chooses) and its
``log1p`` and ``log`` speed under them, in ns per element: where ``log1p`` is slow the
hand-written steps (``F.softplus``) are slower and the ratios lower. Each row also shows the median minor page
faults per step. ``--malloc fixed`` re-runs the script with
glibc's trim/mmap thresholds fixed (see ``_timing.py``), so that freed tensors are not handed back to the
OS and faulted in again: that noise, not the code, moved the ratios by several percent between runs.
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule

sys.path.insert(0, str(Path(__file__).parent))
from _timing import (add_pyro_lenet300_layers, interleaved, log_speeds, malloc_mode, median_round_ratios,  # noqa: E402
                     reexec_with_fixed_malloc)

import pyrobnn  # noqa: E402
from pyrobnn.inference import MeanFieldELBO  # noqa: E402
from pyrobnn.inference.fit import SVIStep  # noqa: E402
from pyrobnn.models import build  # noqa: E402

N, B = 60000, 128
HAND_ONE_LOG = "hand-written, 1-log softplus"
DIMS = [(784, 300), (300, 100), (100, 10)]
INIT_SCALE = 1e-2
RHO0 = math.log(math.expm1(INIT_SCALE))


class HandWrittenBBB(nn.Module):
    """Bayes-by-backprop with local reparameterisation, written directly in PyTorch."""

    def __init__(self, softplus=F.softplus):
        super().__init__()
        self.softplus = softplus
        ref = build("lenet300")
        layers = [ref.fc1, ref.fc2, ref.fc3]
        self.mu = nn.ParameterList([nn.Parameter(l.weight.detach().clone()) for l in layers])
        self.rho = nn.ParameterList([nn.Parameter(torch.full_like(l.weight, RHO0)) for l in layers])
        self.bmu = nn.ParameterList([nn.Parameter(l.bias.detach().clone()) for l in layers])
        self.brho = nn.ParameterList([nn.Parameter(torch.full_like(l.bias, RHO0)) for l in layers])

    def forward(self, x):
        x = x.flatten(1)
        kl = 0.0
        for k in range(3):
            sw, sb = self.softplus(self.rho[k]), self.softplus(self.brho[k])
            mean = F.linear(x, self.mu[k], self.bmu[k])
            var = F.linear(x * x, sw * sw, sb * sb)
            x = mean + (var + 1e-16).sqrt() * torch.randn_like(mean)
            if k < 2:
                x = F.relu(x)
            for mu, sd in ((self.mu[k], sw), (self.bmu[k], sb)):  # KL(N(μ,σ²) ‖ N(0,1))
                kl = kl + 0.5 * (sd * sd + mu * mu - 1).sum() - sd.log().sum()
        return x, kl


def softplus_one_log(rho):
    """softplus without torch's CPU ``log1p`` (~10 ns per element on one AVX-512 CPU, ``log`` ~0.8 ns):
    t = e^ρ, w = 1 + t, log1p(t) = log(w) − ((w − 1) − t)/w. The same trick pyrobnn's MeanField uses, written
    out here so that the second hand-written reference pays for softplus what pyrobnn pays."""
    t = torch.exp(rho)
    w = t + 1.0
    return torch.log(w) - ((w - 1.0) - t) / w


class PlainPyroLeNet(PyroModule):
    def __init__(self):
        super().__init__()
        add_pyro_lenet300_layers(self)

    def forward(self, x, y=None):
        x = x.flatten(1)
        logits = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))
        with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def _copy_hand_into_guide(hw, bnn):
    """Set the pyrobnn guide's flat (loc, ρ) to the hand-written network's (μ, ρ), site by site."""
    values = {}
    for k, layer in enumerate(("fc1", "fc2", "fc3")):
        values[f"{layer}.weight"] = (hw.mu[k], hw.rho[k])
        values[f"{layer}.bias"] = (hw.bmu[k], hw.brho[k])
    flat = bnn.autoguide.flat
    with torch.no_grad():
        for name, (offset, n, *_rest) in bnn.autoguide._layout.items():
            mu, rho = values[name]
            flat.loc[offset:offset + n] = mu.reshape(-1)
            flat.rho[offset:offset + n] = rho.reshape(-1)


def _hand_as_flat(hw, bnn):
    """The hand-written network's (μ, ρ) in the guide's flat layout, for comparison."""
    order = {"fc1.weight": (hw.mu, 0), "fc1.bias": (hw.bmu, 0), "fc2.weight": (hw.mu, 1),
             "fc2.bias": (hw.bmu, 1), "fc3.weight": (hw.mu, 2), "fc3.bias": (hw.bmu, 2)}
    rho_of = {id(hw.mu): hw.rho, id(hw.bmu): hw.brho}
    loc = torch.cat([order[n][0][order[n][1]].detach().reshape(-1) for n in bnn.autoguide._layout])
    rho = torch.cat([rho_of[id(order[n][0])][order[n][1]].detach().reshape(-1) for n in bnn.autoguide._layout])
    return loc, rho


DEVICE = torch.device("cpu")


def check_same_update():
    """One step of each pyrobnn route and of the hand-written step, from the same parameters and RNG state,
    give the same updated parameters (same loss, same noise, same gradients, same Adam): the contenders
    compute the same thing. Returns the largest |difference| relative to the largest |parameter|."""
    torch.manual_seed(1)
    x, y = torch.rand(B, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (B,), device=DEVICE)
    results = {}
    for route in ("SVI.step", "SVI.step, MeanFieldELBO", "fit step"):
        hw = HandWrittenBBB()
        hw_opt = torch.optim.Adam(hw.parameters(), lr=1e-3)
        bnn = pyrobnn.bayesian(build("lenet300"), dataset_size=N,
                               guide={"name": "mean-field", "init_scale": INIT_SCALE})
        bnn.initialize(x.cpu())
        hw.to(DEVICE)
        bnn.to(DEVICE)
        hw_opt = torch.optim.Adam(hw.parameters(), lr=1e-3)
        _copy_hand_into_guide(hw, bnn)
        if route.startswith("SVI.step"):
            elbo = MeanFieldELBO() if route.endswith("MeanFieldELBO") else TraceMeanField_ELBO()
            svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
            run = lambda: svi.step(x, y)  # noqa: E731
        else:
            step = SVIStep(bnn, torch.optim.Adam(bnn.parameters(), lr=1e-3))
            run = lambda: step(x, y)  # noqa: E731
        torch.manual_seed(7)
        out, kl = hw(x)
        loss = F.cross_entropy(out, y, reduction="sum") * (N / B) + kl
        hw_opt.zero_grad(set_to_none=True)
        loss.backward()
        hw_opt.step()
        torch.manual_seed(7)
        run()
        loc, rho = _hand_as_flat(hw, bnn)
        flat = bnn.autoguide.flat
        err = max((flat.loc.detach() - loc).abs().max().item(), (flat.rho.detach() - rho).abs().max().item())
        scale = max(loc.abs().max().item(), rho.abs().max().item())
        if err > 1e-6 * scale:
            raise AssertionError(f"hand-written and pyrobnn ({route}) steps differ by {err:.3g}")
        results[route] = err / scale
    return results


def build_random_module_svi(elbo=TraceMeanField_ELBO):
    """``SVI.step`` on a user's own Pyro model built around ``pyrobnn.random_module``: the network's weights
    are sample sites ``"net.fc1.weight"``..., the user writes the plate and the likelihood, the guide is
    ``pyrobnn.guides.MeanField`` started at the network's initial weights (as ``bayesian()`` does)."""
    from pyro.infer.autoguide.initialization import init_to_value
    net = build("lenet300")
    rnet = pyrobnn.random_module("net", net, prior="gaussian")

    def model(x, y=None):
        logits = rnet(x)
        with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits

    init = {f"net.{k}": v.detach().clone() for k, v in net.named_parameters()}
    guide = pyrobnn.guides.MeanField(model, init_scale=INIT_SCALE, init_loc_fn=init_to_value(values=init))
    return SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo())


def build_pyro_floor_svi():
    """Pyro's own per-step cost for LeNet-300-100's site structure: six latent sites (Normal priors) and a
    subsampled Categorical observation, every tensor of 2 elements, a hand-written guide (two flat parameters,
    one Normal per site), ``TraceMeanField_ELBO``. What is left is the bookkeeping of ``SVI.step`` itself."""
    names = [f"{layer}.{kind}" for layer in ("fc1", "fc2", "fc3") for kind in ("weight", "bias")]

    def model(x, y=None):
        w = [pyro.sample(n, dist.Normal(0.0, 1.0).expand([2]).to_event(1)) for n in names]
        logits = torch.stack([x[:, 0] * w[0][0], x[:, 1] * w[5][1]], -1)
        with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    def guide(x, y=None):
        loc = pyro.param("floor.loc", torch.zeros(2 * len(names)))
        rho = pyro.param("floor.rho", torch.full((2 * len(names),), -4.6))
        scale = F.softplus(rho)
        for i, n in enumerate(names):
            pyro.sample(n, dist.Normal(loc[2 * i:2 * i + 2], scale[2 * i:2 * i + 2]).to_event(1))

    return SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())


def build_steps():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    x, y = torch.rand(B, 1, 28, 28), torch.randint(0, 10, (B,))
    x_init = x
    x, y = x.to(DEVICE), y.to(DEVICE)

    def hand_written_step(softplus):
        hw = HandWrittenBBB(softplus=softplus).to(DEVICE)
        hw_opt = torch.optim.Adam(hw.parameters(), lr=1e-3)

        def step():
            out, kl = hw(x)
            loss = F.cross_entropy(out, y, reduction="sum") * (N / B) + kl
            hw_opt.zero_grad(set_to_none=True)
            loss.backward()
            hw_opt.step()
        return step

    hand_written = hand_written_step(F.softplus)
    hand_written_one_log = hand_written_step(softplus_one_log)

    det = build("lenet300").to(DEVICE)
    det_opt = torch.optim.Adam(det.parameters(), lr=1e-3)

    def deterministic():
        loss = F.cross_entropy(det(x), y)
        det_opt.zero_grad(set_to_none=True)
        loss.backward()
        det_opt.step()

    def lenet_bnn():
        b = pyrobnn.bayesian(build("lenet300"), dataset_size=N, guide={"name": "mean-field", "init_scale": INIT_SCALE})
        b.initialize(x_init)
        return b.to(DEVICE)

    bnn = lenet_bnn()
    svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())

    def pyrobnn_svi():
        svi.step(x, y)

    bnn3 = lenet_bnn()
    svi_fast = SVI(bnn3.model, bnn3.guide, pyro.optim.Adam({"lr": 1e-3}), MeanFieldELBO())

    def pyrobnn_svi_fast():
        svi_fast.step(x, y)

    bnn2 = lenet_bnn()
    step = SVIStep(bnn2, torch.optim.Adam(bnn2.parameters(), lr=1e-3))

    def pyrobnn_fit_step():
        step(x, y)

    svi_random_module = build_random_module_svi()
    svi_random_module.guide(x_init, y.cpu())  # the guide's parameters, made on the CPU
    svi_random_module.guide.to(DEVICE)

    def random_module_svi():
        svi_random_module.step(x, y)

    svi_random_module_fast = build_random_module_svi(MeanFieldELBO)
    svi_random_module_fast.guide(x_init, y.cpu())
    svi_random_module_fast.guide.to(DEVICE)

    def random_module_svi_fast():
        svi_random_module_fast.step(x, y)

    x_floor = torch.rand(B, 2)
    svi_floor = build_pyro_floor_svi()

    def pyro_floor():
        svi_floor.step(x_floor, y % 2)

    plain = PlainPyroLeNet()
    guide = AutoNormal(plain, init_scale=INIT_SCALE)
    svi_plain = SVI(plain, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())

    def plain_pyro():
        svi_plain.step(x, y)

    if DEVICE.type != "cpu":  # priors and guides of these two are built on the CPU
        plain_pyro = pyro_floor = None
    steps = {"hand-written BBB+LRT": hand_written, HAND_ONE_LOG: hand_written_one_log,
            "pyrobnn SVI.step": pyrobnn_svi, "pyrobnn SVI.step, MeanFieldELBO": pyrobnn_svi_fast,
            "pyrobnn fit step": pyrobnn_fit_step, "random_module SVI.step": random_module_svi,
            "random_module SVI.step, MFELBO": random_module_svi_fast,
            "plain Pyro AutoNormal": plain_pyro, "Pyro floor (7 sites, 2-elt)": pyro_floor,
            "deterministic PyTorch": deterministic}
    return {k: f for k, f in steps.items() if f is not None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole measurement; also reports per contender the median over runs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--clock", choices=["wall", "thread", "process"], default="wall",
                    help="wall: elapsed time; thread: CPU time of the calling thread (robust when other jobs load "
                         "the machine; needs --threads 1); process: CPU time of all the process's threads")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 with --clock thread, else torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (wall clock, synchronised)")
    ap.add_argument("--malloc", choices=["default", "fixed"], default="default",
                    help="fixed: re-run with glibc's dynamic trim/mmap thresholds off (no page-fault noise)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    sync = None
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here")
        if args.clock != "wall":
            ap.error("--device cuda measures with --clock wall")
        sync = torch.cuda.synchronize
    if args.malloc == "fixed":
        reexec_with_fixed_malloc()
    threads = args.threads if args.threads is not None else (1 if args.clock == "thread" else None)
    if args.clock == "thread" and threads != 1:
        ap.error("--clock thread measures one thread: use --threads 1 (or --clock process)")
    if threads is not None:
        torch.set_num_threads(threads)
    results = {"same_update_max_rel_diff": check_same_update()}
    print("same update as hand-written (max |Δ| / max |θ|):", results["same_update_max_rel_diff"])
    ref_name = "hand-written BBB+LRT"
    per_run = {"validation_on": [], "validation_off": []}
    for run in range(args.runs):
        for validation in (True, False):
            pyro.enable_validation(validation)
            fns = build_steps()
            faults = {}
            med, times = interleaved(fns, rounds=args.rounds, steps=args.steps, clock=args.clock, samples=True,
                                     faults=faults, sync=sync)
            ref = med[ref_name]
            round_ratios = median_round_ratios(times, ref_name)
            ref2 = med[HAND_ONE_LOG]
            per_run["validation_on" if validation else "validation_off"].append({
                k: {"ms": round(v * 1e3, 3), "ratio": round(v / ref, 3),
                    "median_round_ratio": round(round_ratios[k], 3),
                    "ratio_to_one_log_hand_written": round(v / ref2, 3),
                    "page_faults_per_step": round(faults[k], 1)}
                for k, v in med.items()})
    pyro.enable_validation(True)
    for mode, runs in per_run.items():
        results[mode] = runs[0] if args.runs == 1 else {"runs": runs}
        results[mode + "_median_over_runs"] = {
            k: {key: statistics.median(r[k][key] for r in runs) for key in ("ratio", "median_round_ratio")}
            | {"ratio_min": min(r[k]["ratio"] for r in runs), "ratio_max": max(r[k]["ratio"] for r in runs)}
            for k in runs[0]}
    speeds = results["log_ns_per_element"] = log_speeds()
    print(f"LeNet-300-100, batch {B}, torch {torch.__version__}, pyro {pyro.__version__}, "
          f"threads {torch.get_num_threads()}, clock {args.clock}, malloc {malloc_mode()}, runs {args.runs}, "
          f"torch CPU kernels {speeds['cpu_capability']}, log1p {speeds['log1p']} ns/element, log {speeds['log']} ns/element")
    results["malloc"] = malloc_mode()
    results["threads"] = torch.get_num_threads()
    for mode, runs in per_run.items():
        for i, rows in enumerate(runs):
            print(f"\n[Pyro {mode.replace('_', ' ')}, run {i + 1}]  median ms/step, ratio of medians to hand-written, "
                  f"median of per-round ratios, ratio to the 1-log-softplus hand-written, minor page faults per step")
            for k, r in rows.items():
                print(f"  {k:32s} {r['ms']:8.3f} ms   ×{r['ratio']:.3f}   ×{r['median_round_ratio']:.3f}"
                      f"   ×{r['ratio_to_one_log_hand_written']:.3f}   {r['page_faults_per_step']:7.1f}")
    if args.runs > 1:
        for mode in per_run:
            print(f"\n[Pyro {mode.replace('_', ' ')}, median over {args.runs} runs]  ratio of medians [min–max], "
                  f"median of per-round ratios")
            for k, r in results[mode + "_median_over_runs"].items():
                print(f"  {k:32s} ×{r['ratio']:.3f} [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}]   "
                      f"×{r['median_round_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
