"""Run Pyro's own AutoGuide test module with pyrobnn's MeanField and AdditiveNoise added next to AutoNormal.

    python tests/pyro_compat/run.py [--source PYRO_CHECKOUT] [-k EXPR] [--jobs N]    (or: make pyro-compat)

Pyro's ``tests/infer/test_autoguide.py`` (and the ``tests/common.py`` helpers it imports) at the release of
the installed ``pyro-ppl`` is not part of this repository; it is obtained at run time, in this order:

1. ``--source DIR`` (or ``PYROBNN_PYRO_SOURCE``): a Pyro source tree (a git checkout of that release);
2. the cache ``~/.cache/pyrobnn/pyro-compat/<version>/`` (``$XDG_CACHE_HOME`` if set) a previous run filled;
3. the release's sdist on PyPI (``pip download --no-deps --no-binary :all: pyro-ppl==<version>``), used if
   it contains the test files (the 1.9.x sdists do not);
4. the release's source archive on GitHub (``https://codeload.github.com/pyro-ppl/pyro/tar.gz/refs/tags/<version>``).

``plugin.py`` adds the two guides to every ``parametrize`` list that holds AutoNormal. The outcome of each
added test is compared with AutoNormal's in the same parametrisation: the run fails (exit 1) if a test
that passes for AutoNormal does not pass for MeanField or AdditiveNoise, and prints every such test.

``test_exact_tree`` branches on AutoNormal's identity rather than on what the guide does: it expects exact
posterior standard deviations from every guide not in its list of mean-field classes. MeanField and AdditiveNoise
are mean-field guides, so the list gains them (the adaptation is printed, and the run stops if the text it replaces
is not found). ``test_scores`` checks where each guide keeps its density: AutoContinuous guides at an auxiliary
``_<Guide>_latent`` site, AutoNormal at ``z_unconstrained``; both put a ``Delta`` at ``z``, whose guide log-density
is 0. MeanField and AdditiveNoise sample ``z`` from its Normal directly (so ``TraceMeanField_ELBO`` can use
closed-form KLs), so for them the same test asserts the same fact at their site: no auxiliary site in the guide (``z`` is
its only sample site), the model's log-density at ``z`` non-zero, and the guide's log-density at ``z`` equal to its
Normal's at the drawn value (the adaptation is printed, like the one above).
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FILES = ("tests/infer/test_autoguide.py", "tests/common.py")
ADDED = ("MeanField", "AdditiveNoise")
ARCHIVE = "https://codeload.github.com/pyro-ppl/pyro/tar.gz/refs/tags/{version}"
#: (test, text, replacement) applied to the test module; see the module doc for why
ADAPTATIONS = (
    ("test_exact_tree", "    is_exact = Guide not in (\n        AutoNormal,\n",
     "    is_exact = Guide not in (\n        AutoNormal,\n        MeanField,\n        AdditiveNoise,\n"),
    ("test_scores", '    prefix = auto_class.__name__\n    if prefix != "AutoNormal":\n',
     '    prefix = auto_class.__name__\n'
     '    if prefix in ("MeanField", "AdditiveNoise"):\n'
     '        assert [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"] == ["z"]\n'
     '        assert model_trace.nodes["z"]["log_prob_sum"].item() != 0.0\n'
     '        site = guide_trace.nodes["z"]\n'
     '        assert site["log_prob_sum"].item() == site["fn"].log_prob(site["value"]).sum().item() != 0.0\n'
     '        return\n'
     '    if prefix != "AutoNormal":\n'),
)
#: the tests the comparison reads: AutoNormal's and the added guides' (the module has ~1000 tests in all)
DEFAULT_SELECTION = "AutoNormal or MeanField or AdditiveNoise"
#: tests about AutoNormal's implementation rather than its behaviour (module doc), with the reason
NOT_APPLICABLE: dict = {}
_IMPORT = "from pyrobnn.guides import AdditiveNoise, MeanField  # added by pyrobnn's tests/pyro_compat/run.py\n"


def adapt(source: str) -> str:
    """The test module with :data:`ADAPTATIONS` applied (each must match exactly once)."""
    for test, old, new in ADAPTATIONS:
        if source.count(old) != 1:
            sys.exit(f"pyro-compat: cannot adapt {test}: its text changed in this Pyro release; update ADAPTATIONS")
        source = source.replace(old, new)
        print(f"pyro-compat: adapted {test}: {old.strip()!r} -> {new.strip()!r}")
    return _IMPORT + source


def _pyro_version() -> str:
    import pyro
    return pyro.__version__


def _from_tar(blob: bytes, version: str):
    """The FILES from a source tarball (sdist or archive) whose single top folder holds the tree."""
    found = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[-1]
            if rel in FILES and m.isfile():
                found[rel] = tar.extractfile(m).read()
    return found if len(found) == len(FILES) else None


def _from_pypi(version: str):
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"pyro-ppl=={version}", "-d", d], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"pyro-compat: pip download of the pyro-ppl {version} sdist failed: {r.stderr.strip()[-300:]}")
            return None
        for f in Path(d).glob("*.tar.gz"):
            found = _from_tar(f.read_bytes(), version)
            if found:
                return found
        print(f"pyro-compat: the pyro-ppl {version} sdist on PyPI has no {FILES[0]}")
    return None


def _from_github(version: str):
    url = ARCHIVE.format(version=version)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return _from_tar(r.read(), version)
    except OSError as e:
        print(f"pyro-compat: cannot download {url}: {e}")
        return None


def obtain(version: str, source=None, optional: bool = False) -> Path:
    """A folder holding FILES for Pyro ``version`` (see the module doc for where they come from)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyrobnn" / "pyro-compat" / version
    if source:
        src = Path(source)
        missing = [f for f in FILES if not (src / f).is_file()]
        if missing:
            sys.exit(f"pyro-compat: {src} is not a Pyro source tree (no {', '.join(missing)})")
        found = {f: (src / f).read_bytes() for f in FILES}
    elif all((cache / f).is_file() for f in FILES):
        return cache
    else:
        found = _from_pypi(version) or _from_github(version)
        if not found and optional:
            print(f"pyro-compat: skipped: Pyro {version}'s {FILES[0]} could not be obtained here (no --source, "
                  f"no cache in {cache}, not in the PyPI sdist, no route to GitHub)")
            sys.exit(0)
        if not found:
            sys.exit(f"pyro-compat: could not obtain Pyro {version}'s {FILES[0]}; pass --source with a checkout of "
                     f"the {version} release (git clone -b {version} https://github.com/pyro-ppl/pyro)")
    for rel, data in found.items():
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(data)
    return cache


def _outcomes(xml_path: Path):
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = case.get("name")
        tags = {c.tag for c in case}
        if "failure" in tags or "error" in tags:
            out[name] = "failed"
        elif "skipped" in tags:
            skip = case.find("skipped")
            out[name] = "xfailed" if skip is not None and skip.get("type") == "pytest.xfail" else "skipped"
        else:
            out[name] = "passed"
    return out


def counterpart(name: str, guide: str) -> str:
    """The AutoNormal test id of an added guide's test id."""
    return re.sub(rf"\b{guide}\b", "AutoNormal", name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=os.environ.get("PYROBNN_PYRO_SOURCE"),
                    help="a Pyro source tree at the installed release")
    ap.add_argument("--optional", action="store_true",
                    help="exit 0 with a one-line notice when Pyro's test module cannot be obtained (CI on a machine "
                         "without a route to GitHub and no cache)")
    ap.add_argument("-k", dest="keyword", default=DEFAULT_SELECTION,
                    help=f"pytest -k expression (default {DEFAULT_SELECTION!r}: the tests the comparison needs; "
                         "'' for the whole module)")
    ap.add_argument("--jobs", type=int, default=1, help="pytest-xdist workers (needs pytest-xdist)")
    args = ap.parse_args(argv)
    version = _pyro_version()
    tree = obtain(version, args.source, args.optional)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for rel in FILES:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tree / rel, work / rel)
        test_file = work / FILES[0]
        test_file.write_text(adapt(test_file.read_text()))
        for pkg in ("tests", "tests/infer"):
            (work / pkg / "__init__.py").touch()
        (work / "pytest.ini").write_text("[pytest]\n")
        xml = work / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "plugin", "-p", "no:cacheprovider", "-c",
               str(work / "pytest.ini"), "--rootdir", str(work), "--junitxml", str(xml), "-o",
               "junit_family=xunit1", str(work / FILES[0])]
        if args.keyword:
            cmd += ["-k", args.keyword]
        if args.jobs > 1:
            cmd += ["-n", str(args.jobs)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(work), str(REPO),
                                                           os.environ.get("PYTHONPATH", "")]))
        print(f"pyro-compat: Pyro {version}'s {FILES[0]} with {' and '.join(ADDED)} next to AutoNormal", flush=True)
        subprocess.run(cmd, cwd=work, env=env)
        if not xml.is_file():
            print("pyro-compat: pytest wrote no report")
            return 2
        outcomes = _outcomes(xml)
    regressions, tally, skipped = [], {}, []
    for name, result in sorted(outcomes.items()):
        for guide in ADDED:
            if not re.search(rf"\b{guide}\b", name):
                continue
            test = name.split("[")[0]
            if test in NOT_APPLICABLE:
                skipped.append((name, result, NOT_APPLICABLE[test]))
                continue
            ref = outcomes.get(counterpart(name, guide))
            t = tally.setdefault(guide, {"tests": 0, "passed": 0, "autonormal_passed": 0, "regressions": 0})
            t["tests"] += 1
            t["passed"] += result == "passed"
            t["autonormal_passed"] += ref == "passed"
            if ref == "passed" and result != "passed":
                t["regressions"] += 1
                regressions.append((guide, name, result))
    for guide, t in tally.items():
        print(f"pyro-compat: {guide}: {t['tests']} tests, {t['passed']} pass; AutoNormal passes "
              f"{t['autonormal_passed']} of their counterparts; {t['regressions']} of those fail for {guide}")
    for name, result, why in skipped:
        print(f"pyro-compat: not applicable {name} ({result}): {why}")
    for guide, name, result in regressions:
        print(f"pyro-compat: REGRESSION {name}: {result} (passes for AutoNormal)")
    if not tally:
        print("pyro-compat: no test was parametrised with the added guides")
        return 2
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
