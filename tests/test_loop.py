"""The training loop (inference/loop.py): a custom step trains, checkpoints and resumes exactly, the NaN
guard, callbacks and schedules in order, the data-parallel hooks, and every trainer of the library
going through it."""
import math

import pytest
import torch
from torch import nn

import pyrobnn
from pyrobnn import models
from pyrobnn.inference import loop as loop_module
from pyrobnn.inference.batches import Batches
from pyrobnn.inference.checkpoint import Checkpoints, latest_checkpoint
from pyrobnn.inference.loop import (Loop, OnRecord, Progress, TrainingDiverged, TrainingInterrupted,
                                    check_finite)
from pyrobnn.inference.schedules import LRFactor


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3


class NoisyStep:
    """Least squares with Gaussian noise on the inputs drawn from torch's global RNG (so an exact
    resume needs the RNG state restored, not only the parameters)."""

    def __init__(self, net, opt, nan_at=None):
        self.net, self.opt, self.nan_at, self.calls = net, opt, nan_at, 0

    def __call__(self, x, y):
        self.calls += 1
        x = x + 0.01 * torch.randn(x.shape)
        loss = ((self.net(x).squeeze(-1) - y) ** 2).mean()
        if self.calls == self.nan_at:
            loss = loss * math.nan
        check_finite(loss, "the squared error")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach()


def _mean_loss(loop):
    return {"epoch": loop.position.epoch + 1, "loss": loop.sums["loss"] / loop.count}


def _run(epochs, ckpt=None, resume=False, every=None, stop_after=None, nan_at=None, seed=0):
    torch.manual_seed(seed)
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    step = NoisyStep(net, opt, nan_at)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return stop_after is not None and calls["n"] >= stop_after

    loop = Loop(step, Batches(_data(), 16, 7), epochs=epochs, model=net, summarize=_mean_loss,
                checkpoints=None if ckpt is None else Checkpoints(ckpt, net, opt), checkpoint_every=every,
                resume=resume, stop_requested=stop)
    return net, loop.run(), step


def test_a_custom_step_trains():
    net, history, step = _run(8)
    assert len(history) == 8 and step.calls == 8 * 6
    assert history[-1]["loss"] < 0.02 * history[0]["loss"]


def test_checkpoint_resume_gives_the_uninterrupted_parameters(tmp_path):
    whole, h_whole, _ = _run(4)
    _run(2, tmp_path / "a", every=4)                       # a 2-epoch run, then resumed to 4 epochs
    resumed, h_resumed, _ = _run(4, tmp_path / "a", resume=True, seed=123)
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))
    assert h_resumed.column("loss") == h_whole.column("loss")
    # stopped mid-epoch (step 3 of epoch 2) by stop_requested: a checkpoint there, then resumed
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 3") as info:
        _run(4, tmp_path / "b", stop_after=9)
    assert info.value.checkpoint.name == "ckpt-e00001-s0000003.safetensors"
    resumed, _, step = _run(4, tmp_path / "b", resume=True, seed=5)
    assert step.calls == 4 * 6 - 9
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        _run(3, tmp_path, nan_at=9)     # step 3 of epoch 2
    msg = str(info.value)
    assert "the squared error became nan at epoch 2, step 3" in msg
    good = latest_checkpoint(tmp_path)[0]
    assert good.name == "ckpt-e00001-s0000000.safetensors" and f"Last good checkpoint: {good}" in msg
    # the parameters are those after step 8: the same as 8 steps taken by hand
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    with pytest.raises(TrainingDiverged):
        Loop(NoisyStep(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5), nan_at=9),
             Batches(_data(), 16, 7), epochs=3, model=net).run()
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    ref_step = NoisyStep(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5))
    batches = Batches(_data(), 16, 7)
    for xb, yb in [b for e in range(2) for b in batches.epoch(e)][:8]:
        ref_step(xb, yb)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), nn.Linear(3, 1).parameters()))


def test_a_non_finite_loss_returned_by_a_step_is_also_caught():
    losses = iter([1.0, math.inf, 1.0])
    with pytest.raises(TrainingDiverged, match="the loss became inf at step 2; the step had already updated"):
        Loop(lambda x, y: next(losses), Batches(_data(), 32, 0), diverged_at="step").run()


def test_callbacks_schedules_and_records_in_order():
    events = []

    class CB:
        def __init__(self, name, stop_at=None):
            self.name, self.stop_at = name, stop_at

        def on_step_end(self, loop, position, logs):
            events.append((self.name, "step", position.epoch, position.step, round(logs["loss"], 6)))

        def on_record(self, loop, record):
            events.append((self.name, "record", record["epoch"]))
            return record["epoch"] == self.stop_at

    seen_lr = []
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(x, y):
        seen_lr.append(opt.param_groups[0]["lr"])
        events.append(("step", "run"))
        return float(len(seen_lr))

    history = Loop(step, Batches(_data(), 32, 0), epochs=5, model=net,
                   schedules=[LRFactor(opt, 0.1, lambda e: 1.0 / (1.0 + e))],
                   callbacks=[CB("a", stop_at=2), CB("b")], summarize=_mean_loss).run()
    # 3 steps per epoch; stopped by "a" after epoch 2, whose record "b" never sees (the vote short-circuits)
    assert len(history) == 2 and history.column("loss") == [2.0, 5.0]
    assert seen_lr == [0.1 * (1.0 / (1.0 + (e + s / 3))) for e in range(2) for s in range(3)]
    expected = []
    for e in range(2):
        for s in range(3):
            k = 3 * e + s + 1
            expected += [("step", "run"), ("a", "step", e, s, float(k)), ("b", "step", e, s, float(k))]
        expected += [("a", "record", e + 1)] + ([("b", "record", e + 1)] if e == 0 else [])
    assert events == expected


def test_records_every_n_steps_and_progress(capsys):
    history = Loop(lambda x, y: {"loss": 1.0, "other": 2.0}, Batches(_data(), 16, 0), epochs=2,
                   summarize=lambda loop: {"step": loop.position.global_step + 1, "n": loop.count,
                                           **loop.sums},
                   record_every=4, progress=Progress(postfix=lambda loop: {"n": str(loop.count)})).run()
    assert history.column("step") == [4, 8, 12] and history.column("n") == [4, 4, 4]
    assert history[0]["other"] == 8.0


class FakeDataParallel:
    is_main = False

    def __init__(self):
        self.calls = []

    def synchronize(self, model, epoch, step):
        self.calls.append(("synchronize", epoch, step))

    def begin_step(self, epoch, step):
        self.calls.append(("begin_step", epoch, step))

    def mean(self, value):
        self.calls.append(("mean", value))
        return value / 2

    def any(self, flag):
        self.calls.append(("any", flag))
        return flag


def test_data_parallel_hooks(tmp_path):
    dp = FakeDataParallel()
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    history = Loop(lambda x, y: 1.0, Batches(_data(), 48, 0), epochs=2, model=net, summarize=_mean_loss,
                   distributed=dp, checkpoints=Checkpoints(tmp_path, net, opt), progress=Progress()).run()
    assert dp.calls == [("synchronize", 0, 0), ("begin_step", 0, 0), ("begin_step", 0, 1), ("mean", 2.0),
                        ("any", False), ("begin_step", 1, 0), ("begin_step", 1, 1), ("mean", 2.0), ("any", False)]
    assert history.column("loss") == [0.5, 0.5]
    assert latest_checkpoint(tmp_path) is None     # only rank 0 writes


def test_every_trainer_runs_on_the_loop(monkeypatch):
    """fit, fit_distributed, fit_complexity, sample, distill, train_deterministic and the deep weight
    prior's source nets each hand their step to the loop (seen by a callback the test adds to every loop)."""
    seen = []
    real_init = Loop.__init__

    def spying_init(self, step, batches, **kw):
        class Spy:
            def on_step_end(self_, loop, position, logs):
                seen.append(getattr(loop.step, "__name__", type(loop.step).__name__))
        kw["callbacks"] = list(kw.get("callbacks", ())) + [Spy()]
        real_init(self, step, batches, **kw)

    monkeypatch.setattr(loop_module.Loop, "__init__", spying_init)
    from pyrobnn.guides import HyperMeanField
    from pyrobnn.inference import (distill, fit, fit_complexity, fit_distributed, sample,
                                   train_deterministic)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] > 0).long()

    def bnn(**kw):
        return pyrobnn.bayesian(models.build("mlp", in_features=3, out_features=2, hidden=[4]),
                                likelihood="categorical", **kw)

    def ran(fn):
        seen.clear()
        fn()
        return set(seen)

    b = bnn()
    assert ran(lambda: fit(b, (x, y), epochs=1, batch_size=20, progress=False)) == {"SVIStep"}
    assert ran(lambda: fit_distributed(bnn(), (x, y), 1, batch_size=20, progress=False)) == {"SVIStep"}
    hb = bnn(guide=lambda m, **kw: HyperMeanField(m, lam_range=(0.1, 1.0), **kw))
    assert ran(lambda: fit_complexity(hb, (x, y), epochs=1, batch_size=20, progress=False)) == {"LambdaSweepStep"}
    post = []
    assert ran(lambda: post.append(sample(b, (x, y), num_samples=2, warmup_steps=1, thin=1, batch_size=20,
                                          step_size=1e-4, seed=0))) == {"SGLDStep"}
    assert ran(lambda: distill(post[0], nn.Linear(3, 2), x, steps=3, batch_size=20, seed=0)) == {"DistillStep"}
    assert ran(lambda: train_deterministic(nn.Linear(3, 2), x, y, epochs=1, batch_size=20)) == {"SupervisedStep"}
    assert len(seen) == 2
    from pyrobnn.priors.deep_weight.pipeline import train_source_nets
    arch = {"name": "mlp", "in_features": 3, "out_features": 2, "hidden": [4]}
    assert ran(lambda: train_source_nets(x, y, num_nets=2, epochs=1, arch=arch, batch_size=16)) == {"SupervisedStep"}
    assert len(seen) == 2 * 3          # the last, incomplete batch is kept
    from pyrobnn.priors.deep_weight.pipeline import fit_kernel_vae
    assert ran(lambda: fit_kernel_vae(torch.randn(30, 3, 3), epochs=2, batch_size=16, min_steps=1)) == {"vae_step"}


def test_loop_argument_errors():
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        Loop(lambda x, y: 0.0, Batches(_data(), 16, 0), resume=True)
    for kw, msg in (({"epochs": 0}, "epochs must be a positive integer"),
                    ({"record_every": True}, "record_every must be"), ({"diverged_at": "x"}, "diverged_at")):
        with pytest.raises(ValueError, match=msg):
            Loop(lambda x, y: 0.0, Batches(_data(), 16, 0), **kw)
    with pytest.raises(TypeError, match="the step must be callable"):
        Loop(None, Batches(_data(), 16, 0))
    with pytest.raises(ValueError, match="per must be"):
        LRFactor(None, 0.1, lambda e: 1.0, per="batch")
    assert OnRecord(lambda a, r: r["x"] > 1, "a").on_record(None, {"x": 2}) is True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_adversarial_distillation_with_input_noise_and_the_deterministic_trainer_on_the_gpu():
    from pyrobnn.inference import distill, train_deterministic
    dev = torch.device("cuda")
    x, y = _data(64)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).to(dev)
    labels = (y > y.median()).long().to(dev)
    train_deterministic(teacher, x.to(dev), labels, epochs=3, batch_size=16, seed=0)
    student, rec = distill(teacher, nn.Linear(3, 2).to(dev), x.to(dev), steps=20, batch_size=16, seed=0,
                           input_noise=0.1, adversarial=True, log_every=10)
    assert next(student.parameters()).device.type == "cuda" and len(rec) == 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["d_loss"]) for r in rec.records)
