# posttrain: `make quickstart` runs the embedded default end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# No model or data downloads at run time: everything the tests use is built locally.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install quickstart test test-fast clean

install: $(STAMP)

# torch is pinned (2.13.0) and installed first and alone, so that a CPU-only machine takes the local
# CPU build and never resolves a CUDA build while installing the rest.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Each quickstart is a new run directory (runs/quickstart-<time>), so earlier runs are never touched.
quickstart: $(STAMP)
	$(BIN)/posttrain run recipes/quickstart.yaml name=quickstart-$$(date +%Y%m%d-%H%M%S) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info
