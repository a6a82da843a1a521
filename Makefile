# Two commands do all the set-up: `make serve` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real MNIST, one setting: ../shared/datasets on our machines; where it is absent (empty setting)
# the tests and `make train` download into ~/.cache/digitserve.
export DIGITSERVE_DATA_DIR ?= $(if $(wildcard ../shared/datasets/MNIST/raw),$(abspath ../shared/datasets))
TRAIN_DATA := $(or $(DIGITSERVE_DATA_DIR),$(HOME)/.cache/digitserve)

.PHONY: serve test train venv system-deps clean

venv: $(STAMP)

# Re-installs only when pyproject.toml (the pins) changed since the last install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m service

# Debian tools the tests drive for real (prometheus/promtool, docker-compose, wrk); installs only what is missing.
system-deps:
	bash .ci/system-deps.sh

test: $(STAMP) system-deps
	$(PY) -m pytest

train: $(STAMP)
	$(PY) -m service.train --data-dir $(TRAIN_DATA) --download --store model_store

clean:
	rm -rf $(VENV) .pytest_cache
