# Two entry points: `make demo` (the main job, offline) and `make test` (the test suite).
# Both create .venv and install what they need; the pinned CPU torch goes in first so that
# `torch>=2.2` in the package metadata never pulls a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# Libraries whose metadata would pull torchvision/torchaudio (and a CUDA torch): no deps.
	$(BIN)/python -m pip install -q --no-deps spikingjelly==2.0.0 norse==1.1.0 nirtorch==2.6 tonic==1.7.0 importRosbag==1.0.4
	$(BIN)/python -m pip install -q requests  # tonic's import needs it (GPL tonic: tests only)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/osbc demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench_solvers.py
	$(BIN)/python bench/bench_data.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
