"""ms-swift plugin files, loaded by path with `swift ... --external_plugins FILE`."""

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
REWARD_PLUGIN = PLUGIN_DIR / "swift_rewards.py"
QWEN2_AUDIO_PLUGIN = PLUGIN_DIR / "swift_qwen2_audio.py"
# GRPO with colocated vLLM rollouts on vLLM's CPU build: the weight sync into vLLM's CPU model
VLLM_CPU_PLUGIN = PLUGIN_DIR / "swift_vllm_cpu.py"
