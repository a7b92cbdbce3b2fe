"""fit: schedules, learning, exact resume from a checkpoint, the NaN guard; the CLI and TOML configs."""
import json
import math

import pytest
import torch
import torch.nn as nn

import pyrobnn
from pyrobnn.cli import main as cli
from pyrobnn.cli.config import validate_config
from pyrobnn.inference import TrainingDiverged, fit, latest_checkpoint
from pyrobnn.inference.fit import kl_warmup_schedule, lr_factor_schedule


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _bnn():
    torch.manual_seed(0)
    return pyrobnn.bayesian(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)), dataset_size=96)


def test_schedules():
    kl = kl_warmup_schedule((5, 15))
    assert [kl(e) for e in (0, 4.9, 5, 12.5, 20, 30)] == [0, 0, 0, 0.5, 1, 1]
    assert kl_warmup_schedule(None)(3) == 1.0
    lr = lr_factor_schedule(("linear-decay", 30), 60)
    assert [lr(e) for e in (0, 29, 30, 45, 60)] == [1, 1, 1, 0.5, 0]
    cos = lr_factor_schedule("cosine", 10)
    assert cos(0) == 1 and abs(cos(5) - 0.5) < 1e-12 and abs(cos(10)) < 1e-12
    with pytest.raises(ValueError, match="kl_warmup"):
        kl_warmup_schedule((1, 2, 3))
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor_schedule("step", 10)


def test_fit_learns_and_records_validation():
    x, y = _data()
    bnn = _bnn()
    h = fit(bnn, (x, y), epochs=25, lr=3e-2, batch_size=32, val=(x, y), progress=False, seed=0,
            kl_warmup=(0, 5))
    assert len(h) == 25 and h[0]["kl_weight"] < 1 and h[-1]["kl_weight"] == 1
    assert h[5]["kl_weight"] == 1 and h[-1]["loss"] < 0.8 * h[5]["loss"]  # compare at full KL weight
    assert h[-1]["val_accuracy"] > 0.85
    assert bnn.kl_weight == 1.0


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    x, y = _data()
    full = _bnn()
    fit(full, (x, y), epochs=4, lr=1e-2, batch_size=32, progress=False, seed=1)
    part = _bnn()
    fit(part, (x, y), epochs=2, lr=1e-2, batch_size=32, progress=False, seed=1, checkpoint_dir=tmp_path,
        checkpoint_every=1)
    resumed = _bnn()
    h = fit(resumed, (x, y), epochs=4, lr=1e-2, batch_size=32, progress=False, seed=99,
            checkpoint_dir=tmp_path, resume=True)
    assert len(h) == 4
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    x, y = _data()
    bnn = _bnn()
    fit(bnn, (x, y), epochs=1, lr=1e-2, batch_size=32, progress=False, seed=0, checkpoint_dir=tmp_path)
    good, tensors, meta = latest_checkpoint(tmp_path)
    with torch.no_grad():
        bnn.autoguide.flat.loc[0] = math.nan
    before = bnn.autoguide.flat.rho.detach().clone()
    with pytest.raises(TrainingDiverged, match="became nan at epoch 1, step 1"):
        fit(bnn, (x, y), epochs=2, lr=1e-2, batch_size=32, progress=False, checkpoint_dir=tmp_path)
    assert torch.equal(bnn.autoguide.flat.rho, before)  # no step was taken on the NaN loss
    again, tensors2, _ = latest_checkpoint(tmp_path)
    assert again == good and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)


def test_fit_input_validation():
    x, y = _data()
    with pytest.raises(ValueError, match="epochs"):
        fit(_bnn(), (x, y), epochs=0)
    with pytest.raises(ValueError, match="lr"):
        fit(_bnn(), (x, y), epochs=1, lr=-1.0)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fit(_bnn(), (x, y), epochs=1, resume=True)
    with pytest.raises(TypeError, match="train data"):
        fit(_bnn(), x, epochs=1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        fit(_bnn(), (x, y), epochs=1, optimizer="lbfgs-ish", progress=False)


CFG = """
seed = 0
[data]
name = "digits"
[model]
name = "mlp"
hidden = [16]
[bnn]
prior = {name = "gaussian", scale = 1.0}
[train]
epochs = 2
lr = 0.01
batch_size = 64
kl_warmup = [0, 1]
num_samples = 4
"""


def test_cli_fit_writes_outputs_and_model_reloads(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CFG)
    out = tmp_path / "out"
    assert cli(["fit", str(cfg), "--out", str(out), "--no-progress"]) == 0
    for name in ("metrics.json", "history.csv", "model.safetensors", "learning_curves.png", "reliability.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert 0 <= metrics["ece"] <= 1 and metrics["accuracy"] > 0.3
    bnn = pyrobnn.load(out / "model.safetensors")
    assert bnn.predict(torch.rand(3, 64), 4).shape == (3, 10)
    assert cli(["info", str(out / "model.safetensors")]) == 0
    assert '"kind": "bnn"' in capsys.readouterr().out


@pytest.mark.parametrize("text,msg", [
    ("[train]\nepochs = -1\n", "train.epochs must be a positive integer"),
    ("[train]\nlearning_rate = 1\n", "unknown keys in \\[train\\]"),
    ("[trian]\n", "unknown top-level keys"),
    ("[train]\nkl_warmup = [1]\n", "kl_warmup"),
    ("[bnn]\nprior = 3\n", "bnn.prior must be a name or a table"),
    ("this is = = not toml", "not valid TOML"),
])
def test_cli_bad_configs_get_one_clear_line(tmp_path, capsys, text, msg):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert cli(["fit", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    import re
    assert re.search(msg, err), err


def test_cli_unknown_prior_name(tmp_path, capsys):
    cfg = tmp_path / "p.toml"
    cfg.write_text(CFG.replace('prior = {name = "gaussian", scale = 1.0}', 'prior = "gaussain"'))
    assert cli(["fit", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown prior 'gaussain'" in capsys.readouterr().err


def test_validate_config_defaults():
    cfg = validate_config({})
    assert cfg["train"]["epochs"] == 10 and cfg["bnn"]["guide"] == "mean-field"
