"""Recipe files for the stage tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

QUICK_GRPO = {"learning_rate": 1e-4, "max_steps": 1, "per_device_train_batch_size": 2, "num_generations": 2,
              "max_completion_length": 16, "use_vllm": False, "limit": 8}  # fmt: skip


def write_recipe(
    path: Path, model: Any, datasets: Path, output_dir: Path, stages: dict[str, Any], **extra: Any
) -> Path:
    body = {
        "name": "test",
        "device": "cpu",
        "model": {"path": str(model.path), "model_type": model.model_type, "template": model.template},
        "data": {"datasets": str(datasets)},
        "output_dir": str(output_dir),
        "common": {"tuner_type": "lora", "torch_dtype": "float32", "deepspeed": None, "max_length": 1024,
                   "save_steps": 50, "dataloader_num_workers": 0, "target_modules": ["all-linear"]},
        "stages": stages,
        "evaluate": {"engine": "transformers", "max_tokens": 16, "limit": 4},
        **extra,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(body, allow_unicode=True), "utf-8")
    return path
