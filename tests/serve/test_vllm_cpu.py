"""vLLM for real, on the CPU: vLLM's CPU build (installed by `make setup` where no GPU is present) runs a tiny
Qwen3 with 64-wide heads (`tiny_vllm_model`), built in the test session; nothing is stubbed.

- `teleguard serve --engine vllm --device cpu` as a user starts it: calls streamed over the WebSocket and the
  REST routes at once all get decisions and verdicts, and vLLM's own counters on /metrics show that it ran
  requests of different calls in the same engine steps (continuous batching) and reused cached prefixes.
- rejection sampling and evaluation through the engine a recipe with `engine: vllm` builds give results of
  the same form as the transformers engine's (one loaded vLLM engine for both tests).
- a tiny Qwen2-Audio answers clips through the serving engine.

vLLM loads in about 30-50 s on two cores, so the server and the in-process engine each load once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from teleguard.contract import Round
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.engines import SamplingParams, SwiftEngine, recipe_engine
from teleguard.engines.contract import EngineConfig, EngineRequest, Generation
from teleguard.engines.swift import SwiftServingEngine
from teleguard.evaluate.metrics import evaluate_predictions
from teleguard.evaluate.run import predict, read_eval_rows
from teleguard.loopback import free_port
from teleguard.serve.client import ReplayResult, replay_call, transcript_script
from teleguard.tiny_models import VLLM_TINY_SIZE, TinyModel, build_tiny_model
from teleguard.train.config import Recipe
from teleguard.train.sampling import generate_samples, read_rows, write_selection
from tests.support.detector import TURNS
from tests.support.processes import wait_ready

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed: `make setup` installs vLLM's CPU build only where no GPU is present "
        "(a GPU machine needs PyPI's CUDA vllm, which the set-up leaves to the GPU image)",
    ),
]

CALLS = 6  # at once: half over the WebSocket, half over the REST routes


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics summed over its labels, by sample name."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def call(i: int) -> Any:
    turns = tuple(
        Turn(speaker=s, text=f"{t}（第{i}通）", start=2.0 * n, end=2.0 * n + 1.8)
        for n, (s, t) in enumerate(TURNS)
    )
    return transcript_script(
        CallRecord(call_id=f"vllm/{i}", source="t", turns=turns, labels=CallLabels(is_fraud=i % 2 == 0))
    )


@pytest.fixture(scope="module")
def vllm_server(tiny_vllm_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`teleguard serve --engine vllm --device cpu` in a subprocess; its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    teleguard = Path(sys.executable).parent / "teleguard"
    command = [str(teleguard), "serve", "--model", str(tiny_vllm_model.path), "--engine", "vllm",
               "--device", "cpu", "--port", str(port), "--max-tokens", "32"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            wait_ready(url, process, log, timeout=300)
            yield url
        finally:
            process.terminate()
            process.wait(60)


def test_serve_vllm_on_cpu_batches_concurrent_calls_continuously(vllm_server: str) -> None:
    before = scrape(vllm_server)

    async def main() -> list[ReplayResult]:
        return list(
            await asyncio.gather(
                *(
                    replay_call(
                        vllm_server, call(i), speed=0, transport="ws" if i % 2 else "http", timeout=120
                    )
                    for i in range(CALLS)
                )
            )
        )

    results = asyncio.run(main())
    after = scrape(vllm_server)
    for r in results:
        assert r.decisions and r.verdict is not None and r.verdict["decisions"] == len(r.decisions)
        assert {d.decision["round"] for d in r.decisions} >= {"is_fraud"}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    # vLLM's own counters. An engine step generates at most one token per running request, so fewer steps
    # than generated tokens means some step ran several requests at once: continuous batching across calls.
    steps, generated = delta("vllm:iteration_tokens_total_count"), delta("vllm:generation_tokens_total")
    assert generated > 0 and steps < generated, (steps, generated)
    # every round of a call starts with the same system prompt and transcript: vLLM found them cached
    assert delta("vllm:prefix_cache_hits_total") > 0
    assert delta("vllm:request_success_total") >= sum(r.model_invocations for r in results)


# --- sampling and evaluation through a recipe's engine ------------------------------------------------------


def recipe(model: TinyModel, engine: str) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "vllm-cpu",
            "device": "cpu",
            "model": {"path": str(model.path), "model_type": model.model_type, "template": model.template},
            "data": {"datasets": "d"},
            "output_dir": "o",
            "common": {"torch_dtype": "float32"},
            "stages": {n: {"use_vllm": False} for n in ("grpo", "lcrl", "realtime")} | {"sample": {"engine": engine}},
            "evaluate": {"engine": engine},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def engines(tiny_vllm_model: TinyModel, text_datasets: Path) -> Iterator[dict[str, SwiftEngine]]:
    """The engines `engine: vllm` and `engine: transformers` recipes build, over the same model."""
    built = {
        kind: recipe_engine(
            recipe(tiny_vllm_model, kind), tiny_vllm_model.path, text_datasets, kind=kind, batch_size=8
        )
        for kind in ("vllm", "transformers")
    }
    assert built["vllm"].kind == "vllm"
    # vLLM's CPU build fails seeded requests prefilled in parts (teleguard.engines.swift): no per-request seed
    assert built["vllm"].seeded is False and built["transformers"].seeded is True
    yield built
    for engine in built.values():
        engine.close()


def shape(value: Any) -> Any:
    """A JSON value's form: mappings keep their keys, lists their first item's form, numbers are 'number'."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if not isinstance(v, dict) or v}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return (
        "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__
    )


def test_rejection_sampling_through_vllm_reads_like_transformers(
    engines: dict[str, SwiftEngine], text_datasets: Path, tmp_path: Path
) -> None:
    rows = read_rows(text_datasets / "train" / "grpo.jsonl", 4)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=48, seed=0)
    reports, written = {}, {}
    for kind, engine in engines.items():
        samples = generate_samples(engine, rows, params, batch_size=4)
        assert len(samples) == len(rows) and all(
            len(s) == 3 and all(isinstance(t, str) for t in s) for s in samples
        )
        reports[kind] = write_selection(rows, samples, tmp_path / kind)
        # the fields of the kept rows and of the unsolved prompts' report lines
        written[kind] = {
            name: {
                tuple(sorted(json.loads(line)))
                for line in (tmp_path / kind / name).read_text("utf-8").splitlines()
            }
            for name in ("sft.jsonl", "unsolved.jsonl")
        }
    assert shape(reports["vllm"]) == shape(reports["transformers"])
    assert reports["vllm"]["prompts"] == len(rows)
    for name in ("sft.jsonl", "unsolved.jsonl"):
        fields = written["vllm"][name] | written["transformers"][name]
        assert len(fields) <= 1, fields  # one form per file, whichever engine sampled


def test_evaluation_through_vllm_reads_like_transformers(
    engines: dict[str, SwiftEngine], text_datasets: Path
) -> None:
    rows = read_eval_rows(text_datasets / "test", realtime=False, limit=6)
    results = {}
    for kind, engine in engines.items():
        predictions = predict(engine, rows, max_tokens=32, batch_size=6)
        assert len(predictions) == len(rows)
        # both engines hand back the answer tokens' log-probabilities: the confidence is measured, not stated
        assert {p.confidence_source for p in predictions} == {"tokens"}
        results[kind] = evaluate_predictions(predictions)
    assert shape(results["vllm"]) == shape(results["transformers"])


# --- Qwen2-Audio --------------------------------------------------------------------------------------------


def test_qwen2_audio_answers_clips_on_vllm_cpu(tiny_corpus: list[str], tmp_path: Path) -> None:
    """vLLM's CPU build runs Qwen2-Audio (Whisper encoder and Qwen2) when its heads are 64 wide."""
    model = build_tiny_model(tmp_path / "audio", "qwen2_audio", tiny_corpus, **VLLM_TINY_SIZE)
    engine = SwiftServingEngine(EngineConfig(kind="vllm", device="cpu", model=str(model.path), max_tokens=8))
    clip = np.random.default_rng(0).normal(0.0, 0.1, size=(2 * 16_000, 2)).astype(np.float32)
    messages = [{"role": "user", "content": "<audio>听这段通话，判断是否诈骗。"}]
    requests = [EngineRequest(f"a{i}", Round.FRAUD, messages, audios=(clip,), max_tokens=8) for i in range(2)]

    async def ask() -> list[Generation]:
        try:
            return await engine.generate(requests)
        finally:
            await engine.aclose()

    answers = asyncio.run(ask())
    assert len(answers) == 2 and all(a.tokens and a.logprobs for a in answers)


def test_heads_vllm_cpu_refuses_are_refused_before_it_starts(tiny_text_model: TinyModel) -> None:
    from teleguard.engines.vllm_engine import check_cpu_head_size

    with pytest.raises(
        ValueError, match="heads 16 wide"
    ):  # the default tiny size, which the CPU recipes train
        check_cpu_head_size(tiny_text_model.path)
