"""Feature and unit relevance read off a fitted Bayesian network.

For every weight site of rank ≥ 2 (Linear ``[out, in]``, Conv ``[out, in, *kernel]``) the relevance
of each of its *input units* (dim 1: an input feature, an incoming channel, or a hidden unit of the
previous layer) is one number, larger = more relevant. ``statistic`` chooses it:

* ``"prior-variance"`` — hierarchical ARD with per-input or per-weight precisions only: the posterior
  mean of the prior variance, E[1/α]. With a pyrobnn guide, log α ~ N(m, s²) and
  E[1/α] = exp(−m + s²/2) exactly; with posterior samples (MCMC) the sample mean of 1/α.
* ``"geometric-prior-variance"`` — hierarchical ARD only: exp(−E[log α]) = exp(−m), the posterior
  geometric mean of 1/α. Unlike E[1/α] it does not blow up with the width s of q(log α): the exact
  posterior of α for a group of k weights is Gamma(a + k/2, ·), whose E[1/α] is infinite when
  a + k/2 ≤ 1 (one output, k = 1, e.g. logistic regression) and, in mean-field SVI, a group the data
  do not constrain keeps a broad q(log α) whose exp(s²/2) factor can rank it first.
* ``"second-moment"`` — any prior: E[w²] = μ² + σ². For empirical-Bayes ARD this is exactly the
  fitted per-weight prior variance δ² = μ² + σ² (the empirical-Bayes analogue of E[1/α]).
* ``"squared-mean"`` — any prior: E[w]² = μ², the size of the posterior-mean effect without the
  posterior variance (a weight the data do not pin down has σ² ≈ its prior variance, which inflates
  E[w²] and E[1/α] while μ² stays ≈ 0).

Default ``"second-moment"``: measured on diabetes and breast cancer with 10 added noise columns
(docs/studies/ard_relevance.md) it ranks the noise lowest of the four, and its ranking of a linear
model's inputs matches the classical |coefficient / standard error| ranking, whereas the α-based
statistics rank a noise column first in several runs. The reason: with one weight per group (one
output) α's exact posterior Gamma(a + ½, b + ½E[w²]) hardly moves from its prior unless b ≪ ½E[w²],
and in SVI q(log α) of a group the data do not constrain converges slowly; E[w²] needs neither.

Posterior draws (``samples=``, e.g. NUTS on ``bayesian(..., local_reparameterization=False).model``)
give E[w²] with each weight's full marginal posterior variance. Mean-field VI underestimates that
variance for inputs that are collinear with others (their effect is shared, the data fix only sums of
weights), so its E[w²] ranks them by their conditional effect size and redundant ones fall among
pure-noise inputs. Measured on breast cancer + 10 noise columns: pair AUC 0.875 (mean-field) vs 0.974
(NUTS), same split, prior and noise draws (docs/studies/ard_relevance.md).

Read that variance part with care. It grows with how strongly an input is collinear with the others, whether
or not the input matters. Expanding each input into a correlated basis (x, x², x³) inflates it and makes the
noise columns above rank lower without any new evidence that the real inputs matter. Compare the
``"squared-mean"`` ranking before trusting such a gain (Laplace checks: docs/studies/ard_relevance.md).

Per-weight quantities are averaged over every dim but the input dim (outputs, kernel taps). The
network's input relevance is that of the first weight site in execution order. Which statistic ranks
pure-noise inputs last on real data is measured in docs/studies/ard_relevance.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch.distributions.transforms import AffineTransform, ComposeTransform, ExpTransform, IndependentTransform

from .posterior import DrawSet

__all__ = ["Relevance", "relevance", "plot_relevance", "STATISTICS"]

STATISTICS = ("prior-variance", "geometric-prior-variance", "second-moment", "squared-mean")
_ALPHA_STATISTICS = ("prior-variance", "geometric-prior-variance")
_AXIS_LABELS = {"prior-variance": "E[1/α] (posterior mean of the prior variance)",
                "geometric-prior-variance": "exp(−E[log α]) (posterior geometric-mean prior variance)",
                "second-moment": "E[w²] (mean over outputs)", "squared-mean": "E[w]² (mean over outputs)"}


@dataclass
class Relevance:
    """Relevance scores of a fitted BNN.

    :ivar inputs: ``[in_features]`` (or ``[in_channels]``) relevance of the network's inputs.
    :ivar units: ``{weight site: [in_units]}`` relevance of every layer's input units.
    :ivar methods: ``{weight site: statistic}`` how each entry was computed (see the module doc).
    :ivar input_site: the weight site that consumes the network's inputs.
    """

    inputs: torch.Tensor
    units: Dict[str, torch.Tensor]
    methods: Dict[str, str]
    input_site: str
    extra: Dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.methods[self.input_site]

    def ranks(self, site: Optional[str] = None) -> torch.Tensor:
        """Rank of each input unit, 1 = most relevant: ``[in_units]`` (long)."""
        scores = self.inputs if site is None else self.units[site]
        order = torch.argsort(scores, descending=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(scores) + 1)
        return ranks


def _weight_sites(bnn):
    """Weight sites of rank ≥ 2 in execution order (the guide's prototype trace when it exists)."""
    shapes = {}
    for module in bnn.net.modules():
        for pname, shape in getattr(module, "site_shapes", {}).items():
            if len(shape) >= 2:
                shapes[module.site_name(pname)] = shape
    trace = getattr(bnn.autoguide, "prototype_trace", None)
    order = list(trace.nodes) if trace is not None else list(bnn.site_priors)
    names = [n for n in order if n in shapes] + [n for n in shapes if n not in order]
    return names, shapes


def _per_input(values: torch.Tensor, shape) -> torch.Tensor:
    """Mean over every dim but dim 1 of a tensor broadcastable to ``shape``: ``[shape[1]]``."""
    values = values.expand(shape) if values.shape != shape else values
    dims = [d for d in range(len(shape)) if d != 1]
    return values.mean(dims)


def _alpha_group(prior) -> Optional[str]:
    from .priors.ard import HierarchicalARD
    if isinstance(prior, HierarchicalARD) and prior.group in ("input", "weight"):
        return prior.group
    return None


def _exp_scale(transform) -> Optional[float]:
    """c if ``transform`` is z ↦ c·exp(z) (c > 0; what ``biject_to`` gives for a Gamma's support), else None."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    parts = transform.parts if isinstance(transform, ComposeTransform) else [transform]
    if not parts or not isinstance(parts[0], ExpTransform):
        return None
    c = 1.0
    for t in parts[1:]:
        if not isinstance(t, AffineTransform):
            return None
        loc, scale = torch.as_tensor(t.loc), torch.as_tensor(t.scale)
        if loc.numel() != 1 or scale.numel() != 1 or float(loc) != 0.0 or float(scale) <= 0:
            return None
        c *= float(scale)
    return c


def _inverse_alpha_mean(guide, site, samples):
    if samples is not None:
        return (1.0 / samples[site].double()).mean(0)
    layout = getattr(guide, "_layout", {}).get(site)
    c = _exp_scale(layout.transform) if layout is not None and layout.transform is not None else None
    if c is not None and hasattr(guide, "site_params"):
        # α = c·exp(z), z ~ N(m, s²): E[1/α] = exp(−m + s²/2) / c exactly
        loc, scale = guide.site_params(site)
        return (-loc.double() + 0.5 * scale.double() ** 2).exp() / c
    draws = guide.sample_latents(512)[site]  # other transforms: Monte Carlo
    return (1.0 / draws.double()).mean(0)


def _geometric_inverse_alpha(guide, site, samples):
    if samples is not None:
        return (-samples[site].double().log().mean(0)).exp()
    layout = getattr(guide, "_layout", {}).get(site)
    c = _exp_scale(layout.transform) if layout is not None and layout.transform is not None else None
    if c is not None and hasattr(guide, "site_params"):
        loc, _ = guide.site_params(site)  # α = c·exp(z), z ~ N(m, s²): exp(−E[log α]) = exp(−m) / c
        return (-loc.double()).exp() / c
    draws = guide.sample_latents(512)[site]
    return (-draws.double().log().mean(0)).exp()


def _squared_mean(guide, site, samples):
    if samples is not None:
        return samples[site].double().mean(0) ** 2
    layout = getattr(guide, "_layout", {}).get(site)
    if layout is not None and layout.transform is None and hasattr(guide, "site_params"):
        loc, _ = guide.site_params(site)
        return loc.double() ** 2
    draws = guide.sample_latents(512)[site]
    return draws.double().mean(0) ** 2


def _second_moment(guide, site, samples):
    if samples is not None:
        return (samples[site].double() ** 2).mean(0)
    layout = getattr(guide, "_layout", {}).get(site)
    if layout is not None and layout.transform is None and hasattr(guide, "site_params"):
        loc, scale = guide.site_params(site)
        return loc.double() ** 2 + scale.double() ** 2
    draws = guide.sample_latents(512)[site]
    return (draws.double() ** 2).mean(0)


@torch.no_grad()
def relevance(bnn, samples: Optional[Mapping[str, torch.Tensor]] = None, statistic: str = "second-moment") -> Relevance:
    """Per-input and per-unit relevance of a fitted :class:`~pyrobnn.BNN` (see the module doc).

    :param bnn: a BNN whose guide has been fitted (or at least initialised), or any BNN when
        ``samples`` is given.
    :param samples: optional posterior draws ``{site: [S, *site_shape]}`` (e.g. ``MCMC.get_samples()``)
        or stored draws (a :class:`pyrobnn.posterior.DrawSet`, such as a ``SamplePosterior``); the
        relevance is then computed from them instead of from the guide.
    :param statistic: one of :data:`STATISTICS` (module doc). The α-based ones apply to sites whose
        prior is hierarchical ARD with per-input / per-weight α; other sites fall back to
        ``"second-moment"`` (``"squared-mean"`` is applied to every site).
    :returns: :class:`Relevance` (float64 scores).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"relevance statistic must be one of {', '.join(STATISTICS)}; got {statistic!r}")
    if not hasattr(bnn, "site_priors") or not hasattr(bnn, "net"):
        raise TypeError(f"relevance() needs a pyrobnn BNN, got {type(bnn).__name__}")
    guide = bnn.autoguide
    if isinstance(samples, DrawSet):
        samples = samples.get_samples()
    if samples is None:
        if getattr(guide, "prototype_trace", None) is None:
            raise ValueError("the BNN's guide is not initialised; fit it (or call bnn.initialize(x)) first, "
                             "or pass posterior samples")
        if not (hasattr(guide, "site_params") or hasattr(guide, "sample_latents")):
            raise TypeError(f"relevance() reads pyrobnn guides (site_params/sample_latents); "
                            f"{type(guide).__name__} has neither — pass posterior samples instead")
    names, shapes = _weight_sites(bnn)
    if not names:
        raise ValueError("the BNN has no Bayesian weight of rank ≥ 2 (Linear/Conv) to read relevance from")
    units, methods = {}, {}
    for site in names:
        shape = shapes[site]
        group = _alpha_group(bnn.site_priors.get(site))
        if samples is not None and group is not None and f"{site}.alpha" not in samples:
            group = None
        # the statistic this site gets: α-based ones only where there are per-input/per-weight α
        stat = statistic
        if stat in _ALPHA_STATISTICS and group is None:
            stat = "second-moment"
        if stat in _ALPHA_STATISTICS:
            read = _inverse_alpha_mean if stat == "prior-variance" else _geometric_inverse_alpha
            inv_alpha = read(guide, f"{site}.alpha", samples)
            if group == "input":
                inv_alpha = inv_alpha.reshape((1, shape[1]) + (1,) * (len(shape) - 2))
            units[site], methods[site] = _per_input(inv_alpha, shape), stat
        else:
            if samples is not None and site not in samples:
                raise ValueError(f"samples have no entry for site {site!r}")
            read = _squared_mean if stat == "squared-mean" else _second_moment
            units[site], methods[site] = _per_input(read(guide, site, samples), shape), stat
    return Relevance(inputs=units[names[0]], units=units, methods=methods, input_site=names[0])


def plot_relevance(rel: Relevance, path, feature_names: Optional[Sequence[str]] = None,
                   highlight: Sequence[int] = (), title: Optional[str] = None, site: Optional[str] = None,
                   highlight_label: str = "highlighted"):
    """Horizontal bar chart (log scale) of relevance, most relevant at the top; writes a PNG atomically.

    :param highlight: indices of inputs drawn in a second colour (e.g. known noise features), named
        ``highlight_label`` in the legend.
    :returns: the path written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = (rel.inputs if site is None else rel.units[site]).detach().cpu().double()
    n = len(scores)
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"feature_names has {len(names)} entries but there are {n} inputs")
    order = torch.argsort(scores, descending=True).tolist()
    marked = set(int(i) for i in highlight)
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.22 * n + 1)))
    ax.barh(range(n), [scores[i].item() for i in order],
            color=["C3" if i in marked else "C0" for i in order])
    ax.set_yticks(range(n))
    ax.set_yticklabels([names[i] for i in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    method = rel.methods[site or rel.input_site]
    ax.set_xlabel(_AXIS_LABELS.get(method, method))
    ax.set_title(title or f"relevance of {site or rel.input_site} inputs", fontsize=9)
    if marked:
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color="C0", label="feature"), Patch(color="C3", label=highlight_label)], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
