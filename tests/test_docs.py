"""The documentation's code runs: every fenced ``python`` block of the getting-started page and of
each user-guide page is executed, page by page, in one namespace per page (blocks build on each
other), in a fresh working directory. A block preceded by a MyST comment line ``% skip: <reason>``
is shown but not run (it needs full data sets, several processes or minutes of training)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pyro
import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = [DOCS / "getting-started.md", DOCS / "extend.md"] + sorted(
    p for p in (DOCS / "guide").glob("*.md") if p.name != "index.md")

_FENCE = re.compile(r"^(?P<skip>% skip: .+\n)?```python\n(?P<code>.*?)^```$", re.M | re.S)


def code_blocks(text):
    """``[(line, code, skipped)]`` of the page's fenced python blocks (``line``: 1-based, of the fence)."""
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code"))  # the fence's line, 1-based
        out.append((line, m.group("code"), m.group("skip") is not None))
    return out


def test_block_extraction_sees_fences_and_skips():
    page = "text\n```python\nx = 1\n```\n\n% skip: needs torchrun\n```python\nraise SystemExit\n```\n```text\nno\n```\n"
    assert code_blocks(page) == [(2, "x = 1\n", False), (7, "raise SystemExit\n", True)]


def test_every_page_has_code_and_is_found():
    assert (DOCS / "getting-started.md").is_file()
    assert len(PAGES) >= 10, PAGES
    for page in PAGES:
        assert any(not s for _, _, s in code_blocks(page.read_text())), f"{page.name} has no runnable block"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
@pytest.mark.filterwarnings("default")
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    namespace = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    # a deprecated call in the docs' own code (a warning attributed to it) fails: the docs show current usage
    warnings.filterwarnings("error", category=DeprecationWarning, module=r"docs_")
    for line, code, skipped in code_blocks(page.read_text()):
        if skipped:
            compile(code, f"{page.name}:{line}", "exec")  # still valid Python
            continue
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.relative_to(DOCS)}, block at line {line} failed: {type(e).__name__}: {e}") from e
