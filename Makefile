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

.PHONY: setup test test-cpu test-interpreter bench demo demo-compare lint clean

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

# The demo's settings, chosen by measurement on a 2-core CPU (see the README): the digits at
# their native 8×8, where the networks learn fastest per CPU second; a two-layer mapping
# network in front of the generator (the step that lifted recognisable digits from about 40 %
# to 70 %), a discriminator one block deeper, lr 1e-3, lazy R1; about 85 CPU seconds.
# One OpenMP thread: these tensors are too small to share, and a busy machine stalls two.
DEMO_ARGS := --resolution 8 --width 32 --d-width 32 --d-depth 2 --mapping 2 --lr 1e-3 --r1 0.1 --r1-every 4 --steps 3000

demo: setup
	OMP_NUM_THREADS=1 $(PY) examples/train_gan.py --name demo --overwrite $(DEMO_ARGS)

# Stock torch layers and gankernels' layers trained from the same seed with the demo's
# settings: one table of the digits judge's scores and images/s, recorded in
# docs/demo_compare.md (quoted in the README).
demo-compare: setup
	OMP_NUM_THREADS=1 $(PY) examples/compare_layers.py --out docs/demo_compare.md $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check gankernels tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info gankernels/_C*.so
