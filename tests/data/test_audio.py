"""Call audio: espeak-ng synthesis of a timed stereo call, reading real audio, cutting and splitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from teleguard.data import audio
from teleguard.data.audio import SAMPLE_RATE, cut_audio, read_audio, split_clips, synthesize_call, write_wav
from teleguard.data.records import CallLabels, CallRecord, Turn

CALL = CallRecord(
    call_id="test/bank_otp",
    source="test",
    labels=CallLabels(is_fraud=True, fraud_type="银行诈骗"),
    turns=(
        Turn(speaker="left", text="您好，这里是银行客服中心，您的账户存在异常交易。"),
        Turn(speaker="right", text="啊？什么异常交易？"),
        Turn(speaker="left", text="Please read me the verification code we just sent you."),
        Turn(speaker="right", text="我不会告诉你验证码的，再见。"),
    ),
)
GAP_S = 0.3


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> tuple[CallRecord, Path]:
    # No skip when espeak-ng is missing: synthesize_call raises EspeakNotFoundError naming the Debian package.
    out = tmp_path_factory.mktemp("audio") / "call.wav"
    return synthesize_call(CALL, out, gap_s=GAP_S), out


def test_text_language() -> None:
    assert audio.text_language("您好，这里是顺丰快递客服") == "cmn"
    assert audio.text_language("您的APP账户有异常") == "cmn"
    assert audio.text_language("Please read me the code, 谢谢") == "en"


def test_missing_espeak_ng_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(audio.EspeakNotFoundError, match="apt-get install -y espeak-ng"):
        synthesize_call(CALL, tmp_path / "call.wav")


def test_synthesized_call_is_stereo_16k_pcm16(synthesized: tuple[CallRecord, Path]) -> None:
    record, path = synthesized
    info = sf.info(str(path))
    assert (info.channels, info.samplerate, info.subtype) == (2, SAMPLE_RATE, "PCM_16")
    assert record.audio == str(path)
    assert [t.text for t in record.turns] == [t.text for t in CALL.turns]
    assert record.labels == CALL.labels


def test_turn_times_match_the_audio(synthesized: tuple[CallRecord, Path]) -> None:
    record, path = synthesized
    assert record.timed
    frames = sf.info(str(path)).frames
    assert record.duration == pytest.approx(frames / SAMPLE_RATE, abs=1 / SAMPLE_RATE)
    assert record.turns[0].start == 0.0
    for turn in record.turns:
        assert turn.end - turn.start > 0.5  # every turn produced speech
        # Times are whole samples, so cutting by them is exact.
        assert turn.start * SAMPLE_RATE == pytest.approx(round(turn.start * SAMPLE_RATE), abs=1e-6)
    for before, after in zip(record.turns, record.turns[1:], strict=False):
        assert after.start - before.end == pytest.approx(GAP_S, abs=1 / SAMPLE_RATE)


def test_each_speaker_is_on_its_own_channel(synthesized: tuple[CallRecord, Path]) -> None:
    record, path = synthesized
    samples, rate = read_audio(path)
    for turn in record.turns:
        seg = cut_audio(samples, turn.start, turn.end, rate)
        own, other = (0, 1) if turn.speaker == "left" else (1, 0)
        assert rms(seg[:, own]) > 0.02, turn.text
        assert rms(seg[:, other]) < rms(seg[:, own]) / 100, turn.text
    # The gaps between turns are silent on both channels.
    gap = cut_audio(samples, record.turns[0].end, record.turns[1].start, rate)
    assert gap.shape[0] == round(GAP_S * rate)
    assert rms(gap) == 0.0


def test_two_speakers_have_different_pitch(synthesized: tuple[CallRecord, Path]) -> None:
    import librosa

    record, path = synthesized
    samples, rate = read_audio(path)

    def median_f0(turn: Turn, channel: int) -> float:
        x = cut_audio(samples, turn.start, turn.end, rate)[:, channel]
        return float(np.median(librosa.yin(x, fmin=50, fmax=400, sr=rate)))

    # Default voices: a low male voice on the left (about 80 Hz), a high female voice on the right (about 200 Hz).
    left = [median_f0(t, 0) for t in record.turns if t.speaker == "left"]
    right = [median_f0(t, 1) for t in record.turns if t.speaker == "right"]
    assert max(left) * 1.5 < min(right), (left, right)


def test_synthesis_is_deterministic(synthesized: tuple[CallRecord, Path], tmp_path: Path) -> None:
    record, path = synthesized
    again = synthesize_call(CALL, tmp_path / "again.wav", gap_s=GAP_S, workers=1)
    assert [(t.start, t.end) for t in again.turns] == [(t.start, t.end) for t in record.turns]
    assert (tmp_path / "again.wav").read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("fmt", "channels", "native"), [("FLAC", 2, 44_100), ("MP3", 2, 44_100), ("FLAC", 1, 8_000)]
)
def test_read_audio_resamples_to_16k_stereo(tmp_path: Path, fmt: str, channels: int, native: int) -> None:
    t = np.arange(2 * native) / native
    tone = 0.5 * np.sin(2 * np.pi * 300 * t)
    data = tone if channels == 1 else np.stack([tone, np.zeros_like(tone)], axis=1)
    path = tmp_path / f"call.{fmt.lower()}"
    sf.write(str(path), data.astype(np.float32), native, format=fmt)

    samples, rate = read_audio(path)
    assert rate == SAMPLE_RATE
    assert samples.dtype == np.float32 and samples.ndim == 2 and samples.shape[1] == 2
    # MP3 adds encoder delay and padding (a few ms); lossless formats keep the length to the sample.
    slack = 0.1 * SAMPLE_RATE if fmt == "MP3" else 1
    assert abs(samples.shape[0] - 2 * SAMPLE_RATE) <= slack
    mid = samples[SAMPLE_RATE // 2 : 3 * SAMPLE_RATE // 2]
    assert rms(mid[:, 0]) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    if channels == 1:
        np.testing.assert_array_equal(samples[:, 0], samples[:, 1])
    else:
        assert rms(mid[:, 1]) < 0.01  # channel order survives: the tone stays on the left


def test_read_audio_of_a_wav_keeps_samples(tmp_path: Path) -> None:
    data = np.random.default_rng(0).uniform(-0.5, 0.5, size=(SAMPLE_RATE, 2)).astype(np.float32)
    path = write_wav(tmp_path / "sub" / "x.wav", data, SAMPLE_RATE)
    samples, rate = read_audio(path)
    assert (rate, samples.shape) == (SAMPLE_RATE, data.shape)
    np.testing.assert_allclose(samples, data, atol=1 / 32_768)


def test_cut_audio_length() -> None:
    samples = np.zeros((5 * SAMPLE_RATE, 2), dtype=np.float32)
    assert cut_audio(samples, 0.5, 1.25).shape == (12_000, 2)
    assert cut_audio(samples, 4.5, 9.0).shape[0] == SAMPLE_RATE // 2  # clamped to the end
    assert cut_audio(samples, 2.0, 2.0).shape[0] == 0
    with pytest.raises(ValueError):
        cut_audio(samples, 2.0, 1.0)


def test_split_clips_of_70_seconds() -> None:
    samples = np.random.default_rng(1).normal(size=(70 * SAMPLE_RATE, 2)).astype(np.float32)
    clips = split_clips(samples, SAMPLE_RATE, max_seconds=30.0)
    assert len(clips) == 3
    assert all(0 < clip.shape[0] <= 30 * SAMPLE_RATE for clip in clips)
    np.testing.assert_array_equal(np.concatenate(clips), samples)
    assert len(split_clips(samples[: 30 * SAMPLE_RATE])) == 1
    assert split_clips(samples[:0]) == []
