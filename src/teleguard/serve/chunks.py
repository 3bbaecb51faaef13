"""Decoding and validating one chunk of a live call.

`decode_chunk` turns a `Chunk` into float32 audio at 16 kHz and its transcript segments, or raises a
`RequestError` that names the problem and the field. It never raises anything else, whatever bytes arrive:
sizes are checked from the base64 length before anything is decoded, and every failure of the audio
library becomes `not_audio`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
from pydantic import BaseModel, ConfigDict, Field

from teleguard.serve.protocol import SAMPLE_RATE, Chunk, RequestError, Segment, parse_message

# The WAV family libsndfile reads; other containers (FLAC, OGG, ...) are refused: the protocol says WAV.
_WAV_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64"})
_WHITESPACE = re.compile(r"\s")


class ChunkLimits(BaseModel):
    """How big one chunk may be. The default audio limit holds 32 s of 16 kHz stereo PCM16."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_audio_bytes: int = Field(default=4 * 1024 * 1024, ge=1)  # decoded bytes of `audio` or `wav`
    max_segments: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=20_000, ge=1)  # all segments' text together


@dataclass(frozen=True)
class DecodedChunk:
    """A chunk's content: audio of shape (samples, channels) with 1 or 2 channels at 16 kHz, and segments."""

    audio: np.ndarray | None
    segments: tuple[Segment, ...]

    @property
    def seconds(self) -> float:
        return 0.0 if self.audio is None else self.audio.shape[0] / SAMPLE_RATE


def parse_chunk(data: Any) -> Chunk:
    """A `Chunk` from a JSON object or text; RequestError (invalid_request / invalid_segment) otherwise."""
    return parse_message(Chunk, data)


def decode_chunk(chunk: Chunk, limits: ChunkLimits | None = None) -> DecodedChunk:
    """Validate and decode one chunk. Raises only RequestError."""
    limits = limits or ChunkLimits()
    if chunk.audio is not None and chunk.wav is not None:
        raise RequestError(
            "invalid_request", "send audio either as 'audio' or as 'wav', not both", field="wav"
        )
    _check_segments(chunk.segments, limits)
    audio: np.ndarray | None = None
    if chunk.audio is not None:
        audio = _pcm16(_b64(chunk.audio, "audio", limits), chunk.channels, chunk.sample_rate)
    elif chunk.wav is not None:
        audio = _wav(_b64(chunk.wav, "wav", limits))
    if audio is not None and audio.shape[0] == 0:
        audio = None
    if audio is None and not chunk.segments:
        raise RequestError(
            "empty_chunk",
            f"chunk {chunk.seq} of call {chunk.call_id} holds no audio and no segments: "
            "send 'audio', 'wav' or 'segments'",
        )
    return DecodedChunk(audio=audio, segments=tuple(chunk.segments))


def _check_segments(segments: list[Segment], limits: ChunkLimits) -> None:
    if len(segments) > limits.max_segments:
        raise RequestError(
            "payload_too_large",
            f"{len(segments)} segments in one chunk; at most {limits.max_segments}",
            field="segments",
        )
    chars = sum(len(s.text) for s in segments)
    if chars > limits.max_text_chars:
        raise RequestError(
            "payload_too_large",
            f"the segments hold {chars} characters of text; at most {limits.max_text_chars} per chunk",
            field="segments",
        )
    # The models validate these; checked again because a Chunk may be built without validation.
    for i, s in enumerate(segments):
        if not (0 <= s.start <= s.end < float("inf")):
            raise RequestError(
                "invalid_segment",
                f"segment {i}: times must be finite, non-negative and end >= start (got {s.start}..{s.end})",
                field=f"segments.{i}",
            )


def _b64(text: str, field: str, limits: ChunkLimits) -> bytes:
    # Size first, from the encoded length: 4 base64 characters carry 3 bytes, less the '=' padding. Nothing
    # big is decoded. (Line breaks in wrapped base64 count too: the limit errs on the safe side.)
    estimate = len(text) * 3 // 4 - text[-2:].count("=")
    if estimate > limits.max_audio_bytes:
        raise RequestError(
            "payload_too_large",
            f"field '{field}' carries about {estimate} bytes; at most {limits.max_audio_bytes} per chunk "
            "(send shorter chunks)",
            field=field,
        )
    if _WHITESPACE.search(text):
        text = _WHITESPACE.sub("", text)  # line-wrapped (MIME-style) base64 is still base64
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(
            "invalid_base64", f"field '{field}' is not valid standard base64: {err}", field=field
        ) from None


def _pcm16(data: bytes, channels: int, sample_rate: int) -> np.ndarray:
    if sample_rate != SAMPLE_RATE:
        raise RequestError(
            "wrong_sample_rate",
            f"field 'sample_rate' is {sample_rate}; the detector takes {SAMPLE_RATE} Hz audio only (resample first)",
            field="sample_rate",
        )
    if channels not in (1, 2):
        raise RequestError(
            "wrong_channels",
            f"field 'channels' is {channels}; audio must be mono (1) or stereo (2)",
            field="channels",
        )
    frame = 2 * channels
    if len(data) % frame:
        raise RequestError(
            "invalid_pcm",
            f"field 'audio' holds {len(data)} bytes, not a whole number of {channels}-channel PCM16 frames "
            f"({frame} bytes each)",
            field="audio",
        )
    samples = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
    # / 32768: the scale libsndfile uses for PCM16, so raw and WAV chunks of the same samples are equal.
    return samples.astype(np.float32) / np.float32(32768.0)


def _wav(data: bytes) -> np.ndarray | None:
    if not data:
        return None
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt, rate, channels, frames = f.format, f.samplerate, f.channels, f.frames
            if fmt not in _WAV_FORMATS:
                raise RequestError(
                    "not_audio", f"field 'wav' holds {fmt} audio; send a WAV file", field="wav"
                )
            if rate != SAMPLE_RATE:
                raise RequestError(
                    "wrong_sample_rate",
                    f"field 'wav' is {rate} Hz audio; the detector takes {SAMPLE_RATE} Hz only (resample first)",
                    field="wav",
                )
            if channels not in (1, 2):
                raise RequestError(
                    "wrong_channels", f"field 'wav' has {channels} channels; send mono or stereo", field="wav"
                )
            # A header may claim more samples than the bytes can hold: refuse before allocating for them.
            if frames * channels > 4 * len(data):
                raise RequestError(
                    "not_audio",
                    f"field 'wav': the header claims {frames} frames in {len(data)} bytes",
                    field="wav",
                )
            audio = f.read(dtype="float32", always_2d=True)
    except RequestError:
        raise
    except Exception as err:  # libsndfile reports bad input in several exception types
        raise RequestError(
            "not_audio", f"field 'wav' is not a readable WAV file: {type(err).__name__}: {err}", field="wav"
        ) from None
    if not np.isfinite(audio).all():
        raise RequestError("not_audio", "field 'wav' holds samples that are not finite numbers", field="wav")
    return np.ascontiguousarray(audio, dtype=np.float32)
