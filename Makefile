# The two quickstart commands, `make demo` and `make test`, work on a fresh machine with only
# Python 3 and make: the first call creates .venv and installs; later calls reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(INSTALLED)

# Reinstall only when the package's declared dependencies change.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

# The layer's two statistics modes on digits, then the main job: train, population statistics,
# fold, export to ONNX, verify with ONNX Runtime.
demo: $(INSTALLED)
	$(BIN)/python examples/digits_modes.py
	$(BIN)/python examples/convnet_export.py

test: $(INSTALLED)
	$(BIN)/python -m ruff check kerasbn export tests examples benchmarks
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/python -m ruff check kerasbn export tests examples benchmarks

bench: $(INSTALLED)
	$(BIN)/python benchmarks/bn_step.py

clean:
	rm -rf $(VENV) build dist *.egg-info
