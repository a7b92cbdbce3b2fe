"""Tests for pyrobnn.inference.tta: batched augmentation, per-draw vs classic TTA, calibrated NLL,
greedy policy search, policy JSON, mean embeddings and the linear probe. Tiny nets, synthetic images."""
import json
import math

import pytest
import torch
import torch.nn as nn

import pyrobnn
from pyrobnn.metrics import calibrated_nll, fit_temperature, nll
from pyrobnn.inference.tta import (OPS, AugmentedLoader, Draws, Policy, SubPolicy, Transform, default_policy,
                                   embeddings, greedy_policy_search, linear_probe, member_outputs, sample_pool,
                                   tta_predict)

from _examples import load_example


def _images(n=6, size=8, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


class _Recorder:
    """A 'draw' that records its inputs and returns fixed logits computed from them."""

    def __init__(self, k=3):
        self.seen = []
        self.w = torch.linspace(-1, 1, 64 * k).reshape(64, k)

    def __call__(self, x):
        self.seen.append(x.clone())
        return x.flatten(1) @ self.w


def _blob_data(n, seed):
    """8×8 images whose class (0–3) is the quadrant holding a faint 3×3 blob under strong noise (hard
    enough that the calibrated NLL is far from 0 and augmentations change it)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=g)
    x = 0.8 * torch.rand(n, 1, 8, 8, generator=g)
    for c, (r, col) in enumerate(((1, 1), (1, 4), (4, 1), (4, 4))):
        x[y == c, :, r:r + 3, col:col + 3] += 0.3
    return x.clamp(0, 1), y


def _blob_draws(S, seed=0):
    """S linear classifiers: quadrant templates plus per-draw noise (an 'ensemble')."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.zeros(4, 1, 8, 8)
    for c, (r, col) in enumerate(((0, 0), (0, 4), (4, 0), (4, 4))):
        templates[c, :, r:r + 4, col:col + 4] = 1.0
    members = []
    for _ in range(S):
        w = (templates + 0.3 * torch.randn(templates.shape, generator=g)).flatten(1).T * 0.8
        members.append(lambda x, w=w: x.flatten(1) @ w)
    return Draws(members)


# ---------------------------------------------------------------------------------------------------
# transforms and policies
# ---------------------------------------------------------------------------------------------------
def test_identity_and_flip_are_exact():
    x = _images()
    assert torch.equal(SubPolicy().apply(x), x)
    flipped = SubPolicy((Transform("hflip", 0.0, 1.0),)).apply(x)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    # magnitude 0 geometric ops compose to the identity matrix: one interpolation at pixel centres
    still = SubPolicy((Transform("rotate", 0.0), Transform("translate_x", 0.0), Transform("zoom", 0.0))).apply(x)
    torch.testing.assert_close(still, x, atol=1e-5, rtol=0)
    # flip twice (composed into one matrix) is the identity
    twice = SubPolicy((Transform("hflip", 0.0, 1.0), Transform("hflip", 0.0, 1.0))).apply(x)
    torch.testing.assert_close(twice, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_is_per_image_random_and_in_range(name):
    # the same image repeated 32 times: a per-image random op gives different copies (ops with a
    # deterministic effect still differ through the per-image application probability)
    x = _images(1, 16).expand(32, 1, 16, 16).contiguous()
    g = torch.Generator().manual_seed(1)
    out = SubPolicy((Transform(name, 0.8, 0.5),)).apply(x, g)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    distinct = torch.unique(out.flatten(1).round(decimals=5), dim=0).shape[0]
    assert distinct >= 2, f"{name}: all 32 copies identical"


def test_transform_validation():
    with pytest.raises(ValueError, match="unknown transform"):
        Transform("warp_drive")
    with pytest.raises(ValueError, match="magnitude"):
        Transform("rotate", 1.5)
    with pytest.raises(ValueError, match="probability"):
        Transform("rotate", 0.5, -0.1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        SubPolicy().apply(torch.rand(8, 8))
    with pytest.raises(ValueError, match="at least one"):
        Policy([])


def test_policy_augment_assigns_sub_policies_by_copy():
    x = _images(5)
    pol = Policy([SubPolicy(), SubPolicy((Transform("hflip", 0.0, 1.0),))])
    out = pol.augment(x, 4)
    assert out.shape == (4, 5, 1, 8, 8)
    assert torch.equal(out[0], x) and torch.equal(out[2], x)  # copies 0, 2: identity
    torch.testing.assert_close(out[1], x.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[3], x.flip(-1), atol=1e-5, rtol=0)
    out = pol.augment(x, 2, sub_policy_index=torch.tensor([1, 1]))
    torch.testing.assert_close(out[0], x.flip(-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sub_policy_index"):
        pol.augment(x, 2, sub_policy_index=torch.tensor([0, 2]))


def test_saved_policy_reloads_identically(tmp_path):
    pool = sample_pool(6, torch.Generator().manual_seed(3))
    pol = Policy(pool[1:4] + [pool[1]])  # repeats allowed
    path = tmp_path / "policy.json"
    pol.save(path)
    back = Policy.load(path)
    assert back == pol
    assert back.to_json() == pol.to_json()
    assert [s.transforms for s in back] == [s.transforms for s in pol]
    # same policy + same seed -> the same augmented images
    x = _images(4)
    a = pol.augment(x, 4, torch.Generator().manual_seed(9))
    b = back.augment(x, 4, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    d = json.loads(path.read_text())
    assert d["format"] == "pyrobnn.tta.policy" and len(d["sub_policies"]) == 4
    assert all(2 <= len(s) <= 3 for s in d["sub_policies"])
    d["sub_policies"][0][0]["op"] = "nope"
    with pytest.raises(ValueError, match="unknown transform"):
        Policy.from_dict(d)
    with pytest.raises(ValueError, match="not a pyrobnn TTA policy"):
        Policy.from_json('{"sub_policies": []}')


def test_sample_pool_shapes_and_seed():
    a = sample_pool(10, torch.Generator().manual_seed(0))
    b = sample_pool(10, torch.Generator().manual_seed(0))
    c = sample_pool(10, torch.Generator().manual_seed(1))
    assert a == b and a != c
    assert len(a) == 10 and len(a[0]) == 0  # identity first
    for sub in a[1:]:
        assert 2 <= len(sub) <= 3
        names = [t.name for t in sub.transforms]
        assert len(set(names)) == len(names)
        assert all(0 <= t.magnitude <= 1 and 0.5 <= t.probability <= 1 for t in sub.transforms)


# ---------------------------------------------------------------------------------------------------
# per-draw vs classic TTA
# ---------------------------------------------------------------------------------------------------
def _seen_per_draw(mode, seed, S=4, A=3):
    recs = [_Recorder() for _ in range(S)]
    x = _images(5)
    logits = member_outputs(Draws(recs), x, default_policy(), A, mode, torch.Generator().manual_seed(seed))
    assert logits.shape == (S, A if mode != "none" else 1, 5, 3)
    return [r.seen[0].reshape(-1, 5, 1, 8, 8) for r in recs], logits


def test_per_draw_augmentation_differs_across_draws_and_is_seeded():
    seen, logits = _seen_per_draw("per-draw", seed=0)
    for s in range(len(seen)):
        for t in range(s + 1, len(seen)):
            assert not torch.allclose(seen[s], seen[t]), f"draws {s} and {t} saw the same augmentations"
    # the augmentations of one draw differ from each other too
    assert not torch.allclose(seen[0][0], seen[0][1])
    again, logits2 = _seen_per_draw("per-draw", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(seen, again))
    assert torch.equal(logits, logits2)
    other, _ = _seen_per_draw("per-draw", seed=1)
    assert not torch.allclose(seen[0], other[0])


def test_classic_augmentation_is_shared_by_all_draws():
    seen, _ = _seen_per_draw("classic", seed=0)
    assert all(torch.equal(seen[0], s) for s in seen[1:])
    assert not torch.allclose(seen[0][0], seen[0][1])  # but the A copies differ
    none, _ = _seen_per_draw("none", seed=0)
    assert all(torch.equal(s[0], _images(5)) for s in none)


def test_tta_predict_is_the_mean_of_member_softmaxes():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(64, 3)) for _ in range(3)]
    x = _images(7)
    draws = Draws.from_ensemble(nets)
    probs = tta_predict(draws, x, mode="none")
    manual = torch.stack([torch.softmax(n(x), -1) for n in nets]).mean(0)
    torch.testing.assert_close(probs, manual.detach(), atol=1e-6, rtol=0)
    # per-draw with A copies: the same as averaging the recorded logits' softmaxes
    logits = member_outputs(draws, x, default_policy(), 2, "per-draw", torch.Generator().manual_seed(0))
    probs = tta_predict(draws, x, default_policy(), 2, "per-draw", torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs, torch.softmax(logits, -1).mean((0, 1)), atol=1e-6, rtol=0)
    # chunking does not change the result under a fixed seed when the chunk covers the batch
    again = tta_predict(draws, x, default_policy(), 2, "per-draw", torch.Generator().manual_seed(0), chunk_size=100)
    assert torch.equal(probs, again)


def _tiny_bnn():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    bnn = pyrobnn.bayesian(net, prior="gaussian", guide="mean-field", likelihood="categorical", dataset_size=20)
    bnn.initialize(_images(2))
    return bnn


def test_bnn_weight_draws_are_fixed_networks_and_distinct():
    bnn = _tiny_bnn()
    draws = Draws.from_bnn(bnn, 3, generator=torch.Generator().manual_seed(0))
    x = _images(5)
    outs = [draws[s](x) for s in range(3)]
    assert all(torch.equal(o, draws[s](x)) for s, o in enumerate(outs))  # a weight draw is deterministic
    assert not torch.allclose(outs[0], outs[1])
    # the same draw through the library's own path: outputs_under_draws with the same latents
    from pyrobnn.diagnostics import outputs_under_draws
    latents = bnn.autoguide.sample_latents(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.stack(outs), outputs_under_draws(bnn, latents, x), atol=1e-5, rtol=1e-5)
    same = Draws.from_bnn(bnn, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same[2](x), outs[2])
    local = Draws.from_bnn(bnn, 2, mode="local")
    assert local[0](x).shape == (5, 4)
    with pytest.raises(ValueError, match="mode"):
        Draws.from_bnn(bnn, 2, mode="nope")


def test_sample_posterior_draws_plug_in():
    from pyrobnn.inference import SamplePosterior
    bnn = _tiny_bnn()
    latents = bnn.autoguide.sample_latents(6, generator=torch.Generator().manual_seed(1))
    post = SamplePosterior(bnn, {k: v.unsqueeze(0) for k, v in latents.items()})
    x = _images(4)
    draws = Draws.from_posterior(post, num_samples=3)
    assert len(draws) == 3
    ref = post.sample_outputs(x, num_samples=3)
    torch.testing.assert_close(torch.stack([draws[s](x) for s in range(3)]), ref, atol=1e-5, rtol=1e-5)
    probs = tta_predict(draws, x, default_policy(), 2, "per-draw", torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# calibrated NLL
# ---------------------------------------------------------------------------------------------------
def _logits_with_optimal_temperature_one(n, k, seed):
    """Logits for which T = 1 minimises the NLL of every single example, hence of every subset: the
    label's logit equals its softmax-weighted mean of the logits, d/dβ NLL(β) = E_p[ℓ] − ℓ_y = 0 at β = 1
    (NLL(β) = logsumexp(βℓ) − βℓ_y is convex in β = 1/T)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, generator=g, dtype=torch.double)
    y = torch.randint(k, (n,), generator=g)
    lo, hi = logits.min(1).values, logits.max(1).values
    rows = torch.arange(n)
    for _ in range(200):  # bisection on the label's logit t: g(t) = t − E_softmax[ℓ] is increasing
        t = (lo + hi) / 2
        logits[rows, y] = t
        p = torch.softmax(logits, -1)
        gap = t - (p * logits).sum(-1)
        lo, hi = torch.where(gap < 0, t, lo), torch.where(gap < 0, hi, t)
    return logits, y


def test_calibrated_nll_equals_nll_when_best_temperature_is_one():
    logits, y = _logits_with_optimal_temperature_one(400, 10, 0)
    probs = torch.softmax(logits, -1)
    assert abs(fit_temperature(probs.log(), y) - 1.0) < 1e-4
    for seed in (0, 1, 2):  # any split: each half has its optimum at T = 1
        assert calibrated_nll(probs, y, seed) == pytest.approx(nll(probs, y), abs=1e-7)
    # over-confident predictions (logits × 2): the calibrated NLL is far below the raw NLL, and equals
    # the NLL at T = 1 of the original logits (the fitted T is 2). (A factor 3 pushes probabilities
    # below the 1e-12 clamp of the metric, which changes the optimum by ~3e-5.)
    hot = torch.softmax(2 * logits, -1)
    assert calibrated_nll(hot, y) < nll(hot, y) - 0.1
    assert calibrated_nll(hot, y) == pytest.approx(nll(probs, y), abs=1e-6)


def test_calibrated_nll_is_split_fit_and_swap():
    # reimplement the definition: temperature fitted on one half, NLL on the other, swapped, averaged
    g = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(300, 5, generator=g)
    y = torch.randint(5, (300,), generator=g)
    probs = torch.softmax(logits, -1)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(7))
    a, b = perm[:150], perm[150:]
    lp = probs.log()
    ref = 0.0
    for fit_idx, ev_idx in ((a, b), (b, a)):
        t = fit_temperature(lp[fit_idx], y[fit_idx])
        ref += nn.functional.cross_entropy(lp[ev_idx] / t, y[ev_idx]).item() / 2
    assert calibrated_nll(probs, y, seed=7) == pytest.approx(ref, abs=1e-7)


# ---------------------------------------------------------------------------------------------------
# greedy policy search
# ---------------------------------------------------------------------------------------------------
def _search(pool, max_size=4, S=3):
    x, y = _blob_data(120, 0)
    return greedy_policy_search(_blob_draws(S), x, y, pool, max_policy_size=max_size,
                                generator=torch.Generator().manual_seed(0)), x, y


def test_greedy_search_never_adds_a_sub_policy_that_lowers_the_objective():
    pool = [SubPolicy(),
            SubPolicy((Transform("hflip", 0.0, 1.0), Transform("solarize", 1.0, 1.0))),  # destroys the class
            SubPolicy((Transform("translate_x", 0.3, 1.0), Transform("brightness", 0.3, 1.0))),
            SubPolicy((Transform("cutout", 1.0, 1.0), Transform("rotate", 1.0, 1.0), Transform("gamma", 1.0)))]
    pool += sample_pool(6, torch.Generator().manual_seed(2), include_identity=False)
    res, x, y = _search(pool, max_size=8)
    assert 2 <= len(res.chosen) <= 8 and len(res.policy) == len(res.chosen)
    # strictly increasing objective; each pick is the best candidate of its step
    assert all(b > a for a, b in zip(res.objective, res.objective[1:]))
    for step, j in enumerate(res.chosen):
        assert res.candidates[step][j] == max(res.candidates[step])
        assert res.objective[step] == res.candidates[step][j]
    if len(res.chosen) < 8:  # stopped early: nothing would have raised the objective
        assert max(res.candidates[len(res.chosen)]) <= res.objective[-1]
    assert 1 not in res.chosen  # the flip+solarize sub-policy maps every class to another
    # the objective is −calibrated NLL of the mean of the chosen entries' predictives: recompute it
    draws = _blob_draws(3)
    g = torch.Generator().manual_seed(0)
    pool_probs = [tta_predict(draws, x, Policy([s]), 1, "per-draw", g) for s in pool]
    for k in range(1, len(res.chosen) + 1):
        mix = torch.stack([pool_probs[j].double() for j in res.chosen[:k]]).mean(0).float()
        assert -calibrated_nll(mix, y) == pytest.approx(res.objective[k - 1], abs=1e-6)


def test_greedy_search_stops_when_repeating_gives_nothing():
    # identity only, deterministic draws: adding it again leaves the predictive unchanged -> stop at 1
    res, _, _ = _search([SubPolicy()], max_size=5)
    assert res.chosen == [0] and "no candidate improves" in res.stopped
    assert res.candidates[1][0] == pytest.approx(res.objective[0], abs=1e-9)


def test_greedy_search_validation():
    x, y = _blob_data(10, 0)
    with pytest.raises(ValueError, match="pool"):
        greedy_policy_search(_blob_draws(2), x, y, [])
    with pytest.raises(ValueError, match="y_val"):
        greedy_policy_search(_blob_draws(2), x, y[:5], [SubPolicy()])


# ---------------------------------------------------------------------------------------------------
# mean embeddings and the linear probe
# ---------------------------------------------------------------------------------------------------
def test_mean_embeddings_average_hooked_activations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    draws = Draws.from_ensemble([net])
    x = _images(6)
    central = embeddings(draws, "1", x)
    torch.testing.assert_close(central, net[1](x.flatten(1)).detach())
    central_in = embeddings(draws, "3", x, capture="input")
    torch.testing.assert_close(central_in, net[:3](x).detach())
    pol = default_policy()
    mean = embeddings(draws, "1", x, pol, 4, generator=torch.Generator().manual_seed(0))
    xa = pol.augment(x, 4, torch.Generator().manual_seed(0))  # the same random stream
    manual = torch.stack([net[1](xa[a].flatten(1)) for a in range(4)]).mean(0)
    torch.testing.assert_close(mean, manual.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mean, central, atol=1e-3)
    with pytest.raises(ValueError, match="no module"):
        embeddings(draws, "fc9", x)


def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(3, 6, generator=g)
    y = torch.randint(3, (300,), generator=g)
    f = centers[y] + torch.randn(300, 6, generator=g)
    r = linear_probe(f[:200], y[:200], f[200:], y[200:])
    assert r["accuracy"] > 0.95
    assert r["probs"].shape == (100, 3)
    noise = linear_probe(torch.randn(200, 6, generator=g), y[:200], torch.randn(100, 6, generator=g), y[200:])
    assert noise["accuracy"] < 0.6 and noise["calibrated_nll"] > math.log(3) - 0.15


def test_augmented_loader_is_reproducible_and_resumable():
    x, y = _blob_data(50, 1)
    a = AugmentedLoader(x, y, default_policy(), batch_size=16, seed=3)
    b = AugmentedLoader(x, y, default_policy(), batch_size=16, seed=3)
    full = list(a.batches())
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(full, b.batches()))
    resumed = list(b.batches(2))
    assert torch.equal(resumed[0][0], full[2][0])
    plain = [xb for xb, _ in pyrobnn.data.ArrayLoader(x, y, batch_size=16, seed=3).batches()]
    assert not torch.allclose(plain[0], full[0][0])  # augmented
    a.set_epoch(1)
    assert not torch.equal(next(iter(a.batches()))[0], full[0][0])


# ---------------------------------------------------------------------------------------------------
# the Fashion-MNIST example's resumable training and result cache
# ---------------------------------------------------------------------------------------------------
def _example_module():
    return load_example("tta_fashion")


def _tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))


def test_example_deterministic_training_resumes_exactly(tmp_path):
    """Killed after epoch 1 of 3 and re-run: the same weights as the uninterrupted 3 epochs (cosine lr)."""
    ex = _example_module()
    x, y = _blob_data(80, 2)

    def run(epochs, ckpt):
        net = _tiny_net(0)
        return ex.train_deterministic(net, AugmentedLoader(x, y, default_policy(), batch_size=16, seed=5), epochs,
                                      1e-2, 5, "cosine", ckpt, None, "t")

    whole = run(3, None)
    ckpt = str(tmp_path / "m.safetensors")
    # a 3-epoch run stopped after its first epoch, as a kill would: train with the 3-epoch schedule but
    # raise once the first checkpoint exists
    orig = ex.write_state

    def write_then_stop(path, tensors, meta):
        orig(path, tensors, meta)
        raise KeyboardInterrupt

    ex.write_state = write_then_stop
    with pytest.raises(KeyboardInterrupt):
        run(3, ckpt)
    ex.write_state = orig
    resumed = run(3, ckpt)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    fresh_from_ckpt = _tiny_net(1)  # different init, overwritten by the checkpoint (epoch 3 = done)
    done = ex.train_deterministic(fresh_from_ckpt, AugmentedLoader(x, y, default_policy(), batch_size=16, seed=5),
                                  3, 1e-2, 5, "cosine", ckpt)
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), done.parameters()))


def test_example_stage_cache_computes_each_row_once(tmp_path):
    ex = _example_module()
    calls = []
    path = str(tmp_path / "eval.json")
    s = ex.Stages(path)
    assert s.get("bnn/none", lambda: calls.append(1) or {"accuracy": 0.5}) == {"accuracy": 0.5}
    again = ex.Stages(path)  # a re-run reads the finished row instead of recomputing it
    assert again.get("bnn/none", lambda: calls.append(2) or {"accuracy": 0.0}) == {"accuracy": 0.5}
    assert calls == [1]
