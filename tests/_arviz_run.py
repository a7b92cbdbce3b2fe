"""A tiny, fully seeded pyrobnn run saved as an ArviZ netCDF file, for the cross-line tests.

``python tests/_arviz_run.py`` writes ``tests/data/arviz<major>_run.nc`` with the installed ArviZ line
(0 under ArviZ 0.x, 1 under 1.x). Both files are committed; the tests open each under whichever line
runs them, so a file written by one line is read by the other.
"""
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
N, IN, HIDDEN, DRAWS, NOISE = 12, 2, 3, 30, 0.3


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, IN, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + NOISE * torch.randn(N, generator=g)
    return x, y


def build(draws=DRAWS):
    """The run: guide draws of a 2-3-1 tanh network, every weight stored whole (no coordinate subset)."""
    import pyrobnn
    torch.manual_seed(0)
    x, y = data()
    net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    bnn = pyrobnn.bayesian(net, likelihood={"name": "gaussian", "scale": NOISE}, dataset_size=N)
    bnn.initialize(x)
    return pyrobnn.to_inference_data(bnn, data=(x, y), test=(x[:4], y[:4]), num_samples=draws, seed=0,
                                     max_coords=64, attrs={"pyrobnn_metrics": {"test_rmse": 0.25}})


def log_lik_by_hand(posterior, x, y):
    """log N(y_n | f(x_n; θ_s), NOISE²) ``[chain, draw, N]`` from the stored weights, in float64."""
    w = {k: torch.as_tensor(posterior[k].values, dtype=torch.float64) for k in ("0.weight", "0.bias",
                                                                            "2.weight", "2.bias")}
    h = torch.tanh(torch.einsum("ni,csji->csnj", x.double(), w["0.weight"]) + w["0.bias"][:, :, None])
    f = torch.einsum("csnj,csoj->csno", h, w["2.weight"]).squeeze(-1) + w["2.bias"]
    return torch.distributions.Normal(f, NOISE).log_prob(y.double())


if __name__ == "__main__":
    from pyrobnn import arviz_compat

    path = DATA / f"arviz{arviz_compat.arviz_major()}_run.nc"
    arviz_compat.write(build(), path)
    print(path, path.stat().st_size, "bytes")
