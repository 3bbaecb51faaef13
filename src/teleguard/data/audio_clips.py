"""Audio clips for the audio modality: a call (or its prefix) cut at the prefix time, in clips of <= 30 s.

Qwen2-Audio-class models hold at most 30 s of audio per clip, so a prompt carries several `<audio>` clips for
a longer call. The clips of each cut are written once as 16 kHz stereo WAV under the dataset folder and referenced
from the ms-swift rows by paths relative to it, so a dataset stays whole when it moves (to MinIO and back).
ms-swift resolves relative media paths against the `ROOT_IMAGE_DIR` environment variable: a stage sets it
to the dataset folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from teleguard.data.audio import cut_audio, read_audio, split_clips, write_wav
from teleguard.data.records import CallRecord

RATE = 16_000


class ClipWriter:
    """`(call, end_s or None, cut number) -> clip paths`, reading each call's audio once."""

    def __init__(self, dataset_dir: Path, max_seconds: float = 30.0, subdir: str = "clips") -> None:
        self.dataset_dir, self.subdir, self.max_seconds = dataset_dir, subdir, max_seconds
        self._loaded: tuple[str, np.ndarray] | None = None

    def _audio(self, call: CallRecord) -> np.ndarray:
        if call.audio is None:
            raise ValueError(f"call {call.call_id} has no audio (run `teleguard data audio` first)")
        if self._loaded is None or self._loaded[0] != call.audio:
            audio, _ = read_audio(Path(call.audio), rate=RATE)
            self._loaded = (call.audio, audio)
        return self._loaded[1]

    def __call__(self, call: CallRecord, end_s: float | None, cut: int) -> Sequence[str]:
        audio = self._audio(call)
        if end_s is not None:
            audio = cut_audio(audio, 0.0, end_s, RATE)
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in call.call_id)
        paths = []
        for i, clip in enumerate(split_clips(audio, RATE, self.max_seconds)):
            relative = f"{self.subdir}/{stem}@{cut}-{i}.wav"
            write_wav(self.dataset_dir / relative, clip, RATE)
            paths.append(relative)
        return paths
