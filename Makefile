# Two commands for a fresh machine: `make train` and `make test`. Both create .venv, install the
# package, and make sure Fashion-MNIST is there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
ARGS ?=
# Test files run in parallel processes (pytest-xdist), each file in one process, as its module fixtures
# are shared by its tests: most of the suite's time is single-threaded process starts and tiny runs.
# xdist hands out files largest first by number of tests; handing them out longest first instead
# (--no-loadscope-reorder and a sort in conftest) measured 522 s against 515 s: the long files' runs keep
# both cores busy, so no order leaves a core idle at the end.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: help install data train test nightly benchmark lint clean

help:
	@echo "make train [ARGS='attention=cbam_parallel ...']   train the default job (CIFAR ResNet-20 + CBAM, Fashion-MNIST)"
	@echo "make test                                         fast tests (< 10 min on 2 CPU cores, TEST_WORKERS=2 processes)"
	@echo "make nightly                                      every test, the slow ones too"
	@echo "make benchmark                                    model statistics and speed tables (scripts/benchmark.py)"
	@echo "make lint                                         ruff check and format check"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Debian's dataset-fashion-mnist puts the four IDX files in $(FMNIST); without root or apt-get,
# train.py falls back to torchvision's download.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "note: $(FMNIST) is missing and apt-get needs root; train.py will try torchvision's download"; \
	fi

train: install data
	$(BIN)/python train.py $(ARGS)

test: install data
	$(PYTEST)

nightly: install data
	$(PYTEST) -m ''

benchmark: install data
	$(BIN)/python scripts/model_stats.py
	$(BIN)/python scripts/model_stats.py model=resnet20 data=cifar10
	$(BIN)/python scripts/benchmark.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
