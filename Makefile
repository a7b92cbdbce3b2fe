# Two entry points (see README): `make demo` and `make test`. Both build the same virtual environment.
# PY picks the interpreter (`make test PY=python3.13`); each interpreter gets its own environment:
# `.venv` for the default python3, `.venv-3.13` (etc., by version) for any other PY.
PY ?= python3
# A name that is not on PATH (pyenv keeps non-global versions off it) is looked up under pyenv's versions.
PYEXE := $(shell command -v $(PY) >/dev/null 2>&1 && $(PY) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/*/bin/$(PY) 2>/dev/null | sort -V | tail -n 1)
ifeq ($(PYEXE),)
$(error no interpreter named $(PY) on PATH or under pyenv; pass PY=/path/to/python3.X)
endif
PYVER := $(shell $(PYEXE) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ifeq ($(PY),python3)
VENV ?= .venv
else
VENV ?= .venv-$(PYVER)
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.pyrobnn-installed

.PHONY: install demo test test-slow test-grid bench data clean env-info docs docs-check pyro-compat

# A new environment takes about 6 GB (torch 2.14.1 is a CUDA build, ~4 GB of it NVIDIA libraries that
# the CPU never loads but torch needs to import). Say so up front rather than let pip fail half-way.
NEED_KB := 6300000

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@if [ ! -d $(VENV) ]; then \
	  avail=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ -n "$$avail" ] && [ "$$avail" -lt $(NEED_KB) ]; then \
	    echo "pyrobnn install: a new $(VENV) needs about 6.3 GB of disk; only $$((avail / 1024)) MB are free here ($$(pwd)). Free some space and rerun." >&2; \
	    exit 1; \
	  fi; \
	fi
	$(PYEXE) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# The interpreter PY resolves to, its environment and whether that is installed (used by .ci/run).
env-info:
	@echo "$(PYEXE) $(PYVER) $(VENV) $$([ -f $(STAMP) ] && echo installed || echo missing)"

demo: $(STAMP)
	$(BIN)/pyrobnn demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Every prior × {MeanField, AdditiveNoise} × {TraceMeanField, Trace, TraceGraph} ELBO on a hand-written model (≈2 min)
test-grid: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_handwritten_models.py

# The documentation site (Sphinx + MyST), warnings and broken cross-references are errors.
DOCS_STAMP := $(VENV)/.pyrobnn-docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -E -W --keep-going -n -q -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

# Every page of the built site and a `pyrobnn report` page in headless Chromium (Debian: chromium chromium-driver).
docs-check: docs
	$(BIN)/python -m pytest -q -m browser tests/test_browser.py

# Pyro's own AutoGuide tests with pyrobnn's MeanField and AdditiveNoise added next to AutoNormal (the test
# module is fetched at run time for the installed pyro-ppl release; see tests/pyro_compat/run.py).
pyro-compat: $(STAMP)
	$(BIN)/python tests/pyro_compat/run.py $(PYRO_COMPAT_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py

# Full Fashion-MNIST for the examples (Debian package; needs root or sudo).
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist present"; \
	else (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	     (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist); fi

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
