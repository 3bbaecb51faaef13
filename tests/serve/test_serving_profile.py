"""The serving profile (teleguard.serve.profile): the export step writes how the model must be asked into its
folder, and `teleguard serve --model DIR` asks it so unless an option says otherwise."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from teleguard.contract import Round, format_answer, load_prompts
from teleguard.data.dataset import write_calls
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.engines.contract import EngineRequest, Generation
from teleguard.loopback import free_port
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.model import TeleguardDetector
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.profile import (
    PROFILE_FILE,
    PROMPTS_FILE,
    ProfileError,
    ServingProfile,
    apply_profile,
    profile_for_build,
    read_profile,
    write_profile,
)
from teleguard.serve.server import ServeConfig
from teleguard.tiny_models import TinyModel
from teleguard.train.config import ServingConfig
from tests.support.processes import wait_ready

SYSTEM = "你是测试用的反诈分析员。"  # a system prompt no built-in prompt set has
TURNS = (
    ("left", "您好，这里是银行客服，您的账户出现异常交易。"),
    ("right", "啊？那怎么办？"),
    ("left", "请您提供银行卡号和验证码，我们马上帮您冻结。"),
    ("right", "好的，我看一下。"),
)


def model_with_profile(source: Path, target: Path, *, threshold: float = 0.5, system: str = SYSTEM) -> Path:
    """A copy of a model folder with a serving profile whose prompts carry `system`."""
    shutil.copytree(source, target)
    prompts = load_prompts("zh").model_copy(update={"system": system})
    profile = ServingProfile(
        language="zh",
        policy={
            "max_transcript_chars": 30,
            "on_turn": True,
            "min_turns": 2,
            "ask_scene": "never",
            "alert_threshold": threshold,
            "max_tokens": 24,
        },
    )
    write_profile(target, profile, prompts)
    return target


class Recorder:
    """An engine that answers fraud with confidence 0.7 and keeps every request it was sent."""

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []

    async def __call__(self, requests: Sequence[EngineRequest]) -> list[str | Generation]:
        self.requests += requests
        return [
            format_answer(
                r.round, True if r.round is Round.FRAUD else "银行诈骗", stage="late_stage", confidence=0.7
            )
            for r in requests
        ]


def run_call(model_dir: Path, policy: DecisionPolicy | None = None) -> tuple[Recorder, dict]:
    """One call through the KServe model's detector, loaded from `model_dir` as `teleguard serve` loads it."""
    recorder = Recorder()
    config = ServeConfig(model=str(model_dir), port=0, **({"policy": policy} if policy else {}))
    model = TeleguardDetector(
        config, engine_factory=lambda _c: recorder, metrics=DetectorMetrics(CollectorRegistry())
    )
    model.load()
    detector = model.live_detector()

    async def main() -> dict:
        await detector.open({"call_id": "c1"})
        for seq, (speaker, text) in enumerate(TURNS):
            await detector.chunk(
                {"call_id": "c1", "seq": seq, "segments": [{"speaker": speaker, "text": text, "start": seq * 2.0, "end": seq * 2.0 + 2}]}
            )  # fmt: skip
        return (await detector.close({"call_id": "c1"})).verdict.model_dump()

    return recorder, asyncio.run(main())


def test_profile_round_trip_and_bad_profiles_name_file_and_field(tmp_path: Path) -> None:
    prompts = load_prompts("zh").model_copy(update={"system": SYSTEM})
    profile = ServingProfile(policy={"alert_threshold": 0.8, "max_transcript_chars": 160})
    write_profile(tmp_path, profile, prompts)
    assert read_profile(tmp_path) == profile
    assert load_prompts(tmp_path / PROMPTS_FILE) == prompts  # every text, not a reference to a file
    assert read_profile(tmp_path / "nowhere") is None

    raw = yaml.safe_load((tmp_path / PROFILE_FILE).read_text("utf-8"))
    (tmp_path / PROFILE_FILE).write_text(yaml.safe_dump({**raw, "policy": {"alert_treshold": 0.8}}), "utf-8")
    with pytest.raises(ProfileError, match=rf"{PROFILE_FILE}.*policy.*alert_treshold"):
        read_profile(tmp_path)
    (tmp_path / PROFILE_FILE).write_text(yaml.safe_dump({**raw, "policy": {"alert_threshold": 2}}), "utf-8")
    with pytest.raises(ProfileError, match="alert_threshold"):
        read_profile(tmp_path)
    (tmp_path / PROFILE_FILE).write_text(yaml.safe_dump(raw), "utf-8")
    (tmp_path / PROMPTS_FILE).unlink()
    with pytest.raises(ProfileError, match=r"prompts.*missing"):
        read_profile(tmp_path)


def test_profile_from_a_data_build_carries_its_prompts_window_and_recipe_points(tmp_path: Path) -> None:
    from teleguard.data.dataset import build_datasets

    calls = [
        CallRecord(
            call_id=f"c{i}", source="t", turns=tuple(Turn(speaker=s, text=t) for s, t in TURNS),
            labels=CallLabels(is_fraud=True, fraud_type="银行诈骗"),
        )
        for i in range(3)
    ]  # fmt: skip
    write_calls(tmp_path / "splits" / "train", calls)
    prompt_file = tmp_path / "p.yaml"
    prompt_file.write_text(f"language: zh\nsystem: {SYSTEM}\n", "utf-8")
    build_datasets(
        tmp_path / "splits",
        tmp_path / "data",
        prompts=str(prompt_file),
        max_transcript_chars=77,
        eval_sets=[],
    )
    serving = ServingConfig(every_seconds=15.0, on_turn=False, alert_threshold=0.65, max_tokens=96)
    profile, prompts = profile_for_build(serving, tmp_path / "data", modality="text", source={"recipe": "r"})
    assert prompts.system == SYSTEM
    assert profile.policy == {
        "chain_scene": False, "max_transcript_chars": 77, "every_seconds": 15.0, "on_turn": False,
        "min_turns": 1, "ask_scene": "when_normal", "alert_threshold": 0.65, "max_tokens": 96,
    }  # fmt: skip
    assert profile.source["recipe"] == "r" and profile.source["data_build"]["max_transcript_chars"] == 77


def test_the_detector_asks_as_the_profile_says_and_explicit_options_win(
    tiny_text_model: TinyModel, tmp_path: Path
) -> None:
    model_dir = model_with_profile(tiny_text_model.path, tmp_path / "model", threshold=0.6)
    recorder, verdict = run_call(model_dir)
    # every prompt carries the profile's system text and its 30-character window of the transcript (the first
    # evaluation is at the 2nd turn: min_turns)
    first = recorder.requests[0].messages
    assert first[0] == {"role": "system", "content": SYSTEM}
    seen = "\n".join(f"{'左' if s == 'left' else '右'}：{t}" for s, t in TURNS[:2])
    assert seen[:30] in first[1]["content"] and seen[:31] not in first[1]["content"]
    assert all(r.max_tokens == 24 for r in recorder.requests)
    assert {r.round for r in recorder.requests} == {Round.FRAUD, Round.FRAUD_TYPE}  # ask_scene: never
    assert verdict["is_fraud"] is True  # 0.7 >= the profile's 0.6

    # a changed profile changes what is asked and decided
    changed = model_with_profile(
        tiny_text_model.path, tmp_path / "changed", threshold=0.9, system="另一个系统提示。"
    )
    recorder, verdict = run_call(changed)
    assert recorder.requests[0].messages[0]["content"] == "另一个系统提示。"
    assert verdict["is_fraud"] is False  # 0.7 < 0.9
    # an explicit option (--alert-threshold, or the --config file) wins over the profile
    _, verdict = run_call(changed, DecisionPolicy(alert_threshold=0.5))
    assert verdict["is_fraud"] is True
    policy, profile = apply_profile(changed, DecisionPolicy(alert_threshold=0.5))
    assert profile is not None and policy.alert_threshold == 0.5 and policy.max_transcript_chars == 30


def serve_and_stream(model_dir: Path, calls_file: Path, workdir: Path) -> tuple[str, str]:
    """`teleguard serve --model DIR` and `teleguard stream` as a user runs them; (server log, stream output)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    log = workdir / f"serve-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(bin_dir / "teleguard"), "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
             "--log-level", "DEBUG"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            wait_ready(url, process, log)
            stream = subprocess.run(
                [str(bin_dir / "teleguard"), "stream", str(calls_file), "--url", url, "--speed", "0", "--http"],
                capture_output=True, text=True, timeout=300, env=env,
            )  # fmt: skip
            assert stream.returncode == 0, stream.stdout + stream.stderr
        finally:
            process.terminate()
            process.wait(30)
    return log.read_text("utf-8"), stream.stdout


def test_teleguard_serve_model_dir_alone_uses_the_profile(tiny_text_model: TinyModel, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    call = CallRecord(call_id="t/1", source="t", turns=tuple(Turn(speaker=s, text=t) for s, t in TURNS),
                      labels=CallLabels(is_fraud=True))  # fmt: skip
    write_calls(calls, [call])
    with_profile = model_with_profile(tiny_text_model.path, tmp_path / "with")
    log, output = serve_and_stream(with_profile, calls / "calls.jsonl", tmp_path)
    assert f"serving profile {with_profile / PROFILE_FILE}" in log and "alert threshold 0.5" in log
    prompts = [json.loads(line.split(": ", 2)[2]) for line in log.splitlines() if "prompt for call" in line]
    assert prompts and all(p[0] == {"role": "system", "content": SYSTEM} for p in prompts)
    assert "verdict" in output

    # a folder without a profile says so when it starts, and is asked with the built-in prompts
    bare = tmp_path / "bare"
    shutil.copytree(tiny_text_model.path, bare)
    (bare / PROFILE_FILE).unlink(missing_ok=True)
    log, _ = serve_and_stream(bare, calls / "calls.jsonl", tmp_path)
    assert "has no serving profile" in log
    prompts = [json.loads(line.split(": ", 2)[2]) for line in log.splitlines() if "prompt for call" in line]
    assert prompts and prompts[0][0]["content"] == load_prompts("zh").system


def test_profile_keeps_switched_off_time_points_and_a_chained_scene(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "card.json").write_text(json.dumps({"chain_scene": True, "max_transcript_chars": 99}))
    profile, _ = profile_for_build(ServingConfig(every_seconds=None, ask_scene="until_known"), data, modality="text",
                                   source={})  # fmt: skip
    policy = DecisionPolicy.model_validate(profile.policy)
    assert policy.every_seconds is None and policy.on_turn  # not DecisionPolicy's default of every 5 s
    # a model trained with the scene chained before is_fraud is asked so: the scene round always comes first
    assert policy.chain_scene and policy.ask_scene == "always" and policy.max_transcript_chars == 99
