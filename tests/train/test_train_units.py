"""Recipe validation, the distributed environment mapping and rejection-sampling selection (no trainer)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from teleguard.contract import format_answer
from teleguard.train.config import RecipeError, load_recipe
from teleguard.train.distributed import DistributedEnvError, swift_launch_env
from teleguard.train.sampling import is_correct, select, shortest_correct
from tests.support.paths import REPO

RECIPES = REPO / "recipes" / "safe-qaq"

MINIMAL = {
    "name": "t",
    "device": "cpu",
    "model": {"path": "m", "model_type": "qwen2", "template": "qwen2_5"},
    "data": {"datasets": "d"},
    "output_dir": "o",
    "common": {"torch_dtype": "float32"},
    "stages": {
        "grpo": {"use_vllm": False},
        "lcrl": {"use_vllm": False},
        "realtime": {"use_vllm": False},
        "sample": {"engine": "transformers"},
    },
    "evaluate": {"engine": "transformers"},
}


def write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True), "utf-8")
    return path


# ----------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["qwen2-audio-7b.yaml", "tiny-cpu.yaml"])
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(RECIPES / name)
    assert recipe.enabled()[-1] == "export"
    if name.startswith("qwen2-audio"):
        g = recipe.stages.grpo
        assert (recipe.common.lora_rank, recipe.common.target_modules) == (32, ["q_proj", "v_proj"])
        assert (g.learning_rate, g.num_generations, g.temperature, g.use_vllm) == (3e-5, 9, 0.9, True)
        assert recipe.common.torch_dtype == "bfloat16" and recipe.common.deepspeed == "zero2"
        assert "think_length_penalty_200" in recipe.stages.lcrl.reward_funcs
        assert recipe.stages.realtime.dataset == "realtime"


def test_minimal_recipe_gets_the_safe_qaq_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.enabled() == [
        "grpo",
        "sample",
        "rsft",
        "lcrl",
        "realtime",
        "export",
    ]  # warm start is opt-in
    assert recipe.stages.lcrl.reward_funcs[-1] == "think_length_penalty_200"
    assert recipe.stages.realtime.reward_funcs[-1] == "stage_classification"
    assert recipe.stages.realtime.warmup_ratio == 0.0 and recipe.stages.grpo.warmup_ratio == 0.05


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": {"grpo": {"use_vllm": False, "learnig_rate": 1e-4}}}, "field 'stages.grpo.learnig_rate'"),
        ({"stages": {"grpo": {"use_vllm": False, "learning_rate": -1}}}, "field 'stages.grpo.learning_rate'"),
        (
            {"stages": {"grpo": {"use_vllm": False, "num_generations": 1}}},
            "field 'stages.grpo.num_generations'",
        ),
        ({"stages": {"grpo": {"use_vllm": False, "reward_funcs": ["accuracy"]}}}, "unknown reward_funcs"),
        (
            {"stages": {"grpo": {"use_vllm": True, "vllm": {"mode": "server"}}}},
            "stages.grpo.vllm.mode server needs a GPU: ms-swift's rollout server receives the trained weights "
            "over NCCL",
        ),
        (
            {"stages": {"lcrl": {"use_vllm": True, "vllm": {"tensor_parallel_size": 2}}}},
            "stages.lcrl.vllm.tensor_parallel_size must be 1 when device is cpu",
        ),
        ({"common": {"torch_dtype": "bfloat16"}}, "float32 when device is cpu"),
        (
            {"model": {**MINIMAL["model"], "build_tiny": {"hidden_size": 64, "head_dim": 48}}},
            "hidden_size must be a multiple of head_dim",
        ),
        (
            {"stages": {"sample": {"engine": "transformers", "enabled": False}}},
            "enable sample or disable rsft",
        ),
        ({"device": "tpu"}, "field 'device'"),
        ({"model": {"path": "m"}}, "field 'model.model_type'"),
    ],
)
def test_bad_recipes_are_rejected_naming_the_field(tmp_path: Path, change: dict, message: str) -> None:
    body = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict) and key != "model":
            for sub, subvalue in value.items():
                body[key][sub] = (
                    {**body[key].get(sub, {}), **subvalue} if isinstance(subvalue, dict) else subvalue
                )
        else:
            body[key] = value
    path = write(tmp_path, body)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_cpu_recipe_may_sample_evaluate_and_roll_out_with_vllm(tmp_path: Path) -> None:
    # vLLM's CPU build runs the sampling and evaluation engine and GRPO's colocated rollouts
    body = {
        **MINIMAL,
        "stages": {**MINIMAL["stages"], "sample": {"engine": "vllm"}, "grpo": {"use_vllm": True}},
        "evaluate": {"engine": "vllm"},
    }
    recipe = load_recipe(write(tmp_path, body))
    assert (recipe.stages.sample.engine, recipe.evaluate.engine) == ("vllm", "vllm")
    assert recipe.stages.grpo.use_vllm and recipe.stages.grpo.vllm.mode == "colocate"
    # a stage switched off keeps its GPU settings
    body["stages"]["lcrl"] = {"enabled": False, "use_vllm": True, "vllm": {"mode": "server"}}
    assert load_recipe(write(tmp_path, body)).stages.lcrl.vllm.mode == "server"


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, {"stages.grpo.max_steps": 3, "stages.sft.enabled": True})
    assert recipe.stages.grpo.max_steps == 3 and recipe.enabled()[0] == "sft"
    with pytest.raises(RecipeError, match=r"field 'stages\.grpo\.max_steps'"):
        load_recipe(path, {"stages.grpo.max_steps": 0})


def test_unreadable_recipes(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n", "utf-8")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------------------- distributed


def test_pytorchjob_environment() -> None:
    env = swift_launch_env(
        {
            "WORLD_SIZE": "2",
            "RANK": "1",
            "MASTER_ADDR": "job-master-0",
            "MASTER_PORT": "23456",
            "PATH": "/bin",
        },
        gpus_per_node=4,
    )
    assert {k: env[k] for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")} == {
        "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "NPROC_PER_NODE": "4",
    }  # fmt: skip
    assert "WORLD_SIZE" not in env and "RANK" not in env and env["PATH"] == "/bin"


def test_trainjob_environment() -> None:
    env = swift_launch_env(
        {
            "PET_NNODES": "1:3",
            "PET_NODE_RANK": "2",
            "PET_MASTER_ADDR": "trainjob-node-0-0.trainjob",
            "PET_MASTER_PORT": "29400",
            "PET_NPROC_PER_NODE": "8",
        }
    )
    assert (env["NNODES"], env["NODE_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"], env["NPROC_PER_NODE"]) == (
        "3", "2", "trainjob-node-0-0.trainjob", "29400", "8",
    )  # fmt: skip


def test_single_node_environment() -> None:
    assert "NNODES" not in swift_launch_env({}) and "NPROC_PER_NODE" not in swift_launch_env({})
    assert swift_launch_env({}, gpus_per_node=4)["NPROC_PER_NODE"] == "4"
    assert "NPROC_PER_NODE" not in swift_launch_env({}, gpus_per_node=1)
    # a free port of its own for the node's process group, not the default 29500 two stages would share
    ports = {swift_launch_env({})["MASTER_PORT"] for _ in range(3)}
    assert all(1024 < int(p) < 65536 and p != "29500" for p in ports)
    with socket.socket() as held:  # the port is free: a server can bind it
        held.bind(("127.0.0.1", int(swift_launch_env({})["MASTER_PORT"])))
    assert swift_launch_env({"MASTER_PORT": "23456"})["MASTER_PORT"] == "23456"  # a given port stands


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "m"}, "outside 0..1"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "no MASTER_ADDR"),
        ({"PET_NNODES": "two"}, "not a whole number"),
    ],
)
def test_bad_distributed_environment(environ: dict[str, str], message: str) -> None:
    with pytest.raises(DistributedEnvError, match=message):
        swift_launch_env(environ)


# ---------------------------------------------------------------------------------------- rejection selection


def answer(label: object, *, round_: str = "is_fraud", stage: str = "complete", think: str = "分析") -> str:
    return format_answer(round_, label, stage=stage, think=think)


def test_shortest_correct_is_kept() -> None:
    long_right = answer(True, think="对方要求转账，" * 20)
    short_right = answer(True, think="要求转账。")
    wrong = answer(False, think="短")
    assert shortest_correct([long_right, wrong, short_right], "fraud", "complete") == short_right
    assert shortest_correct([wrong], "fraud", "complete") is None


def test_null_labels_and_string_labels() -> None:
    null_early = answer(None, stage="early_stage")
    assert is_correct(null_early, "fraud", "early_stage")  # the reward accepts null before intent shows
    assert not is_correct(answer(None), "fraud", "complete")
    # a string is never an is_fraud answer, whatever it says: "不正常" must not pass as "正常" (or anything)
    for text in ("不正常", "正常", "true"):
        assert not is_correct(answer(text), "normal", "complete")
        assert not is_correct(answer(text), "fraud", "complete")
    assert not is_correct(answer(True) + "\n多余的话", "fraud", "complete")  # not fully well-formed


def test_select_writes_sft_rows_and_reports_unsolved() -> None:
    rows = [
        {"messages": [{"role": "user", "content": "q1"}], "answers": "fraud", "conversation_stage": "complete",
         "task": "is_fraud", "call_id": "c1"},
        {"messages": [{"role": "user", "content": "q2"}], "answers": "银行诈骗", "conversation_stage": "complete",
         "task": "fraud_type", "call_id": "c2"},
    ]  # fmt: skip
    samples = [
        [answer(False), answer(True, think="长" * 30), answer(True, think="短")],
        [answer("投资诈骗", round_="fraud_type"), "<think>x</think>"],
    ]
    selection = select(rows, samples)
    [kept] = selection.rows
    assert kept["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": samples[0][2]},
    ]
    assert kept["call_id"] == "c1" and kept["answers"] == "fraud"
    [unsolved] = selection.unsolved
    assert unsolved["call_id"] == "c2" and unsolved["samples"] == 2 and unsolved["problems"]
    report = selection.report()
    assert report == {
        "prompts": 2, "kept": 1, "unsolved": 1, "solved_rate": 0.5, "sample_accuracy": 2 / 5,
        "unsolved_by_task": {"fraud_type": 1},
    }  # fmt: skip
