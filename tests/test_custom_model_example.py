"""examples/custom_model.py on tiny settings: every model trains by SVI and SGLD and reaches ArviZ."""
import json
import math

from _examples import load_example


def test_custom_model_example_runs_end_to_end(tmp_path):
    ex = load_example("custom_model")
    results = ex.main(["--out", str(tmp_path), "--hidden", "4", "--svi-steps", "3", "--samples", "25",
                       "--warmup", "3", "--thin", "1", "--batch", "16"])
    saved = json.loads((tmp_path / "results.json").read_text())
    keys = ["heteroscedastic/model", "heteroscedastic/baseline", "hierarchical/model", "hierarchical/baseline"]
    assert [k for k in saved if "/" in k] == keys
    for k in keys:
        for how in ("svi", "sgld"):
            assert math.isfinite(saved[k][how]["rmse"]) and math.isfinite(saved[k][how]["nll"])
        assert math.isfinite(saved[k]["sgld"]["arviz"]["elpd_loo"])
    # the hierarchical model's group sites reach az.summary
    assert {"tau", "mu_b", "sigma"} <= set(saved["hierarchical/model"]["sgld"]["arviz"]["summary"])
    assert saved["n_train"] + saved["n_test"] == 442 and results["n_test"] == 88
    assert (tmp_path / "results.md").read_text().count("\n") == 6
