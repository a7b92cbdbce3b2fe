"""examples/sparse_vd.py: the frozen-mask phase's options (mask threshold, distillation from the
sparse-VD posterior predictive) — tags, the distillation target, the mask kept frozen. Small and fast."""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrobnn
from pyrobnn import sparsity
from pyrobnn.data import ArrayLoader
from pyrobnn.inference import distillation_loss

from _examples import load_example


@pytest.fixture(scope="module")
def svd():
    return load_example("sparse_vd")


def _args(svd, argv):
    ns = {}
    parser_args = ["run", "--model", "lenet300", "--method", "svd"] + argv
    orig = svd.cmd_run
    try:
        svd.cmd_run = lambda a: ns.setdefault("a", a)
        svd.main(parser_args)
    finally:
        svd.cmd_run = orig
    return ns["a"]


def test_default_frozen_phase_options_keep_the_reference_tags(svd):
    assert svd._tag(_args(svd, ["--epochs", "60"])) == "lenet300-svd-fashion_mnist-cliphi8-e60"
    assert (svd._tag(_args(svd, ["--finetune-epochs", "20", "--kl-hold", "0", "--kl-ramp", "5"]))
            == "lenet300-svd-fashion_mnist-kl0+5-cliphi8-ft20-e60")
    # a deterministic run has no log α: no clip suffix (its checkpoint path stays the documented one)
    assert svd._tag(_args(svd, ["--method", "det"])) == "lenet300-det-fashion_mnist-e60"


def test_a_seed_other_than_0_gets_its_own_tag(svd):
    # a seed-1 run must not resume (and report) seed 0's checkpoint
    assert svd._tag(_args(svd, ["--method", "det", "--seed", "1"])) == "lenet300-det-fashion_mnist-seed1-e60"
    assert svd._tag(_args(svd, ["--seed", "0"])) == "lenet300-svd-fashion_mnist-cliphi8-e60"


def test_changed_frozen_phase_options_get_tag_suffixes(svd):
    a = _args(svd, ["--finetune-epochs", "10", "--threshold", "2.5", "--finetune-objective", "distill",
                    "--distill-temperature", "2", "--distill-label-weight", "0.5"])
    assert svd._tag(a) == "lenet300-svd-fashion_mnist-cliphi8-ft10-thr2.5-distT2s32lw0.5-e60"
    with pytest.raises(SystemExit):   # distillation needs a frozen-mask phase
        _args(svd, ["--finetune-objective", "distill"])


def test_target_compression_replaces_the_threshold_in_the_tag_and_sets_the_freeze_threshold(svd):
    a = _args(svd, ["--finetune-epochs", "10", "--target-compression", "45", "--threshold", "1.5"])
    assert svd._tag(a) == "lenet300-svd-fashion_mnist-cliphi8-ft10-cmp45-e60"
    bnn, mask, x, y = _small_sparse_vd()
    svd._set_freeze_threshold(a, bnn)
    kept = sparsity.report(bnn, threshold=a.freeze_threshold)
    assert kept["weights_kept"] == (6 * 5 + 5 * 3) // 45   # one weight of 45
    b = _args(svd, ["--finetune-epochs", "10", "--threshold", "1.5"])
    svd._set_freeze_threshold(b, bnn)
    assert b.freeze_threshold == 1.5
    with pytest.raises(SystemExit):
        _args(svd, ["--target-compression", "0.5"])


def test_cached_predictive_as_logits_gives_the_library_distillation_objective():
    torch.manual_seed(0)
    S, B, C, T = 5, 7, 4, 2.5
    draws, student = torch.randn(S, B, C) * 3, torch.randn(B, C)
    log_p = torch.logsumexp(F.log_softmax(draws / T, -1), 0) - torch.log(torch.tensor(float(S)))
    direct = distillation_loss(draws, student, temperature=T)
    cached = distillation_loss(T * log_p, student, temperature=T)
    assert torch.allclose(direct, cached, atol=1e-6)


def test_distilled_frozen_mask_phase_keeps_the_mask_and_the_data_order(svd, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    bnn = pyrobnn.sparsity.sparse_vd_from_pretrained(net, dataset_size=40, init_log_sigma2=-10.0)
    bnn.initialize(x[:2])
    g = bnn.autoguide
    with torch.no_grad():
        g.flat.log_sigma2.uniform_(-6.0, 6.0)   # some weights above the threshold, some below
    mask = sparsity.masks(bnn, threshold=1.0)
    assert 0 < sum(int(m.sum()) for m in mask.values()) < sum(m.numel() for m in mask.values())
    pruned = sparsity.export(bnn, mask=mask)
    loader = ArrayLoader(x, y, batch_size=8, seed=3)
    a = argparse.Namespace(finetune_epochs=2, epochs=5, finetune_lr=1e-2, finetune_objective="distill",
                           distill_temperature=2.0, distill_samples=4, distill_label_weight=0.5, seed=0,
                           threshold=1.0)
    # the index loader sees the same batches as the data loader
    index_loader = ArrayLoader(x, torch.arange(40), batch_size=8, seed=3)
    for e in (3, 4):
        loader.set_epoch(e)
        index_loader.set_epoch(e)
        for (xb, yb), (xi, ib) in zip(loader.batches(), index_loader.batches()):
            assert torch.equal(xb, xi) and torch.equal(yb, y[ib])
    out, hist, teacher = svd._finetune_frozen_mask(a, bnn, pruned, mask, loader, x, y, tmp_path)
    assert len(hist) == 2 and [r["epoch"] for r in hist] == [4, 5]
    assert set(teacher) >= {"test_error", "train_error_T", "samples", "temperature"}
    params = dict(out.named_parameters())
    for name, keep in mask.items():
        assert torch.all(params[name][~keep] == 0)
    # teacher targets are reproducible (own seed): the same cache twice
    t1 = svd._teacher_log_probs(bnn, x, 4, 2.0, seed=11)
    t2 = svd._teacher_log_probs(bnn, x, 4, 2.0, seed=11)
    assert torch.equal(t1, t2) and torch.allclose(t1.exp().sum(-1), torch.ones(40), atol=1e-5)


def test_validation_holds_out_a_fixed_part_of_the_training_set(svd, monkeypatch):
    a = _args(svd, ["--validation", "--dataset", "mnist5k", "--seed", "1"])
    assert svd._tag(a) == "lenet300-svd-mnist5k-val-cliphi8-seed1-e60"
    monkeypatch.setattr(svd, "VALIDATION_SIZE", 500)
    x_tr, y_tr, x_ev, y_ev = svd._data(a)
    full = svd._data(_args(svd, ["--dataset", "mnist5k"]))
    assert len(x_ev) == 500 and len(x_tr) == len(full[0]) - 500
    # the held-out images come from the training set and none of them is trained on (an image that occurs
    # twice among the training digits may sit on both sides)
    from collections import Counter
    counts = Counter(tuple(r.tolist()) for r in full[0].flatten(1))
    kept_rows = {tuple(r.tolist()) for r in x_tr.flatten(1)}
    ev_rows = [tuple(r.tolist()) for r in x_ev.flatten(1)]
    assert all(counts[r] >= 1 for r in ev_rows)
    assert all(r not in kept_rows for r in ev_rows if counts[r] == 1)
    # the split is the same for another seed (one fixed validation set for every recipe)
    x2 = svd._data(_args(svd, ["--validation", "--dataset", "mnist5k"]))[2]
    assert torch.equal(x2, x_ev)
    monkeypatch.setattr(svd, "VALIDATION_SIZE", 5000)
    with pytest.raises(SystemExit, match="--validation needs more than"):
        svd._data(a)


def _small_sparse_vd(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    bnn = pyrobnn.sparsity.sparse_vd_from_pretrained(net, dataset_size=40, init_log_sigma2=-10.0)
    bnn.initialize(x[:2])
    with torch.no_grad():
        bnn.autoguide.flat.log_sigma2.uniform_(-6.0, 6.0)
    mask = sparsity.masks(bnn, threshold=1.0)
    return bnn, mask, x, y


def _frozen_args(**kw):
    base = dict(finetune_epochs=4, epochs=6, finetune_lr=1e-2, finetune_objective="data", distill_temperature=1.0,
                distill_samples=4, distill_label_weight=0.0, seed=0, threshold=1.0, finetune_noise=False,
                finetune_weight_decay=0.0, finetune_average=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_new_frozen_phase_options_get_tag_suffixes(svd):
    a = _args(svd, ["--finetune-epochs", "20", "--finetune-weight-decay", "0.05", "--finetune-average",
                    "--finetune-noise"])
    assert svd._tag(a) == "lenet300-svd-fashion_mnist-cliphi8-ft20-noise-wd0.05-swa-e60"
    assert svd._tag(_args(svd, ["--finetune-epochs", "20"])) == "lenet300-svd-fashion_mnist-cliphi8-ft20-e60"


def test_weight_averaging_reports_the_mean_of_the_decay_half_end_of_epoch_weights(svd, tmp_path, monkeypatch):
    bnn, mask, x, y = _small_sparse_vd()
    plain = svd._finetune_frozen_mask(_frozen_args(), bnn, sparsity.export(bnn, mask=mask), mask,
                                      ArrayLoader(x, y, batch_size=8, seed=3), x, y, tmp_path)[0]
    # record the end-of-epoch weights of an averaged run (same data order and start): epochs 2 and 3 of 4
    seen = []
    orig = svd._error

    def spy(net, *args, **kw):
        seen.append({n: p.detach().clone() for n, p in net.named_parameters()})
        return orig(net, *args, **kw)
    monkeypatch.setattr(svd, "_error", spy)
    out, hist, _ = svd._finetune_frozen_mask(_frozen_args(finetune_average=True), bnn,
                                             sparsity.export(bnn, mask=mask), mask,
                                             ArrayLoader(x, y, batch_size=8, seed=3), x, y, tmp_path)
    assert [r.get("averaged_epochs") for r in hist] == [None, None, 1, 2]
    # the last iterate is the plain run's network; the reported one is the mean of epochs 3 and 4's weights
    assert torch.allclose(seen[3]["3.weight"], plain[3].weight)
    for n, p in out.named_parameters():
        assert torch.allclose(p, (seen[2][n] + seen[3][n]) / 2, atol=1e-7)
        assert torch.all(p[~mask[n]] == 0)
    assert "test_error_last_iterate" in hist[-1]


def test_posterior_noise_hooks_add_the_frozen_posterior_variance_in_training_only(svd):
    bnn, mask, x, _ = _small_sparse_vd()
    pruned = sparsity.export(bnn, mask=mask)
    keep = {n: m.float() for n, m in mask.items()}
    clean = pruned(x).detach()
    handles = svd._posterior_noise_hooks(bnn, pruned, keep)
    pruned.eval()
    assert torch.equal(pruned(x), clean)                      # evaluation uses θ
    pruned.train()
    # first layer's pre-activation: mean θx + b, variance Σ x² α θ² + α_b b² (Monte Carlo over 20,000 draws)
    lin = pruned[1]
    alpha_w = sparsity.log_alpha(bnn, "1.weight").exp() * keep["1.weight"]
    alpha_b = sparsity.log_alpha(bnn, "1.bias").exp() * keep["1.bias"]
    xi = x[:1].expand(20000, -1)
    draws = lin(xi).detach()
    want_var = (xi[:1] ** 2) @ (alpha_w * lin.weight ** 2).T + alpha_b * lin.bias ** 2
    assert torch.allclose(draws.mean(0), (xi[:1] @ lin.weight.T + lin.bias)[0], atol=4 * (want_var[0] / 20000).sqrt().max() + 1e-6)
    assert torch.allclose(draws.var(0), want_var[0].detach(), rtol=0.05, atol=1e-6)
    for h in handles:
        h.remove()
    assert torch.equal(pruned(x), clean)


def test_weight_decay_shrinks_the_kept_weights_and_keeps_the_mask(svd, tmp_path):
    bnn, mask, x, y = _small_sparse_vd()
    norms = {}
    for wd in (0.0, 5.0):
        out = svd._finetune_frozen_mask(_frozen_args(finetune_weight_decay=wd), bnn, sparsity.export(bnn, mask=mask),
                                        mask, ArrayLoader(x, y, batch_size=8, seed=3), x, y, tmp_path)[0]
        norms[wd] = sum(float(p.pow(2).sum()) for p in out.parameters())
        for n, p in out.named_parameters():
            assert torch.all(p[~mask[n]] == 0)
    assert norms[5.0] < 0.9 * norms[0.0]
