# contrastkit: the two user commands are `make demo` and `make test`; both set up a fresh machine first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_CONFIG ?= configs/fmnist_simclr_dcl.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean data

setup: $(STAMP) data

# The virtual environment with the package (editable) and test extras; torch/torchvision are pinned in pyproject.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, lightning, contrastkit; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	touch $(STAMP)

# Fashion-MNIST, the embedded default dataset, from Debian (offline).
data:
	@test -f $(FMNIST) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }
	@test -f $(FMNIST) || { echo "error: Fashion-MNIST is missing: apt-get install dataset-fashion-mnist"; exit 1; }

demo: setup
	$(VENV)/bin/contrastkit train $(DEMO_CONFIG)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/contrastkit bench throughput

clean:
	rm -rf $(VENV) runs .pytest_cache
