"""The images the components run in (docker/ builds them). Override at compile time with the environment."""

import os

from teleguard import __version__

# The trainer image: CUDA, ms-swift, vLLM and teleguard (kfp included, so components never reinstall it). The
# tag is the package's version, so a release compiles its pipelines against its own image.
RELEASED_TRAINER_IMAGE = f"ghcr.io/teleguard/teleguard-trainer:{__version__}"
TRAINER_IMAGE = os.environ.get("TELEGUARD_TRAINER_IMAGE", RELEASED_TRAINER_IMAGE)
