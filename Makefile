# Every target does its own set-up from a fresh clone: a virtual env, CPU torch, the package with all extras.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed
DATA ?= data
SEED ?= 0

.PHONY: install demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_CPU)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/recon-sim --out $(DATA)/sim-demo --preset demo --seed $(SEED) --overwrite
	$(BIN)/recon-prepare --nsd-root $(DATA)/sim-demo --subject 1 --out $(DATA)/subj01 --overwrite

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

lint: install
	$(BIN)/ruff check brainrecon train export runtime benchmarks tests
	$(BIN)/ruff format --check brainrecon train export runtime benchmarks tests

bench: install
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf $(VENV) $(DATA) engines/*/ .pytest_cache
