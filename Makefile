# make test · make bench · make demo — each sets up .venv first (idempotent, quick when done).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gankernels-installed
CUDA_HOME ?= $(shell test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda)
export CUDA_HOME
# Two compile jobs on a 2-core machine; override on bigger ones.
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup test test-cpu test-interpreter bench demo lint clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch>=2.11" "triton>=3.6" numpy pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,examples,dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup test-cpu test-interpreter

test-cpu: setup
	$(PY) -m pytest -q tests

# Triton kernels on CPU: TRITON_INTERPRET must be set before kernels are defined,
# so these run in their own process.
test-interpreter: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/interpreter

bench: setup
	$(PY) -m gankernels.bench

demo: setup
	$(PY) examples/train_gan.py --name demo

lint: setup
	$(PY) -m ruff check gankernels tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info gankernels/_C*.so
