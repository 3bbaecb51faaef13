"""Shared fixtures: offline mode, tiny Qwen models built once per session, a short WAV file."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from teleguard.data.dataset import build_split
from teleguard.data.ingest import ingest
from teleguard.tiny_models import VLLM_TINY_SIZE, TinyModel, build_tiny_model, corpus_from_paths
from tests.support.paths import TRANSCRIPTS_DIR

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE")


# Enough transcript text for Chinese merges; the full ~100k strings would cost ~15 s of BPE training per model.
CORPUS_LIMIT = 20_000


@pytest.fixture(autouse=True, scope="session")
def offline_hubs() -> Iterator[None]:
    """Nothing may reach a model hub: transformers, huggingface_hub and modelscope all read these."""
    saved = {name: os.environ.get(name) for name in (*OFFLINE_VARS, "OMP_NUM_THREADS")}
    os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    # The trainers run in subprocesses beside the test process on few cores: one OpenMP thread each avoids
    # spin-waiting that made CPU GRPO steps about ten times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def autograd_left_as_found() -> Iterator[None]:
    """A test must not leave torch's thread-wide autograd state changed: a later test in the same worker that
    trains (the cascade's tiny models) then fails far from the cause. This names the test that leaked it."""
    yield
    torch = sys.modules.get("torch")  # torch is never imported here for a test that did not import it
    if torch is None:
        return
    leaked = [
        what
        for what, bad in (
            ("inference mode left on", torch.is_inference_mode_enabled()),
            ("grad mode left off", not torch.is_grad_enabled()),
        )
        if bad
    ]
    assert not leaked, f"this test left torch's autograd state changed: {', '.join(leaked)}"


def transcript_corpus() -> list[str]:
    """Text of the shared TeleAntiFraud transcripts, or nothing when the shared folder is absent."""
    paths = sorted(TRANSCRIPTS_DIR.glob("*.jsonl")) if TRANSCRIPTS_DIR.is_dir() else []
    return list(itertools.islice(corpus_from_paths(paths), CORPUS_LIMIT))


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    return transcript_corpus()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: list[str]) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", tiny_corpus)


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: list[str]) -> TinyModel:
    """A tiny Qwen3 vLLM's CPU build runs: heads 64 wide (its CPU attention refuses the default 16)."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-qwen3-vllm"), "qwen3", tiny_corpus, **VLLM_TINY_SIZE
    )


@pytest.fixture(scope="session")
def tiny_audio_model(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: list[str]) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-audio"), "qwen2_audio", tiny_corpus)


@pytest.fixture
def wav_file(tmp_path: Path) -> Path:
    """2 s of 16 kHz stereo audio: a different tone per channel plus a little noise, like a two-party call."""
    import soundfile as sf

    rate = 16_000
    t = np.arange(2 * rate) / rate
    noise = np.random.default_rng(0).normal(0.0, 0.02, size=(t.size, 2))
    tones = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)], axis=1)
    path = tmp_path / "call.wav"
    sf.write(path, (tones + noise).astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 server (moto) on a free loopback port; it ignores credentials unless told otherwise."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def text_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text datasets of every stage from 24 shared calls (12 fraud, 12 normal), split in half."""
    files = sorted(TRANSCRIPTS_DIR.glob("*_dialogues-*.jsonl"))
    if not files:
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    calls, _ = ingest([files[0], files[-1]], "dialogues")
    fraud = [c for c in calls if c.labels.is_fraud][:12]
    normal = [c for c in calls if not c.labels.is_fraud][:12]
    out = tmp_path_factory.mktemp("datasets")
    for name, part in (("train", fraud[:6] + normal[:6]), ("test", fraud[6:] + normal[6:])):
        build_split(part, out / name)
    return out


# `make test` runs the files on every core (pytest-xdist, `--dist loadfile --no-loadscope-reorder`), handing
# them out in collection order as workers free up. The longest files go first (seconds of the last CI run), so
# no worker is still in a long file at the end while the others idle; the rest keep their order.
LONG_FILES = (
    "tests/pipeline/test_seed_recipes.py",  # ~480 s
    "tests/train/test_train_stages.py",  # ~370 s
    "tests/pipeline/test_pipeline_local.py",  # ~330 s
    "tests/bench/test_gpu_check.py",  # ~200 s
    "tests/serve/test_vllm_cpu.py",  # ~190 s
    "tests/serve/test_cascade.py",
    "tests/train/test_grpo_vllm_cpu.py",
    "tests/train/test_grpo_text.py",
    "tests/serve/test_serving_profile.py",
    "tests/train/test_trainjob.py",
    "tests/pipeline/test_pipeline_compile.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONG_FILES)}
    items.sort(
        key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank))
    )  # stable: in-file order kept
