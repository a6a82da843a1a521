# Two commands do all the set-up: `make serve` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real MNIST, one setting: ../shared/datasets on our machines; where it is absent (empty setting)
# the tests and `make train` download into ~/.cache/digitserve.
export DIGITSERVE_DATA_DIR ?= $(if $(wildcard ../shared/datasets/MNIST/raw),$(abspath ../shared/datasets))
TRAIN_DATA := $(or $(DIGITSERVE_DATA_DIR),$(HOME)/.cache/digitserve)

.PHONY: serve test test-fast lint train export proto venv system-deps triton-venv clean bench soak profile pair rolling-update

venv: $(STAMP)

# Re-installs only when pyproject.toml (the pins) changed since the last install; says what it does and
# shows pip's progress (a first install takes about a minute and a half).
$(STAMP): pyproject.toml
	@if test -x $(PY); then echo "pyproject.toml changed: updating .venv to the pinned dependencies"; \
	else echo "first run: creating .venv and installing pinned dependencies, about a minute and a half"; \
	$(PYTHON) -m venv $(VENV); fi
	@echo "[1/2] upgrading pip"
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@echo "[2/2] installing digitserve and its pinned dependencies (torch is the big one)"
	@$(PY) -m pip install --progress-bar on --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)
	@echo ".venv is ready"

# Loads the model and starts the workers (a few seconds), then one line: "ready: the page is http://...".
serve: $(STAMP)
	$(PY) -m service

# Debian tools the tests drive for real (prometheus/promtool, docker-compose, wrk); installs only what is missing.
system-deps:
	bash .ci/system-deps.sh

# The whole suite: lint and types, the unit tier, then the end-to-end tier (real processes), which lists its
# 15 slowest tests at the end: where to look when the suite nears its 15 minutes.
test: lint test-fast system-deps triton-venv
	$(PY) -m pytest tests/e2e --durations=15

# The unit tier alone: in process, no server started (under a minute).
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# A real Triton Inference Server (PyTriton, numpy<2) in a venv of its own, the reference the V2 tests compare with.
triton-venv:
	bash .ci/triton-venv.sh

train: $(STAMP) system-deps
	$(PY) -m service.train --data-dir $(TRAIN_DATA) --download --store model_store

# The gRPC service's Python modules from its proto file (committed; tests/unit/test_grpc_codec.py checks them).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. service/grpc/oip.proto

# The static graph of a version for --runtime export (docs/runtimes.md): AOTInductor, about a minute; the
# highest version (the one served), or VERSION=N.
export: $(STAMP)
	$(PY) -m service.export --store model_store $(if $(VERSION),--version $(VERSION)) --data-dir $(TRAIN_DATA) --download

# Not part of `make test`: digitserve vs. a LitServe-README baseline under wrk (~10 min; BENCH_QUICK=1 ~3 min).
bench: $(STAMP) system-deps
	$(PY) -m bench.run

# Not part of `make test`: py-spy and per-process CPU under one bench workload (PROFILE_ARGS, e.g. --workload predict-1img@64).
profile: $(STAMP) system-deps
	$(PY) -m bench.profile $(PROFILE_ARGS)

# Not part of `make test`: two commits loaded side by side on the same CPUs (PAIR_ARGS, e.g. "2875244 HEAD").
pair: $(STAMP) system-deps
	$(PY) -m bench.pair $(PAIR_ARGS)

# 3 replicas behind a real HAProxy, replaced one by one under load, then one killed (also in make test).
rolling-update: $(STAMP) system-deps
	$(PY) -m harness.cluster --rolling-update

# Not part of `make test`: a few minutes of mixed good, bad and explain traffic; RSS and metric checks.
soak: $(STAMP)
	$(PY) -m bench.soak --minutes $(or $(SOAK_MINUTES),3)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
