"""The images the components run in (docker/ builds them). Override at compile time with the environment."""

import os

# The trainer image: CUDA, ms-swift, vLLM and teleguard (kfp included, so components never reinstall it).
TRAINER_IMAGE = os.environ.get("TELEGUARD_TRAINER_IMAGE", "ghcr.io/teleguard/teleguard-trainer:0.1.0")
