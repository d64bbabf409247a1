"""Dataset mel statistics for feature normalisation (docs/formats.md section 6).

Writes ``melmeans.pt`` and ``melvars.pt`` (float32 ``[n_filt]``) and ``meln.pt``
(float32 ``[1]``, the number of frames) into the config's
``filterbank_features.stats_path``, or ``--output_dir``::

    python -m caiman_asr_train.data.generate_mel_stats \\
        --model_config training/configs/demo.yaml \\
        --dataset_dir datasets/demo --train_manifests train.json

The statistics are of the raw log-mels training computes (initial padding
included) with dither, augmentation and normalisation off, accumulated in
float64; the variance is the population variance.
"""

import argparse
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch
from tqdm import tqdm

from caiman_asr_train.core.errors import ConfigError, DataError
from caiman_asr_train.core.features import FilterbankFeatures
from caiman_asr_train.data.audio import load_audio
from caiman_asr_train.data.manifest import audio_path, read_manifests
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.atomic import atomic_torch_save
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.cores import available_cores, keep_freed_heap, map_in_processes

PathLike = Union[str, Path]


# Entries per task of the worker pool: small enough for a smooth progress bar,
# large enough that the pickling of results costs nothing.
_CHUNK = 64


def compute_mel_stats(
    manifest_entries: Sequence[dict],
    dataset_dir: PathLike,
    filterbank_features: dict,
    progress: bool = True,
    workers: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-bin mean and population variance of the log-mels of every entry's audio.

    Each entry's first file (``files[0]``, the audio training reads) is decoded
    at the filterbank's sample rate and featurised alone with dither 0.
    Per-utterance means and sums of squared deviations are merged in float64
    (Chan et al.), which stays exact for constant data, so a zero variance is
    caught. Chunks of ``_CHUNK`` entries are processed by ``workers`` processes
    and merged in manifest order, so the result does not depend on ``workers``.

    Args:
        manifest_entries: manifest entries (docs/formats.md section 11).
        dataset_dir: directory the entries' ``fname`` values are relative to.
        filterbank_features: the config's ``filterbank_features`` block.
        progress: show a tqdm progress bar.
        workers: processes (default: the CPU cores this process may use).
    Returns:
        means float64 [n_filt], variances float64 [n_filt], frame count.
    Raises:
        DataError when there are no frames, or a bin's variance is not > 0.
    """
    features = {**filterbank_features, "dither": 0.0}
    n_filt = int(features["n_filt"])
    chunks = [
        (manifest_entries[i : i + _CHUNK], str(dataset_dir), features)
        for i in range(0, len(manifest_entries), _CHUNK)
    ]
    total = _Moments.empty(n_filt)
    with tqdm(total=len(manifest_entries), desc="mel statistics", unit="file", disable=not progress) as bar:
        for done, part in map_in_processes(_chunk_moments, chunks, workers or available_cores()):
            total = total.merge(part)
            bar.update(done)
    if total.count == 0:
        raise DataError(
            f"no feature frames in {len(manifest_entries)} manifest entries under {dataset_dir}; "
            "check the manifests (every utterance is shorter than one frame)"
        )
    variances = total.sq_dev / total.count
    _check_variances(variances, f"{total.count} frames of {len(manifest_entries)} files")
    return total.mean, variances, total.count


class _Moments(NamedTuple):
    """Frame count, per-bin mean and sum of squared deviations of a set of frames."""

    count: int
    mean: torch.Tensor
    sq_dev: torch.Tensor

    @classmethod
    def empty(cls, n_filt: int) -> "_Moments":
        """The moments of no frames."""
        return cls(0, torch.zeros(n_filt, dtype=torch.float64), torch.zeros(n_filt, dtype=torch.float64))

    def merge(self, other: "_Moments") -> "_Moments":
        """The moments of both sets together (Chan et al.'s pairwise update)."""
        if other.count == 0:
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        return _Moments(
            total,
            self.mean + delta * (other.count / total),
            self.sq_dev + other.sq_dev + delta.square() * (self.count * other.count / total),
        )


def _chunk_moments(task: tuple) -> tuple[int, _Moments]:
    """Pool worker: the moments of one chunk of entries, and how many entries it held."""
    entries, dataset_dir, features = task
    # One utterance's features are too small a job for intra-op threads: with
    # several, a busy 2-core machine runs them ~10x slower.
    torch.set_num_threads(1)
    filterbank = FilterbankFeatures(**features)
    moments = _Moments.empty(filterbank.n_filt)
    for entry in entries:
        audio = torch.from_numpy(load_audio(audio_path(entry, dataset_dir), filterbank.sample_rate))
        logmel, lens = filterbank(audio[None], torch.tensor([audio.numel()]))
        frames = logmel[0, :, : int(lens[0])].to(torch.float64)  # [n_filt, T]
        if frames.shape[1] == 0:
            continue
        utt_mean = frames.mean(dim=1)
        utt = _Moments(frames.shape[1], utt_mean, (frames - utt_mean[:, None]).square().sum(dim=1))
        moments = moments.merge(utt)
    return len(entries), moments


def _check_variances(variances: torch.Tensor, source: str) -> None:
    bad = torch.nonzero(~(variances > 0)).flatten().tolist()
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(
            f"mel statistics of {source}: variance is not > 0 in bins {shown}; "
            "the audio is silent or constant there: use more (and real) training audio"
        )


def save_mel_stats(stats_dir: PathLike, means: torch.Tensor, variances: torch.Tensor, n: int) -> None:
    """Write melmeans.pt, melvars.pt (float32 [n_filt]) and meln.pt (float32 [1]) atomically.

    Pickle protocol 2, readable with ``torch.load(..., weights_only=True)``.
    Refuses (DataError, nothing written) when a variance is not > 0.
    """
    _check_variances(variances, str(stats_dir))
    stats_dir = Path(stats_dir)
    stats_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(means.to(torch.float32).clone(), stats_dir / "melmeans.pt")
    atomic_torch_save(variances.to(torch.float32).clone(), stats_dir / "melvars.pt")
    atomic_torch_save(torch.tensor([float(n)], dtype=torch.float32), stats_dir / "meln.pt")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compute dataset log-mel statistics (melmeans.pt, melvars.pt, meln.pt) "
        "for feature normalisation."
    )
    parser.add_argument(
        "--model_config",
        required=True,
        help="YAML model config; its input_train.filterbank_features block defines the features",
    )
    parser.add_argument(
        "--dataset_dir",
        required=True,
        help="dataset directory: manifest paths and audio fnames are relative to it",
    )
    parser.add_argument(
        "--train_manifests",
        nargs="+",
        required=True,
        help="training manifest(s), relative to --dataset_dir (or to the current directory)",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to write the statistics (default: the config's "
        "input_train.filterbank_features.stats_path)",
    )
    parser.add_argument(
        "--max_files",
        type=int,
        default=None,
        help="use only the first N manifest entries (default: all)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    keep_freed_heap()
    cfg = config.load(args.model_config)
    filterbank_features = config.input(cfg, "train")["filterbank_features"]
    output_dir = args.output_dir or filterbank_features.get("stats_path")
    if not output_dir:
        raise ConfigError(
            f"{args.model_config}: input_train.filterbank_features.stats_path is not set; "
            "set it or pass --output_dir"
        )
    if args.max_files is not None and args.max_files < 1:
        raise ConfigError(f"--max_files must be >= 1, got {args.max_files}")
    entries = read_manifests(args.train_manifests, args.dataset_dir)
    if args.max_files is not None:
        entries = entries[: args.max_files]
    means, variances, n = compute_mel_stats(entries, args.dataset_dir, filterbank_features)
    save_mel_stats(output_dir, means, variances, n)
    print(f"wrote mel statistics of {n} frames ({len(entries)} files) to {output_dir}")


if __name__ == "__main__":
    run_cli(main)
