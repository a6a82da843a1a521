# Two commands do all the set-up: `make serve` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real MNIST: ../shared/datasets on our machines; elsewhere tests download into a cache.
export DIGITSERVE_DATA_DIR ?= $(abspath ../shared/datasets)

.PHONY: serve test train venv clean

venv: $(STAMP)

# Re-installs only when pyproject.toml (the pins) changed since the last install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m service

test: $(STAMP)
	$(PY) -m pytest

train: $(STAMP)
	$(PY) -m service.train --data-dir $(DIGITSERVE_DATA_DIR) --store model_store

clean:
	rm -rf $(VENV) .pytest_cache
