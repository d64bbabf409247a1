"""The demo corpus's voices: eSpeak NG driven through ctypes, and one utterance's recording.

eSpeak NG comes from the PyPI package ``espeakng-loader`` (library and voice
data); the ``espeak-ng`` command is the fallback. ``speaker_settings`` draws an
utterance's voice, speed, pitch and recording conditions from its seed and
``synthesize_block`` speaks sentences with them, each padded with a little
silence and a faint noise floor, resampled to 16 kHz mono.
"""

import _ctypes
import ctypes
import io
import random
import shutil
import subprocess
from typing import Sequence

import numpy as np
import soundfile
import soxr

from caiman_asr_train.core.errors import DataError

SAMPLE_RATE = 16000


# A few speakers rather than hundreds: the demo must train to a low WER in
# minutes on two CPU cores, and each extra accent or synthesiser is another
# pronunciation of every word for the model to learn. Two accents times six
# voice variants, with moderate pitches, still give the model
# several voices to generalise over (the dev set uses the same speakers).
_VOICES = ["en-us", "en"]
_VARIANTS = ["", "m1", "m3", "f1", "f2", "f4"]

# espeak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _EspeakLibrary:
    """libespeak-ng from the ``espeakng-loader`` wheel, called through ctypes.

    The library keeps state in static variables (such as the phase of its
    pitch flutter) that carries over from one utterance to the next and shifts
    lengths by a few samples, so the corpus would depend on which process spoke
    which sentences in which order. Each call of ``synthesize`` therefore gets
    a freshly loaded library (load, initialise, speak its sentences in order,
    terminate, unload), and what it says depends only on its own requests.
    Loading the library and its first voice's data costs more than speaking a
    sentence (about 5-7 ms against 3 ms), so callers pass sentences in fixed
    blocks.
    """

    def __init__(self):
        import espeakng_loader

        self.path = espeakng_loader.get_library_path()
        self.data_path = espeakng_loader.get_data_path().encode()
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the C trampoline with the Python object.
        self._callback = _SYNTH_CALLBACK(self._collect)
        # Fail here, where the caller can fall back to the command, not mid-corpus.
        self._unload(self._load())

    def _load(self) -> ctypes.CDLL:
        lib = ctypes.CDLL(self.path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path, _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise OSError(f"espeak_Initialize failed with data at {self.data_path.decode()}")
        lib.espeak_SetSynthCallback(self._callback)
        return lib

    @staticmethod
    def _unload(lib: ctypes.CDLL) -> None:
        lib.espeak_Terminate()
        # dlclose drops the mapping, so the next load starts from pristine statics.
        _ctypes.dlclose(lib._handle)

    def _collect(self, wav, num_samples, _events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = keep going

    def synthesize(self, requests: Sequence[tuple]) -> list[np.ndarray]:
        """int16 samples ``[N]`` at ``self.sample_rate`` Hz of each request, spoken in order.

        A request is ``(text, voice, rate, pitch, pitch_range, seed)``; ``seed``
        fixes the breath noise.
        """
        lib = self._load()
        try:
            return [self._speak(lib, *request) for request in requests]
        finally:
            self._unload(lib)

    def _speak(
        self, lib: ctypes.CDLL, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int
    ) -> np.ndarray:
        set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)  # eSpeak NG >= 1.52
        if set_seed is not None:
            set_seed(ctypes.c_long(seed))
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"eSpeak NG has no voice {voice!r}; reinstall espeakng-loader")
        # The voice sets its own defaults, so parameters come after it.
        for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            lib.espeak_SetParameter(parameter, value, 0)
        self._chunks = []
        encoded = text.encode() + b"\0"
        status = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if status != 0:
            raise DataError(f"eSpeak NG failed (status {status}) on {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


class _EspeakCommand:
    """The ``espeak-ng`` program, one process per utterance (no pitch range or seed control)."""

    def __init__(self, executable: str):
        self.executable = executable

    def synthesize(self, requests: Sequence[tuple]) -> list[np.ndarray]:
        """As ``_EspeakLibrary.synthesize``, one process per request (its seed is not used)."""
        return [self._speak(*request) for request in requests]

    def _speak(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, _seed: int
    ) -> np.ndarray:
        command = [self.executable, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0:
            raise DataError(f"{' '.join(command)} failed: {result.stderr.decode().strip()}")
        samples, self.sample_rate = soundfile.read(io.BytesIO(result.stdout), dtype="int16")
        return samples


_ENGINE = None


def _espeak():
    """This process's eSpeak NG: the bundled library, else the ``espeak-ng`` command."""
    global _ENGINE
    if _ENGINE is None:
        try:
            _ENGINE = _EspeakLibrary()
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            executable = shutil.which("espeak-ng")
            if executable is None:
                raise DataError(
                    f"cannot load eSpeak NG ({exc}); `pip install espeakng-loader` "
                    "or install the espeak-ng package"
                ) from None
            _ENGINE = _EspeakCommand(executable)
    return _ENGINE


def speaker_settings(seed: int, split: str, index: int) -> dict:
    """Voice, speed, pitch and recording conditions of one utterance, fixed by its seed."""
    rng = random.Random(f"{seed}:{split}:{index}")
    variant = rng.choice(_VARIANTS)
    # Brisk speech and short pauses: the encoder's cost grows with the frames an utterance
    # has, and silence teaches the model little. 175-215 words per minute with 0.03-0.15 s of
    # silence at each end make the training audio 19% shorter (1.74 s an utterance, against
    # 2.14 s at 150-190 and 0.05-0.3 s), and the demo trained 15% more steps per second to a
    # dev WER as low (5.9% against 6.0% after its 2,600 steps; 7.3% against 8.4% after 1,950).
    return {
        "voice": rng.choice(_VOICES) + (f"+{variant}" if variant else ""),
        "rate": rng.randint(175, 215),  # words per minute
        "pitch": rng.randint(35, 65),  # 0..99, 50 is the voice's normal pitch
        "pitch_range": rng.randint(40, 80),  # 0 is a monotone
        "peak": rng.uniform(0.3, 0.95),  # peak amplitude, full scale = 1
        "lead_silence": rng.uniform(0.03, 0.15),  # seconds
        "trail_silence": rng.uniform(0.03, 0.15),  # seconds
        # Background noise, full scale = 1: at most ~5 LSB of 16-bit audio, so
        # that FLAC still compresses well.
        "noise_std": 10 ** rng.uniform(-5.0, -3.8),
        "noise_seed": rng.getrandbits(32),  # also seeds eSpeak's own breath noise
    }


def synthesize_block(texts: Sequence[str], settings: Sequence[dict]) -> list[np.ndarray]:
    """Speak each of ``texts`` with its ``settings`` (see ``speaker_settings``), in order.

    One load of eSpeak NG speaks the whole block, so each utterance depends on
    the ones before it in the block (by a few samples) and on nothing else: the
    same block always gives the same audio.

    Returns:
        float32 ``[N]`` at 16 kHz for each text.
    """
    engine = _espeak()
    requests = [
        (text, s["voice"], s["rate"], s["pitch"], s["pitch_range"], s["noise_seed"])
        for text, s in zip(texts, settings, strict=True)
    ]
    spoken = engine.synthesize(requests)
    return [
        _record(samples, engine.sample_rate, text, s) for samples, text, s in zip(spoken, texts, settings)
    ]


def synthesize(text: str, settings: dict) -> np.ndarray:
    """Speak ``text`` with ``settings`` alone (a block of one): float32 ``[N]`` at 16 kHz."""
    return synthesize_block([text], [settings])[0]


def _record(samples: np.ndarray, sample_rate: int, text: str, settings: dict) -> np.ndarray:
    """One utterance's recording: eSpeak's samples at the settings' peak, silence and noise, 16 kHz."""
    speech = samples.astype(np.float32)
    peak = float(np.abs(speech).max(initial=0.0))
    if peak == 0:
        raise DataError(f"eSpeak NG produced no audio for {text!r} with voice {settings['voice']}")
    speech *= settings["peak"] / peak
    speech = soxr.resample(speech, sample_rate, SAMPLE_RATE, quality="HQ")
    lead = np.zeros(int(settings["lead_silence"] * SAMPLE_RATE), np.float32)
    trail = np.zeros(int(settings["trail_silence"] * SAMPLE_RATE), np.float32)
    audio = np.concatenate([lead, speech, trail])
    noise_rng = np.random.default_rng(settings["noise_seed"])
    noise = noise_rng.normal(0.0, settings["noise_std"], audio.shape)
    return np.clip(audio + noise.astype(np.float32), -1.0, 1.0).astype(np.float32)
