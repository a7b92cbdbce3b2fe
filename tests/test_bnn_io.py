"""save → load → identical predictions; malformed files; every bad input gets a clear error."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import pyrobnn
from pyrobnn.models import build
from pyrobnn.priors import Gaussian


@pytest.fixture
def trained():
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    bnn = pyrobnn.bayesian(build("lenet300"), dataset_size=40)
    from pyrobnn.inference import fit
    fit(bnn, (x, y), epochs=2, lr=1e-2, batch_size=20, progress=False, seed=0)
    return bnn, x, y


def test_save_load_identical_predictions(trained, tmp_path):
    bnn, x, _ = trained
    path = tmp_path / "m.safetensors"
    pyrobnn.save(bnn, path)
    loaded = pyrobnn.load(path)
    torch.manual_seed(3)
    a = bnn.predict(x, num_samples=8)
    torch.manual_seed(3)
    b = loaded.predict(x, num_samples=8)
    assert torch.equal(a, b)
    for k, v in bnn.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_save_load_custom_net_needs_net(tmp_path):
    net = nn.Sequential(nn.Linear(3, 2))
    bnn = pyrobnn.bayesian(net, dataset_size=5, likelihood="gaussian")
    bnn.initialize(torch.randn(2, 3))
    pyrobnn.save(bnn, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="custom network"):
        pyrobnn.load(tmp_path / "c.safetensors")
    loaded = pyrobnn.load(tmp_path / "c.safetensors", net=net)
    assert torch.equal(loaded.likelihood.rho, bnn.likelihood.rho)


def test_saved_file_has_no_pickle_and_foreign_files_are_refused(trained, tmp_path):
    bnn, *_ = trained
    path = tmp_path / "m.safetensors"
    pyrobnn.save(bnn, path)
    raw = path.read_bytes()
    assert b"\x80\x04" not in raw[:2] and b"pickle" not in raw  # safetensors header is JSON
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert json.loads(header["__metadata__"]["pyrobnn"])["spec"]["arch"]["name"] == "lenet300"
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        pyrobnn.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not one written by pyrobnn"):
        pyrobnn.load(tmp_path / "foreign.safetensors")
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError):
        pyrobnn.load(torn)
    # flip one payload byte: checksum catches it
    bad = bytearray(raw)
    bad[-5] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        pyrobnn.load(tmp_path / "flip.safetensors")


def test_save_before_initialisation_is_refused(tmp_path):
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(3, 2)), dataset_size=5)
    with pytest.raises(ValueError, match="not been initialised"):
        pyrobnn.save(bnn, tmp_path / "x.safetensors")


# -- bad input ---------------------------------------------------------------------------------------
@pytest.fixture
def small():
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(4, 3)), dataset_size=10)
    bnn.initialize(torch.randn(2, 4))
    return bnn


def test_nan_and_inf_inputs(small):
    x = torch.randn(5, 4)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match="x contains NaN or inf .*example 2"):
        small.model(x, torch.zeros(5, dtype=torch.long))
    x[2, 1] = math.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        small.predict(x)


def test_nan_targets_and_out_of_range_labels(small):
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 2\]"):
        small.model(x, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="class labels"):
        small.model(x, torch.tensor([0, -1, 2, 1, 0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        small.model(x, torch.tensor([0.0, math.nan, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="non-integer"):
        small.model(x, torch.tensor([0.5, 1.0, 1.0, 1.0, 0.0]))
    reg = pyrobnn.bayesian(nn.Sequential(nn.Linear(4, 1)), likelihood="gaussian", dataset_size=10)
    with pytest.raises(ValueError, match="NaN or inf"):
        reg.model(x, torch.tensor([0.0, math.inf, 1.0, 1.0, 0.0]))


def test_shape_mismatches(small):
    with pytest.raises(ValueError, match=r"per-example shape \(5,\) but the network was built for \(4,\)"):
        small.model(torch.randn(3, 5))
    with pytest.raises(ValueError, match="targets y have shape"):
        small.model(torch.randn(3, 4), torch.zeros(4, dtype=torch.long))
    fresh = pyrobnn.bayesian(nn.Sequential(nn.Linear(4, 3)), dataset_size=10)
    with pytest.raises(ValueError, match="cannot run on inputs of per-example shape"):
        fresh.model(torch.randn(3, 7))


def test_dataset_size_checks(small):
    with pytest.raises(ValueError, match=r"dataset_size \(10\) is smaller than the batch \(12"):
        small.model(torch.randn(12, 4))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="dataset_size"):
            pyrobnn.bayesian(nn.Sequential(nn.Linear(4, 3)), dataset_size=bad)
    from pyrobnn.inference import fit
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(4, 3)), dataset_size=5)
    with pytest.raises(ValueError, match="smaller than the training set"):
        fit(bnn, (torch.randn(20, 4), torch.zeros(20, dtype=torch.long)), epochs=1, progress=False)


def test_unknown_names_and_invalid_prior_parameters():
    net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="unknown prior 'gausian'; known priors: .*gaussian"):
        pyrobnn.bayesian(net, prior="gausian")
    with pytest.raises(ValueError, match="unknown guide 'mean_fieldz'"):
        pyrobnn.bayesian(net, guide="mean_fieldz")
    with pytest.raises(ValueError, match="unknown likelihood"):
        pyrobnn.bayesian(net, likelihood="poisson-ish")
    with pytest.raises(ValueError, match="Gaussian prior scale must be a positive finite number, got -1.0"):
        Gaussian(scale=-1.0)
    with pytest.raises(ValueError, match="scale must be a positive finite number, got inf"):
        pyrobnn.bayesian(net, prior={"name": "gaussian", "scale": math.inf})
    with pytest.raises(TypeError, match="Gaussian prior scale must be a positive finite number, got 'big'"):
        Gaussian(scale="big")
    with pytest.raises(ValueError, match="bad arguments for prior 'gaussian'"):
        pyrobnn.bayesian(net, prior={"name": "gaussian", "sigma": 1.0})
    with pytest.raises(ValueError, match="no prior pattern"):
        pyrobnn.bayesian(net, prior={"conv*": "gaussian"})
    with pytest.raises(ValueError, match="no module of the network matched"):
        pyrobnn.bayesian(net, layers="conv*")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pyrobnn.bayesian(lambda x: x)


def test_numpy_inputs_are_accepted(small):
    x = np.random.randn(3, 4).astype(np.float32)
    out = small.model(x, np.array([0, 1, 2]))
    assert out.shape == (3, 3)
