# Every target sets up .venv/ in the repository if it is missing (or stale) and uses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is pinned here (the CPU build on local disk); pyproject keeps a range.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m mergelab.demo

bench: $(STAMP)
	$(PY) benchmarks/merge_vs_mergekit.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
