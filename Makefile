# advdetect: `make demo` sets up .venv and runs the main job; `make test` runs the suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test` (each gets its share of the cores; tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch/torchvision are pinned in pyproject.toml to the releases served from local disk here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/advdetect train --n 100 --n-eval 100 --n-calibration 100 --data-dir $(DATA_DIR) --out runs/demo-detector

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf runs .pytest_cache
