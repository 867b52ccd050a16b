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

# Builds the tiny zoo once (cached in ~/.cache/mergelab/zoo), merges experts, evaluates, reports.
demo: $(STAMP)
	$(VENV)/bin/mergelab demo --force

# Every benchmarks/*_vs_*.py compares mergelab with its peer tool and prints the ratios.
bench: $(STAMP)
	@set -e; for script in benchmarks/*_vs_*.py; do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info
