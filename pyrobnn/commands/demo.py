"""``pyrobnn demo``: the main job on an embedded dataset (sklearn's digits; nothing is downloaded).

A mean-field Bayesian MLP and a deterministic MLP of the same architecture, trained on the same split;
prints accuracy, NLL, ECE and Brier of both on the held-out test split.
"""
import json
import time


def register(sub):
    p = sub.add_parser("demo", help="Bayesian vs deterministic network on sklearn's digits (≈1 min on 2 cores)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="optional directory for metrics.json and plots")
    p.set_defaults(func=run)


def train_deterministic(net, x, y, epochs, lr=1e-3, batch_size=64, seed=0):
    """Plain maximum-likelihood training (Adam, cross-entropy) — the baseline a user would write."""
    import torch
    from pyrobnn.data import ArrayLoader
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loader = ArrayLoader(x, y, batch_size=batch_size, seed=seed)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def run(args):
    import pyro
    import torch
    import pyrobnn
    from pyrobnn import metrics
    from pyrobnn.data import load_digits
    from pyrobnn.inference import fit
    from pyrobnn.models import build

    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    ds = load_digits(seed=args.seed)
    arch = dict(in_features=64, out_features=10, hidden=[256, 256])
    print(f"digits: {len(ds.x_train)} train / {len(ds.x_test)} test, MLP 64-256-256-10, {args.epochs} epochs each")
    t0 = time.perf_counter()
    bnn = pyrobnn.bayesian(build("mlp", **arch), prior="gaussian", guide="mean-field",
                           likelihood="categorical", dataset_size=len(ds.x_train))
    fit(bnn, (ds.x_train, ds.y_train), epochs=args.epochs, lr=1e-2, batch_size=64, kl_warmup=(0, 10),
        lr_schedule="cosine", seed=args.seed, progress=False)
    t_bnn = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    p_bnn = bnn.predict(ds.x_test, num_samples=64)
    t0 = time.perf_counter()
    det = train_deterministic(build("mlp", **arch), ds.x_train, ds.y_train, args.epochs, seed=args.seed)
    t_det = time.perf_counter() - t0
    with torch.no_grad():
        p_det = det(ds.x_test).softmax(-1)
    y = ds.y_test
    rows = {}
    for name, p, t in (("bayesian (mean-field)", p_bnn, t_bnn), ("deterministic", p_det, t_det)):
        rows[name] = {"accuracy": metrics.accuracy(p, y), "nll": metrics.nll(p, y), "ece": metrics.ece(p, y),
                      "brier": metrics.brier(p, y), "train_seconds": t}
    print(f"{'network':24s} {'accuracy':>9s} {'NLL':>8s} {'ECE':>8s} {'Brier':>8s} {'train s':>8s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['accuracy']:9.4f} {r['nll']:8.4f} {r['ece']:8.4f} {r['brier']:8.4f} {r['train_seconds']:8.1f}")
    b, d = rows["bayesian (mean-field)"], rows["deterministic"]
    print(f"Bayesian better on NLL: {b['nll'] < d['nll']}, on ECE: {b['ece'] < d['ece']}")
    if args.out:
        from pyrobnn.plots import plot_reliability
        from pyrobnn.run import write_json
        write_json(f"{args.out}/metrics.json", rows)
        plot_reliability({"bayesian": p_bnn, "deterministic": p_det}, y, f"{args.out}/reliability.png")
    return 0
