"""The Pyro AutoGuide compatibility harness (tests/pyro_compat): how it adds pyrobnn's guides next to
AutoNormal and pairs outcomes (the run itself needs Pyro's test module: ``make pyro-compat``)."""
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_median

from pyrobnn.guides import AdditiveNoise, MeanField

HERE = Path(__file__).resolve().parent / "pyro_compat"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_pyro_compat_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plugin_adds_both_guides_wherever_autonormal_is_parametrised():
    plugin = _load("plugin")
    marked = pytest.param(AutoNormal, marks=pytest.mark.xfail(reason="x"))
    partial = functools.partial(AutoNormal, init_loc_fn=init_to_median)
    out = plugin._extend([AutoDelta, AutoNormal, (AutoNormal, 3), partial, marked])
    assert out[:5] == [AutoDelta, AutoNormal, (AutoNormal, 3), partial, marked]
    added = out[5:]
    assert added[0:2] == [MeanField, AdditiveNoise]
    assert added[2:4] == [(MeanField, 3), (AdditiveNoise, 3)]
    assert [p.func for p in added[4:6]] == [MeanField, AdditiveNoise]
    assert added[4].keywords == {"init_loc_fn": init_to_median}
    assert added[6].values == (MeanField,) and added[6].marks == marked.marks
    assert plugin._extend([AutoDelta, 1]) == [AutoDelta, 1]  # nothing to add
    assert plugin._value_id(MeanField) == "MeanField"
    assert plugin._value_id(functools.partial(MeanField, init_loc_fn=init_to_median)) == \
        "partial(MeanField,init_loc_fn=init_to_median)"


def test_runner_pairs_each_added_test_with_autonormal_and_adapts_only_known_text():
    run = _load("run")
    assert run.counterpart("test_shapes[Trace_ELBO-init_to_mean-MeanField]", "MeanField") == \
        "test_shapes[Trace_ELBO-init_to_mean-AutoNormal]"
    assert run.counterpart("test_x[partial(AdditiveNoise,init_loc_fn=f)]", "AdditiveNoise") == \
        "test_x[partial(AutoNormal,init_loc_fn=f)]"
    scores = ('def test_scores(auto_class):\n    prefix = auto_class.__name__\n    if prefix != "AutoNormal":\n'
              '        pass\n')
    src = "def test_exact_tree(Guide):\n    is_exact = Guide not in (\n        AutoNormal,\n        AutoDelta,\n    )\n" + scores
    adapted = run.adapt(src)
    assert "        MeanField,\n        AdditiveNoise,\n" in adapted and adapted.startswith("from pyrobnn.guides")
    assert 'if prefix in ("MeanField", "AdditiveNoise"):' in adapted and adapted.count('if prefix != "AutoNormal":') == 1
    with pytest.raises(SystemExit, match="cannot adapt test_exact_tree"):
        run.adapt("def test_exact_tree(Guide):\n    pass\n" + scores)
    with pytest.raises(SystemExit, match="cannot adapt test_scores"):
        run.adapt("def test_exact_tree(Guide):\n    is_exact = Guide not in (\n        AutoNormal,\n    )\n")
    with pytest.raises(SystemExit, match="not a Pyro source tree"):
        run.obtain("0.0.0", source=str(HERE))
