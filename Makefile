# The two commands of the README: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medflow-installed
DEMO_DIR ?= demo

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DO_NOT_TRACK ?= 1

.PHONY: demo test bench setup clean test-services

setup: $(STAMP)

# torch first, pinned, so that pip takes the CPU build on disk instead of a multi-GB CUDA one.
# Then the pinned styles and scripts Data Docs load, from the npm registry, so that they render offline.
$(STAMP): pyproject.toml constraints.txt components/validation/offline_docs.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m components.validation.offline_docs
	touch $@

# The whole pipeline on embedded defaults, in its own working folder ($(DEMO_DIR)/).
demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && PYTHONUNBUFFERED=1 ../$(BIN)/medflow run

# The integration tests start a throwaway PostgreSQL cluster, and the HTML report is
# rendered in headless Chromium: both from Debian's packages, installed when missing.
test-services:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing (Debian packages) for the tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "the tests need:$$missing; install them with: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

# The tests run in TEST_WORKERS processes (pytest-xdist), each with its share of the cores for torch and
# BLAS (tests/conftest.py). A test file stays in one process, so its module-scoped fixtures (servers) start
# once; the files with end-to-end runs go first (not xdist's default of the most tests first).
TEST_WORKERS ?= 2
test: $(STAMP) test-services
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py --write
	$(BIN)/python benchmarks/registry.py --write
	$(BIN)/python benchmarks/evaluation.py --write
	$(BIN)/python benchmarks/evaluation_memory.py --write
	$(BIN)/python benchmarks/ingest.py --write
	$(BIN)/python benchmarks/training.py --write
	$(BIN)/python benchmarks/layouts.py --write
	$(BIN)/python benchmarks/transforms.py --write
	$(BIN)/python benchmarks/load.py --write
	$(BIN)/python benchmarks/backbones.py --write
	$(BIN)/python benchmarks/predict.py --write
	$(BIN)/python benchmarks/study.py --write
	$(BIN)/python benchmarks/pretrain.py --write
	$(BIN)/python benchmarks/scale.py --write --sizes 1000 10000 --runs 400 4000 --volumes 6 10

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
