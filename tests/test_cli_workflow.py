"""The whole workflow from configs, end to end through the command line on sklearn's digits:
fit → report → distill, and sample (pSGLD, two chains) → report; the assertions read the files' contents."""
import json

import numpy as np
import pytest
import torch
import xarray as xr

from pyrobnn.cli import main
from pyrobnn.data import load_digits
from pyrobnn.io import read_state

CONFIG = """
seed = 3
[data]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[train]
epochs = 4
lr = 0.02
num_samples = 8
[sample]
kernel = "psgld"
step_size = 1e-3
num_samples = 4
warmup_steps = 60
thin = 5
num_chains = 2
"""

DISTILL = """
seed = 0
[student]
name = "mlp"
hidden = [32]
[distill]
epochs = 8
lr = 0.01
num_samples = 8
[evaluate]
num_samples = 8
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("workflow")
    (d / "run.toml").write_text(CONFIG)
    (d / "distill.toml").write_text(DISTILL)
    return d


def _group(path, name):
    with xr.open_dataset(path, group=name) as ds:
        return ds.load()


def test_fit_then_report_then_distill(workdir, capsys):
    run = workdir / "fit"
    assert main(["fit", str(workdir / "run.toml"), "--out", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.8
    record = json.loads((run / "run.json").read_text())
    assert record["command"] == "fit" and record["config"]["model"]["hidden"] == [32]
    assert len(record["fingerprint"]) == 64

    # the ArviZ file: 64 guide draws, predictions on the first 256 held-out images
    nc = run / "inference_data.nc"
    pred, const = _group(nc, "predictions"), _group(nc, "predictions_constant_data")
    p = pred["p_test"].values
    assert p.shape == (1, 64, 256, 10) and np.allclose(p.sum(-1), 1, atol=1e-4)
    y = const["y_test"].values
    assert np.array_equal(y, load_digits(seed=0).y_test[:256].numpy())
    acc = float((p.mean((0, 1)).argmax(-1) == y).mean())
    assert abs(acc - metrics["test"]["accuracy"]) < 0.08
    post = _group(nc, "posterior")
    assert post.sizes["draw"] == 64 and json.loads(post.attrs["pyrobnn_metrics"]) == metrics["test"]

    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "1 chain(s) × 64 draws" in page and "Function-space convergence" in page
    assert f"<td>accuracy</td><td>{metrics['test']['accuracy']:.4g}</td>" in page
    assert (run / "report" / "reliability.png").stat().st_size > 1000

    student = workdir / "student"
    assert main(["distill", str(workdir / "distill.toml"), "--teacher", str(run), "--out", str(student)]) == 0
    result = json.loads((student / "metrics.json").read_text())
    teacher_row = next(v for k, v in result["test"].items() if k.startswith("teacher"))
    assert result["test"]["student"]["accuracy"] > 0.7
    assert abs(teacher_row["accuracy"] - metrics["test"]["accuracy"]) < 0.05
    from pyrobnn.inference import load_student
    net, meta = load_student(student / "student.safetensors")
    assert meta["teacher"] == str(run) and meta["data"]["name"] == "digits"   # data taken from the run
    ds = load_digits(seed=0)
    with torch.no_grad():
        acc = (net(ds.x_test).argmax(-1) == ds.y_test).float().mean().item()
    assert acc == pytest.approx(result["test"]["student"]["accuracy"], abs=1e-6)


def test_sample_then_report(workdir, capsys):
    run = workdir / "sgld"
    assert main(["sample", str(workdir / "run.toml"), "--out", str(run), "--no-progress"]) == 0
    assert sorted(p.name for p in (run / "chains").iterdir()) == ["chain-000.safetensors", "chain-001.safetensors"]
    from pyrobnn.inference import SamplePosterior
    post = SamplePosterior.load(run / "posterior.safetensors")
    assert (post.num_chains, post.num_draws) == (2, 4)
    assert post.config["kernel"] == "PSGLD" or "psgld" in json.dumps(post.config).lower()
    # the two chains are different chains (seeded apart), each the chain file's draws
    c0, _ = read_state(run / "chains" / "chain-000.safetensors")
    w = next(k for k in post.draws if k.endswith("weight"))
    assert torch.equal(post.draws[w][0], c0[f"draw/{w}"][0]) and not torch.equal(post.draws[w][0], post.draws[w][1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_chains"] == 2 and metrics["draws_per_chain"] == 4
    ds = load_digits(seed=0)
    torch.manual_seed(3)
    assert post.evaluate(ds.x_test, ds.y_test)["accuracy"] == pytest.approx(metrics["test"]["accuracy"])

    nc = run / "inference_data.nc"
    posterior = _group(nc, "posterior")
    assert (posterior.sizes["chain"], posterior.sizes["draw"]) == (2, 4)
    assert _group(nc, "predictions")["p_test"].shape == (2, 4, 256, 10)
    assert "step_size" in _group(nc, "sample_stats")

    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "2 chain(s) × 4 draws" in page and "Function-space convergence" in page
