"""Nothing lost: a run killed with SIGKILL mid-epoch resumes to the parameters of an uninterrupted run,
torn checkpoints are skipped with a warning, checkpoint writes are atomic.

Tolerance: exact equality (``torch.equal``) of every parameter — resume restores parameters, optimizer
state, data order (epoch, step) and the RNG state, and both runs use the same thread count
(OMP_NUM_THREADS=1), so the resumed run repeats the uninterrupted run's arithmetic bit for bit.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pyrobnn
from pyrobnn import models
from pyrobnn.inference import fit, latest_checkpoint
from pyrobnn.io import read_state, write_state

CONFIG = """
seed = 7
[data]
name = "digits"
[model]
name = "mlp"
hidden = [16]
[train]
epochs = 3
lr = 0.01
batch_size = 128
checkpoint_every = 3
num_samples = 4
kl_warmup = [0, 2]
lr_schedule = "cosine"
"""
# digits: 1258 training examples → 10 steps per epoch; checkpoints after steps 3, 6, 9 and at epoch ends.

# The child (tests/_paused_cli.py) counts the batches fit draws (the first is fit's initialisation batch);
# when it is about to hand out batch 5 of epoch 2 (steps 0-4 of that epoch done, last checkpoint after
# step 3) it writes a marker and waits there to be killed.
PAUSED_CLI = os.path.join(os.path.dirname(__file__), "_paused_cli.py")
KILL_AT = 1 + 10 + 6   # init batch + epoch 1 + batches 0..5 of epoch 2 → killed before step 5 runs


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args):
    return [sys.executable, "-m", "pyrobnn.cli", *args]


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    ref_dir, run_dir, marker = tmp_path / "reference", tmp_path / "killed", tmp_path / "marker"
    reference = subprocess.Popen(_cli("fit", str(cfg), "--out", str(ref_dir), "--no-progress"), env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, PAUSED_CLI, str(marker), str(KILL_AT), "sigkill",
                               "fit", str(cfg), "--out", str(run_dir), "--no-progress"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert victim.poll() is None, f"the run ended before it could be killed: {victim.communicate()}"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (run_dir / "model.safetensors").exists()          # it really died mid-run
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None and (found[2]["epoch"], found[2]["step"]) == (1, 3)   # mid-epoch checkpoint

    resumed = subprocess.run(_cli("fit", str(cfg), "--out", str(run_dir), "--resume", "--no-progress"),
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    want, _ = read_state(ref_dir / "model.safetensors")
    got, _ = read_state(run_dir / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k                     # stated tolerance: exact
    assert json.loads((ref_dir / "metrics.json").read_text())["test"] == \
        json.loads((run_dir / "metrics.json").read_text())["test"]
    h_ref, h_run = _history(ref_dir / "history.csv"), _history(run_dir / "history.csv")
    assert len(h_ref) == len(h_run) == 3
    for a, b in zip(h_ref, h_run):
        assert all(a[k] == b[k] for k in a if k.startswith("val_") or k in ("kl_weight", "lr"))
    # the loss of epochs 1 and 3 is the same; epoch 2's record averages only the steps run after the resume
    assert h_ref[0]["loss"] == h_run[0]["loss"] and h_ref[2]["loss"] == h_run[2]["loss"]


# -- torn checkpoints (in process: fast) -----------------------------------------------------------------
def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    return x, (x.sum(1) > 0).long()


def _bnn():
    torch.manual_seed(0)
    return pyrobnn.bayesian(models.build("mlp", in_features=3, out_features=2, hidden=[6]), likelihood="categorical")


def _tear(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped-payload-byte":
        b = bytearray(data)
        b[-3] ^= 0xFF                     # inside the tensor payload: only the checksum can tell
        path.write_bytes(bytes(b))
    elif how == "garbage-header":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped-payload-byte", "garbage-header"])
def test_torn_checkpoint_is_skipped_with_warning_and_previous_one_used(tmp_path, how):
    x, y = _data()
    kw = dict(batch_size=16, lr=0.05, seed=1, progress=False)
    ref = _bnn()
    fit(ref, (x, y), 4, **kw)

    ck = tmp_path / "ck"
    fit(_bnn(), (x, y), 3, checkpoint_dir=str(ck), keep_checkpoints=5, **kw)
    newest = ck / "ckpt-e00003-s0000000.safetensors"
    assert newest.exists()
    _tear(newest, how)
    resumed = _bnn()
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*ckpt-e00003"):
        history = fit(resumed, (x, y), 4, checkpoint_dir=str(ck), resume=True, **kw)
    assert [r["epoch"] for r in history.records] == [1, 2, 3, 4]   # epochs 1-2 from e2's history, 3-4 rerun
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_all_checkpoints_torn_starts_over(tmp_path):
    x, y = _data()
    kw = dict(batch_size=16, lr=0.05, seed=1, progress=False)
    ref = _bnn()
    fit(ref, (x, y), 2, **kw)
    ck = tmp_path / "ck"
    fit(_bnn(), (x, y), 2, checkpoint_dir=str(ck), keep_checkpoints=5, **kw)
    paths = sorted(ck.glob("ckpt-*.safetensors"))
    assert len(paths) == 2
    for p in paths:
        _tear(p, "truncated")
    again = _bnn()
    with pytest.warns(UserWarning) as record:
        fit(again, (x, y), 2, checkpoint_dir=str(ck), resume=True, **kw)
    assert sum("skipping unreadable checkpoint" in str(w.message) for w in record) == 2
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import pyrobnn.state_io as state_io
    target = tmp_path / "state.safetensors"
    write_state(target, {"a": torch.ones(3)}, {"kind": "checkpoint", "n": 1})

    def crash(src, dst):                  # the process "dies" between writing the temp file and renaming it
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(state_io.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write_state(target, {"a": torch.zeros(3)}, {"kind": "checkpoint", "n": 2})
    monkeypatch.undo()
    tensors, meta = read_state(target)    # the old file, whole
    assert meta["n"] == 1 and torch.equal(tensors["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]   # no temp file left behind
