"""``pyrobnn report DIR``: render a run's saved ArviZ file (netCDF) to PNG plots and an HTML page.

The file may have been written under either ArviZ line (0.x ``InferenceData`` or 1.x ``DataTree``: the
netCDF4/HDF5 layout is the same); it is read as the installed line's container
(:func:`pyrobnn.arviz_compat.read`).

Looks for ``DIR/inference_data.nc`` (else the first ``*.nc`` in DIR, or DIR itself when it is a file) and
writes into ``DIR/report/`` (``--out`` to change):

* ``trace.png`` — trace and density plot (``az.plot_trace``; ``plot_trace_dist`` on 1.x) of the per-draw
  scalars (layer norms, scalar sites);
* ``ppc.png`` — posterior predictive check (``az.plot_ppc``; ``plot_ppc_dist`` on 1.x), when the file has
  those groups;
* ``reliability.png`` — classification: accuracy vs confidence of the held-out predictive; regression:
  observed vs nominal coverage of central predictive intervals (from the held-out ``f_test`` and the
  draws of the noise precision, or else from the posterior predictive on the training data);
* ``index.html`` — the plots, the function-space R-hat/ESS (the meaningful convergence check for a
  network, see :mod:`pyrobnn.diagnostics`), ``az.summary`` of the scalars and any metrics stored in
  the file's ``pyrobnn_metrics`` attribute.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from pyrobnn.validation import positive_int


def register(sub):
    from ._common import add_parser
    p = add_parser(sub, "report", help="render a run's InferenceData (netCDF) to PNG plots and an HTML page",
                   description="Plots (trace, posterior predictive check, reliability) and an HTML page with "
                               "function-space R-hat/ESS and the run's metrics, from a run's inference_data.nc.",
                   epilog="examples:\n  pyrobnn report runs/digits              # a `pyrobnn fit` run\n"
                          "  pyrobnn report runs/digits-sgld --out www/sgld  # a `pyrobnn sample` run")
    p.add_argument("dir", help="run directory holding inference_data.nc (or a .nc file)")
    p.add_argument("--out", default=None, help="output directory (default DIR/report)")
    p.add_argument("--max-vars", type=int, default=6, help="per-draw scalars shown in the trace plot (default 6)")
    p.set_defaults(func=run)


def find_inference_data(path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such directory: {path}")
    preferred = path / "inference_data.nc"
    if preferred.is_file():
        return preferred
    found = sorted(path.glob("*.nc"))
    if not found:
        raise FileNotFoundError(f"{path} holds no ArviZ file (*.nc); save one with "
                                "pyrobnn.arviz_compat.write(idata, path)")
    return found[0]


def _scalar_vars(posterior, limit):
    names = []
    for name, var in posterior.data_vars.items():
        if var.ndim == 2:  # (chain, draw)
            names.append(name)
    # true scalar sites (a noise precision, ...) first, then layer norms, then the other summaries
    def rank(n):
        return 1 if n.endswith("_norm") else 2 if n.endswith(("_mean", "_std")) else 0

    names.sort(key=lambda n: (rank(n), n))
    return names[:limit]


def _var(groups, name, var):
    """``groups[name][var]`` as a numpy array, or None when the group or variable is absent."""
    import numpy as np
    ds = groups.get(name)
    return None if ds is None or var not in ds.data_vars else np.asarray(ds[var].values)


def _regression_coverage(groups):
    """(nominal, observed) coverage of central predictive intervals, or None."""
    import numpy as np
    levels = np.linspace(0.1, 0.9, 9)
    f, y = _var(groups, "predictions", "f_test"), _var(groups, "predictions_constant_data", "y_test")
    if f is not None and y is not None:
        f = f.reshape((-1,) + f.shape[2:])
        rng = np.random.default_rng(0)
        precision = _var(groups, "posterior", "likelihood.precision")
        if precision is not None:
            sigma = precision.reshape(-1) ** -0.5
            sigma = sigma.reshape((-1,) + (1,) * (f.ndim - 1))
        else:
            sigma = 0.0
        reps = f + sigma * rng.standard_normal(f.shape)
    elif "posterior_predictive" in groups and "observed_data" in groups:
        name = next(iter(groups["observed_data"].data_vars))
        reps = _var(groups, "posterior_predictive", name)
        if reps is None:
            return None
        reps = reps.reshape((-1,) + reps.shape[2:])
        y = _var(groups, "observed_data", name)
    else:
        return None
    pit = (reps < y[None]).mean(0).reshape(-1)
    observed = [float(np.mean(np.abs(pit - 0.5) <= lv / 2)) for lv in levels]
    return levels, np.asarray(observed)


def render(idata_path, out_dir, max_vars: int = 6) -> Path:
    """Write the plots and ``index.html`` for the ArviZ file at ``idata_path``; returns the page."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from pyrobnn import arviz_compat as compat
    from pyrobnn.diagnostics import function_space_diagnostics
    from pyrobnn.plots import plot_reliability, savefig

    idata = compat.read(idata_path)
    groups = {name: compat.group(idata, name) for name in compat.group_names(idata)}
    posterior = groups["posterior"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections, images = [], []

    scalars = _scalar_vars(posterior, max_vars)
    if not scalars:  # no per-draw scalars: take one coordinate of the first variable
        scalars = [next(iter(posterior.data_vars))]
    compat.plot_trace(idata, scalars, out / "trace.png", figsize=(10, 1.8 * len(scalars)))
    images.append(("Trace of per-draw scalars", "trace.png"))

    if "posterior_predictive" in groups and "observed_data" in groups:
        compat.plot_ppc(idata, out / "ppc.png", num_pp_samples=min(50, posterior.sizes["draw"] * posterior.sizes["chain"]))
        images.append(("Posterior predictive check (training data)", "ppc.png"))

    task = posterior.attrs.get("pyrobnn_task")
    p, y = _var(groups, "predictions", "p_test"), _var(groups, "predictions_constant_data", "y_test")
    if p is not None and y is not None:
        p = p.reshape((-1,) + p.shape[2:]).mean(0)
        if p.ndim == 1:
            p = np.stack([1 - p, p], -1)
        plot_reliability({"posterior predictive": torch.as_tensor(p, dtype=torch.float32)},
                         torch.as_tensor(y).long(), out / "reliability.png")
        images.append(("Reliability (held-out data)", "reliability.png"))
    elif task != "classification":
        cov = _regression_coverage(groups)
        if cov is not None:
            levels, observed = cov
            fig, ax = plt.subplots(figsize=(4.2, 4))
            ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
            ax.plot(levels, observed, marker="o", label="posterior predictive")
            ax.set(xlabel="nominal coverage of central interval", ylabel="observed coverage", xlim=(0, 1),
                   ylim=(0, 1), title="Reliability (interval coverage)")
            ax.legend(loc="upper left", fontsize=8)
            savefig(fig, out / "reliability.png")
            images.append(("Reliability (predictive-interval coverage)", "reliability.png"))

    attrs = dict(posterior.attrs)
    metrics = attrs.get("pyrobnn_metrics")
    if metrics:
        try:
            metrics = json.loads(metrics)
            rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                           else f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                           for k, v in metrics.items())
            sections.append(f"<h2>Metrics</h2><table>{rows}</table>")
        except (ValueError, TypeError):
            pass
    curve = attrs.get("pyrobnn_lambda_curve")
    if curve:
        section, image = _lambda_curve_section(curve, out)
        sections.append(section)
        images.append(image)
    if "predictions" in groups:
        try:
            fs = function_space_diagnostics(idata)
            rows = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in fs.items())
            sections.append("<h2>Function-space convergence (held-out predictions)</h2>"
                            "<p>R-hat/ESS of the predictions, which are invariant to the network's weight "
                            "symmetries; weight-space R-hat is not a meaningful check for a network.</p>"
                            f"<table>{rows}</table>")
        except ValueError as e:
            sections.append(f"<p>function-space diagnostics unavailable: {html.escape(str(e))}</p>")
    summary = compat.summary(idata, var_names=scalars, kind="all" if posterior.sizes["draw"] > 3 else "stats")
    sections.append("<h2>Posterior summary (per-draw scalars)</h2>" + summary.to_html(float_format="%.4g"))
    diverging = _var(groups, "sample_stats", "diverging")
    if diverging is not None:
        n_div = int(diverging.sum())
        sections.append(f"<p>Divergent draws: {n_div}</p>")

    body = "".join(f"<h2>{html.escape(t)}</h2><img src='{f}' style='max-width:100%'>" for t, f in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pyrobnn report</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            f"<h1>pyrobnn report: {html.escape(Path(idata_path).name)}</h1>"
            f"<p>{posterior.sizes['chain']} chain(s) × {posterior.sizes['draw']} draws; groups: "
            f"{html.escape(', '.join(groups))}</p>{''.join(sections)}{body}</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _lambda_curve_section(curve, out):
    """A λ-hypernetwork run (``pyrobnn fit`` with ``[train] lambdas``): test accuracy and the fraction of
    weights removable at no accuracy cost, per KL weight λ — as a table and ``lambda_curve.png``."""
    import matplotlib.pyplot as plt

    from pyrobnn.plots import savefig
    rows = json.loads(curve) if isinstance(curve, str) else curve
    metric = "accuracy" if "accuracy" in rows[0] else "nll"
    lams = [r["lambda"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(lams, [r[metric] for r in rows], marker="o", label=f"test {metric}")
    ax.plot(lams, [r["removable_fraction"] for r in rows], marker="s", label="removable fraction")
    ax.set(xlabel="KL weight λ", title="one guide for every λ")
    ax.legend(fontsize=8)
    savefig(fig, out / "lambda_curve.png")
    table = "".join(f"<tr><td>{r['lambda']:.4g}</td><td>{r[metric]:.4g}</td><td>{r['removable_fraction']:.4g}</td></tr>"
                    for r in rows)
    section = (f"<h2>Accuracy and sparsity over λ</h2><table><tr><th>λ</th><th>test {metric}</th>"
               f"<th>removable fraction</th></tr>{table}</table>")
    return section, ("Accuracy and sparsity over λ", "lambda_curve.png")


def run(args):
    positive_int("--max-vars", args.max_vars)
    path = find_inference_data(args.dir)
    base = path.parent if path.is_file() else Path(args.dir)
    out = Path(args.out) if args.out else base / "report"
    index = render(path, out, args.max_vars)
    print(index)
    return 0
