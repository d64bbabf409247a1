"""Build the built-in demo speech corpus: synthetic English sentences spoken by eSpeak NG.

A fixed-seed grammar (``grammar``) writes distinct sentences of 3-10 words over
a vocabulary of about a thousand common words (statements in several tenses,
negations, questions, commands, descriptions, number phrases, two-clause
sentences). The dev sentences are held out: none occurs in training and every
dev word does. Each sentence is spoken by eSpeak NG (``espeak``) with a voice,
variant, speed and pitch drawn from the seed, padded with a little silence and
a faint noise floor, resampled to 16 kHz mono and written as FLAC. One load of
eSpeak NG speaks a fixed block of ``BLOCK`` consecutive sentences of a split
(loading it and its voice data costs about twice what speaking a sentence
does), so an utterance's audio depends on its block only.

Output (default ``datasets/demo`` at the repository root)::

    train.json, dev.json        manifests (docs/formats.md section 11), fnames relative to the output dir
    audio/train/*.flac, audio/dev/*.flac
    corpus.json                 generation settings; "complete": true once finished

The same seed, counts and grammar data files give the same manifests and
byte-identical audio, whatever the number of worker processes. Re-running
with the same settings is a no-op once ``corpus.json`` says the corpus is
complete; an interrupted run resumes, keeping every FLAC already written that
decodes whole (each is written atomically, and the corpus is synced to disk
once, before ``corpus.json`` says it is complete); a block with a file missing
is spoken again up to that file.

A caller may also have each new training utterance featurised where it is made
(``featurise`` and ``receive`` of ``make_demo_corpus``), from the waveform
exactly as its FLAC decodes, instead of decoding the corpus again afterwards.

Usage::

    python -m caiman_asr_train.recipes.demo_corpus [--output_dir datasets/demo] [--seed 0]
"""

import argparse
import io
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import soundfile
from tqdm import tqdm

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.manifest import manifest_entry, read_manifest, write_manifest
from caiman_asr_train.recipes.demo_corpus.espeak import SAMPLE_RATE, speaker_settings, synthesize_block
from caiman_asr_train.recipes.demo_corpus.grammar import data_files_sha256, make_sentences
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cores import available_cores, map_in_processes
from caiman_asr_train.utils.paths import REPO_ROOT

PathLike = Union[str, os.PathLike]

# Bump when the grammar's code or the synthesis changes, so that an old corpus
# is not mistaken for a complete new one (the grammar's data files are
# fingerprinted by their hash).
GENERATOR_VERSION = 4
# Sentences one load of eSpeak NG speaks (part of the generator: other blocks, other audio).
# 32 makes the corpus's synthesis about twice as fast as a load per sentence.
BLOCK = 32


def default_output_dir() -> Path:
    """``datasets/demo`` at the repository root, or under the current directory
    when the package is installed outside a checkout."""
    if (REPO_ROOT / "training" / "caiman_asr_train").is_dir():
        return REPO_ROOT / "datasets" / "demo"
    return Path("datasets") / "demo"


def _pcm16(audio: np.ndarray) -> np.ndarray:
    """The 16-bit samples of a float waveform in [-1, 1], rounded as libsndfile rounds them."""
    return np.clip(np.rint(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _flac_bytes(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _make_block(task: tuple) -> list[tuple[str, int, int, object]]:
    """Pool worker: speak a block's sentences, writing the FLACs asked for.

    Returns (split, index, num_samples, features) of each file written;
    ``features`` is what ``featurise`` made of a training utterance, else None.
    """
    seed, split, first, texts, paths, wanted, featurise = task
    settings = [speaker_settings(seed, split, first + k) for k in range(len(texts))]
    written = []
    for k, audio in enumerate(synthesize_block(texts, settings)):
        if k not in wanted:
            continue
        pcm = _pcm16(audio)
        # Not synced one by one (two fsyncs a file cost as much as a sixth of the synthesis): the
        # corpus is synced once, before corpus.json says it is complete.
        atomic_write_bytes(paths[k], _flac_bytes(pcm), durable=False)
        features = None
        if featurise is not None and split == "train":
            # what reading the FLAC back gives (libsndfile scales 16-bit samples by 1/32768)
            features = featurise(_fname(split, first + k), pcm.astype(np.float32) / np.float32(32768))
        written.append((split, first + k, len(pcm), features))
    return written


# ---------------------------------------------------------------------------
# The corpus on disk
# ---------------------------------------------------------------------------

MARKER = "corpus.json"
SPLITS = ("train", "dev")


def _fname(split: str, index: int) -> str:
    return f"audio/{split}/{split}_{index:05d}.flac"


def _read_marker(path: Path) -> Optional[dict]:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(output_dir: Path, settings: dict) -> bool:
    """Whether the manifests list the asked-for counts and all their audio exists."""
    for split in SPLITS:
        try:
            entries = read_manifest(output_dir / f"{split}.json")
        except DataError:
            return False
        if len(entries) != settings[f"num_{split}"]:
            return False
        if not all((output_dir / e["files"][0]["fname"]).is_file() for e in entries):
            return False
    return True


def _existing_num_samples(path: Path) -> Optional[int]:
    """Samples of a FLAC left by an interrupted run, or None when it is missing or not whole.

    Files are written without a sync of their own, so after a power cut one may be
    cut short: it counts only when every sample its header promises decodes.
    """
    try:
        with soundfile.SoundFile(str(path)) as f:
            if f.samplerate != SAMPLE_RATE or f.frames <= 0:
                return None
            frames = f.frames
            decoded = len(f.read(dtype="int16"))
    except (soundfile.LibsndfileError, RuntimeError):
        return None
    return frames if decoded == frames else None


def make_demo_corpus(
    output_dir: Optional[PathLike] = None,
    seed: int = 0,
    num_train: int = 3000,
    num_dev: int = 200,
    workers: Optional[int] = None,
    progress: bool = True,
    featurise: Optional[Callable[[str, np.ndarray], object]] = None,
    receive: Optional[Callable[[str, int, object], None]] = None,
) -> dict:
    """Make (or finish, or leave alone) the demo corpus in ``output_dir``.

    Args:
        featurise: called in the worker process with each training utterance
            it writes: its ``fname`` and its float32 16 kHz waveform exactly as
            its FLAC decodes. Must pickle.
        receive: called here with each such ``fname``, its sample count and
            what ``featurise`` returned. Utterances a resumed run keeps from
            disk, and those of a corpus already complete, are not passed.

    Returns the contents of ``corpus.json``: the settings plus ``complete``,
    ``train_hours`` and ``dev_hours`` (audio duration in hours).

    Raises:
        DataError: ``output_dir`` holds a corpus made with other settings, or
            eSpeak NG is unavailable.
    """
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    workers = workers if workers is not None else available_cores()
    settings = {
        "generator_version": GENERATOR_VERSION,
        "grammar_data_sha256": data_files_sha256(),
        "seed": seed,
        "num_train": num_train,
        "num_dev": num_dev,
        "sample_rate": SAMPLE_RATE,
    }
    marker_path = output_dir / MARKER
    previous = _read_marker(marker_path)
    if previous is not None and {k: previous.get(k) for k in settings} != settings:
        described = ", ".join(f"{k}={previous.get(k)}" for k in settings)
        raise DataError(
            f"{output_dir} holds a demo corpus made with {described}; delete that folder "
            "or pass another --output_dir"
        )
    if previous is not None and previous.get("complete") and _is_complete(output_dir, settings):
        return previous
    atomic_write_bytes(marker_path, json.dumps({**settings, "complete": False}, indent=2).encode())
    # A killed worker leaves its half-written temporary file behind.
    for stale in output_dir.glob("audio/*/.*.tmp"):
        stale.unlink()

    sentences = dict(zip(SPLITS, make_sentences(seed, num_train, num_dev)))
    num_samples: dict[tuple[str, int], int] = {}
    tasks = []
    for split in SPLITS:
        texts = sentences[split]
        for first in range(0, len(texts), BLOCK):
            paths = [output_dir / _fname(split, i) for i in range(first, min(first + BLOCK, len(texts)))]
            wanted = set()
            for k, path in enumerate(paths):
                # Without a marker from this run's settings, files on disk may be
                # someone else's: only resume over our own.
                existing = _existing_num_samples(path) if previous is not None else None
                if existing is not None:
                    num_samples[split, first + k] = existing
                else:
                    wanted.add(k)
            if wanted:
                end = max(wanted) + 1  # the sentences after the last missing one need not be spoken
                tasks.append((seed, split, first, texts[first : first + end], paths[:end], wanted, featurise))
    total = sum(len(task[5]) for task in tasks)
    with tqdm(total=total, desc="demo corpus", unit="utt", disable=not progress or not total) as bar:
        for written in map_in_processes(_make_block, tasks, workers):
            for split, index, count, features in written:
                num_samples[split, index] = count
                if receive is not None and features is not None:
                    receive(_fname(split, index), count, features)
            bar.update(len(written))
    # The audio reaches the disk before the manifests and the marker that vouch for it.
    os.sync()

    marker = {**settings, "complete": True}
    for split in SPLITS:
        entries = [
            manifest_entry(text, _fname(split, index), num_samples[split, index], SAMPLE_RATE)
            for index, text in enumerate(sentences[split])
        ]
        write_manifest(entries, output_dir / f"{split}.json")
        total = sum(num_samples[split, index] for index in range(len(sentences[split])))
        marker[f"{split}_hours"] = round(total / SAMPLE_RATE / 3600, 4)
    atomic_write_bytes(marker_path, (json.dumps(marker, indent=2) + "\n").encode())
    return marker


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m caiman_asr_train.recipes.demo_corpus", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to write the corpus (default: datasets/demo at the repository root)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of sentences and voices (default: 0)")
    parser.add_argument(
        "--num_train", type=int, default=3000, help="number of training utterances (default: 3000)"
    )
    parser.add_argument(
        "--num_dev", type=int, default=200, help="number of held-out dev utterances (default: 200)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="synthesis processes (default: one per available CPU core)"
    )
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_dev < 1:
        parser.error("--num_train and --num_dev must be at least 1")
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir()
    start = time.monotonic()
    marker = make_demo_corpus(output_dir, args.seed, args.num_train, args.num_dev, args.workers)
    hours = marker["train_hours"] + marker["dev_hours"]
    print(
        f"demo corpus: {args.num_train} train + {args.num_dev} dev utterances, "
        f"{hours:.2f} h of audio in {output_dir} ({time.monotonic() - start:.1f} s)"
    )
