"""The thin ms-swift runner: flags, errors, run folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from teleguard.offline import OFFLINE_ENV, swift_argv, swift_env
from teleguard.plugins import QWEN2_AUDIO_PLUGIN, REWARD_PLUGIN, VLLM_CPU_PLUGIN
from teleguard.train.swift import SwiftError, flags, latest_run_dir, plugin_args, run_swift


def test_flags_render_booleans_lists_and_paths() -> None:
    argv = flags(
        {"use_vllm": False, "reward_funcs": ["a", "b"], "output_dir": Path("/x"), "seed": None, "lr": 3e-5}
    )
    assert argv == ["--use_vllm", "false", "--reward_funcs", "a", "b", "--output_dir", "/x", "--lr", "3e-05"]


def test_plugins_are_one_flag_with_every_file_needed() -> None:
    # one --external_plugins listing every file: argparse keeps only the last of repeated flags
    assert plugin_args() == ["--external_plugins", str(REWARD_PLUGIN)]
    assert plugin_args(audio=True, vllm_cpu=True) == [
        "--external_plugins",
        *map(str, (REWARD_PLUGIN, QWEN2_AUDIO_PLUGIN, VLLM_CPU_PLUGIN)),
    ]
    assert VLLM_CPU_PLUGIN.is_file()


def test_env_is_offline() -> None:
    env = swift_env({"EXTRA": "1"})
    assert all(env[k] == "1" for k in OFFLINE_ENV) and env["EXTRA"] == "1"


def test_a_single_process_command_skips_the_launcher_and_a_distributed_one_keeps_it() -> None:
    import importlib.util
    import sys

    from swift.cli.main import ROUTE_MAPPING

    # the script ms-swift's own launcher would start in a second interpreter when torchrun is not wanted
    for command in ("sft", "rlhf", "deploy", "merge-lora"):
        script = importlib.util.find_spec(ROUTE_MAPPING[command]).origin
        assert swift_argv(command, ["--a", "1"], {}) == [sys.executable, script, "--a", "1"]
    for distributed in ({"NPROC_PER_NODE": "4"}, {"NNODES": "2"}):
        assert swift_argv("rlhf", ["--a", "1"], distributed) == [
            sys.executable, "-m", "swift.cli.main", "rlhf", "--a", "1",
        ]  # fmt: skip
    with pytest.raises(ValueError, match="no command 'trian'"):
        swift_argv("trian", [], {})


def test_failing_swift_command_raises_with_log_tail(tmp_path: Path) -> None:
    with pytest.raises(SwiftError) as err:
        run_swift("sft", ["--no_such_flag_anywhere", "1"], log_path=tmp_path / "log.txt")
    assert "swift sft exited with" in str(err.value)
    assert "no_such_flag_anywhere" in (tmp_path / "log.txt").read_text("utf-8")


def test_latest_run_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no ms-swift run folder"):
        latest_run_dir(tmp_path)
    (tmp_path / "v0-20260101-000000").mkdir()
    assert latest_run_dir(tmp_path).name == "v0-20260101-000000"
