"""Local reparameterisation: same pre-activation moments as weight sampling, lower gradient variance."""
import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
from pyro.infer import TraceMeanField_ELBO

import pyrobnn


def _bnn(layer, lrt, x):
    bnn = pyrobnn.bayesian(nn.Sequential(layer, nn.Flatten()), dataset_size=100, local_reparameterization=lrt,
                           likelihood={"name": "gaussian", "scale": 1.0},
                           guide={"name": "mean-field", "init_scale": 0.3})
    bnn.initialize(x)
    return bnn


def _outputs(bnn, x, n):
    outs = []
    for _ in range(n):
        tr = poutine.trace(bnn.autoguide).get_trace(x)
        outs.append(poutine.replay(bnn._net_only, tr)(x))
    return torch.stack(outs)


@pytest.mark.parametrize("layer_fn,x_shape", [(lambda: nn.Linear(6, 4), (3, 6)),
                                              (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5))])
def test_lrt_preactivation_moments_match_weight_sampling(layer_fn, x_shape):
    torch.manual_seed(0)
    layer = layer_fn()
    x = torch.randn(x_shape)
    lrt, ws = _bnn(layer, True, x), _bnn(layer, False, x)
    ws.load_state_dict(lrt.state_dict())
    assert lrt.autoguide._layout["0.weight"][5] and not ws.autoguide._layout["0.weight"][5]
    with torch.no_grad():
        # LRT: 20000 draws in one batched forward; weight sampling: 3000 guide+network runs
        a, b = lrt.sample_outputs(x, 20000), _outputs(ws, x, 3000)
        # exact moments: mean = xμ + μ_b, var = x²σ² + σ_b²
        loc_w, sd_w = lrt.autoguide.site_params("0.weight")
        loc_b, sd_b = lrt.autoguide.site_params("0.bias")
        f = (lambda inp, w, bb: nn.functional.linear(inp, w, bb)) if isinstance(layer, nn.Linear) else \
            (lambda inp, w, bb: nn.functional.conv2d(inp, w, bb, padding=1))
        mean, var = f(x, loc_w, loc_b).flatten(1), f(x * x, sd_w ** 2, sd_b ** 2).flatten(1)
    # per-element tolerance of 4.5 Monte-Carlo standard errors (mean: sqrt(var/n); var: var·sqrt(2/n));
    # over ≤ 75 outputs a false alarm has probability < 1e-3
    for s in (a, b):
        n = s.shape[0]
        assert ((s.mean(0) - mean).abs() <= 4.5 * (var / n).sqrt() + 1e-4).all()
        assert ((s.var(0) - var).abs() <= 4.5 * var * (2 / n) ** 0.5 + 1e-4).all()


def test_lrt_lowers_gradient_variance():
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    grads = {}
    for lrt in (True, False):
        bnn = pyrobnn.bayesian(net, dataset_size=1000, local_reparameterization=lrt,
                               guide={"name": "mean-field", "init_scale": 0.3})
        bnn.initialize(x)
        if lrt:
            state = bnn.state_dict()
        else:
            bnn.load_state_dict(state)
        elbo, g = TraceMeanField_ELBO(), []
        for _ in range(300):
            loss = elbo.differentiable_loss(bnn.model, bnn.guide, x, y)
            (gl,) = torch.autograd.grad(loss, [bnn.autoguide.flat.loc])
            g.append(gl)
        grads[lrt] = torch.stack(g).var(0).sum()
    assert grads[True] < 0.5 * grads[False], grads


def test_bayesian_layers_compose_in_sequential_and_return_tensors():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    bnn = pyrobnn.bayesian(net, dataset_size=10)
    out = bnn.model(torch.randn(5, 1, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (5, 4)
    assert set(bnn.site_priors) == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_batchnorm_stays_deterministic_unless_selected():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    bnn = pyrobnn.bayesian(net, dataset_size=10)
    assert "1.weight" not in bnn.site_priors
    names = [n for n, _ in bnn.named_parameters()]
    assert "net.1.weight" in names  # trained as an ordinary parameter
    bnn2 = pyrobnn.bayesian(net, dataset_size=10, params=["1.weight"])
    assert "1.weight" in bnn2.site_priors
    x = torch.randn(8, 3)
    tr = poutine.trace(bnn2.model).get_trace(x, torch.randint(0, 2, (8,)))
    assert tr.nodes["1.weight"]["type"] == "sample"


def test_layer_pattern_selection_and_prior_mapping():
    from pyrobnn.models import build
    net = build("lenet5")
    bnn = pyrobnn.bayesian(net, prior={"conv*": {"name": "gaussian", "scale": 0.5}, "*": "gaussian"},
                           layers=["conv*", "fc2"], dataset_size=10)
    assert set(bnn.site_priors) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc2.weight", "fc2.bias"}
    assert bnn.site_priors["conv1.weight"].scale == 0.5
    assert bnn.site_priors["fc2.weight"].scale == 1.0


# ----------------------------------------------------------------------------------------------------
# the classifier's observation distribution (pyrobnn.site_dist.LogitsCategorical)
# ----------------------------------------------------------------------------------------------------
def test_logits_categorical_is_the_categorical_distribution():
    import pyro.distributions as dist

    from pyrobnn.site_dist import LogitsCategorical
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3) * 3
    y = torch.randint(0, 3, (4, 5))
    ours, ref = LogitsCategorical(logits), dist.Categorical(logits=logits)
    assert ours.batch_shape == ref.batch_shape and ours.event_shape == ref.event_shape
    assert torch.allclose(ours.log_prob(y), ref.log_prob(y), atol=1e-6)
    assert torch.allclose(ours.log_prob(y.int()), ref.log_prob(y), atol=1e-6)             # other int dtypes
    assert torch.allclose(ours.log_prob(torch.tensor(1)), ref.log_prob(torch.tensor(1)))  # broadcast value
    assert torch.allclose(ours.probs, ref.probs) and torch.allclose(ours.entropy(), ref.entropy())
    assert ours.expand([2, 4, 5]).log_prob(y).shape == (2, 4, 5)
    support = ours.enumerate_support(expand=False)
    assert torch.allclose(ours.log_prob(support), ref.log_prob(ref.enumerate_support(expand=False)))
    # gradients equal too (the fused cross-entropy backward)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    LogitsCategorical(a).log_prob(y).sum().backward()
    dist.Categorical(logits=b).log_prob(y).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_logits_categorical_log_prob_sum_is_the_summed_log_prob():
    """``log_prob_sum`` (one cross-entropy with reduction="sum", what SG-MCMC's log-joint uses) equals
    Σ log_prob in value and gradient; values it cannot take (floats, a broadcast scalar) give None."""
    import pyro.distributions as dist

    from pyrobnn.site_dist import LogitsCategorical
    torch.manual_seed(1)
    logits = (torch.randn(6, 4, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, 4, (6,))
    fast = LogitsCategorical(logits).log_prob_sum(y)
    ref = dist.Categorical(logits=logits).log_prob(y).sum()
    assert fast.shape == () and abs(fast.item() - ref.item()) < 1e-12
    g_fast, = torch.autograd.grad(fast, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_fast, g_ref, atol=1e-12)
    assert LogitsCategorical(logits).log_prob_sum(y.double()) is None
    assert LogitsCategorical(logits).log_prob_sum(torch.tensor(1)) is None


def test_subsampled_model_checks_the_full_targets_once():
    """With subsample_size the model checks the whole y (a bad label outside the minibatch is still
    caught) and caches the result per tensor version."""
    net = nn.Sequential(nn.Linear(3, 4))
    bnn = pyrobnn.bayesian(net, dataset_size=20, subsample_size=5)
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    tr = poutine.trace(bnn.model).get_trace(x, y)
    idx = tr.nodes["data"]["value"]
    assert torch.equal(tr.nodes["obs"]["value"], y[idx])
    y[7] = 9                                   # in-place edit: a new version is checked again
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\]"):
        bnn.model(x, y)
    with pytest.raises(ValueError, match="targets y have shape"):
        bnn.model(x, torch.randint(0, 4, (19,)))
