"""``MeanFieldELBO``: Pyro's ``TraceMeanField_ELBO``, the same estimator with less per-step bookkeeping.

``TraceMeanField_ELBO`` records the guide and the model in two ``pyro.poutine.Trace`` s, then computes the
log-density of *every* site (weight sites included, although their term is replaced by the closed-form KL) and
the guide's score parts, and, with Pyro's validation on (its default), checks every site's shape and registers
NaN/inf hooks on every log-density. On a small network that bookkeeping, not the tensor work, is most of a
step: for LeNet-300-100 at batch 128 it is about 2.5 ms of a 12 ms step on a 2-core AMD EPYC, and Pyro's own
step on a model with the same seven sites and almost no tensor work costs as much (``benchmarks/step_cost.py``,
row "Pyro floor").

:class:`MeanFieldELBO` computes the same ELBO — each observed site's scaled log-density, minus each latent
site's scaled KL(q‖p) (or log p − log q where no closed form is registered), minus the log-density of
auxiliary guide sites — from one lightweight record of each run, and only the terms the ELBO uses. Loss values
and gradients are those of ``TraceMeanField_ELBO`` for the same random draws (tests/test_elbo.py checks both on
``bnn.model``, on hand-written models and on ``random_module`` models). It is a drop-in for
``pyro.infer.SVI``::

    svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 1e-3}), pyrobnn.inference.MeanFieldELBO())

Validation. With Pyro's validation on, the first step — and every step whose sites (names, shapes, observed
or not) differ from those already validated — is checked exactly as ``TraceMeanField_ELBO`` checks it
(model/guide site match, site shapes, the mean-field and reparameterisation requirements, NaN/inf
log-densities); every step checks that the sites are the validated ones and warns on a NaN loss. A model whose
structure never changes (a network) is therefore fully checked once, not every step.

Falls back to ``TraceMeanField_ELBO`` itself for what it does not cover: ``vectorize_particles=True`` and
``GuideMessenger`` guides.
"""
from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan
from torch.distributions.kl import kl_divergence

__all__ = ["MeanFieldELBO"]


class _Record(Messenger):
    """The sample sites of one run, by name (the live message dicts); with ``replay``, every latent site
    named there takes its value (and ``infer``) from it, as ``poutine.replay`` does."""

    def __init__(self, replay=None):
        super().__init__()
        self.replay = replay
        self.sites = {}
        self.params = False

    def _pyro_sample(self, msg):
        if self.replay is None or msg["is_observed"]:
            return
        site = self.replay.get(msg["name"])
        if site is not None:
            if site["is_observed"]:
                raise RuntimeError(f"site {msg['name']} must be sampled in trace")
            msg["done"] = True
            msg["value"] = site["value"]
            msg["infer"] = site["infer"]

    def _pyro_post_sample(self, msg):
        name = msg["name"]
        if name in self.sites:
            raise RuntimeError(f"Multiple sample sites named '{name}'")
        self.sites[name] = msg

    def _pyro_param(self, msg):
        self.params = True


def _log_prob_sum(site) -> torch.Tensor:
    """A site's scaled, masked log-density summed, as ``Trace.compute_log_prob`` computes it."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"]).sum()


def _signature(sites) -> tuple:
    # torch.Size is a tuple: hashable and compared by value as it is
    return tuple([(name, site["is_observed"], getattr(site["value"], "shape", None)) for name, site in sites.items()])


class MeanFieldELBO(TraceMeanField_ELBO):
    """``pyro.infer.TraceMeanField_ELBO`` without traces: the same loss and gradients, evaluated from one record of
    the guide's and one of the model's sample sites (see the module doc). Same constructor arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._validated = set()

    # -- one particle ----------------------------------------------------------------------------------------
    def _fast(self, guide) -> bool:
        return not self.vectorize_particles and not isinstance(poutine.unwrap(guide), Messenger)

    def _run(self, model, guide, args, kwargs):
        with _Record() as g:
            guide(*args, **kwargs)
        with _Record(replay=g.sites) as m:
            model(*args, **kwargs)
        if is_validation_enabled():
            key = (_signature(g.sites), _signature(m.sites))
            if key not in self._validated:
                self._validate(g.sites, m.sites)
                self._validated.add(key)
        return m, g

    def _validate(self, guide_sites, model_sites):
        """The checks ``TraceMeanField_ELBO`` runs on every step, on traces rebuilt from the records."""
        traces = []
        for sites in (model_sites, guide_sites):
            trace = poutine.Trace()
            for name, site in sites.items():
                trace.add_node(name, **site.copy())
            traces.append(trace)
        model_trace, guide_trace = traces
        check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = poutine.util.prune_subsample_sites(guide_trace)
        model_trace = poutine.util.prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                check_site_shape(site, self.max_plate_nesting)
        _check_mean_field_requirement(model_trace, guide_trace)
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                check_fully_reparametrized(site)

    @staticmethod
    def _elbo(model_sites, guide_sites):
        """The particle's ELBO, term for term as ``TraceMeanField_ELBO._differentiable_loss_particle``."""
        elbo = 0
        for name, model_site in model_sites.items():
            if site_is_subsample(model_site):
                continue
            if model_site["is_observed"]:
                elbo = elbo + _log_prob_sum(model_site)
                continue
            guide_site = guide_sites[name]
            try:
                kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:
                elbo = elbo + _log_prob_sum(model_site) - _log_prob_sum(guide_site)
                continue
            kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
            if torch.is_tensor(kl_qp):
                kl_qp_sum = kl_qp.sum()
            else:
                kl_qp_sum = kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
            elbo = elbo - kl_qp_sum
        for name, guide_site in guide_sites.items():
            if name not in model_sites and not site_is_subsample(guide_site):
                if not guide_site["infer"].get("is_auxiliary"):
                    raise ValueError(f"guide site {name!r} is not in the model and not marked is_auxiliary")
                elbo = elbo - _log_prob_sum(guide_site)
        return elbo

    # -- the ELBO interface ----------------------------------------------------------------------------------
    def loss(self, model, guide, *args, **kwargs):
        if not self._fast(guide):
            return super().loss(model, guide, *args, **kwargs)
        loss = 0.0
        with torch.no_grad():
            for _ in range(self.num_particles):
                m, g = self._run(model, guide, args, kwargs)
                loss = loss - torch_item(self._elbo(m.sites, g.sites)) / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if not self._fast(guide):
            return super().differentiable_loss(model, guide, *args, **kwargs)
        loss = 0.0
        surrogate_loss = 0.0
        for _ in range(self.num_particles):
            m, g = self._run(model, guide, args, kwargs)
            elbo = self._elbo(m.sites, g.sites)
            surrogate_loss += -elbo / self.num_particles
            loss += -torch_item(elbo) / self.num_particles
        warn_if_nan(surrogate_loss, "loss")
        return loss + (surrogate_loss - torch_item(surrogate_loss))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if not self._fast(guide):
            return super().loss_and_grads(model, guide, *args, **kwargs)
        loss = 0.0
        for _ in range(self.num_particles):
            m, g = self._run(model, guide, args, kwargs)
            elbo = self._elbo(m.sites, g.sites)
            loss += -torch_item(elbo) / self.num_particles
            surrogate = -elbo
            if (m.params or g.params) and getattr(surrogate, "requires_grad", False):
                (surrogate / self.num_particles).backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss
