#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): at most 10 minutes, one JSON result. Run it from the repository root in
# an environment with teleguard and vLLM (the trainer image, or `make setup` on a GPU machine):
#   bash bench/gpu_check.sh --out gpu-check.json            # one GPU
#   bash bench/gpu_check.sh --device cpu --out dry.json     # the CPU dry run, tiny model (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# nothing is downloaded at run time: the model is an architecture with dummy weights, the tokenizer built here
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODELSCOPE_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
# the Python side stops starting new work at 9 minutes; the hard limit leaves it time to write its result
exec timeout --signal=TERM --kill-after=20 600 "$PYTHON" bench/gpu_check.py --budget-s 540 "$@"
