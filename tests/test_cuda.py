"""The core paths on a GPU: an SVI step, an SGLD step, predict, save → load, distillation. Marked ``cuda``: they run
when ``torch.cuda.is_available()`` and are skipped otherwise (``pytest -m cuda`` selects only them).

On the GPU the speed tricks of :mod:`pyrobnn.fastpath` are not taken (the reference path runs); that choice is
checked on the CPU by tests/test_fastpath.py. Each test here compares the GPU result with what the same code
computes on the CPU where the computation is deterministic, and checks finiteness and shapes where it draws."""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

import pyrobnn
from pyrobnn.inference import SGLD, MeanFieldELBO, distill
from pyrobnn.models import build

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEV = torch.device("cuda")


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return x, (x[:, 0] > 0).long()


def _bnn(x):
    bnn = pyrobnn.bayesian(build("mlp", in_features=5, out_features=2, hidden=(16,)), dataset_size=len(x))
    bnn.initialize(x)
    return bnn


def test_svi_step_and_predict_on_the_gpu():
    x, y = _data()
    bnn = _bnn(x).to(DEV)
    assert all(p.device.type == "cuda" for p in bnn.parameters())
    svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 1e-2}), MeanFieldELBO())
    losses = [svi.step(x.to(DEV), y.to(DEV)) for _ in range(60)]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-10:]) < sum(losses[:10])
    probs = bnn.predict(x.to(DEV), num_samples=8)
    assert probs.device.type == "cuda" and probs.shape == (64, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(64, device=DEV), atol=1e-5)


def test_fit_on_the_gpu():
    x, y = _data()
    bnn = _bnn(x).to(DEV)
    hist = pyrobnn.inference.fit(bnn, (x.to(DEV), y.to(DEV)), epochs=5, lr=1e-2, batch_size=32, progress=False)
    assert len(hist.records) == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist.records)


def test_sgld_step_on_the_gpu_is_the_cpu_update():
    """The SGLD update is deterministic given the noise: the GPU step from the same state with the noise drawn on
    the CPU equals the CPU step."""
    X = torch.randn(20, 2)
    Y = X @ torch.tensor([1.0, -0.5]) + 0.1 * torch.randn(20)

    def model(X, Y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, device=X.device), 2.0).to_event(1))
        with pyro.plate("data", len(X)):
            pyro.sample("y", dist.Normal(X @ w, 0.5), obs=Y)

    results = []
    for device in ("cpu", "cuda"):
        k = SGLD(model, step_size=0.01)
        k.setup(0, X.to(device), Y.to(device))
        potential, (grad,) = k.potential_and_grad({"w": torch.tensor([0.3, -0.2], device=device)},
                                                  X.to(device), Y.to(device))
        results.append((potential.cpu(), grad.cpu()))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


def test_save_load_identical_predictions_on_the_gpu(tmp_path):
    x, y = _data()
    bnn = _bnn(x).to(DEV)
    pyrobnn.save(bnn, tmp_path / "m.safetensors")
    back = pyrobnn.load(tmp_path / "m.safetensors").to(DEV)
    preds = []
    for b in (bnn, back):
        pyro.set_rng_seed(3)
        preds.append(b.predict(x.to(DEV), num_samples=4))
    assert torch.equal(preds[0], preds[1])


def test_distill_on_the_gpu():
    x, y = _data()
    bnn = _bnn(x).to(DEV)
    student = build("mlp", in_features=5, out_features=2, hidden=(8,)).to(DEV)
    student, rec = distill(bnn, student, x.to(DEV), steps=100, batch_size=32, lr=1e-2, seed=0, log_every=50)
    assert next(student.parameters()).device.type == "cuda"
    assert rec.records[-1]["loss"] < rec.records[0]["loss"]
