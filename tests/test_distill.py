"""Distillation (inference/distill/) and the ``pyrobnn distill`` command."""
import copy
import gc
import json
import math
import warnings

import pyro
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrobnn
from pyrobnn.inference import (MCDropout, SGLDChain, distill, distillation_loss, evaluate_distillation, load_student,
                               sample, save_student, train_deterministic)
from pyrobnn.inference.distill import Adversarial, Deterministic, as_teacher, student_predictive
from pyrobnn.models import build


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny networks: a second intra-op thread only adds synchronisation, badly so on a shared machine
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _softmax_teacher(seed=0, d=5, c=3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(d, c)
    with torch.no_grad():
        net.weight.copy_(scale * torch.randn(c, d, generator=g))
        net.bias.copy_(torch.randn(c, generator=g))
    return net


def _regression_bnn(n=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5])[:d] + 0.3 * torch.randn(n, generator=g)
    bnn = pyrobnn.bayesian(build("mlp", in_features=d, out_features=1, hidden=(8,)), prior="gaussian",
                           likelihood={"name": "gaussian", "scale": "latent"}, dataset_size=n)
    return bnn, x, y


# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------
def test_classification_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    teacher = _softmax_teacher()
    x = torch.randn(50, 5)
    with torch.no_grad():
        logits = teacher(x)
        for T in (1.0, 3.0):
            assert distillation_loss(logits, copy.deepcopy(teacher)(x), temperature=T).item() == pytest.approx(0, abs=1e-6)
            other = logits + 0.3 * torch.randn_like(logits)
            assert distillation_loss(logits, other, temperature=T).item() > 1e-3
        # an ensemble: the student that outputs log p̄ is exact, any single member is not
        draws = logits + torch.randn(7, 50, 3)
        log_p_bar = torch.logsumexp(draws.log_softmax(-1), 0) - math.log(7)
        assert distillation_loss(draws, log_p_bar).item() == pytest.approx(0, abs=1e-6)
        assert distillation_loss(draws, draws[0]).item() > 1e-2


def test_classification_loss_is_korattikaras_average_kl_up_to_a_constant():
    """T² KL(p̄_T ‖ q_T) = mean_s KL(p_s ‖ q) − mean_s KL(p_s ‖ p̄) (same gradients), and ×T²."""
    torch.manual_seed(1)
    draws, student = torch.randn(5, 20, 4), torch.randn(20, 4)
    for T in (1.0, 2.5):
        p = (draws / T).softmax(-1)
        log_q = (student / T).log_softmax(-1)
        p_bar = p.mean(0)
        kl_q = (p * (p.log() - log_q)).sum(-1).mean(0)
        kl_bar = (p * (p.log() - p_bar.log())).sum(-1).mean(0)
        expected = (T ** 2) * (kl_q - kl_bar).mean()
        assert distillation_loss(draws, student, temperature=T).item() == pytest.approx(expected.item(), rel=1e-5)


def test_regression_loss_is_the_gaussian_nll_against_draws_minus_its_minimum():
    torch.manual_seed(2)
    S, B = 6, 30
    means, noise_var = torch.randn(S, B), 0.1 + torch.rand(S)
    mu, log_var = torch.randn(B), torch.randn(B)
    # E_s E_{y ~ N(m_s, v_s)} [−log N(y; μ, σ²)] in closed form, averaged over draws
    var = log_var.exp()
    nll = (0.5 * torch.log(2 * math.pi * var) + ((means - mu) ** 2 + noise_var[:, None]) / (2 * var)).mean(0)
    v_bar = means.var(0, unbiased=False) + noise_var.mean()
    minimum = 0.5 * torch.log(2 * math.pi * math.e * v_bar)
    out = torch.stack([mu, log_var], -1)
    assert distillation_loss(means, out, "regression", noise_variance=noise_var).item() == \
        pytest.approx((nll - minimum).mean().item(), rel=1e-5)
    # zero exactly at the predictive mean and total variance, positive elsewhere
    exact = torch.stack([means.mean(0), v_bar.log()], -1)
    assert distillation_loss(means, exact, "regression", noise_variance=noise_var).item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(means, exact + torch.tensor([0.1, 0.0]), "regression", noise_variance=noise_var).item() > 1e-4
    assert distillation_loss(means, exact + torch.tensor([0.0, 0.2]), "regression", noise_variance=noise_var).item() > 1e-4


def test_loss_validates_its_inputs():
    with pytest.raises(ValueError, match="task"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), task="ranking")
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="classes"):
        distillation_loss(torch.randn(4, 2, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        distillation_loss(torch.randn(4, 2), torch.randn(2, 3), task="regression")


# ----------------------------------------------------------------------------------------------------
# reaching a known teacher
# ----------------------------------------------------------------------------------------------------
def test_student_reaches_a_fixed_softmax_teacher_on_held_out_inputs():
    teacher = _softmax_teacher()
    student = nn.Linear(5, 3)
    unlabelled = torch.randn(2000, 5, generator=torch.Generator().manual_seed(3))
    before = F.kl_div(student(torch.randn(500, 5)).log_softmax(-1), teacher(torch.randn(500, 5)).softmax(-1),
                      reduction="batchmean").item()
    student, record = distill(teacher, student, unlabelled, steps=800, batch_size=100, lr=0.1,
                              lr_schedule="cosine", seed=0, log_every=500)
    held_out = torch.randn(1000, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        p, q = teacher(held_out).softmax(-1), student(held_out).softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert before > 0.1 and kl < 1e-5                        # measured 1.6e-9
    assert (p - q).abs().max().item() < 1e-3
    assert record.records[-1]["loss"] < 1e-4 * record.records[0]["loss"]
    assert record.config["cache_teacher"] is True and record.teacher_draws_stored == 0


def test_heterogeneous_student_with_temperature_and_noisy_inputs():
    """A deeper teacher into a smaller student: the student's T = 1 predictive approaches the teacher's."""
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    student = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(1000, 4)
    held = torch.randn(500, 4)
    with torch.no_grad():
        p = teacher(held).softmax(-1)
        kl0 = (p * (p.log() - student(held).log_softmax(-1))).sum(-1).mean().item()
    student, rec = distill(teacher, student, x, steps=800, batch_size=100, lr=1e-2, temperature=2.0,
                           input_noise=0.1, seed=0)
    assert rec.config["cache_teacher"] is False          # noisy inputs: the teacher runs every batch
    with torch.no_grad():
        kl = (p * (p.log() - student(held).log_softmax(-1))).sum(-1).mean().item()
    assert kl < 0.1 * kl0


def test_regression_student_matches_mc_dropout_predictive_mean_and_variance():
    torch.manual_seed(6)
    teacher_net = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 1))
    teacher = MCDropout(teacher_net, task="regression", noise_variance=0.05)
    x = torch.linspace(-2, 2, 400)[:, None]
    student = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    student, _ = distill(teacher, student, x, steps=800, batch_size=100, lr=5e-3, num_samples=32,
                         lr_schedule="cosine", seed=0)
    held = torch.linspace(-1.9, 1.9, 50)[:, None]
    outs, _ = teacher.sample(held, 4000)
    m_true, v_true = outs.squeeze(-1).mean(0), outs.squeeze(-1).var(0) + 0.05
    mean, var = student_predictive(student, held, "regression")
    assert (mean - m_true).abs().max().item() < 0.15 * m_true.abs().max().item() + 0.05
    assert ((var / v_true).log().abs().mean().item()) < 0.25         # variance within ~25 % on average
    assert teacher_net.training                                      # MC dropout left the net's mode alone


# ----------------------------------------------------------------------------------------------------
# teachers
# ----------------------------------------------------------------------------------------------------
def test_mc_dropout_draws_vary_and_zero_dropout_is_deterministic():
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    x = torch.randn(5, 3)
    d = MCDropout(net).draws(x, 8)
    assert d.logits.shape == (8, 5, 2) and d.logits.std(0).min() > 0
    net[2].p = 0.0
    d0 = MCDropout(net).draws(x, 4)
    net.eval()
    assert torch.allclose(d0.logits, net(x).expand(4, 5, 2))
    assert isinstance(as_teacher(net), MCDropout) and isinstance(as_teacher(nn.Linear(2, 2)), Deterministic)


def test_guide_sample_posterior_and_mcmc_teachers_give_the_posterior_predictive():
    bnn, x, y = _regression_bnn()
    pyrobnn.inference.fit(bnn, (x, y), epochs=30, lr=0.03, batch_size=32, progress=False, seed=0)
    t = as_teacher(bnn)
    d = t.draws(x[:10], 16)
    assert d.mean.shape == (16, 10) and d.noise_var.shape == (16, 1) and (d.noise_var > 0).all()

    post = sample(bnn, (x, y), num_samples=12, warmup_steps=50, thin=2, step_size=1e-3, batch_size=32, seed=0)
    ts = as_teacher(post, generator=torch.Generator().manual_seed(0))
    assert ts.stored_draws == 12
    d = ts.draws(x[:10], None)
    mean, var = post.predict(x[:10])
    from pyrobnn.inference.distill import _aggregate
    m_bar, v_bar = _aggregate(d, "regression", 1.0)
    assert torch.allclose(m_bar, mean, atol=1e-5) and torch.allclose(v_bar, var, rtol=1e-4)
    assert ts.draws(x[:10], 5).mean.shape == (5, 10)

    bnn.subsample_size = 16
    kernel = pyrobnn.inference.SGLD(bnn.model, step_size=1e-3, thin=1)
    mcmc = pyro.infer.MCMC(kernel, num_samples=6, warmup_steps=10, disable_progbar=True)
    mcmc.run(x, y)
    bnn.subsample_size = None
    tm = as_teacher(mcmc)
    assert tm.stored_draws == 6 and tm.draws(x[:4], None).mean.shape == (6, 4)
    student, rec = distill(mcmc, build("mlp", in_features=3, out_features=2, hidden=(8,)), x, steps=20,
                           batch_size=32, seed=0)
    assert rec.config["teacher"] == "SampleTeacher" and math.isfinite(rec.records[-1]["loss"])


def test_bernoulli_teacher_and_one_logit_student():
    torch.manual_seed(7)
    x = torch.randn(80, 2)
    y = (x[:, 0] > 0).float()
    bnn = pyrobnn.bayesian(build("mlp", in_features=2, out_features=1, hidden=(8,)), likelihood="bernoulli",
                           dataset_size=80)
    pyrobnn.inference.fit(bnn, (x, y), epochs=20, lr=0.05, batch_size=40, progress=False, seed=0)
    student, rec = distill(bnn, build("mlp", in_features=2, out_features=1, hidden=(8,)), x, steps=300,
                           batch_size=40, lr=1e-2, seed=0, log_every=100)
    assert rec.records[-1]["loss"] < rec.records[0]["loss"]
    probs = student_predictive(student, x, "classification")
    assert probs.shape == (80, 2) and torch.allclose(probs.sum(-1), torch.ones(80))


# ----------------------------------------------------------------------------------------------------
# online (running chain)
# ----------------------------------------------------------------------------------------------------
def _live_tensor_bytes():
    """Bytes of all live tensors (a callback that kept one clone of the state per step makes this grow by
    168 bytes a step here: 42 000 from step 150 to 400, checked)."""
    gc.collect()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # isinstance() on deprecated torch.distributed objects warns
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor):
                try:
                    total += o.numel() * o.element_size()
                except RuntimeError:
                    pass
    return total


def test_online_mode_never_stores_teacher_draws_and_memory_stays_flat():
    bnn, x, y = _regression_bnn()
    chain = SGLDChain(bnn, (x, y), "sgld", step_size=1e-3, batch_size=16, burn_in=20, seed=0)
    live = {}

    def probe(step, teacher, student, record):
        if step in (50, 150, 400):
            live[step] = _live_tensor_bytes()

    student, rec = distill(chain, build("mlp", in_features=3, out_features=2, hidden=(8,)), x, steps=400,
                           batch_size=16, input_noise=0.1, seed=0, log_every=50, callbacks=[probe])
    assert rec.teacher_draws_stored == 0 and chain.stored_draws == 0
    assert chain.updates == 20 + 400                          # burn-in, then one teacher update per student step
    assert rec.column("teacher_updates") == [20 + 50 * k for k in range(1, 9)]
    sizes = set(rec.column("teacher_state_bytes"))
    n_weights = sum(v.numel() for v in chain.current().values())   # 3·8 + 8 + 8 + 1 weights, + the precision
    assert n_weights == 42 and sizes == {2 * 4 * n_weights}         # current + last finite state, float32
    # nothing held grows with the number of steps (a stored draw would add ≥ 4·n_weights bytes per step)
    assert live[400] - live[150] < 4 * n_weights and live[150] - live[50] < 4 * n_weights


def test_online_student_learns_the_chain_predictive():
    bnn, x, y = _regression_bnn(n=128)
    chain = SGLDChain(bnn, (x, y), "psgld", step_size=3e-3, batch_size=32, burn_in=300, seed=1)
    student, rec = distill(chain, build("mlp", in_features=3, out_features=2, hidden=(16,)), x, steps=800,
                           batch_size=32, lr=5e-3, lr_schedule="cosine", input_noise=0.05, seed=1, log_every=500)
    mean, var = student_predictive(student, x, "regression")
    rmse = (mean - y).pow(2).mean().sqrt().item()
    assert rmse < 0.6 * y.std().item()                 # the data's signal was learnt without any label
    assert 0.02 < var.mean().sqrt().item() < 1.5        # a finite, data-scaled predictive spread
    with pytest.raises(TypeError, match="SGLDChain"):
        as_teacher(pyrobnn.inference.SGLD(bnn.model))


# ----------------------------------------------------------------------------------------------------
# adversarial
# ----------------------------------------------------------------------------------------------------
def test_adversarial_distillation_reaches_the_teacher_with_a_stabilised_discriminator():
    teacher = _softmax_teacher(seed=1)
    x = torch.randn(1500, 5, generator=torch.Generator().manual_seed(8))
    student, rec = distill(teacher, nn.Linear(5, 3), x, steps=600, batch_size=100, lr=0.1, lr_schedule="cosine",
                           adversarial={"weight": 0.05}, seed=0, log_every=200)
    disc = rec.discriminator
    assert all(hasattr(m, "parametrizations") for m in disc.modules() if isinstance(m, nn.Linear))  # spectral norm
    assert {"d_loss", "g_loss"} <= set(rec.records[-1])
    held = torch.randn(500, 5)
    with torch.no_grad():
        p, q = teacher(held).softmax(-1), student(held).softmax(-1)
    assert (p * (p.log() - q.log())).sum(-1).mean().item() < 5e-3
    # near the end the discriminator can hardly tell the two apart: its loss stays near 2·log 2
    assert rec.records[-1]["d_loss"] > 1.0


def test_adversarial_on_a_hidden_layer_needs_equal_widths():
    torch.manual_seed(9)
    teacher = build("mlp", in_features=4, out_features=3, hidden=(16,))
    x = torch.randn(200, 4)
    student, rec = distill(teacher, build("mlp", in_features=4, out_features=3, hidden=(16,)), x, steps=30,
                           batch_size=50, adversarial=Adversarial(hidden=("2", "2")), seed=0)
    assert rec.config["cache_teacher"] is False and math.isfinite(rec.records[-1]["g_loss"])
    with pytest.raises(ValueError, match="equal widths"):
        distill(teacher, build("mlp", in_features=4, out_features=3, hidden=(8,)), x, steps=2, batch_size=50,
                adversarial={"hidden": ("2", "2")}, seed=0)
    with pytest.raises(ValueError, match="no module"):
        distill(teacher, nn.Linear(4, 3), x, steps=2, adversarial={"hidden": ("2", "fc9")})


# ----------------------------------------------------------------------------------------------------
# evaluation, persistence, validation
# ----------------------------------------------------------------------------------------------------
def test_evaluation_helper_scores_teacher_students_and_baseline_in_one_run():
    torch.manual_seed(10)
    teacher = _softmax_teacher(seed=2)
    x = torch.randn(300, 5)
    y = teacher(x).argmax(-1).detach()
    base = train_deterministic(nn.Linear(5, 3), x, y, epochs=5, seed=0)
    rows = evaluate_distillation(teacher, {"same": copy.deepcopy(teacher), "baseline": base}, x, y, num_samples=1,
                                 latency_repeats=3, teacher_name="teacher")
    assert rows["teacher"]["accuracy"] == 1.0 and rows["same"]["accuracy"] == 1.0
    probs = teacher(x).softmax(-1).detach()
    assert rows["same"]["nll"] == pytest.approx(pyrobnn.metrics.nll(probs, y), rel=1e-6)
    assert rows["same"]["ece"] == pytest.approx(pyrobnn.metrics.ece(probs, y), rel=1e-6)
    assert all(r["latency_ms"] >= 0 and r["latency_wall_ms"] > 0 for r in rows.values())
    assert rows["baseline"]["latency_ratio"] > 0 and rows["baseline"]["latency_wall_ratio"] > 0


def test_save_load_gives_identical_student_outputs(tmp_path):
    student = build("mlp", in_features=6, out_features=4, hidden=(12, 7))
    x = torch.randn(9, 6)
    save_student(student, tmp_path / "s.safetensors", {"task": "classification", "temperature": 2.0})
    again, meta = load_student(tmp_path / "s.safetensors")
    assert torch.equal(again(x), student(x)) and again is not student and meta["temperature"] == 2.0
    custom = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    save_student(custom, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="custom network"):
        load_student(tmp_path / "c.safetensors")
    fresh = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    again, _ = load_student(tmp_path / "c.safetensors", net=fresh)
    assert torch.equal(again(x), custom(x))
    with pytest.raises(ValueError, match="do not fit"):
        load_student(tmp_path / "c.safetensors", net=nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_distill_validates_its_arguments():
    t, x = _softmax_teacher(), torch.randn(20, 5)
    with pytest.raises(ValueError, match="exactly one"):
        distill(t, nn.Linear(5, 3), x)
    with pytest.raises(ValueError, match="classes"):
        distill(t, nn.Linear(5, 4), x, steps=1)
    with pytest.raises(TypeError, match="student"):
        distill(t, "mlp", x, steps=1)
    with pytest.raises(ValueError, match="label_weight"):
        distill(t, nn.Linear(5, 3), x, steps=1, label_weight=1.0)
    with pytest.raises(ValueError, match="NaN"):
        distill(t, nn.Linear(5, 3), torch.full((4, 5), float("nan")), steps=1)
    with pytest.raises(ValueError, match="task"):
        distill(pyrobnn.bayesian(nn.Sequential(nn.Linear(5, 3))), nn.Linear(5, 3), x, steps=1, task="regression")
    with pytest.raises(TypeError, match="teacher"):
        as_teacher(42)


def test_labels_and_epochs_and_loader_inputs():
    teacher = _softmax_teacher()
    x = torch.randn(100, 5)
    y = teacher(x).argmax(-1).detach()
    _, rec = distill(teacher, nn.Linear(5, 3), (x, y), epochs=2, batch_size=25, label_weight=0.5, seed=0, log_every=4)
    assert rec.config["steps"] == 8 and "label_loss" in rec.records[-1]
    loader = pyrobnn.data.ArrayLoader(x, y, batch_size=30, seed=0)
    _, rec = distill(teacher, nn.Linear(5, 3), loader, epochs=1, seed=0)
    assert rec.config["steps"] == 4 and rec.config["cache_teacher"] is False


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _check_cli_distill(tmp_path, run_dir_name):
    from pyrobnn.cli import main
    cfg = tmp_path / "distill.toml"
    cfg.write_text(f'teacher = "{run_dir_name}"\nout = "student"\nseed = 0\n[student]\nname = "mlp"\nhidden = [16]\n'
                   '[distill]\nepochs = 3\nlr = 0.01\nnum_samples = 4\n[evaluate]\nnum_samples = 4\nbaseline = true\n'
                   'baseline_epochs = 3\nlatency_batch = 32\n')
    out = tmp_path / "student"
    assert main(["distill", str(cfg), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["test"]
    assert set(rows) == {"teacher ensemble (S=4)", "student", "deterministic (labels)"}
    assert rows["student"]["accuracy"] > 0.5 and rows["student"]["latency_ratio"] > 0
    student, meta = load_student(out / "student.safetensors")
    ds = pyrobnn.data.load_digits()
    assert meta["task"] == "classification" and student(ds.x_test[:3]).shape == (3, 10)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'teacher = "{run_dir_name}"\n[student]\nname = "mlp"\n[distill]\nsteps = 1\nwarp = 9\n')
    assert main(["distill", str(bad), "--out", str(out)]) == 2
    missing = tmp_path / "missing.toml"
    missing.write_text('teacher = "nowhere"\n[student]\nname = "mlp"\n')
    assert main(["distill", str(missing), "--out", str(out)]) == 2


def test_cli_distills_a_saved_run_directory(tmp_path):
    """A directory laid out as `pyrobnn fit` writes it (model.safetensors + metrics.json with the config)."""
    ds = pyrobnn.data.load_digits()
    bnn = pyrobnn.bayesian(build("mlp", in_features=64, out_features=10, hidden=(32,)), dataset_size=len(ds.x_train))
    pyrobnn.inference.fit(bnn, (ds.x_train, ds.y_train), epochs=3, lr=0.01, progress=False, seed=0)
    (tmp_path / "run").mkdir()
    pyrobnn.save(bnn, tmp_path / "run" / "model.safetensors")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"config": {"data": {"name": "digits"}}}))
    _check_cli_distill(tmp_path, "run")


@pytest.mark.slow
def test_cli_distills_a_pyrobnn_fit_run(tmp_path):
    from pyrobnn.cli import main
    fit_cfg = tmp_path / "fit.toml"
    fit_cfg.write_text('seed = 0\n[data]\nname = "digits"\n[model]\nname = "mlp"\nhidden = [32]\n'
                       '[train]\nepochs = 3\nlr = 0.01\nbatch_size = 128\nnum_samples = 4\n')
    assert main(["fit", str(fit_cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    _check_cli_distill(tmp_path, "run")


def test_cli_takes_a_saved_sample_posterior_file(tmp_path):
    from pyrobnn.cli import main
    ds = pyrobnn.data.load_digits()
    bnn = pyrobnn.bayesian(build("mlp", in_features=64, out_features=10, hidden=(16,)), dataset_size=len(ds.x_train))
    post = sample(bnn, (ds.x_train, ds.y_train), "psgld", num_samples=4, warmup_steps=30, thin=2, step_size=1e-3, seed=0)
    post.save(tmp_path / "post.safetensors")
    cfg = tmp_path / "d.toml"
    cfg.write_text('teacher = "post.safetensors"\n[data]\nname = "digits"\n[student]\nname = "mlp"\nhidden = [8]\n'
                   '[distill]\nsteps = 5\n[evaluate]\nnum_samples = 4\nlatency_batch = 16\n')
    assert main(["distill", str(cfg), "--out", str(tmp_path / "s")]) == 0
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["distill"]["teacher"] == "SampleTeacher" and metrics["distill"]["steps"] == 5
    assert load_student(tmp_path / "s" / "student.safetensors")[0](ds.x_test[:2]).shape == (2, 10)


# ----------------------------------------------------------------------------------------------------
# teachers are posteriors (pyrobnn.posterior)
# ----------------------------------------------------------------------------------------------------
def test_every_teacher_answers_the_posterior_protocol():
    from pyrobnn.inference.distill import GuideTeacher, PosteriorTeacher, SampleTeacher
    from pyrobnn.posterior import Ensemble, Posterior
    torch.manual_seed(0)
    bnn, x, y = _regression_bnn(n=40)
    bnn.initialize(x)
    post = pyrobnn.inference.sample(bnn, (x, y), num_samples=4, warmup_steps=5, thin=1, batch_size=20,
                                    step_size=1e-4, seed=0)
    chain = SGLDChain(bnn, (x, y), step_size=1e-4, batch_size=20, seed=1)
    chain.advance()
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    teachers = [SampleTeacher(post), GuideTeacher(bnn), MCDropout(net), Deterministic(nn.Linear(3, 2)), chain,
                PosteriorTeacher(Ensemble([nn.Linear(3, 2), nn.Linear(3, 2)]))]
    for t in teachers:
        assert isinstance(t, Posterior), type(t).__name__
        draws = t.parameter_draws(2)
        outs = t.outputs(x[:5], 2)
        assert outs.shape[1] == 5 and torch.isfinite(outs).all(), type(t).__name__
        assert t.run(draws[0], x[:5]).shape == outs.shape[1:], type(t).__name__
        assert isinstance(t.network(), nn.Module)
    # the running chain's one draw is its current state, run through the BNN's public forward under a draw
    state = chain.current()
    assert torch.equal(chain.outputs(x[:5])[0], bnn.run(state, x[:5]))
    assert torch.equal(chain.draws(x[:5]).mean[0], bnn.likelihood._mean(bnn.run(state, x[:5])))
    # stored draws: the teacher's outputs are the posterior's
    assert torch.equal(SampleTeacher(post).outputs(x[:5]), post.outputs(x[:5]))


def test_an_ensemble_teaches_its_members_average_predictive_and_hidden_layer():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
    t = as_teacher(members)
    x = torch.randn(12, 5)
    d = t.draws(x, None, hidden="1")
    with torch.no_grad():
        assert torch.equal(d.logits, torch.stack([m(x) for m in members]))
        assert torch.allclose(d.hidden, torch.stack([m[1](m[0](x)) for m in members]).mean(0))
    assert t.stored_draws == 3
    student = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    _, rec = distill(members, student, torch.randn(256, 5), steps=300, batch_size=64, lr=1e-2, seed=0,
                     log_every=100)
    assert rec[-1]["loss"] < 0.2 * rec[0]["loss"]


def test_distillation_runs_the_network_under_a_draw_through_the_public_protocol():
    import pathlib
    import sys
    src = pathlib.Path(sys.modules["pyrobnn.inference.distill"].__file__).parent
    assert not [p.name for p in src.glob("*.py") if "_net_only" in p.read_text()]
