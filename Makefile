# The two quickstart commands, `make demo` and `make test`, work on a fresh machine with only
# Python 3 and make: the first call creates .venv and installs; later calls reuse it.
#
# Another Python: `make test PYTHON=python3.13` builds and uses .venv-py3.13 (one virtualenv per
# Python version, so switching back and forth reinstalls nothing).
# The next Keras: `make test-keras-next` runs the suite in .venv-next, where the newest
# keras-nightly from PyPI replaces the pinned keras.
PYTHON ?= python3
ifeq ($(origin PYTHON),file)
VENV ?= .venv
else
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
$(if $(PYTHON_VERSION),,$(error PYTHON=$(PYTHON) does not run))
VENV ?= .venv-py$(PYTHON_VERSION)
endif
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
NEXT := .venv-next
LINTED := kerasbn export tests examples benchmarks

.PHONY: setup demo test lint bench zoo test-keras-next clean

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

# The suite, run with the Python of $(1): two pytest workers, one per core of the CI machine,
# whole files per worker (--dist loadfile), so a module's expensive fixtures (a wheel,
# distributed workers, exported models) run once. Then each zoo architecture
# (tests/test_zoo.py) in a process of its own: in one process, what TensorFlow keeps of the
# earlier tests plus the largest architecture exceed the 24 GiB here.
ZOO_NAMES := import kerasbn_programs; kerasbn_programs.quiet_tensorflow_import(); from benchmarks import _zoo_models as z; print(*sorted(set(z.smallest_per_family().values())))
define suite
	$(1)/python -m pytest -n 2 --dist loadfile --ignore=tests/test_zoo.py
	names="$$($(1)/python -c '$(ZOO_NAMES)')" && test -n "$$names" && \
	for name in $$names; do KERASBN_ZOO_ONLY=$$name $(1)/python -m pytest -q tests/test_zoo.py || exit 1; done
endef

test: $(INSTALLED)
	$(BIN)/python -m ruff check $(LINTED)
	$(call suite,$(BIN))

lint: $(INSTALLED)
	$(BIN)/python -m ruff check $(LINTED)

bench: $(INSTALLED)
	$(BIN)/python benchmarks/bn_step.py

# Every keras.applications architecture through to_onnx and through Keras's own ONNX export.
zoo: $(INSTALLED)
	$(BIN)/python benchmarks/zoo.py

# keras-nightly installs the same `keras` package as keras, so keras is removed first; pip
# then warns that kerasbn's keras requirement is unmet, which is the point of this run.
$(NEXT)/.installed: pyproject.toml
	$(PYTHON) -m venv $(NEXT)
	$(NEXT)/bin/python -m pip install --quiet --upgrade pip
	$(NEXT)/bin/python -m pip install --quiet -e '.[dev]'
	$(NEXT)/bin/python -m pip uninstall --quiet --yes keras
	$(NEXT)/bin/python -m pip install --quiet --upgrade --pre keras-nightly
	touch $@

test-keras-next: $(NEXT)/.installed
	$(NEXT)/bin/python -m pip install --quiet --upgrade --pre keras-nightly
	$(NEXT)/bin/python -c 'import keras; print("keras", keras.__version__)'
	$(call suite,$(NEXT)/bin)

clean:
	rm -rf .venv .venv-py* $(NEXT) build dist *.egg-info
