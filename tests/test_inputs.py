"""Inputs as users have them: integer tokens (nn.Embedding), a tuple of tensors, a dict of tensors —
through bayesian, fit, predict, evaluate, save/load, SGLD sampling, the ArviZ bridge and distillation."""
import pyro
import pytest
import torch
import torch.nn as nn

import pyrobnn
from pyrobnn import inputs
from pyrobnn.inference import fit, sample


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, tokens):               # [B, L] int64
        return self.fc(self.emb(tokens).mean(1))


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(2, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, image, meta):          # two tensors, positional or by keyword
        return self.out(torch.tanh(self.a(image) + self.b(meta)))


def _tokens(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (n, 5), generator=g)
    return x, (x < 10).sum(1).gt(2).long()


def _two(n=48):
    g = torch.Generator().manual_seed(1)
    a, m = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
    return a, m, (a[:, 0] + m[:, 1] > 0).long()


def _roundtrip(bnn, x, tmp_path, net):
    path = tmp_path / "m.safetensors"
    pyrobnn.save(bnn, path)
    loaded = pyrobnn.load(path, net=net)
    torch.manual_seed(5)
    a = bnn.predict(x, 6)
    torch.manual_seed(5)
    b = loaded.predict(x, 6)
    assert torch.equal(a, b)
    return loaded


def test_embedding_network_end_to_end(tmp_path):
    x, y = _tokens()
    bnn = pyrobnn.bayesian(TokenNet(), params=["emb.weight"], dataset_size=len(y))
    assert set(bnn.site_priors) == {"emb.weight", "fc.weight", "fc.bias"}
    hist = fit(bnn, (x, y), epochs=15, lr=0.05, batch_size=16, progress=False, seed=0)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert bnn.input_signature.dtypes == ("int64",)       # tokens stayed integer
    assert bnn.evaluate(x, y, 8)["accuracy"] > 0.7
    loaded = _roundtrip(bnn, x, tmp_path, TokenNet())
    assert loaded.input_signature == bnn.input_signature
    with pytest.raises(TypeError, match=r"x has dtype float32 but the network takes integer inputs \(int64\)"):
        bnn.predict(x.float())
    post = sample(bnn, (x, y), num_samples=3, warmup_steps=5, thin=2, step_size=1e-4, seed=0)
    assert post.predict(x).shape == (len(y), 2)


@pytest.mark.parametrize("as_dict", [False, True])
def test_two_input_network_end_to_end(tmp_path, as_dict):
    a, m, y = _two()
    x = {"image": a, "meta": m} if as_dict else (a, m)
    bnn = pyrobnn.bayesian(TwoInputNet(), dataset_size=len(y))
    hist = fit(bnn, (x, y), epochs=15, lr=0.05, batch_size=16, progress=False, seed=0, val=(x, y))
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["val_accuracy"] > 0.7
    assert bnn.input_signature.kind == ("dict" if as_dict else "tuple")
    # the network saw its inputs as separate arguments: the same as calling the plain network by hand
    p = bnn.predict(x, 4)
    assert p.shape == (len(y), 2) and torch.allclose(p.sum(-1), torch.ones(len(y)))
    _roundtrip(bnn, x, tmp_path, TwoInputNet())
    post = sample(bnn, (x, y), num_samples=3, warmup_steps=5, thin=2, step_size=1e-4, seed=0, eval_x=x)
    assert post.eval_outputs.shape == (1, 3, len(y), 2)
    post.save(tmp_path / "p.safetensors")
    again = type(post).load(tmp_path / "p.safetensors", net=TwoInputNet())
    assert torch.equal(again.predict(x), post.predict(x))
    idata = pyrobnn.to_inference_data(post, data=(x, y))
    assert idata.log_likelihood["obs"].shape[-1] == len(y)
    # SGLD on the model itself: the kernel draws minibatches of structured inputs through the plate
    from pyrobnn.inference import SGLD
    bnn.subsample_size = 8
    mcmc = pyro.infer.MCMC(SGLD(bnn.model, step_size=1e-4), num_samples=3, warmup_steps=2, disable_progbar=True)
    mcmc.run(x, y)
    assert mcmc.get_samples()["out.weight"].shape == (3, 2, 8)


def test_structured_inputs_are_checked_with_clear_errors():
    a, m, y = _two(8)
    bnn = pyrobnn.bayesian(TwoInputNet(), dataset_size=8)
    bnn.predict((a, m))
    with pytest.raises(ValueError, match=r"different numbers of examples"):
        bnn.predict((a, m[:5]))
    with pytest.raises(ValueError, match=r"x\[1\] has per-example shape \(3,\) but the network was built for \(2,\)"):
        bnn.predict((a, a))
    with pytest.raises(ValueError, match=r"x is a dict of tensors .* built for a tuple of 2 tensors"):
        bnn.predict({"image": a, "meta": m})
    with pytest.raises(ValueError, match=r"x\[0\] contains NaN or inf \(first in example 2\)"):
        bnn.predict((a.index_fill(0, torch.tensor([2]), float("nan")), m))
    with pytest.raises(TypeError, match="string keys"):
        inputs.as_inputs({1: a})


def test_integer_features_for_a_linear_network_become_float():
    x = torch.randint(0, 3, (10, 4))
    bnn = pyrobnn.bayesian(nn.Sequential(nn.Linear(4, 2)), dataset_size=10)
    out = bnn.predict(x, 2)
    assert out.shape == (10, 2) and bnn.input_signature.dtypes == ("float32",)
    assert torch.equal(inputs.as_inputs(x.numpy()), x)  # array-likes keep their integer dtype


def test_inputs_helpers_keep_structure():
    a, m, _ = _two(6)
    for x in (a, (a, m), {"image": a, "meta": m}):
        idx = torch.tensor([4, 1])
        got = inputs.index(x, idx)
        assert inputs.batch_size(got) == 2 and inputs.batch_size(inputs.repeat(x, 3)) == 18
        assert all(torch.equal(u, v[idx]) for u, v in zip(inputs.leaves(got), inputs.leaves(x)))
        assert all(torch.equal(u, v) for u, v in zip(inputs.leaves(inputs.concat([inputs.rows(x, 0, 2),
                                                                                    inputs.rows(x, 2, 6)])),
                                                      inputs.leaves(x)))
        sig = inputs.Signature.of(x)
        assert inputs.Signature.from_json(sig.to_json()) == sig
        assert inputs.Signature.of(sig.example(3)) == sig
        stored = inputs.to_tensors(x, "eval_x")
        back = inputs.from_tensors(stored, "eval_x", sig)
        assert type(back) is type(x) and all(torch.equal(u, v) for u, v in zip(inputs.leaves(back), inputs.leaves(x)))
    with pytest.raises(ValueError, match="bad input signature"):
        inputs.Signature.from_json({"kind": "dict", "shapes": [[3]], "dtypes": ["float32"]})


@pytest.mark.filterwarnings("ignore:the fitted predictive")
def test_float64_network_keeps_float64_inputs_through_svi_and_sgld():
    """A network in float64 gets float64 inputs, also before any guide parameter exists (SG-MCMC on a
    fresh BNN, whose weights are all sample sites): float32 inputs are cast up, not the other way."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    bnn = pyrobnn.bayesian(net(), dataset_size=len(y))
    fit(bnn, (x, y), epochs=2, batch_size=8, progress=False)
    assert all(p.dtype == torch.float64 for p in bnn.parameters())
    assert bnn.predict(x.float(), 3).dtype == torch.float64

    chain = pyrobnn.bayesian(net(), dataset_size=len(y))
    assert list(chain.parameters()) == []          # nothing but sample sites yet
    post = sample(chain, (x, y), num_samples=3, warmup_steps=2, step_size=1e-4, batch_size=8, progress=False)
    assert post.predict(x.float(), 3).dtype == torch.float64
