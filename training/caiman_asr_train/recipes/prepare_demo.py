"""Make everything the built-in demo needs; ``scripts/prepare_demo.sh`` runs this.

Phases, in order (each prints its wall time)::

    corpus  DATASET_DIR/{train,dev}.json + audio/     demo_corpus (eSpeak NG)
    stats   mel statistics of train.json              -> filterbank_features.stats_path
    features  log-mels of train.json for training     -> DATASET_DIR/features (data.feature_cache;
            not made when the config has speed perturbation; computed by the
            corpus's workers as they make each utterance, when they make them all)
    spm     SentencePiece unigram model of train.json -> tokenizer.sentpiece_model
    ngram   KenLM n-gram (order 4) over its pieces    -> ngram.ngram_path/ngram.{arpa,binary}

Output paths, features and transcript normalisation come from the config
(``training/configs/demo.yaml``), so the YAML and the files cannot disagree.
A phase is skipped when its outputs are complete and were made from the same
inputs: ``DATASET_DIR/prepare_demo.json`` records a fingerprint of each
phase's inputs (manifest bytes, settings, the front end's version,
SentencePiece model), so a changed corpus, setting or feature computation
remakes exactly the phases that depend on it. A re-run
with nothing to do takes a second or two.

Usage::

    python -m caiman_asr_train.recipes.prepare_demo [--config training/configs/demo.yaml]
        [--dataset_dir datasets/demo] [--vocab_size 40] [--ngram_order 4] [--num_train 12000]
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from caiman_asr_train.core.errors import DataError, TokenizerError, UserError
from caiman_asr_train.core.features import FRONT_END_VERSION, load_mel_stats
from caiman_asr_train.data.feature_cache import VERSION as FEATURE_CACHE_VERSION
from caiman_asr_train.data.feature_cache import (
    CacheWriter,
    FeatureCache,
    LogmelFeaturiser,
    build_feature_cache,
    check_covers,
    feature_settings,
)
from caiman_asr_train.data.generate_mel_stats import compute_mel_stats, save_mel_stats
from caiman_asr_train.data.manifest import read_manifests
from caiman_asr_train.data.ngram import is_kenlm_binary
from caiman_asr_train.data.spm.spm_from_json import config_user_symbols, spm_from_json, text_settings
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.lm.prep_kenlm_data import prep_kenlm_data
from caiman_asr_train.recipes.demo_corpus.corpus import default_output_dir, make_demo_corpus
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.cores import keep_freed_heap
from caiman_asr_train.utils.paths import REPO_ROOT

PathLike = Union[str, os.PathLike]

DEFAULT_CONFIG = REPO_ROOT / "training" / "configs" / "demo.yaml"
STATE_FILE = "prepare_demo.json"
TRAIN_MANIFEST = "train.json"

# Near-character pieces and many distinct sentences: on two CPU cores the demo
# model must learn acoustics in a couple of thousand steps. 40 pieces generalise
# much sooner than 256 (26% vs 50% dev WER at step 1000, on 3,000 sentences),
# and so do sentences heard less often: after 2,000 steps of 16, 12,000
# sentences reach 8.3% dev WER where 6,000 reach 11.2%. The extra 6,000 take
# about 30 s to synthesise and featurise; the shorter schedule they allow
# (train.sh) saves about 150 s of training.
DEFAULT_VOCAB_SIZE = 40
DEFAULT_NUM_TRAIN = 12000
DEFAULT_NGRAM_ORDER = 4
STATS_FILES = 2000  # utterances the mel statistics are computed from (prepare_demo's make_stats)
FEATURE_CACHE = "features"  # under the dataset directory: the training log-mels (data.feature_cache)


def _fingerprint(*parts: object) -> str:
    """SHA-256 of the parts (bytes as they are, anything else as sorted JSON)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


class _State:
    """Fingerprints of the phases already made, kept in DATASET_DIR/prepare_demo.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.done = json.loads(path.read_text())
        except (OSError, ValueError):
            self.done = {}
        if not isinstance(self.done, dict):
            self.done = {}

    def is_current(self, phase: str, fingerprint: str) -> bool:
        return self.done.get(phase) == fingerprint

    def record(self, phase: str, fingerprint: str) -> None:
        self.done[phase] = fingerprint
        atomic_write_bytes(self.path, (json.dumps(self.done, indent=2, sort_keys=True) + "\n").encode())


def _complete(check: Callable[[], object]) -> bool:
    """Whether ``check()`` runs without the error a missing or corrupt output raises."""
    try:
        return check() is not False
    except (DataError, TokenizerError):
        return False


def _run_script(name: str, *args: str) -> None:
    script = REPO_ROOT / "scripts" / name
    if not script.is_file():
        raise UserError(f"{script} not found; run prepare_demo from a checkout of the repository")
    env = dict(os.environ)
    env["PATH"] = f"{REPO_ROOT / 'tools' / 'kenlm' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PY", sys.executable)
    result = subprocess.run(
        [str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if result.returncode != 0:
        lines = result.stdout.strip().splitlines()
        raise DataError(f"{name} failed (exit {result.returncode}): {' | '.join(lines[-5:])}")


def prepare_demo(
    config_path: PathLike = DEFAULT_CONFIG,
    dataset_dir: Optional[PathLike] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    ngram_order: int = DEFAULT_NGRAM_ORDER,
    progress: bool = True,
    log: Callable[[str], None] = print,
    num_train: int = DEFAULT_NUM_TRAIN,
) -> dict[str, float]:
    """Make (or bring up to date) the demo corpus, statistics, tokenizer and n-gram.

    Args:
        config_path: YAML whose ``stats_path``, ``sentpiece_model`` and
            ``ngram_path`` say where the outputs go.
        dataset_dir: corpus directory (default: ``datasets/demo`` at the
            repository root).
        vocab_size: SentencePiece vocabulary size.
        ngram_order: n-gram order (KenLM's tools support up to 6).
        num_train: training sentences in the corpus.
        progress: show progress bars.
        log: receives one line per phase.

    Returns:
        Wall time in seconds of each phase (``corpus``, ``stats``, ``features``,
        ``spm``, ``ngram``) and ``total``; a skipped phase takes ~0 s.
    """
    cfg = config.load(config_path)
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else default_output_dir()
    features = config.input(cfg, "train")["filterbank_features"]
    stats_dir = Path(features["stats_path"])
    spm_model = Path(config.tokenizer(cfg)["sentpiece_model"])
    if spm_model.suffix != ".model":
        raise UserError(f"{config_path}: tokenizer.sentpiece_model must end in .model, got {spm_model}")
    ngram_dir = Path(config.ngram(cfg)["ngram_path"])
    text = text_settings(cfg)
    symbols = config_user_symbols(cfg)
    state = _State(dataset_dir / STATE_FILE)
    timings: dict[str, float] = {}
    start = time.monotonic()

    def phase(
        name: str, fingerprint: str, complete: Callable[[], bool], make: Callable[[], Optional[str]]
    ) -> None:
        # make() may say how it made the outputs (default: "made")
        began = time.monotonic()
        if state.is_current(name, fingerprint) and complete():
            verdict = "up to date"
        else:
            verdict = make() or "made"
            state.record(name, fingerprint)
        timings[name] = time.monotonic() - began
        log(f"[prepare_demo] {name}: {verdict} ({timings[name]:.1f} s)")

    # Training reads the corpus's log-mels from DATASET_DIR/features (train.sh's --feature_cache)
    # rather than decoding and featurising every utterance each epoch: 15% of a demo step's CPU.
    # The corpus's workers featurise each training utterance as they make it: reading the
    # corpus back afterwards would decode every file again (a third of that phase's CPU).
    cache_dir = dataset_dir / FEATURE_CACHE
    use_cache = not config.input(cfg, "train")["speed_perturbation"]
    with CacheWriter(cache_dir, features) as made_with_corpus:  # removed unless committed below
        # The corpus generator keeps its own completeness marker and returns at
        # once when the corpus is whole.
        make_demo_corpus(
            dataset_dir,
            num_train=num_train,
            progress=progress,
            featurise=LogmelFeaturiser(features) if use_cache else None,
            receive=made_with_corpus.add,
        )
        timings["corpus"] = time.monotonic() - start
        log(f"[prepare_demo] corpus: ready ({timings['corpus']:.1f} s)")
        train_bytes = (dataset_dir / TRAIN_MANIFEST).read_bytes()

        stats_settings = {k: v for k, v in features.items() if k not in ("dither", "stats_path", "normalize")}
        n_filt = int(features["n_filt"])

        def make_stats() -> None:
            entries = read_manifests([TRAIN_MANIFEST], dataset_dir)
            # Evenly spaced utterances, at most STATS_FILES: the statistics of an hour of the
            # corpus's twelve voices are those of all of it, at a sixth of the time.
            entries = entries[:: max(1, math.ceil(len(entries) / STATS_FILES))]
            means, variances, frames = compute_mel_stats(entries, dataset_dir, features, progress=progress)
            save_mel_stats(stats_dir, means, variances, frames)

        phase(
            "stats",
            # The front end's version: statistics of the same audio change when it does.
            _fingerprint(train_bytes, stats_settings, FRONT_END_VERSION, STATS_FILES),
            lambda: _complete(lambda: load_mel_stats(stats_dir, n_filt)),
            make_stats,
        )

        if not use_cache:
            # the log-mels would change every epoch: no cache, and none left to be used by mistake
            shutil.rmtree(cache_dir, ignore_errors=True)
        else:

            def make_features() -> Optional[str]:
                entries = read_manifests([TRAIN_MANIFEST], dataset_dir)
                if made_with_corpus.covers([entry["files"][0]["fname"] for entry in entries]):
                    made_with_corpus.commit()
                    return "made with the corpus"
                # a corpus made earlier, or resumed: featurise its files
                build_feature_cache(entries, dataset_dir, features, cache_dir, progress=progress)
                return None

            def features_complete() -> None:
                check_covers(FeatureCache(cache_dir, features), read_manifests([TRAIN_MANIFEST], dataset_dir))

            phase(
                "features",
                _fingerprint(
                    train_bytes, feature_settings(features), FRONT_END_VERSION, FEATURE_CACHE_VERSION
                ),
                lambda: _complete(features_complete),
                make_features,
            )

    def make_spm() -> None:
        spm_from_json([TRAIN_MANIFEST], spm_model.with_suffix(""), vocab_size, dataset_dir, symbols, **text)

    phase(
        "spm",
        _fingerprint(train_bytes, vocab_size, text, symbols),
        lambda: _complete(lambda: Tokenizer(spm_model)),
        make_spm,
    )

    arpa, binary, pieces = ngram_dir / "ngram.arpa", ngram_dir / "ngram.binary", ngram_dir / "pieces.txt"

    def make_ngram() -> None:
        prep_kenlm_data([TRAIN_MANIFEST], spm_model, pieces, dataset_dir, **text)
        _run_script("build_kenlm.sh")
        _run_script("generate_ngram.sh", str(ngram_order), str(pieces), str(arpa), str(binary))

    phase(
        "ngram",
        _fingerprint(train_bytes, spm_model.read_bytes(), ngram_order, text),
        lambda: arpa.is_file() and _complete(lambda: is_kenlm_binary(binary)),
        make_ngram,
    )
    timings["total"] = time.monotonic() - start
    return timings


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Make the demo corpus, mel statistics, SentencePiece model and n-gram "
        "(each skipped when up to date)."
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="YAML config naming the output paths and settings (default: training/configs/demo.yaml "
        "of this checkout)",
    )
    parser.add_argument(
        "--dataset_dir",
        default=None,
        help="where the corpus goes (default: datasets/demo at the repository root)",
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"SentencePiece vocabulary size (default: {DEFAULT_VOCAB_SIZE})",
    )
    parser.add_argument(
        "--ngram_order",
        type=int,
        default=DEFAULT_NGRAM_ORDER,
        choices=range(2, 7),
        metavar="{2..6}",
        help=f"n-gram order over pieces (default: {DEFAULT_NGRAM_ORDER})",
    )
    parser.add_argument(
        "--num_train",
        type=int,
        default=DEFAULT_NUM_TRAIN,
        help=f"training sentences in the corpus (default: {DEFAULT_NUM_TRAIN})",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    keep_freed_heap()  # the mel statistics and the log-mel cache featurise thousands of files
    timings = prepare_demo(
        args.config,
        args.dataset_dir,
        args.vocab_size,
        args.ngram_order,
        progress=not args.no_progress,
        num_train=args.num_train,
    )
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items() if name != "total")
    print(f"[prepare_demo] done in {timings['total']:.1f} s ({phases})")


if __name__ == "__main__":
    run_cli(main)
