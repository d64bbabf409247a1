"""The validation flags shared by ``caiman_asr_train.val`` and ``caiman_asr_train.lm.sweep_scale_factor``.

Both decode manifests with a checkpoint the same way, so they take the model
config, audio location, batching, padding, dither seed and utterance limit
from one definition.
"""

import argparse
from pathlib import Path

DEFAULT_MODEL_CONFIG = "training/configs/demo.yaml"


def add_validation_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--model_config --dataset_dir --val_batch_size --val_final_padding_secs --seed --num_utterances``."""
    parser.add_argument(
        "--model_config",
        type=Path,
        default=None,
        help="YAML config of a training checkpoint (default: the config the checkpoint recorded; for "
        f"checkpoints that record none, {DEFAULT_MODEL_CONFIG} in the repository); not read for hardware "
        "checkpoints",
    )
    parser.add_argument(
        "--dataset_dir",
        type=Path,
        default=None,
        help="directory the manifests' audio fnames are relative to (default: the first manifest's directory)",
    )
    parser.add_argument(
        "--val_batch_size", type=int, default=8, help="utterances decoded together (default: 8)"
    )
    parser.add_argument(
        "--val_final_padding_secs",
        type=float,
        default=0.24,
        help="seconds of silence appended to each utterance, as the inference server does (default: 0.24)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the dither noise (default: 1)")
    parser.add_argument(
        "--num_utterances",
        type=int,
        default=None,
        help="decode only the first N utterances of the manifests (default: all)",
    )
