"""Decode audio files (FLAC, WAV, anything libsndfile reads) to mono float32 at a target rate."""

import os
from typing import Union

import numpy as np
import soundfile
import soxr

from caiman_asr_train.core.errors import DataError

PathLike = Union[str, os.PathLike]


def load_audio(path: PathLike, sample_rate: int) -> np.ndarray:
    """Read ``path`` as a mono float32 waveform at ``sample_rate`` Hz.

    Multi-channel audio is averaged to mono. A file stored at another rate is
    resampled with soxr (high quality), so the result has about
    ``round(frames * sample_rate / file_rate)`` samples.

    Returns:
        audio: float32 ``[N]``, nominally in [-1, 1].

    Raises:
        DataError: naming the file when it is missing, unreadable or corrupt.
    """
    if not os.path.isfile(path):
        raise DataError(
            f"audio file not found: {os.path.abspath(path)}; check the manifest and --dataset_dir"
        )
    try:
        audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, EOFError) as exc:
        raise DataError(
            f"cannot decode audio file {os.path.abspath(path)} ({exc}); "
            "replace it with a valid FLAC or WAV file"
        ) from None
    # [frames, channels] -> [frames]
    audio = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    if file_rate != sample_rate and audio.size > 0:
        audio = soxr.resample(audio, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)
