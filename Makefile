# Two entry points (see README): `make demo` and `make test`. Both build the same virtual environment.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pyrobnn-installed

.PHONY: install demo test test-slow bench data clean docs docs-check

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
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pyrobnn demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

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

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py

# Full Fashion-MNIST for the examples (Debian package; needs root or sudo).
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist present"; \
	else (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	     (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist); fi

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
