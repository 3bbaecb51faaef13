"""Call audio: synthesize a timed stereo call from a transcript, read real calls, cut and split audio.

TeleAntiFraud-28k synthesized each turn separately and merged the turns into a stereo file, the left speaker on
the left channel and the right speaker on the right, read at 16 kHz. `synthesize_call` does the same offline with
espeak-ng, so that calls without audio (the shared transcripts) get audio whose turn times are exact to the
sample. Everything here uses numpy arrays of shape (samples, 2), float32 in [-1, 1], at 16 kHz unless told.

espeak-ng note: in espeak-ng 1.51 (Debian 12) the `cmn` voice turns each hanzi into pinyin with a tone digit and
then reads that Latin text as English ("好" comes out as "hao three"; espeak-ng issues #1028, #1236). The
`cmn-latn-pinyin` voice reads hanzi correctly there, so `mandarin_voice()` probes `cmn` once and falls back.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

from teleguard.data.records import CallRecord, Speaker, Turn

SAMPLE_RATE = 16_000
CHANNELS: dict[Speaker, int] = {"left": 0, "right": 1}
ESPEAK = "espeak-ng"
ESPEAK_PACKAGE = "espeak-ng"  # the Debian/Ubuntu package that provides the binary
ENGLISH_VOICE = "en-us"

# Below this level (about -54 dBFS) a sample counts as silence when trimming espeak-ng's padding.
_SILENCE = 2e-3
# Kept around the speech when trimming, so onsets and releases are not clipped.
_MARGIN_S = 0.01

Language = Literal["cmn", "en"]


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is not on PATH."""


@dataclass(frozen=True)
class Voice:
    """How one speaker sounds: an espeak-ng voice variant (m1..m7, f1..f5, ...) and a pitch (0-99)."""

    variant: str
    pitch: int = 50


# A low male voice and a high female voice: about 80 Hz and 210 Hz median F0, easy to tell apart.
DEFAULT_VOICES: Mapping[Speaker, Voice] = {"left": Voice("m3", 35), "right": Voice("f2", 70)}


# --- espeak-ng --------------------------------------------------------------------------------------------


def _espeak_binary() -> str:
    # Looked up on every call (not cached) so installing espeak-ng mid-session, or a test's PATH, takes effect.
    path = shutil.which(ESPEAK)
    if path is None:
        raise EspeakNotFoundError(
            f"{ESPEAK} is not installed (not found on PATH); it synthesizes call audio offline. "
            f"Install it with `apt-get install -y {ESPEAK_PACKAGE}` (Debian/Ubuntu package {ESPEAK_PACKAGE!r})."
        )
    return path


def _run_espeak(args: Sequence[str], text: str) -> bytes:
    # Text goes on stdin, not argv, so a turn that starts with "-" is never taken for an option.
    done = subprocess.run(
        [_espeak_binary(), "-b", "1", *args], input=text.encode("utf-8"), capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{ESPEAK} {' '.join(args)} failed ({done.returncode}): {done.stderr.decode()}")
    return done.stdout


@functools.cache
def _mandarin_voice_for(binary: str) -> str:
    # espeak-ng 1.51's `cmn` marks the hanzi it mis-reads as English with "(en)" in its phoneme output.
    phonemes = _run_espeak(["-v", "cmn", "-q", "-x"], "你好").decode("utf-8", "replace")
    if "(en)" not in phonemes:
        return "cmn"
    voices = subprocess.run([binary, "--voices=cmn"], capture_output=True, check=False).stdout.decode()
    return "cmn-latn-pinyin" if "cmn-latn-pinyin" in voices.lower() else "cmn"


def mandarin_voice() -> str:
    """The espeak-ng voice that reads hanzi as Mandarin here: `cmn`, or `cmn-latn-pinyin` on espeak-ng 1.51."""
    return _mandarin_voice_for(_espeak_binary())


def espeak_version() -> str:
    """The first line of `espeak-ng --version`."""
    out = subprocess.run([_espeak_binary(), "--version"], capture_output=True, check=False).stdout
    return out.decode("utf-8", "replace").strip().splitlines()[0]


def text_language(text: str) -> Language:
    """ "en" when Latin letters outnumber CJK characters (the text is mostly English), else "cmn"."""
    cjk = sum(1 for ch in text if "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff")
    latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return "en" if latin > cjk else "cmn"


def _trim(audio: np.ndarray, rate: int) -> np.ndarray:
    # espeak-ng pads its output with silence; trimming it makes a turn's start/end bound the speech itself.
    loud = np.flatnonzero(np.abs(audio) > _SILENCE)
    if loud.size == 0:
        return audio[:0]
    margin = round(_MARGIN_S * rate)
    return audio[max(loud[0] - margin, 0) : min(loud[-1] + 1 + margin, audio.size)]


def synthesize_text(text: str, voice: Voice, *, speed_wpm: int | None = None) -> np.ndarray:
    """One utterance as mono float32 at 16 kHz, leading and trailing silence trimmed."""
    language = text_language(text)
    name = ENGLISH_VOICE if language == "en" else mandarin_voice()
    args = ["-v", f"{name}+{voice.variant}", "-p", str(voice.pitch), "--stdout"]
    if speed_wpm is not None:
        args += ["-s", str(speed_wpm)]
    wav = _run_espeak(args, text)
    # espeak-ng's streamed WAV header carries a placeholder length; libsndfile reads up to the real end.
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=False)
    return _trim(resample(audio, rate, SAMPLE_RATE), SAMPLE_RATE)


def synthesize_call(
    record: CallRecord,
    out_wav: Path,
    *,
    gap_s: float = 0.3,
    voices: Mapping[Speaker, Voice] = DEFAULT_VOICES,
    speed_wpm: int | None = None,
    workers: int | None = None,
) -> CallRecord:
    """Synthesize every turn, lay the turns out one after another `gap_s` apart, and write a stereo 16 kHz WAV.

    Returns a copy of `record` whose turns carry start/end seconds that are exact sample positions in the WAV
    (start = first sample / 16000, end = one past the last sample / 16000) and whose `audio` is `str(out_wav)`.
    The file ends with the last turn. Turns are synthesized in parallel (`workers`, default: one per core);
    the result does not depend on the number of workers.
    """
    if gap_s < 0:
        raise ValueError(f"gap_s must be >= 0, got {gap_s}")
    missing = {t.speaker for t in record.turns} - set(voices)
    if missing:
        raise ValueError(f"no voice for speaker(s) {sorted(missing)}")
    mandarin_voice()  # fails here, before any thread starts, if espeak-ng is missing; probes the voice once
    workers = workers or min(len(record.turns), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # map keeps turn order, so the layout is the same however the threads interleave.
        clips = list(
            pool.map(lambda t: synthesize_text(t.text, voices[t.speaker], speed_wpm=speed_wpm), record.turns)
        )

    gap = round(gap_s * SAMPLE_RATE)
    bounds: list[tuple[int, int]] = []
    cursor = 0
    for i, clip in enumerate(clips):
        start = cursor + (gap if i else 0)
        bounds.append((start, start + clip.size))
        cursor = start + clip.size

    audio = np.zeros((cursor, 2), dtype=np.float32)
    turns: list[Turn] = []
    for turn, clip, (start, end) in zip(record.turns, clips, bounds, strict=True):
        # Only this speaker's channel gets the turn; the other channel stays silent, as in TeleAntiFraud.
        audio[start:end, CHANNELS[turn.speaker]] = clip
        turns.append(turn.model_copy(update={"start": start / SAMPLE_RATE, "end": end / SAMPLE_RATE}))

    write_wav(out_wav, audio, SAMPLE_RATE)
    return record.model_copy(update={"turns": tuple(turns), "audio": str(out_wav)})


# --- reading, writing, cutting ------------------------------------------------------------------------------


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample along the first axis (soxr, high quality); float32 out."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate == target or audio.shape[0] == 0:
        return audio
    return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32, copy=False)


def read_audio(path: str | Path, *, rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """A call's audio as float32 of shape (samples, 2) at `rate`; mono is duplicated to both channels.

    Reads what libsndfile reads (WAV, FLAC, MP3, OGG, ...); anything else goes through librosa/audioread.
    """
    try:
        audio, native = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError:
        import librosa  # slow to import; only needed for formats libsndfile lacks

        data, native = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
        audio = np.atleast_2d(data).T
    if audio.shape[1] == 1:
        audio = np.repeat(audio, 2, axis=1)
    elif audio.shape[1] != 2:
        raise ValueError(f"{path}: expected mono or stereo audio, got {audio.shape[1]} channels")
    return np.ascontiguousarray(resample(audio, int(native), rate)), rate


def write_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Write PCM16 WAV (mono for 1-D audio, else one column per channel), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Clip first: libsndfile would otherwise wrap out-of-range floats around when converting to int16.
    sf.write(str(path), np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return path


def cut_audio(audio: np.ndarray, start_s: float, end_s: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples from `start_s` to `end_s` (a view), clamped to the audio; times round to the nearest sample.

    Rounding means the times `synthesize_call` writes (sample / rate) cut out exactly that turn's samples.
    """
    if end_s < start_s:
        raise ValueError(f"end ({end_s}) is before start ({start_s})")
    n = audio.shape[0]
    first = min(max(round(start_s * rate), 0), n)
    last = min(max(round(end_s * rate), first), n)
    return audio[first:last]


def split_clips(audio: np.ndarray, rate: int = SAMPLE_RATE, max_seconds: float = 30.0) -> list[np.ndarray]:
    """Split audio into the fewest clips of at most `max_seconds` each, of near-equal length (views).

    Qwen2-Audio's feature extractor holds at most 30 s; equal clips avoid a last clip of a few samples.
    Concatenated, the clips are exactly the input; empty audio gives no clips.
    """
    limit = int(max_seconds * rate)
    if limit < 1:
        raise ValueError(f"max_seconds * rate must be at least one sample, got {max_seconds} * {rate}")
    n = audio.shape[0]
    if n == 0:
        return []
    count = -(-n // limit)  # ceil
    return np.array_split(audio, count, axis=0)
