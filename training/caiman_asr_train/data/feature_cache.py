"""Training log-mels computed once: a directory that training reads instead of decoding and featurising audio.

Every training step decodes its utterances and computes their filterbank
(``core.features.FilterbankFeatures``): on the 2-core demo about a tenth of a
step, repeated every epoch. When nothing changes the waveform before the
filterbank (no speed perturbation) the log-mels of an utterance are the same
each epoch up to dither, so they can be computed once::

    python -m caiman_asr_train.data.feature_cache --model_config CONFIG \\
        --dataset_dir DIR --train_manifests train.json [--output_dir DIR/features]
    python -m caiman_asr_train.train ... --feature_cache DIR/features

Training then reads each utterance's log-mels and applies only what follows the
filterbank (normalisation with the norm ramp, SpecAugment, splicing), every
step as before. Validation still reads the audio.

Layout of the directory (built beside it and renamed into place, ``index.json``
written last, so a directory with ``index.json`` is complete):

    logmel.f16    float16 natural-log mel power, frame-major: utterance after
                  utterance, each ``[frames, n_filt]``
    index.json    {"version", "filterbank_features" (the settings the
                  log-mels were made with), "seed", "n_filt",
                  "utterances": {fname: [first frame, frames, samples]}}

Each utterance is featurised alone in float32, as training does, with dither
drawn from a generator seeded by ``seed`` and the utterance's file name: the
same noise whichever process makes it and however often it is made. So one
dither draw serves every epoch (training draws it anew each step; at the
demo's 1e-5 it only keeps digital silence off the log floor). float16 keeps
the log-mels to about 3 significant digits, far finer than training's noise.
"""

import argparse
import json
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from caiman_asr_train.core.errors import ConfigError, DataError
from caiman_asr_train.core.features import FilterbankFeatures
from caiman_asr_train.data.audio import load_audio
from caiman_asr_train.data.manifest import audio_path, read_manifests
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.atomic import atomic_write_bytes, replace_directory
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.cores import available_cores, keep_freed_heap, map_in_processes

PathLike = Union[str, os.PathLike]

VERSION = 1
INDEX = "index.json"
DATA = "logmel.f16"
# filterbank settings that do not change the log-mels
_NOT_FEATURE_KEYS = ("stats_path", "normalize")
_CHUNK = 64  # utterances a worker featurises per task
BUILD_HINT = "python -m caiman_asr_train.data.feature_cache"


def feature_settings(filterbank_features: dict) -> dict:
    """The settings of a config's ``filterbank_features`` block that the log-mels depend on."""
    return {k: v for k, v in sorted(filterbank_features.items()) if k not in _NOT_FEATURE_KEYS}


def _dither_seed(seed: int, fname: str) -> int:
    words = [seed, zlib.crc32(fname.encode()), len(fname)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def utterance_logmel(audio: np.ndarray, filterbank: FilterbankFeatures, seed: int, fname: str) -> np.ndarray:
    """float16 ``[frames, n_filt]`` log-mels of one waveform, as the cache stores them."""
    generator = torch.Generator().manual_seed(_dither_seed(seed, fname))
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    logmel, _ = filterbank(wave, torch.tensor([wave.shape[1]]), generator=generator)
    return logmel[0].t().numpy().astype(np.float16)


class LogmelFeaturiser:
    """The cache's log-mels of one waveform; pickles small (the filterbank is made where it is used).

    A corpus generator can featurise each utterance where it makes it
    (``recipes.demo_corpus``'s ``featurise``): given the waveform exactly as
    its file decodes, the log-mels equal those ``build_feature_cache`` makes
    from the file.
    """

    def __init__(self, filterbank_features: dict, seed: int = 1) -> None:
        self.settings = feature_settings(filterbank_features)
        self.sample_rate = int(self.settings["sample_rate"])
        self.seed = int(seed)
        self._filterbank: Optional[FilterbankFeatures] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_filterbank": None}

    def __call__(self, fname: str, audio: np.ndarray) -> np.ndarray:
        """float16 ``[frames, n_filt]`` log-mels of ``audio`` (float32 at ``sample_rate``), file ``fname``."""
        if self._filterbank is None:
            # One utterance is too small a job for intra-op threads: one process per core instead.
            torch.set_num_threads(1)
            self._filterbank = FilterbankFeatures(**self.settings, compute_dtype=torch.float32)
        return utterance_logmel(audio, self._filterbank, self.seed, fname)


def _featurise(task: tuple) -> list[tuple[str, int, np.ndarray]]:
    """Pool worker: (fname, samples, log-mels) of a chunk of entries."""
    entries, dataset_dir, featuriser = task
    out = []
    for entry in entries:
        audio = load_audio(audio_path(entry, dataset_dir), featuriser.sample_rate)
        fname = entry["files"][0]["fname"]
        out.append((fname, int(audio.shape[0]), featuriser(fname, audio)))
    return out


class CacheWriter:
    """A cache directory being written: built beside ``output_dir``, put in its place by ``commit``.

    ``add`` appends one utterance's log-mels (in any order); ``commit`` syncs
    them, writes ``index.json`` last and replaces ``output_dir`` (an existing
    cache stays until then). Leaving the ``with`` block without a commit (an
    error, or nothing to commit) removes what was written.
    """

    def __init__(self, output_dir: PathLike, filterbank_features: dict, seed: int = 1) -> None:
        self.output_dir = Path(output_dir)
        self.settings = feature_settings(filterbank_features)
        self.seed = int(seed)
        self.utterances: dict[str, list[int]] = {}
        self.frames = 0
        self._build = self.output_dir.with_name(f".{self.output_dir.name}.partial-{os.getpid()}")
        self._data = None

    def add(self, fname: str, samples: int, logmel: np.ndarray) -> None:
        """Store the float16 ``[frames, n_filt]`` log-mels of ``fname`` (a name already stored is kept)."""
        if fname in self.utterances:
            return
        self._open().write(np.ascontiguousarray(logmel, dtype=np.float16).tobytes())
        self.utterances[fname] = [self.frames, int(logmel.shape[0]), int(samples)]
        self.frames += int(logmel.shape[0])

    def covers(self, fnames: Sequence[str]) -> bool:
        """Whether every one of ``fnames`` has been added."""
        return all(name in self.utterances for name in fnames)

    def commit(self) -> None:
        """Make the cache complete and put it in place of ``output_dir``."""
        data = self._open()
        data.flush()
        os.fsync(data.fileno())
        data.close()
        index = {
            "version": VERSION,
            "filterbank_features": self.settings,
            "n_filt": int(self.settings["n_filt"]),
            "seed": self.seed,
            "utterances": self.utterances,
        }
        atomic_write_bytes(self._build / INDEX, json.dumps(index).encode())  # last: the directory is complete
        replace_directory(self._build, self.output_dir)
        self._data = None

    def _open(self):
        if self._data is None:
            self.output_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self._build, ignore_errors=True)
            self._build.mkdir()
            self._data = open(self._build / DATA, "wb")
        return self._data

    def discard(self) -> None:
        """Remove what was written (nothing when it was committed)."""
        if self._data is not None:
            self._data.close()
            self._data = None
            shutil.rmtree(self._build, ignore_errors=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *_exc) -> None:
        self.discard()


def build_feature_cache(
    entries: Sequence[dict],
    dataset_dir: PathLike,
    filterbank_features: dict,
    output_dir: PathLike,
    seed: int = 1,
    workers: Optional[int] = None,
    progress: bool = True,
) -> int:
    """Featurise every entry's first audio file into ``output_dir`` (module docstring); returns the frames.

    Entries with the same file name are stored once. An existing ``output_dir``
    is replaced only once the new one is complete.

    Raises:
        DataError: an audio file is missing or unreadable (nothing is left behind).
    """
    featuriser = LogmelFeaturiser(filterbank_features, seed)
    unique = list({entry["files"][0]["fname"]: entry for entry in entries}.values())
    tasks = [(unique[i : i + _CHUNK], str(dataset_dir), featuriser) for i in range(0, len(unique), _CHUNK)]
    with (
        CacheWriter(output_dir, filterbank_features, seed) as cache,
        tqdm(total=len(unique), desc="log-mel cache", unit="utt", disable=not progress) as bar,
    ):
        for chunk in map_in_processes(_featurise, tasks, workers or available_cores()):
            for fname, samples, logmel in chunk:
                cache.add(fname, samples, logmel)
            bar.update(len(chunk))
        cache.commit()
    return cache.frames


class FeatureCache:
    """A finished cache directory, read through a memory map (shared by every process that opens it).

    Args:
        directory: made by ``build_feature_cache``.
        filterbank_features: the training config's block; its settings must be
            those the cache was made with.

    Raises:
        DataError: the directory is missing, unfinished or unreadable.
        ConfigError: it was made with other filterbank settings.
    """

    def __init__(self, directory: PathLike, filterbank_features: dict) -> None:
        self.directory = Path(directory)
        fix = f"make it with {BUILD_HINT} --model_config CONFIG --dataset_dir DIR --train_manifests ..."
        try:
            index = json.loads((self.directory / INDEX).read_text())
            utterances = index["utterances"]
            self.n_filt = int(index["n_filt"])
            stored = index["filterbank_features"]
            version = index["version"]
        except FileNotFoundError:
            raise DataError(
                f"--feature_cache {self.directory}: no finished cache there ({INDEX} is missing); {fix}"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"--feature_cache {self.directory}: unreadable {INDEX} ({exc}); {fix}") from None
        if version != VERSION:
            raise DataError(f"--feature_cache {self.directory}: version {version}, expected {VERSION}; {fix}")
        wanted = feature_settings(filterbank_features)
        changed = sorted(k for k in set(wanted) | set(stored) if wanted.get(k) != stored.get(k))
        if changed:
            key = changed[0]
            raise ConfigError(
                f"--feature_cache {self.directory} was made with filterbank_features.{key}="
                f"{stored.get(key)!r}, the config has {wanted.get(key)!r}; {fix}"
            )
        self._utterances = {name: tuple(int(v) for v in span) for name, span in utterances.items()}
        self._total = sum(span[1] for span in self._utterances.values())
        path = self.directory / DATA
        expected = self._total * self.n_filt * 2
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            raise DataError(
                f"--feature_cache {self.directory}: {DATA} holds {size} bytes, expected {expected}; {fix}"
            )
        self._data = self._map()

    def _map(self) -> Optional[np.memmap]:
        shape = (self._total, self.n_filt)
        return (
            np.memmap(self.directory / DATA, dtype=np.float16, mode="r", shape=shape) if self._total else None
        )

    def __getstate__(self) -> dict:
        # A DataLoader started with "spawn" pickles the dataset: send the index, not the mapped
        # log-mels (numpy would copy all of them), and map the file again on the other side.
        return {**self.__dict__, "_data": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._data = self._map()

    def missing(self, fnames: Sequence[str]) -> list[str]:
        """Those of ``fnames`` the cache does not hold."""
        return [name for name in fnames if name not in self._utterances]

    def logmel(self, fname: str) -> tuple[np.ndarray, int]:
        """(float16 ``[frames, n_filt]`` log-mels, samples of the audio they came from) of one file."""
        first, frames, samples = self._utterances[fname]
        return self._data[first : first + frames], samples


def check_covers(cache: FeatureCache, entries: Sequence[dict]) -> None:
    """DataError naming the first training file the cache lacks (the cache is older than the manifests)."""
    missing = cache.missing([entry["files"][0]["fname"] for entry in entries])
    if missing:
        raise DataError(
            f"--feature_cache {cache.directory} lacks {len(missing)} training file(s), e.g. {missing[0]}; "
            f"remake it for these manifests with {BUILD_HINT}"
        )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compute the training utterances' log-mels once, for train.py --feature_cache."
    )
    parser.add_argument("--model_config", required=True, help="YAML config (input_train.filterbank_features)")
    parser.add_argument("--dataset_dir", required=True, help="directory the manifests' paths are relative to")
    parser.add_argument("--train_manifests", nargs="+", required=True, help="manifests of the training set")
    parser.add_argument(
        "--output_dir", default=None, help="where the cache goes (default: DATASET_DIR/features)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the dither (default: 1)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: the CPU cores)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    keep_freed_heap()
    cfg = config.load(args.model_config)
    inp = config.input(cfg, "train")
    if inp.get("speed_perturbation"):
        raise ConfigError(
            f"{args.model_config}: input_train.speed_perturbation is set, so the log-mels change every "
            "epoch; a feature cache needs it removed"
        )
    entries = read_manifests(args.train_manifests, args.dataset_dir, check_files=True)
    output_dir = Path(args.output_dir or Path(args.dataset_dir) / "features")
    frames = build_feature_cache(
        entries,
        args.dataset_dir,
        inp["filterbank_features"],
        output_dir,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    hours = frames * float(inp["filterbank_features"]["window_stride"]) / 3600
    print(f"wrote the log-mels of {len(entries)} utterances ({hours:.1f} h) to {output_dir}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
