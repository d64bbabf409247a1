"""Word error rate of an ONNX Runtime bundle on manifests, torch-free (what ``val.py --ckpt BUNDLE_DIR`` runs).

References are normalised and scored as for a hardware checkpoint, with the
settings stored in the bundle's ``text`` section (docs/formats.md section 10); the
result carries the same per-utterance predictions (``hyp``, ``ref``,
``fname``) that val.py writes.
"""

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from tqdm import tqdm

from caiman_asr_train.data.audio import load_audio
from caiman_asr_train.data.manifest import audio_path, read_manifests
from caiman_asr_train.data.normalizers import normalize_texts
from caiman_asr_train.evaluate.wer import EvalResult, score_predictions
from caiman_asr_train.runtime.recognizer import Recognizer

PathLike = Union[str, Path]

# A bundle's WER is scored like any other evaluation; the name is the one runtime callers know.
BundleResult = EvalResult


def evaluate_transcriber(
    transcribe: Callable[[np.ndarray], str],
    manifests: Sequence[PathLike],
    dataset_dir: PathLike,
    *,
    sample_rate: int,
    text: Mapping,
    num_utterances: int | None = None,
    progress: bool = False,
) -> BundleResult:
    """Transcribe every utterance of ``manifests`` with ``transcribe`` and score them.

    Args:
        transcribe: float32 mono waveform ``[N]`` at ``sample_rate`` Hz -> transcript.
        manifests: manifest paths, relative to ``dataset_dir`` or absolute.
        dataset_dir: directory the manifests' audio fnames are relative to.
        text: ``{"labels", "normalize_transcripts", "standardize_wer", "error_rate"}``
            (a bundle.json ``text`` section).
        num_utterances: only the first N utterances (None: all).
        progress: show a tqdm bar on stderr.

    Raises:
        DataError: a manifest or audio file is missing or corrupt.
    """
    entries = read_manifests(manifests, dataset_dir)[:num_utterances]
    refs = normalize_texts([e["transcript"] for e in entries], text["normalize_transcripts"], text["labels"])
    hyps = [
        transcribe(load_audio(audio_path(entry, dataset_dir), sample_rate))
        for entry in tqdm(entries, desc="decoding", unit="utt", disable=not progress)
    ]
    fnames = [entry["files"][0]["fname"] for entry in entries]
    return score_predictions(
        hyps, refs, fnames, standardize=bool(text["standardize_wer"]), error_rate=text["error_rate"]
    )


def evaluate_bundle(
    bundle: PathLike | Recognizer,
    manifests: Sequence[PathLike],
    dataset_dir: PathLike,
    *,
    num_utterances: int | None = None,
    num_threads: int | None = None,
    max_symbols_per_step: int = 8,
    final_padding_secs: float | None = None,
    progress: bool = False,
) -> BundleResult:
    """WER of an ONNX Runtime bundle (a directory or a ``Recognizer`` made from one) on ``manifests``.

    ``num_threads``, ``max_symbols_per_step`` and ``final_padding_secs`` are as for ``Recognizer``
    (ignored when ``bundle`` is one); the rest as for ``evaluate_transcriber``.

    Raises:
        CheckpointError: not a readable bundle. DataError: a manifest or audio
        file is missing or corrupt.
    """
    recognizer = (
        bundle
        if isinstance(bundle, Recognizer)
        else Recognizer(
            bundle,
            num_threads=num_threads,
            max_symbols_per_step=max_symbols_per_step,
            final_padding_secs=final_padding_secs,
        )
    )
    return evaluate_transcriber(
        recognizer.transcribe,
        manifests,
        dataset_dir,
        sample_rate=recognizer.sample_rate,
        text=recognizer.info["text"],
        num_utterances=num_utterances,
        progress=progress,
    )
