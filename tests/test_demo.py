"""``pyrobnn demo``: the KL schedule, argument checks and a 2-epoch run writing metrics.json."""
import json
import math

import pytest

from pyrobnn.cli import main
from pyrobnn.cli.commands.demo import kl_schedule


def test_kl_schedule_ramps_linearly_to_the_tempered_weight():
    f = kl_schedule(0.1, ramp_epochs=10)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.05, abs=1e-12)
    assert f(10) == pytest.approx(0.1, abs=1e-12)
    assert f(149.5) == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("flag, value", [("--kl-weight", "0"), ("--kl-weight", "1.5"), ("--init-scale", "0"),
                                         ("--det-weight-decay", "-1"), ("--epochs", "0")])
def test_bad_arguments_are_clear_errors(flag, value, capsys):
    assert main(["demo", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err


def test_two_epoch_demo_writes_metrics(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "KL weight λ = 0.1" in out and "Bayesian better on NLL" in out
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert rows["settings"] == {"seed": 0, "epochs": 2, "kl_weight": 0.1, "init_scale": 1e-3,
                                "det_weight_decay": 0.0}
    for name in ("bayesian (mean-field)", "deterministic"):
        r = rows[name]
        # 10 classes: after 2 epochs both networks are far better than chance (0.1) and their
        # metrics are proper numbers in range
        assert 0.5 < r["accuracy"] <= 1.0
        assert 0.0 < r["nll"] < math.log(10)
        assert 0.0 <= r["ece"] <= 1.0 and 0.0 <= r["brier"] <= 2.0
        assert 0.1 <= r["mean_confidence"] <= 1.0
    assert (tmp_path / "reliability.png").stat().st_size > 1000
