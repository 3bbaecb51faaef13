# teleguard: `make demo` runs the main job, `make test` runs the tests. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA ?= ../shared/data/teleantifraud-dialogues

# Nothing is ever fetched from a model or data hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MODELSCOPE_OFFLINE := 1

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "teleguard needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch 2.13.0 (the CPU wheel on a machine without a GPU) and the measured versions.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

demo: setup
	$(BIN)/teleguard demo --data $(DATA) --out runs/demo

test: setup lint
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: setup
	$(BIN)/python bench/bench_rewards.py --out docs/benchmarks-rewards.json

clean:
	rm -rf runs .pytest_cache .ruff_cache
