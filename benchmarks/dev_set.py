"""The demo model and dev set that the decoding benchmarks measure: their shared flags."""

import argparse
from pathlib import Path

from caiman_asr_train.data.manifest import read_manifests

REPO = Path(__file__).resolve().parents[1]


def add_dev_set_args(parser: argparse.ArgumentParser) -> None:
    """``--ckpt``, ``--val_manifests``, ``--dataset_dir`` and ``--num_utterances``, defaulting to the demo's."""
    parser.add_argument(
        "--ckpt",
        type=Path,
        default=REPO / "results/RNN-T_best_checkpoint.hw.pt",
        help="hardware checkpoint to decode with (default: results/RNN-T_best_checkpoint.hw.pt)",
    )
    parser.add_argument(
        "--val_manifests",
        nargs="+",
        default=[str(REPO / "datasets/demo/dev.json")],
        help="manifests to decode (default: datasets/demo/dev.json)",
    )
    parser.add_argument(
        "--dataset_dir", type=Path, default=None, help="audio root (default: the first manifest's directory)"
    )
    parser.add_argument(
        "--num_utterances", type=int, default=None, help="only the first N utterances (default: all)"
    )


def dev_entries(args: argparse.Namespace) -> tuple[list[dict], Path]:
    """The manifest entries the flags select, and the directory their audio paths are relative to."""
    dataset_dir = args.dataset_dir or Path(args.val_manifests[0]).parent
    return read_manifests(args.val_manifests, dataset_dir)[: args.num_utterances], dataset_dir
