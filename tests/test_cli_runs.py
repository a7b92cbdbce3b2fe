"""The command line around runs: a run directory is a unit (never overwritten or mixed), --resume checks
the config, interrupts write a checkpoint and say how to resume, errors are one line and leave nothing
behind, files follow the umask, broken pipes end quietly; data errors name the user's row; a network
collapsed to its prior is reported; the λ-hypernetwork trains over its range from TOML.

Runs are on sklearn's breast cancer data (455 training rows, 30 features) with a 30-16-2 MLP and 1-3
epochs: a few seconds each."""
import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings

import pytest
import torch

import pyrobnn
from pyrobnn import models
from pyrobnn.cli import main
from pyrobnn.inference import fit, latest_checkpoint
from pyrobnn.io import read_state

BASE = """
seed = {seed}
[data]
name = "{data}"
[model]
name = "mlp"
hidden = [16]
[bnn]
{bnn}
[train]
epochs = {epochs}
lr = {lr}
batch_size = {batch}
num_samples = 4
{train}
"""


def _config(tmp_path, name="run.toml", seed=1, epochs=1, lr=0.01, bnn="", train="", data="breast_cancer", batch=128):
    path = tmp_path / name
    path.write_text(BASE.format(seed=seed, epochs=epochs, lr=lr, bnn=bnn, train=train, data=data, batch=batch))
    return str(path)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _ckpt_names(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args):
    return [sys.executable, "-m", "pyrobnn.cli", *args]


# -- a run directory is a unit -----------------------------------------------------------------------------
def test_new_run_refuses_occupied_directory_and_overwrite_replaces_it_whole(tmp_path, capsys):
    long_cfg, short_cfg = _config(tmp_path, "long.toml", epochs=3), _config(tmp_path, "short.toml", epochs=1)
    run = tmp_path / "A"
    assert main(["fit", long_cfg, "--out", str(run), "--no-progress"]) == 0
    model_before = (run / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert main(["fit", short_cfg, "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a pyrobnn run" in err and "--overwrite" in err
    assert (run / "model.safetensors").read_bytes() == model_before          # the old run is untouched

    assert main(["fit", short_cfg, "--out", str(run), "--no-progress", "--overwrite"]) == 0
    assert len(_rows(run / "history.csv")) == 1
    assert _ckpt_names(run) == ["ckpt-e00001-s0000000.safetensors"]          # none of the old run's
    stored = json.loads((run / "run.json").read_text())
    assert stored["config"]["train"]["epochs"] == 1 and stored["pyrobnn_version"] == pyrobnn.__version__
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".A.")]   # the replaced run is gone
    # resuming now continues the new run, not the old one (formerly: 151 history rows for a 2-epoch config)
    assert main(["fit", short_cfg, "--out", str(run), "--no-progress", "--resume"]) == 0
    assert len(_rows(run / "history.csv")) == 1


def _failing_step(*args):
    raise RuntimeError("out of memory (simulated)")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_and_puts_a_replaced_run_back(
        tmp_path, capsys, monkeypatch):
    from pyrobnn.inference.fit import SVIStep
    run, cfg = tmp_path / "A", _config(tmp_path)
    assert main(["fit", cfg, "--out", str(run), "--no-progress"]) == 0
    before = sorted(p.name for p in run.iterdir())
    model_before = (run / "model.safetensors").read_bytes()
    monkeypatch.setattr(SVIStep, "__call__", _failing_step)
    assert main(["fit", _config(tmp_path, "new.toml", epochs=2), "--out", str(run), "--no-progress",
                 "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("RuntimeError: out of memory (simulated) (run with --debug for the traceback)")
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "model.safetensors").read_bytes() == model_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "new.toml", "run.toml"]
    assert main(["fit", cfg, "--out", str(tmp_path / "x" / "y"), "--no-progress"]) == 1
    assert not (tmp_path / "x").exists()


def test_resume_refuses_another_config_with_a_diff_and_force_overrides(tmp_path, capsys):
    run = tmp_path / "A"
    assert main(["fit", _config(tmp_path, epochs=1), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    other = _config(tmp_path, "other.toml", seed=5, lr=0.05, bnn='prior = "log-uniform"')
    assert main(["fit", other, "--out", str(run), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for key in ("bnn.prior", "train.lr", "seed"):
        assert key in err, err
    assert "train.epochs" not in err and "--force" in err
    assert len(_rows(run / "history.csv")) == 1                              # nothing was continued

    longer = _config(tmp_path, "longer.toml", epochs=2)                        # epochs may grow
    assert main(["fit", longer, "--out", str(run), "--no-progress", "--resume"]) == 0
    assert [r["epoch"] for r in _rows(run / "history.csv")] == ["1", "2"]
    assert json.loads((run / "run.json").read_text())["config"]["train"]["epochs"] == 2

    forced = _config(tmp_path, "forced.toml", epochs=3, lr=0.02)
    assert main(["fit", forced, "--out", str(run), "--no-progress", "--resume", "--force"]) == 0
    rows = _rows(run / "history.csv")
    assert len(rows) == 3 and float(rows[-1]["lr"]) == pytest.approx(0.02)


def test_resume_without_a_checkpoint_fails_and_resume_or_start_starts(tmp_path, capsys):
    cfg, run = _config(tmp_path), tmp_path / "B"
    assert main(["fit", cfg, "--out", str(run), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--resume-or-start" in err
    assert not run.exists()
    assert main(["fit", cfg, "--out", str(run), "--no-progress", "--resume-or-start"]) == 0
    assert len(_rows(run / "history.csv")) == 1
    assert main(["fit", cfg, "--out", str(run), "--no-progress", "--resume-or-start"]) == 0  # now resumes
    assert len(_rows(run / "history.csv")) == 1


# -- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, words", [
    ({"bnn": 'prior = "no-such-prior"'}, "no-such-prior"),
    ({"bnn": 'likelihood = "gaussian"'}, "classification"),
    ({"train": "kl_warmup = \"sometimes\""}, "kl_warmup"),
    ({"train": "lambdas = [0.0, 1.0]"}, "hyper-mean-field"),
])
def test_a_config_error_is_one_line_and_leaves_nothing_behind(tmp_path, capsys, edit, words):
    cfg, run = _config(tmp_path, **edit), tmp_path / "runs" / "new"
    assert main(["fit", cfg, "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyrobnn fit: error: ") and err.count("\n") == 1 and words in err, err
    assert "Trace Shapes" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    cfg = _config(tmp_path, bnn='prior = "no-such-prior"')
    with pytest.raises(ValueError, match="no-such-prior"):
        main(["fit", cfg, "--out", str(tmp_path / "o"), "--debug"])


def test_nan_in_the_data_is_reported_by_its_row_in_the_users_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = (x.sum(1) > 0).long()
    x[137, 2] = float("nan")
    x[150, 0] = float("inf")
    bnn = pyrobnn.bayesian(models.build("mlp", in_features=3, out_features=2, hidden=[4]), likelihood="categorical")
    with pytest.raises(ValueError, match=r"training x contains NaN or inf in row 137 .*2 row\(s\) in all: 137, 150"):
        fit(bnn, (x, y), epochs=1, batch_size=64, seed=0, progress=False)
    x[137, 2] = x[150, 0] = 0.0
    xv = x[:20].clone()
    xv[7] = float("nan")
    with pytest.raises(ValueError, match="validation x contains NaN or inf in row 7"):
        fit(bnn, (x, y), epochs=1, batch_size=64, seed=0, progress=False, val=(xv, y[:20]))


# -- interrupts -------------------------------------------------------------------------------------------
# The child (tests/_paused_cli.py) pauses before handing out training batch PAUSE_AT (counting fit's
# initialisation batch) until the SIGINT has arrived, so the signal lands mid-epoch at a known step.
PAUSED_CLI = os.path.join(os.path.dirname(__file__), "_paused_cli.py")
PAUSE_AT = 1 + 8 + 4    # init batch + epoch 1 (8 batches of 64) + batches 0..3 of epoch 2: stops after step 4


def test_sigint_finishes_the_step_writes_a_checkpoint_and_the_printed_command_resumes_bit_identically(tmp_path):
    cfg = _config(tmp_path, seed=7, epochs=3, batch=64, train='kl_warmup = [0, 2]\nlr_schedule = "cosine"')
    ref_dir, run_dir, marker = tmp_path / "reference", tmp_path / "interrupted", tmp_path / "marker"
    reference = subprocess.Popen(_cli("fit", cfg, "--out", str(ref_dir), "--no-progress"), env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = subprocess.Popen([sys.executable, PAUSED_CLI, str(marker), str(PAUSE_AT), "sigint", "fit", cfg, "--out",
                              str(run_dir), "--no-progress"], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, f"the run ended before the signal: {child.communicate()}"
            assert time.monotonic() < deadline, "the run never reached the pause"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None and (found[2]["epoch"], found[2]["step"]) == (1, 4)
    assert str(found[0]) in err
    hint = [line for line in err.splitlines() if line.startswith("resume with: ")]
    assert len(hint) == 1
    command = hint[0][len("resume with: "):].split()
    assert command[0] == "pyrobnn" and command[1:] == ["fit", cfg, "--out", str(run_dir), "--resume"]

    resumed = subprocess.run(_cli(*command[1:], "--no-progress"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-3000:]
    want, _ = read_state(ref_dir / "model.safetensors")
    got, _ = read_state(run_dir / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert json.loads((ref_dir / "metrics.json").read_text())["test"] == \
        json.loads((run_dir / "metrics.json").read_text())["test"]


def test_interrupt_guard_turns_sigterm_into_a_flag_and_exit_code_143():
    from pyrobnn.cli.run import interrupt_guard
    with interrupt_guard() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop() and stop.exit_code == 143 and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):   # a second signal stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_fit_stop_requested_checkpoints_the_finished_step(tmp_path):
    from pyrobnn.inference.fit import TrainingInterrupted
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    y = (x.sum(1) > 0).long()
    bnn = pyrobnn.bayesian(models.build("mlp", in_features=3, out_features=2, hidden=[4]), likelihood="categorical")
    calls = []
    with pytest.raises(TrainingInterrupted) as info:
        fit(bnn, (x, y), epochs=2, batch_size=25, seed=0, progress=False, checkpoint_dir=str(tmp_path),
            stop_requested=lambda: calls.append(1) or len(calls) >= 2)
    assert (info.value.epoch, info.value.step) == (0, 2)
    assert info.value.checkpoint.name == "ckpt-e00000-s0000002.safetensors"


# -- files and pipes --------------------------------------------------------------------------------------
def test_atomic_writes_follow_the_umask(tmp_path):
    from pyrobnn.io import atomic_write_bytes
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One `pyrobnn fit` run, made under umask 022, shared by the tests that read its files."""
    tmp = tmp_path_factory.mktemp("fit")
    cfg = _config(tmp, epochs=3, lr=0.02)
    old = os.umask(0o022)
    try:
        assert main(["fit", cfg, "--out", str(tmp / "run"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    return tmp / "run"


def test_run_files_follow_the_umask(digits_run):
    modes = {str(p.relative_to(digits_run)): stat.S_IMODE(p.stat().st_mode)
             for p in digits_run.rglob("*") if p.is_file()}
    assert {"run.json", "model.safetensors", "metrics.json", "history.csv", "inference_data.nc"} <= set(modes)
    assert any(k.startswith("checkpoints/") for k in modes)
    assert set(modes.values()) == {0o644}, modes


def test_a_closed_pipe_ends_quietly(digits_run):
    child = subprocess.Popen(_cli("info", str(digits_run / "model.safetensors")), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=_env())
    child.stdout.close()        # the reader is gone before the command writes (like `| head` that has exited)
    err = child.stderr.read().decode()
    child.wait(timeout=120)
    assert err == "" and child.returncode == 141


# -- defaults that do not silently fail ----------------------------------------------------------------------
def test_auto_kl_warmup_for_log_uniform_and_empirical_ard_only():
    from pyrobnn.cli.config import validate_config
    from pyrobnn.inference.fit import auto_kl_warmup
    net = lambda: models.build("mlp", in_features=3, out_features=2, hidden=[4])  # noqa: E731
    x = torch.zeros(2, 3)
    for prior, want in (("log-uniform", (0, 5)), ("ard-empirical", (0, 5)), ("gaussian", None)):
        bnn = pyrobnn.bayesian(net(), prior=prior, likelihood="categorical")
        bnn.initialize(x)
        assert auto_kl_warmup(bnn, 20) == want, prior
    assert validate_config({})["train"]["kl_warmup"] == "auto"
    assert validate_config({"train": {"kl_warmup": "none"}})["train"]["kl_warmup"] == "none"


def test_fit_warns_when_the_predictive_is_no_better_than_the_class_prior():
    # constant inputs: the network can learn the class frequencies and nothing else
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 30)
    x = torch.zeros(len(y), 4)
    bnn = pyrobnn.bayesian(models.build("mlp", in_features=4, out_features=3, hidden=[8]), likelihood="categorical")
    with pytest.warns(RuntimeWarning, match="no better than the class prior"):
        fit(bnn, (x, y), epochs=10, lr=0.05, batch_size=60, seed=0, progress=False)
    # informative inputs: no warning
    x = torch.nn.functional.one_hot(y, 3).float().repeat(1, 2)[:, :4] + 0.1 * torch.randn(len(y), 4)
    bnn = pyrobnn.bayesian(models.build("mlp", in_features=4, out_features=3, hidden=[8]), likelihood="categorical")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit(bnn, (x, y), epochs=20, lr=0.05, batch_size=60, seed=0, progress=False)


# -- the λ-hypernetwork from TOML -------------------------------------------------------------------------
def test_toml_lambda_sweep_trains_over_the_range_and_reports_the_curve(tmp_path):
    cfg = _config(tmp_path, epochs=2, lr=0.02, bnn='guide = "hyper-mean-field"',
                  train="lambdas = [0.0, 2.0]\nlams_per_batch = 3")
    run = tmp_path / "hyper"
    assert main(["fit", cfg, "--out", str(run), "--no-progress"]) == 0
    _, meta = read_state(run / "model.safetensors")
    assert meta["spec"]["guide"]["name"] == "hyper-mean-field" and meta["spec"]["guide"]["lam_range"] == [0.0, 2.0]
    curve = json.loads((run / "metrics.json").read_text())["lambda_curve"]
    assert [r["lambda"] for r in curve] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["removable_fraction"] <= 0.95 for r in curve)
    assert len({round(r["nll"], 6) for r in curve}) == 5          # one guide, a different posterior per λ
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "Accuracy and sparsity over λ" in page and (run / "report" / "lambda_curve.png").stat().st_size > 0
    for r in curve:
        assert f"<td>{r['lambda']:.4g}</td><td>{r['accuracy']:.4g}</td>" in page


def test_an_interrupted_sample_run_keeps_its_finished_chains_and_resume_runs_only_the_rest(tmp_path, capsys):
    from pyrobnn.cli.config import load_config
    from pyrobnn.cli.run import SampleInterrupted, open_run, run_sample
    cfg_path = _config(tmp_path, train="[sample]\nkernel = \"sgld\"\nstep_size = 1e-4\nnum_samples = 2\n"
                                       "warmup_steps = 5\nthin = 1\nnum_chains = 2")
    run = tmp_path / "S"
    cfg = load_config(cfg_path)
    polls = []
    with pytest.raises(SampleInterrupted, match="chain 2 of 2; 1 finished"):
        with open_run(run, cfg, "sample") as rundir:
            run_sample(cfg, run, progress=False, run=rundir, stop_requested=lambda: polls.append(1) or len(polls) > 1)
    assert sorted(p.name for p in (run / "chains").iterdir()) == ["chain-000.safetensors"]
    first = (run / "chains" / "chain-000.safetensors").read_bytes()
    assert not (run / "posterior.safetensors").exists()
    assert main(["sample", cfg_path, "--out", str(run), "--no-progress"]) == 2     # occupied: resume or overwrite
    assert main(["sample", cfg_path, "--out", str(run), "--no-progress", "--resume"]) == 0
    assert (run / "chains" / "chain-000.safetensors").read_bytes() == first
    tensors, _ = read_state(run / "posterior.safetensors")
    assert next(v for k, v in tensors.items() if k.startswith("draw/")).shape[:2] == (2, 2)


def test_help_imports_neither_torch_nor_pyro():
    """`pyrobnn --help` builds every subcommand's parser without importing torch, Pyro, ArviZ or matplotlib
    (they load lazily),
    and every subcommand's --help ends with examples."""
    code = ("import sys, contextlib, io\n"
            "from pyrobnn.cli import build_parser, main\n"
            "for argv in (['--help'], ['fit', '--help'], ['sample', '--help'], ['distill', '--help'],\n"
            "             ['report', '--help'], ['info', '--help'], ['demo', '--help'], ['dwp', '--help']):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    assert 'example' in out.getvalue(), argv\n"
            "print(sorted(m for m in ('torch', 'pyro', 'arviz', 'matplotlib') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
