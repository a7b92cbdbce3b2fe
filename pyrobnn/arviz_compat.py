"""The one place where pyrobnn meets the two ArviZ lines.

ArviZ 0.x (Python 3.11 here) keeps posterior draws in ``arviz.InferenceData``; ArviZ 1.x (Python ≥ 3.12)
in an ``xarray.DataTree`` built by ``arviz_base``, with statistics in ``arviz_stats`` and plots in
``arviz_plots`` (all re-exported by ``import arviz``). The rest of pyrobnn calls only the functions
below, which take and return the *native* object of the installed line — so whatever pyrobnn returns,
that line's own ``az.summary`` / ``az.rhat`` / ``az.ess`` / ``az.loo`` / plots accept it.

Where the lines differ:

======================  ==================================  ======================================
                        ArviZ 0.x                           ArviZ 1.x
======================  ==================================  ======================================
container               ``InferenceData``                   ``xarray.DataTree``
build from arrays       ``from_dict(posterior=..., ...,     ``from_dict({"posterior": ..., ...},
                        posterior_attrs=...)``              attrs={"posterior": ...})``
group names             ``idata.groups()`` (a method)       ``dt.children`` (``dt.groups`` are paths)
read a file             ``az.from_netcdf`` (InferenceData)  ``xarray.open_datatree``
LOO                     ``ELPDData.elpd_loo`` / ``p_loo``   ``ELPDData.elpd`` / ``p``
WAIC                    ``az.waic``                         none: :func:`waic` computes it here
trace / PPC plots       ``plot_trace`` / ``plot_ppc``       ``plot_trace_dist`` / ``plot_ppc_dist``
                        (matplotlib axes)                   (a ``PlotCollection``)
======================  ==================================  ======================================

The file on disk (netCDF4/HDF5 with one group per ArviZ group) is the same on both lines, so a run
saved under one opens under the other (:func:`read`).
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["arviz", "arviz_major", "is_datatree_line", "from_groups", "is_inference_data", "group_names",
           "group", "read", "write", "summary", "rhat", "ess", "loo", "waic", "plot_trace", "plot_ppc"]


@functools.lru_cache(maxsize=None)
def arviz():
    """The ``arviz`` module (imported on first use: it is slow to import)."""
    import arviz as az
    return az


def arviz_major() -> int:
    """The installed ArviZ's major version (0 or 1)."""
    return int(str(arviz().__version__).split(".")[0])


def is_datatree_line() -> bool:
    """True on ArviZ 1.x (``xarray.DataTree``), False on 0.x (``InferenceData``)."""
    return arviz_major() >= 1


# ----------------------------------------------------------------------------------------------------
# building, inspecting, reading and writing
# ----------------------------------------------------------------------------------------------------
def from_groups(groups: Dict[str, Dict[str, np.ndarray]], *, coords=None, dims=None, pred_dims=None,
                attrs: Optional[Dict[str, Dict[str, object]]] = None):
    """The line's native container from ``{group: {var: array}}``.

    Arrays of sampled groups lead with ``(chain, draw)``; ``observed_data`` and the other ``*_data``
    groups have no sample dimensions. ``dims`` name the other dimensions per variable, ``pred_dims``
    those of the ``predictions*`` groups; ``attrs`` are per group (``{"posterior": {...}}``).
    Empty groups are left out.
    """
    az = arviz()
    groups = {g: d for g, d in groups.items() if d}
    attrs = {g: a for g, a in (attrs or {}).items() if g in groups and a}
    if is_datatree_line():
        return az.from_dict(groups, coords=coords or None, dims=dims or None, pred_dims=pred_dims or None,
                            attrs=attrs or None)
    group_attrs = {f"{g}_attrs": a for g, a in attrs.items()}
    # ArviZ 0.x builds the *_data groups with `dims` only (it drops pred_dims there): give it those too
    const = groups.get("predictions_constant_data", {})
    dims = {**{k: v for k, v in (pred_dims or {}).items() if k in const}, **(dims or {})}
    return az.from_dict(**groups, coords=coords or None, dims=dims or None, pred_dims=pred_dims or None,
                        **group_attrs)


def is_inference_data(obj) -> bool:
    """True for an ``InferenceData`` (0.x) or an ``xarray.DataTree`` (1.x)."""
    try:
        from xarray import DataTree
    except ImportError:  # xarray before 2024.10 has no DataTree (ArviZ 0.x only)
        DataTree = ()
    if DataTree and isinstance(obj, DataTree):
        return True
    InferenceData = getattr(arviz(), "InferenceData", None) if not is_datatree_line() else None
    return InferenceData is not None and isinstance(obj, InferenceData)


def group_names(idata) -> List[str]:
    """Names of the groups (``["posterior", "sample_stats", ...]``) of either container."""
    if not is_inference_data(idata):
        raise TypeError(f"expected an InferenceData or DataTree, got {type(idata).__name__}")
    if hasattr(idata, "children") and not callable(getattr(idata, "groups", None)):
        return list(idata.children)
    return list(idata.groups())


def group(idata, name: str):
    """Group ``name`` as an ``xarray.Dataset`` (``KeyError`` naming the groups present when absent)."""
    names = group_names(idata)
    if name not in names:
        raise KeyError(f"no {name!r} group; this one has {names}")
    node = idata[name] if hasattr(idata, "children") else getattr(idata, name)
    return node.to_dataset() if hasattr(node, "to_dataset") and hasattr(node, "children") else node


def read(path):
    """Open a saved run (netCDF4/HDF5, written by either ArviZ line) as this line's native container,
    loaded into memory so the file is closed afterwards."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        if is_datatree_line():
            import xarray as xr
            with xr.open_datatree(str(path)) as dt:
                out = dt.load().copy()
        else:
            out = arviz().from_netcdf(str(path))
            for name in out.groups():
                getattr(out, name).load()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not an ArviZ netCDF file ({type(e).__name__}: {e})") from e
    if "posterior" not in group_names(out):
        raise ValueError(f"{path} has no posterior group (groups: {group_names(out)})")
    return out


def write(idata, path) -> Path:
    """Save ``idata`` to ``path`` (netCDF4/HDF5) atomically: a temporary file next to it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if is_datatree_line():
            idata.to_netcdf(str(tmp), engine="h5netcdf")
        else:  # uncompressed, as 1.x writes: zlib chunks make small runs larger, not smaller
            idata.to_netcdf(str(tmp), engine="h5netcdf", compress=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
def summary(idata, var_names: Optional[Sequence[str]] = None, kind: str = "all", group: str = "posterior"):
    """``az.summary`` as a ``pandas.DataFrame`` (rows = variables); ``kind`` is ``"all"``, ``"stats"``
    or ``"diagnostics"`` on both lines."""
    if kind not in ("all", "stats", "diagnostics"):
        raise ValueError(f"kind must be 'all', 'stats' or 'diagnostics', got {kind!r}")
    return arviz().summary(idata, var_names=list(var_names) if var_names else None, kind=kind, group=group)


def _chains_draws(array) -> np.ndarray:
    arr = np.asarray(array, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"draws must have shape [chains, draws, ...], got {arr.shape}")
    return arr


def rhat(array) -> np.ndarray:
    """Rank-normalised split R-hat (Vehtari et al. 2021) of ``array [chains, draws, ...]`` per quantity."""
    az = arviz()
    arr = _chains_draws(array)
    ds = az.convert_to_dataset({"x": arr})
    return np.asarray(az.rhat(ds)["x"].values)


def ess(array, method: str = "bulk") -> np.ndarray:
    """Effective sample size (``method`` ``"bulk"`` or ``"tail"``) of ``array [chains, draws, ...]``."""
    if method not in ("bulk", "tail"):
        raise ValueError(f"method must be 'bulk' or 'tail', got {method!r}")
    az = arviz()
    arr = _chains_draws(array)
    ds = az.convert_to_dataset({"x": arr})
    return np.asarray(az.ess(ds, method=method)["x"].values)


def _log_lik(idata, var_name: Optional[str]) -> np.ndarray:
    names = group_names(idata)
    if "log_likelihood" not in names:
        raise ValueError(f"no log_likelihood group (groups: {names}); build it with log_likelihood=True "
                         "and data=(x, y)")
    ds = group(idata, "log_likelihood")
    if var_name is None:
        if len(ds.data_vars) != 1:
            raise ValueError(f"log_likelihood has variables {list(ds.data_vars)}; pass var_name")
        var_name = next(iter(ds.data_vars))
    if var_name not in ds.data_vars:
        raise ValueError(f"log_likelihood has no variable {var_name!r} (it has {list(ds.data_vars)})")
    arr = np.asarray(ds[var_name].values, dtype=np.float64)
    return arr.reshape(arr.shape[0] * arr.shape[1], -1)  # [draws, observations]


def loo(idata, var_name: Optional[str] = None) -> Dict[str, object]:
    """PSIS-LOO (Vehtari, Gelman and Gabry 2017) of the stored log-likelihood, by the line's ``az.loo``:
    ``{"elpd_loo", "se", "p_loo", "n_data_points", "pareto_k" (array), "warning"}``."""
    draws = _log_lik(idata, var_name).shape[0]
    if is_datatree_line() and draws < 25:  # arviz_stats smooths floor(S/5) tail draws and needs 5 of them
        raise ValueError(f"PSIS-LOO needs at least 25 draws on ArviZ 1.x; this run has {draws}")
    res = arviz().loo(idata, pointwise=True, var_name=var_name)
    elpd = getattr(res, "elpd_loo", None)
    if elpd is None:
        elpd = res.elpd
    p = getattr(res, "p_loo", None)
    if p is None:
        p = res.p
    return {"elpd_loo": float(elpd), "se": float(res.se), "p_loo": float(p),
            "n_data_points": int(res.n_data_points), "pareto_k": np.asarray(res.pareto_k).reshape(-1),
            "warning": bool(res.warning)}


def waic(idata, var_name: Optional[str] = None) -> Dict[str, float]:
    """WAIC (Watanabe 2010) on the log scale, from the stored log-likelihood ``ll [S, n]``:

    ``lppd_i = logsumexp_s ll[s, i] − log S``, ``p_i = Var_s ll[s, i]``, ``elpd_waic = Σ_i (lppd_i − p_i)``,
    ``se = sqrt(n · Var_i(lppd_i − p_i))`` (Vehtari, Gelman and Gabry 2017), with the variances taken
    over the draws as ArviZ 0.x's ``az.waic`` takes them (divided by S, not S − 1), so the numbers
    equal that function's. ArviZ 1.x has no WAIC, so it is computed here on both lines:
    ``{"elpd_waic", "se", "p_waic", "n_data_points"}``.
    """
    ll = _log_lik(idata, var_name)
    S, n = ll.shape
    if S < 2:
        raise ValueError("WAIC needs at least two draws")
    m = ll.max(0)
    lppd = m + np.log(np.exp(ll - m).sum(0)) - math.log(S)
    p = ll.var(0)
    pointwise = lppd - p
    return {"elpd_waic": float(pointwise.sum()), "se": float(math.sqrt(n * pointwise.var())),
            "p_waic": float(p.sum()), "n_data_points": int(n)}


# ----------------------------------------------------------------------------------------------------
# plots (matplotlib, written to PNG)
# ----------------------------------------------------------------------------------------------------
def _save(fig, path):
    from .plots import savefig
    savefig(fig, path)


def _figure_of(obj):
    viz = getattr(obj, "viz", None)
    if viz is not None:  # a PlotCollection (1.x): its matplotlib figure
        fig = viz["figure"] if "figure" in getattr(viz, "data_vars", viz) else None
        fig = getattr(fig, "item", lambda: fig)() if fig is not None else None
        if fig is None:
            raise RuntimeError("the ArviZ plot collection holds no matplotlib figure")
        return fig
    return np.ravel(obj)[0].figure  # matplotlib axes (0.x)


def plot_trace(idata, var_names: Sequence[str], path, figsize=None) -> Path:
    """Trace and marginal density per variable (one row each), chains overlaid, saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    az = arviz()
    var_names = list(var_names)
    if is_datatree_line():
        kw = {} if figsize is None else {"figure_kwargs": {"figsize": figsize}}
        out = az.plot_trace_dist(idata, var_names=var_names, compact=True, backend="matplotlib", **kw)
    else:
        out = az.plot_trace(idata, var_names=var_names, compact=True, figsize=figsize)
    _save(_figure_of(out), path)
    return Path(path)


def plot_ppc(idata, path, num_pp_samples: int = 50, seed: int = 0) -> Path:
    """Replicated vs observed data densities (posterior predictive check), saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    az = arviz()
    post = group(idata, "posterior_predictive")
    num_pp_samples = max(1, min(int(num_pp_samples), post.sizes["chain"] * post.sizes["draw"]))
    if is_datatree_line():
        out = az.plot_ppc_dist(idata, num_samples=num_pp_samples, backend="matplotlib")
    else:
        out = az.plot_ppc(idata, num_pp_samples=num_pp_samples, random_seed=seed)
    _save(_figure_of(out), path)
    return Path(path)
