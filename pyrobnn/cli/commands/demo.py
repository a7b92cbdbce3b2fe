"""``pyrobnn demo``: the main job on an embedded dataset (sklearn's digits; nothing is downloaded).

A mean-field Bayesian MLP and a deterministic MLP of the same architecture, trained on the same split
for the same number of epochs with Adam; prints accuracy, NLL, ECE and Brier of both on the held-out
test split.

Settings of the Bayesian network, and why (measured in docs/RESULTS.md, "Demo"):

* ``--kl-weight 0.1`` — the KL term of the ELBO is multiplied by λ = 0.1 (a tempered, "cold"
  posterior: the data count ten times as much as the prior). With λ = 1 the mean-field posterior of a
  64-256-256-10 MLP fitted to 1,258 images is underconfident (mean confidence below accuracy) and its
  ECE is worse than the deterministic network's. ``--kl-weight 1`` gives the untempered posterior.
* ``--init-scale 1e-3`` — every guide σ starts at 1e-3 (μ starts at the network's initial weights).
  A larger initial σ leaves the network noisier after 150 epochs, which again costs calibration.

The deterministic baseline is what a user would write: Adam (lr 1e-3), cross-entropy, the same
architecture, batch size and epochs; ``--det-weight-decay`` adds an L2 penalty (Adam's
``weight_decay``) for comparisons.
"""
import time

from pyrobnn.validation import non_negative_float, positive_float, positive_int, real


def register(sub):
    from ._common import add_parser
    p = add_parser(sub, "demo", help="Bayesian vs deterministic network on sklearn's digits (≈1 min on 2 cores)",
                   description="Train a mean-field Bayesian MLP and a deterministic MLP on sklearn's digits "
                               "and compare accuracy, NLL, ECE and Brier on the test split.",
                   epilog="examples:\n  pyrobnn demo\n  pyrobnn demo --kl-weight 1 --out runs/demo   "
                          "# the untempered ELBO; metrics.json + reliability.png")
    p.add_argument("--epochs", type=int, default=150, help="training epochs of both networks (default 150)")
    p.add_argument("--seed", type=int, default=0, help="seeds the train/test split, the inits and the data order")
    p.add_argument("--kl-weight", type=float, default=0.1,
                   help="λ multiplying the KL term after warm-up (1 = the untempered ELBO; default 0.1)")
    p.add_argument("--init-scale", type=float, default=1e-3, help="initial σ of the mean-field guide")
    p.add_argument("--det-weight-decay", type=float, default=0.0, help="Adam weight decay of the deterministic net")
    p.add_argument("--out", default=None, metavar="DIR", help="optional directory for metrics.json and plots")
    p.set_defaults(func=run)


def _check_args(args):
    positive_int("--epochs", args.epochs)
    real("--kl-weight", args.kl_weight, minimum=0, maximum=1, exclusive_minimum=True)
    positive_float("--init-scale", args.init_scale)
    non_negative_float("--det-weight-decay", args.det_weight_decay)


def kl_schedule(kl_weight: float, ramp_epochs: float = 10.0):
    """KL weight per (fractional) epoch: linear warm-up from 0 to ``kl_weight`` over ``ramp_epochs``."""
    return lambda epoch: kl_weight * min(1.0, epoch / ramp_epochs)


def run(args):
    import pyro
    import torch
    import pyrobnn
    from pyrobnn import metrics
    from pyrobnn.data import ArrayLoader, load_digits
    from pyrobnn.guides import MeanField
    from pyrobnn.inference import fit, train_deterministic
    from pyrobnn.models import build

    _check_args(args)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    ds = load_digits(seed=args.seed)
    arch = dict(in_features=64, out_features=10, hidden=[256, 256])
    tempering = "untempered ELBO" if args.kl_weight == 1 else f"KL weight λ = {args.kl_weight:g} (tempered posterior)"
    print(f"digits: {len(ds.x_train)} train / {len(ds.x_test)} test, MLP 64-256-256-10, {args.epochs} epochs each, "
          f"seed {args.seed}")
    print(f"bayesian: N(0, 1) prior, mean-field guide (initial σ {args.init_scale:g}), {tempering}, 64 predictive draws; "
          f"deterministic: Adam 1e-3, weight decay {args.det_weight_decay:g}")
    t0 = time.perf_counter()
    init_scale = args.init_scale
    bnn = pyrobnn.bayesian(build("mlp", **arch), prior="gaussian",
                           guide=lambda model, **kw: MeanField(model, init_scale=init_scale, **kw),
                           likelihood="categorical", dataset_size=len(ds.x_train))
    fit(bnn, (ds.x_train, ds.y_train), epochs=args.epochs, lr=1e-2, batch_size=64,
        kl_warmup=kl_schedule(args.kl_weight), lr_schedule="cosine", seed=args.seed, progress=False)
    t_bnn = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    p_bnn = bnn.predict(ds.x_test, num_samples=64)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # the baseline's initial weights do not depend on the Bayesian run
    loader = ArrayLoader(ds.x_train, ds.y_train, batch_size=64, seed=args.seed)
    det = train_deterministic(build("mlp", **arch), loader, epochs=args.epochs, lr=1e-3, seed=args.seed,
                              weight_decay=args.det_weight_decay)
    t_det = time.perf_counter() - t0
    with torch.no_grad():
        p_det = det(ds.x_test).softmax(-1)
    y = ds.y_test
    rows = {}
    for name, p, t in (("bayesian (mean-field)", p_bnn, t_bnn), ("deterministic", p_det, t_det)):
        rows[name] = {"accuracy": metrics.accuracy(p, y), "nll": metrics.nll(p, y), "ece": metrics.ece(p, y),
                      "brier": metrics.brier(p, y), "mean_confidence": p.max(-1).values.mean().item(),
                      "train_seconds": t}
    print(f"{'network':24s} {'accuracy':>9s} {'NLL':>8s} {'ECE':>8s} {'Brier':>8s} {'conf':>8s} {'train s':>8s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['accuracy']:9.4f} {r['nll']:8.4f} {r['ece']:8.4f} {r['brier']:8.4f} "
              f"{r['mean_confidence']:8.4f} {r['train_seconds']:8.1f}")
    b, d = rows["bayesian (mean-field)"], rows["deterministic"]
    print(f"Bayesian better on NLL: {b['nll'] < d['nll']}, on ECE: {b['ece'] < d['ece']}")
    if args.out:
        from pyrobnn.plots import plot_reliability
        from pyrobnn.cli.run import write_json
        settings = {"seed": args.seed, "epochs": args.epochs, "kl_weight": args.kl_weight,
                    "init_scale": args.init_scale, "det_weight_decay": args.det_weight_decay}
        write_json(f"{args.out}/metrics.json", {**rows, "settings": settings})
        plot_reliability({"bayesian": p_bnn, "deterministic": p_det}, y, f"{args.out}/reliability.png")
    return 0
