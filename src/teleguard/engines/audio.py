"""Clips as the engines hand them to a model: in-memory PCM16 WAV, the format training's clips were written in
(`teleguard.data.audio.write_wav`). ms-swift loads them like its dataset files (librosa, mono, 16 kHz); the
remote engine sends them base64-encoded as ``input_audio`` parts. Nothing touches the disk."""

from __future__ import annotations

import io

import numpy as np

AUDIO_TAG = "<audio>"  # ms-swift's placeholder for one clip in a message's text


def wav_bytes(clip: np.ndarray) -> bytes:
    """A clip as a PCM16 WAV file in memory, as training wrote clips (clipped to [-1, 1])."""
    import soundfile as sf

    from teleguard.data.audio import SAMPLE_RATE  # the serving protocol's only rate, too

    buf = io.BytesIO()
    sf.write(
        buf,
        np.clip(np.asarray(clip, dtype=np.float32), -1.0, 1.0),
        SAMPLE_RATE,
        format="WAV",
        subtype="PCM_16",
    )
    return buf.getvalue()
