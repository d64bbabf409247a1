import os
import re

import numpy as np
import pytest
import soundfile

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.audio import load_audio


def _tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.argmax(spectrum) * rate / len(audio)


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("WAV", "FLOAT")])
def test_reads_mono_at_native_rate_exactly(tmp_path, fmt, subtype):
    tone = _tone(440, 0.5, 16000)
    path = tmp_path / f"tone.{fmt.lower()}"
    soundfile.write(path, tone, 16000, format=fmt, subtype=subtype)
    audio = load_audio(path, 16000)
    assert audio.dtype == np.float32 and audio.shape == (8000,)
    tolerance = 1e-7 if subtype == "FLOAT" else 1 / 32768
    np.testing.assert_allclose(audio, tone, atol=tolerance)


@pytest.mark.parametrize("file_rate, frames", [(22050, 33075), (8000, 12000), (44100, 44100)])
def test_resamples_to_the_target_rate(tmp_path, file_rate, frames):
    path = tmp_path / "tone.wav"
    soundfile.write(path, _tone(1000, frames / file_rate, file_rate), file_rate)
    audio = load_audio(path, 16000)
    assert abs(len(audio) - frames * 16000 / file_rate) <= 1
    assert audio.dtype == np.float32
    # The pitch survives resampling: 1 kHz stays 1 kHz (FFT bin width ~1 Hz).
    assert _dominant_frequency(audio, 16000) == pytest.approx(1000, abs=2)
    # No large gain change (RMS of a 0.5 sine is 0.354).
    assert np.sqrt(np.mean(audio[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_stereo_is_averaged_to_mono(tmp_path):
    left = _tone(300, 0.25, 16000)
    right = _tone(700, 0.25, 16000, amplitude=0.25)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_24")
    audio = load_audio(path, 16000)
    assert audio.shape == (4000,)
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)


def test_stereo_at_another_rate_is_downmixed_and_resampled(tmp_path):
    stereo = np.stack([_tone(500, 1.0, 8000), np.zeros(8000, np.float32)], axis=1)
    path = tmp_path / "stereo8k.wav"
    soundfile.write(path, stereo, 8000)
    audio = load_audio(path, 16000)
    assert audio.ndim == 1 and abs(len(audio) - 16000) <= 1
    assert np.abs(audio).max() == pytest.approx(0.25, rel=0.02)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "a.flac"
    with pytest.raises(DataError, match=re.escape(f"audio file not found: {os.path.abspath(path)}")):
        load_audio(path, 16000)


def test_corrupt_flac_is_named(tmp_path):
    good = tmp_path / "good.flac"
    soundfile.write(good, _tone(440, 1.0, 16000), 16000)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.flac"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"this is not audio" * 20)
    for path in (truncated, garbage):
        with pytest.raises(DataError) as info:
            load_audio(path, 16000)
        message = str(info.value)
        assert message.startswith(f"cannot decode audio file {os.path.abspath(path)}")
        assert "\n" not in message
