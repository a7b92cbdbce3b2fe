"""Bad input and hostile files, property-based (hypothesis).

Every malformed config, saved file, checkpoint or tensor must end in a clear ``ValueError``,
``TypeError`` or ``FileNotFoundError`` (or be accepted); nothing may crash the process, raise anything
else, or execute code. Saved files hold no pickle and loading never unpickles.

Each property records its outcome with ``hypothesis.event`` (shown by ``--hypothesis-show-statistics``)
and in a tally that ``PYROBNN_RELIABILITY_OUT=tally.json pytest tests/test_hostile_inputs.py`` writes
out: how many cases each class generated and how they ended (docs/RELIABILITY.md tabulates one such
run). Runs are derandomised (reproducible) and keep no example database (hypothesis still caches
Unicode tables in the git-ignored ``.hypothesis/``).
"""
import collections
import contextlib
import io
import json
import math
import os
import pickle
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyrobnn  # noqa: E402
from pyrobnn import models  # noqa: E402
from pyrobnn.cli.config import load_config, validate_config  # noqa: E402
from pyrobnn.io import read_state, unflatten_state, write_state  # noqa: E402

CLEAR = (ValueError, TypeError, FileNotFoundError)
COMMON = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# strings a hostile file would use to try to make a loader import or run something
DANGEROUS = ["__import__('os').system('touch PWNED')", "os.system", "builtins.eval", "subprocess.Popen",
             "../../../../etc/passwd", "/dev/zero", "${HOME}", "$(touch PWNED)", "; touch PWNED",
             "torch.load", "pickle.loads", "__class__", "__reduce__", "\x00", "mlp\x00evil"]
_dangerous = st.one_of(st.sampled_from(DANGEROUS), st.integers(1, 3).map(lambda k: "A" * 10 ** (k + 2)))

TALLY = collections.defaultdict(collections.Counter)     # {test: {outcome: count}}


def _outcome(fn, *args, **kwargs):
    """Run fn; a clear error is an outcome (recorded), anything else fails the test."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    try:
        fn(*args, **kwargs)
    except CLEAR as e:
        event(f"outcome: {type(e).__name__}")
        TALLY[test][type(e).__name__] += 1
        assert str(e), "an error must say what is wrong"
        return e
    event("outcome: accepted")
    TALLY[test]["accepted"] += 1
    return None


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    yield
    out = os.environ.get("PYROBNN_RELIABILITY_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({k: dict(v) for k, v in TALLY.items()}, f, indent=1, sort_keys=True)


@pytest.fixture(autouse=True)
def _no_pwned(tmp_path, monkeypatch):
    """Run in a scratch cwd and check that no hostile string created a file."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------------------------------
# 1. TOML run configs
# ----------------------------------------------------------------------------------------------------
def _toml_key(k):
    return json.dumps(k, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return _toml_key(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict) -> str:
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in doc.items())


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_small_ints = st.integers(-3, 4096)          # model sizes stay small: a memory bomb is not what we test here
toml_scalars = st.one_of(st.booleans(), st.integers(), st.floats(), _text, _dangerous)
toml_values = st.recursive(toml_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(_text, c, max_size=4)), max_leaves=8)
model_values = st.recursive(st.one_of(st.booleans(), _small_ints, st.floats(), _text),
                            lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_text, c, max_size=3)),
                            max_leaves=6)

BASE = {"seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [8]},
        "bnn": {"prior": "gaussian", "guide": "mean-field", "likelihood": "categorical"},
        "train": {"epochs": 1, "lr": 0.01, "batch_size": 64}}
KEYS = {"data": ["name", "test_fraction", "seed", "root"],
        "model": ["name", "hidden", "activation", "in_features", "out_features", "num_classes", "flatten"],
        "bnn": ["prior", "guide", "likelihood", "layers", "local_reparameterization"],
        "train": ["epochs", "lr", "batch_size", "optimizer", "kl_warmup", "lr_schedule", "num_samples",
                  "checkpoint_every", "grad_clip"]}
NAMES = {"data": ["digits", "breast_cancer", "boston", "mnist", "Digits", ""],
         "model": ["mlp", "lenet300", "lenet5", "MLP", "resnet"],
         "prior": ["gaussian", "log-uniform", "ard", "deep-weight", "laplace"],
         "guide": ["mean-field", "additive-noise", "hyper-mean-field", "full-rank"],
         "likelihood": ["categorical", "bernoulli", "gaussian", "poisson"]}


@st.composite
def mutated_configs(draw):
    """A valid config with 1-4 random edits: a key set to a hostile value, a key removed, a section
    replaced, or an unknown key added."""
    doc = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "name", "drop", "section", "unknown"]))
        section = draw(st.sampled_from(list(KEYS)))
        if not isinstance(doc.get(section), dict) and kind != "unknown":
            doc[section] = {}
        if kind == "set":
            key = draw(st.sampled_from(KEYS[section]))
            doc[section][key] = draw(model_values if section == "model" else toml_values)
        elif kind == "name":
            key = "name" if section in ("data", "model") else draw(st.sampled_from(["prior", "guide", "likelihood"]))
            pool = NAMES[section] if key == "name" else NAMES[key]
            doc[section][key] = draw(st.one_of(st.sampled_from(pool), _dangerous, _text))
        elif kind == "drop":
            doc[section].pop(draw(st.sampled_from(KEYS[section])), None)
        elif kind == "section":
            doc[section] = draw(toml_values)
        else:
            doc[draw(_text)] = draw(toml_values)
    if draw(st.booleans()):
        doc["seed"] = draw(st.one_of(st.integers(), toml_values))
    return doc


def _write(text_or_bytes) -> Path:
    fd, path = tempfile.mkstemp(suffix=".toml", dir=".")
    with os.fdopen(fd, "wb") as f:
        f.write(text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode("utf-8", "surrogatepass"))
    return Path(path)


def _load_and_build(path):
    """What ``pyrobnn fit`` does before training: load + validate, seed, data, network, BNN."""
    import pyro
    from pyrobnn.cli.run import build_from_config
    cfg = load_config(path)
    pyro.set_rng_seed(cfg["seed"])
    build_from_config(cfg)


@settings(max_examples=250, **COMMON)
@given(doc=mutated_configs())
def test_hostile_toml_configs_give_clear_errors(doc):
    path = _write(to_toml(doc))
    try:
        err = _outcome(_load_and_build, path)
        if err is not None and isinstance(err, ValueError) and "not valid TOML" not in str(err):
            # the CLI turns the same error into one line on stderr and exit status 2, not a traceback
            from pyrobnn.cli import main
            if _validation_error(path):
                with contextlib.redirect_stderr(io.StringIO()) as stderr:
                    assert main(["fit", str(path), "--out", "out"]) == 2
                assert stderr.getvalue().startswith("pyrobnn fit: error: ") and "Traceback" not in stderr.getvalue()
    finally:
        path.unlink()


def _validation_error(path):
    try:
        load_config(path)
    except CLEAR:
        return True
    return False


@settings(max_examples=150, **COMMON)
@given(blob=st.one_of(st.binary(max_size=300), st.binary(max_size=40).map(lambda b: b"[train]\nepochs = " + b)))
def test_random_bytes_as_config(blob):
    path = _write(blob)
    try:
        _outcome(load_config, path)
    finally:
        path.unlink()


@settings(max_examples=200, **COMMON)
@given(raw=st.one_of(st.none(), toml_values, st.dictionaries(st.sampled_from(["seed", "data", "model", "bnn", "train"]),
                                                                 st.one_of(st.none(), toml_values), max_size=5)))
def test_validate_config_on_arbitrary_python_objects(raw):
    _outcome(validate_config, raw)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        load_config("no/such/run.toml")


# ----------------------------------------------------------------------------------------------------
# 2. saved models: bytes, spec and safetensors header
# ----------------------------------------------------------------------------------------------------
def _saved_model_bytes():
    torch.manual_seed(0)
    bnn = pyrobnn.bayesian(models.build("mlp", in_features=4, out_features=3, hidden=[5]), likelihood="categorical")
    bnn.initialize(torch.randn(2, 4))
    with tempfile.TemporaryDirectory() as d:
        pyrobnn.save(bnn, Path(d) / "m.safetensors")
        return (Path(d) / "m.safetensors").read_bytes()


MODEL_BYTES = _saved_model_bytes()
HEADER_LEN = struct.unpack("<Q", MODEL_BYTES[:8])[0]


def _load_bytes(data: bytes, fn=None):
    fd, path = tempfile.mkstemp(suffix=".safetensors", dir=".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        return (fn or pyrobnn.load)(path)
    finally:
        os.unlink(path)


@st.composite
def byte_mutations(draw):
    data = bytearray(MODEL_BYTES)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "header-length", "header-region"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[i:])
    if kind == "delete":
        i = draw(st.integers(0, len(data) - 1))
        return bytes(data[:i]) + bytes(data[i + draw(st.integers(1, 64)):])
    if kind == "header-length":
        n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(HEADER_LEN - 16, HEADER_LEN + 16).filter(
            lambda v: v >= 0 and v != HEADER_LEN)))
        return struct.pack("<Q", n) + bytes(data[8:])
    i = draw(st.integers(8, 8 + HEADER_LEN - 1))               # a byte of the JSON header
    data[i] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300, **COMMON)
@given(blob=byte_mutations())
def test_mutated_model_file_bytes(blob):
    _outcome(_load_bytes, blob)


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, prefix + (i,))


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 50),
                                     st.floats(), _text, _dangerous),
                           lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(_text, c, max_size=4)),
                           max_leaves=8)

def _model_state():
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(MODEL_BYTES)
    try:
        return read_state(path)
    finally:
        os.unlink(path)


MODEL_TENSORS, MODEL_META = _model_state()
SPEC_PATHS = [p for p in _json_paths(MODEL_META["spec"])]


@st.composite
def spec_mutations(draw):
    """The saved spec with 1-3 values replaced (by hostile JSON) or keys deleted; the checksum stays
    valid, so only the loader's validation stands between the file and the code."""
    meta = json.loads(json.dumps(MODEL_META))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(SPEC_PATHS))
        node = meta["spec"]
        for k in path[:-1]:
            if not isinstance(node, (dict, list)):
                break
            try:
                node = node[k]
            except (KeyError, IndexError, TypeError):
                break
        else:
            if not path:
                meta["spec"] = draw(json_values)
            elif isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
                node.pop(path[-1], None)
            elif isinstance(node, (dict, list)):
                try:
                    node[path[-1]] = draw(st.one_of(json_values, _dangerous))
                except (IndexError, TypeError):     # an earlier edit turned this dict into a list
                    pass
    if draw(st.integers(0, 9)) == 0:
        meta[draw(st.sampled_from(["kind", "version"]))] = draw(json_values)
    return meta


def _write_raw(path, tensors, meta):
    """Like write_state, but keeps a mutated format ``version``; the checksum is recomputed, so the
    file passes the torn-file check and reaches the spec validation."""
    from safetensors.torch import save_file
    from pyrobnn.state_io import _digest
    save_file(tensors, str(path), metadata={"pyrobnn": json.dumps({**meta, "sha256": _digest(tensors)})})


def _write_and_load(tensors, meta):
    fd, path = tempfile.mkstemp(suffix=".safetensors", dir=".")
    os.close(fd)
    try:
        _write_raw(path, tensors, meta)
        return pyrobnn.load(path)
    finally:
        os.unlink(path)


@settings(max_examples=300, **COMMON)
@given(meta=spec_mutations())
def test_mutated_model_spec(meta):
    _outcome(_write_and_load, MODEL_TENSORS, meta)


@st.composite
def size_bombs(draw):
    """Specs that ask for huge allocations: layer sizes, feature counts or input shapes up to 2**40."""
    meta = json.loads(json.dumps(MODEL_META))
    spec = meta["spec"]
    big = st.one_of(st.integers(10**5, 2**40), st.sampled_from([2**20, 2**26, 2**31, 2**40]))
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["hidden", "in_features", "out_features", "input_shape"]))
        if where == "hidden":
            spec["arch"]["hidden"] = draw(st.lists(big, min_size=1, max_size=3))
        elif where == "input_shape":
            spec["input_shape"] = draw(st.lists(st.one_of(big, st.integers(1, 4096)), min_size=1, max_size=4))
        else:
            spec["arch"][where] = draw(big)
    return meta


@settings(max_examples=60, **COMMON)
@given(meta=size_bombs())
def test_size_bomb_specs_are_refused_before_allocating(meta):
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = _outcome(_write_and_load, MODEL_TENSORS, meta)
    assert isinstance(err, ValueError)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"loading a hostile spec grew the peak memory by {grown_mb:.0f} MB"


safetensor_dtypes = st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3",
                                     "C64", "X99", "", "f32"])


@st.composite
def safetensors_files(draw):
    """Hand-made safetensors headers: arbitrary dtypes, shapes (negative, huge, mismatched) and data
    offsets (overlapping, out of range), random payload and metadata."""
    header = {}
    for i in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.one_of(st.integers(0, 5), st.integers(-2, 2**40)), max_size=3))
        start = draw(st.integers(0, 64))
        header[draw(st.one_of(st.just(f"t{i}"), _text))] = {
            "dtype": draw(safetensor_dtypes), "shape": shape,
            "data_offsets": draw(st.one_of(st.tuples(st.just(start), st.integers(0, 128)).map(list), json_values))}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(
            st.dictionaries(st.sampled_from(["pyrobnn", "x"]), st.one_of(_text, st.just(json.dumps(MODEL_META)))),
            json_values))
    if draw(st.integers(0, 5)) == 0:
        header = draw(json_values)
    raw = json.dumps(header).encode()
    pad = draw(st.integers(0, 7))
    return struct.pack("<Q", len(raw) + pad) + raw + b" " * pad + draw(st.binary(max_size=128))


@settings(max_examples=300, **COMMON)
@given(blob=safetensors_files())
def test_handmade_safetensors_headers(blob):
    _outcome(_load_bytes, blob, read_state)
    _outcome(_load_bytes, blob)


# ----------------------------------------------------------------------------------------------------
# 3. training checkpoints
# ----------------------------------------------------------------------------------------------------
def _tiny_bnn():
    torch.manual_seed(0)
    return pyrobnn.bayesian(models.build("mlp", in_features=3, out_features=2, hidden=[4]), likelihood="categorical")


X_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
Y_T = (X_T[:, 0] > 0).long()


def _checkpoint():
    from pyrobnn.inference import fit, latest_checkpoint
    with tempfile.TemporaryDirectory() as d:
        fit(_tiny_bnn(), (X_T, Y_T), 1, batch_size=8, checkpoint_dir=d, progress=False, seed=0)
        _, tensors, meta = latest_checkpoint(d)
        return tensors, meta


CKPT_TENSORS, CKPT_META = _checkpoint()
CKPT_PATHS = list(_json_paths({k: v for k, v in CKPT_META.items() if k not in ("version", "sha256")}))


def _set_path(root, path, value):
    """Set root[path[0]][path[1]]... = value where that path still exists (earlier edits may have
    replaced a container by a scalar or a list by a dict)."""
    node = root
    for k in path[:-1]:
        if isinstance(node, dict) and k in node or isinstance(node, list) and isinstance(k, int) and k < len(node):
            node = node[k]
        else:
            return
    k = path[-1]
    if isinstance(node, dict) or isinstance(node, list) and isinstance(k, int) and k < len(node):
        node[k] = value


@st.composite
def checkpoint_mutations(draw):
    meta = json.loads(json.dumps(CKPT_META))
    tensors = dict(CKPT_TENSORS)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "drop-tensor", "reshape-tensor"]))
        if kind == "value":
            _set_path(meta, draw(st.sampled_from(CKPT_PATHS[1:])), draw(json_values))
        elif kind == "drop-tensor":
            tensors.pop(draw(st.sampled_from(sorted(tensors))), None)
        elif tensors:
            k = draw(st.sampled_from(sorted(tensors)))
            tensors[k] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)))
    return tensors, meta


def _resume_from(tensors, meta):
    from pyrobnn.inference import fit
    with tempfile.TemporaryDirectory(dir=".") as d:
        _write_raw(Path(d) / "ckpt-e00001-s0000000.safetensors", tensors, meta)
        fit(_tiny_bnn(), (X_T, Y_T), 2, batch_size=8, checkpoint_dir=d, resume=True, progress=False, seed=0)


@settings(max_examples=150, **COMMON)
@given(mutation=checkpoint_mutations())
def test_mutated_checkpoints_on_resume(mutation):
    from pyrobnn.inference import TrainingDiverged
    try:
        _outcome(_resume_from, *mutation)
    except TrainingDiverged:   # e.g. a negative Adam second moment: NaN at the first step, the NaN guard stops
        event("outcome: TrainingDiverged")
        TALLY["test_mutated_checkpoints_on_resume"]["TrainingDiverged"] += 1


@settings(max_examples=150, **COMMON)
@given(skeleton=json_values)
def test_unflatten_arbitrary_skeletons(skeleton):
    _outcome(unflatten_state, skeleton, {"state.0": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------
# 4. input tensors
# ----------------------------------------------------------------------------------------------------
TRAINED = _tiny_bnn()
TRAINED.initialize(X_T)

dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
                          torch.uint8, torch.bool, torch.complex64])
special = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, float("nan"), float("inf"), float("-inf"), 1e-40])


@st.composite
def tensors_like_inputs(draw, features=3):
    if draw(st.integers(0, 9)) == 0:       # not a tensor at all
        return draw(st.one_of(st.none(), _text, st.dictionaries(_text, st.integers(), max_size=2),
                              st.lists(st.one_of(st.integers(), _text), max_size=4), st.just(object())))
    shape = draw(st.one_of(st.just([draw(st.integers(0, 6)), features]),
                           st.lists(st.integers(0, 5), max_size=4)))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if t.numel() and draw(st.booleans()):
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, t.numel() - 1))] = draw(special)
    return t.to(draw(dtypes)) if draw(st.booleans()) else t


@st.composite
def labels(draw, n=None):
    kind = draw(st.sampled_from(["ok", "range", "float", "shape", "dtype", "other"]))
    n = draw(st.integers(0, 6)) if n is None else n
    if kind == "ok":
        return torch.randint(0, 2, (n,))
    if kind == "range":
        return torch.tensor(draw(st.lists(st.integers(-2**40, 2**40), min_size=n, max_size=n)), dtype=torch.long)
    if kind == "float":
        return torch.tensor(draw(st.lists(st.one_of(st.floats(), special), min_size=n, max_size=n)))
    if kind == "shape":
        return torch.zeros(draw(st.lists(st.integers(0, 4), max_size=3)), dtype=torch.long)
    if kind == "dtype":
        return torch.zeros(n, dtype=draw(dtypes))
    return draw(st.one_of(st.none(), _text, st.lists(st.one_of(st.integers(), _text), max_size=4)))


@settings(max_examples=300, **COMMON)
@given(x=tensors_like_inputs(), num_samples=st.one_of(st.integers(-2, 4), st.just(True), st.floats(0, 3)))
def test_predict_on_hostile_inputs(x, num_samples):
    def run():
        out = TRAINED.predict(x, num_samples)
        if torch.as_tensor(x).abs().max() < 1e15:
            assert torch.isfinite(out).all()      # ordinary inputs give finite probabilities
        elif not torch.isfinite(out).all():       # |x|² overflows float32 in the LRT variance: not guarded
            event("finite but extreme input (|x| ≥ 1e15): non-finite probabilities")
    _outcome(run)


@settings(max_examples=200, **COMMON)
@given(x=tensors_like_inputs(), y=labels())
def test_evaluate_on_hostile_inputs(x, y):
    _outcome(TRAINED.evaluate, x, y, 2)


@st.composite
def xy_pairs(draw):
    """Half the time x and y agree on the number of examples (so the hostile part is elsewhere)."""
    x = draw(tensors_like_inputs())
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() and draw(st.booleans()) else None
    return x, draw(labels(n))


@settings(max_examples=150, **COMMON)
@given(xy=xy_pairs(),
       kwargs=st.fixed_dictionaries({}, optional={
           "epochs": st.one_of(st.integers(-1, 1), st.just(True), st.floats(), _text),
           "lr": st.one_of(st.floats(), st.integers(-1, 1), _text),
           "batch_size": st.one_of(st.integers(-1, 8), st.just(2.5), st.just(False)),
           "optimizer": st.one_of(st.sampled_from(["adam", "sgd", "rmsprop", "ADAM"]), _text),
           "kl_warmup": st.one_of(st.none(), toml_values),
           "lr_schedule": st.one_of(st.none(), st.sampled_from(["cosine", "linear-decay", "step"]), toml_values)}))
def test_fit_on_hostile_inputs(xy, kwargs):
    from pyrobnn.inference import TrainingDiverged, fit
    kwargs = {"epochs": 1, "progress": False, **kwargs}
    epochs = kwargs.pop("epochs")

    try:
        _outcome(fit, _tiny_bnn(), xy, epochs, **kwargs)
    except TrainingDiverged:   # finite but extreme data (|x| ~ 1e30): the NaN guard's clear stop
        event("outcome: TrainingDiverged")
        TALLY["test_fit_on_hostile_inputs"]["TrainingDiverged"] += 1


# ----------------------------------------------------------------------------------------------------
# 5. no pickle, ever
# ----------------------------------------------------------------------------------------------------
class _Tripwire:
    """A pickle whose unpickling creates a file: evidence that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    class RefusingUnpickler(pickle.Unpickler):
        def __init__(self, *a, **k):
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)


def _accounted_safetensors(data: bytes):
    """Every byte of a safetensors file: the 8-byte length, the JSON header, then exactly the tensors'
    bytes, contiguous — no room for anything else (a pickle, a zip)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    end = 0
    for a, b in spans:
        assert a == end
        end = b
    assert 8 + n + end == len(data)
    assert all(isinstance(v, str) for v in header.get("__metadata__", {}).values())
    return header


def test_saved_files_hold_no_pickle_and_load_without_unpickling(no_unpickling, tmp_path):
    from pyrobnn.inference import SamplePosterior, fit, sample
    bnn = _tiny_bnn()
    fit(bnn, (X_T, Y_T), 1, batch_size=8, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1, progress=False,
        seed=0)
    pyrobnn.save(bnn, tmp_path / "model.safetensors")
    bnn.dataset_size = 16
    post = sample(bnn, (X_T, Y_T), num_samples=3, warmup_steps=2, thin=1, batch_size=8, step_size=1e-3, seed=0)
    post.save(tmp_path / "post.safetensors")
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) >= 4
    for f in files:
        _accounted_safetensors(f.read_bytes())
        read_state(f)
    loaded = pyrobnn.load(tmp_path / "model.safetensors")
    for k, v in bnn.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    SamplePosterior.load(tmp_path / "post.safetensors")
    from pyrobnn.inference import latest_checkpoint, load_checkpoint
    load_checkpoint(_tiny_bnn().initialize(X_T), latest_checkpoint(tmp_path / "ck")[0])


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "pickle-in-metadata"])
def test_pickle_files_are_refused_and_never_executed(tmp_path, writer):
    evidence = tmp_path / "UNPICKLED"
    target = tmp_path / "model.safetensors"
    if writer == "pickle":
        target.write_bytes(pickle.dumps(_Tripwire(str(evidence))))
    elif writer == "torch.save":
        torch.save({"state": _Tripwire(str(evidence))}, target)
    else:   # a base64 pickle smuggled into the JSON metadata is just a string to pyrobnn
        import base64
        meta = dict(MODEL_META, spec=dict(MODEL_META["spec"],
                                          arch=base64.b64encode(pickle.dumps(_Tripwire(str(evidence)))).decode()))
        meta = {k: v for k, v in meta.items() if k not in ("version", "sha256")}
        write_state(target, MODEL_TENSORS, meta)
    from pyrobnn.inference import SamplePosterior, latest_checkpoint
    for loader in (pyrobnn.load, SamplePosterior.load) + ((read_state,) if writer != "pickle-in-metadata" else ()):
        with pytest.raises(ValueError):
            loader(target)
    (tmp_path / "ckpt-e00001-s0000000.safetensors").write_bytes(target.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert latest_checkpoint(tmp_path) is None     # skipped (unreadable, or not a checkpoint)
    assert not evidence.exists()


@settings(max_examples=100, **COMMON)
@given(blob=st.binary(max_size=200).map(lambda b: b"\x80\x04\x95" + b))
def test_pickle_prefixed_bytes(blob):
    _outcome(_load_bytes, blob)


def test_process_still_alive():
    """Trivially true if reached: none of the cases above crashed the interpreter."""
    assert sys.modules["torch"] is torch
