"""Load a training or hardware checkpoint for validation, and build its decoder and dev-set batches.

Shared by ``val.py`` and ``lm/sweep_scale_factor.py``. It sits in train_utils/,
not evaluate/, because a training checkpoint is rebuilt through ``builders``
and train_utils/ already imports evaluate/.
"""

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.core.load_hw import is_hardware_checkpoint, load_hw_checkpoint, read_checkpoint
from caiman_asr_train.core.model import RNNT as CoreRNNT
from caiman_asr_train.data.dataset import AudioDataset, collate
from caiman_asr_train.data.features import FeaturePipeline
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.evaluate.decoding import Decoder, build_decoder, encoder_frame_seconds
from caiman_asr_train.evaluate.validation_args import DEFAULT_MODEL_CONFIG
from caiman_asr_train.export.checkpointer import first_non_finite, load_weights, recorded_config
from caiman_asr_train.rnnt import config
from caiman_asr_train.train_utils.builders import (
    build_model,
    build_pipeline,
    build_tokenizer,
    sample_rate,
    scoring_settings,
    text_settings,
)
from caiman_asr_train.utils.paths import REPO_ROOT


@dataclass
class Validatable:
    """Everything needed to validate one checkpoint.

    ``text`` holds the ``normalize_transcript`` settings for the references
    (``normalize_transcripts``, ``labels``, ``replacements``, ``remove_tags``)
    and ``scoring`` the ``word_error_rate`` settings (``standardize``,
    ``error_rate``). ``embedded_ngram`` is a hardware checkpoint's
    ``{"binary", "scale_factor"}``, ``config_ngram`` a training checkpoint's
    config ``ngram`` section (None when it has none): what beam search fuses.
    """

    model: CoreRNNT
    pipeline: FeaturePipeline
    tokenizer: Tokenizer
    sample_rate: int
    step: Optional[int]
    kind: str
    text: dict
    scoring: dict
    embedded_ngram: Optional[dict] = None
    config_ngram: Optional[dict] = None


def load_training_checkpoint(
    path: Path, ckpt: dict, model_config: Optional[Path], device: torch.device
) -> Validatable:
    """The EMA model of training checkpoint ``ckpt`` (read from ``path``) with the features,
    statistics and tokenizer of ``model_config``, else of the config the checkpoint recorded, else
    of the demo config."""
    if "ema_state_dict" not in ckpt:
        raise CheckpointError(
            f"{path}: no 'ema_state_dict'; pass a checkpoint written by train.py, "
            "or a hardware checkpoint (*.hw.pt)"
        )
    recorded = recorded_config(ckpt)
    if model_config is not None or recorded is None:
        cfg = config.load(model_config or REPO_ROOT / DEFAULT_MODEL_CONFIG)
    else:
        cfg = recorded
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    load_weights(
        model,
        ckpt["ema_state_dict"],
        source=f"{path} [ema_state_dict]",
        hint="pass the --model_config (and SentencePiece model) the checkpoint was trained with",
    )
    return Validatable(
        model=model.to(device).eval(),
        pipeline=build_pipeline(cfg, "val"),
        tokenizer=tokenizer,
        sample_rate=sample_rate(cfg),
        step=ckpt.get("step"),
        kind="training",
        text=text_settings(cfg, "val"),
        scoring=scoring_settings(cfg),
        config_ngram=config.ngram(cfg) if "ngram" in cfg else None,
    )


def load_hardware_checkpoint(path: Path, device: torch.device) -> Validatable:
    """A hardware checkpoint with everything taken from the file itself."""
    hw = load_hw_checkpoint(path, device=str(device))
    data = hw.data_config
    features = data["filterbank_features"]
    return Validatable(
        model=hw.model,
        pipeline=FeaturePipeline(features, data["frame_splicing"], data["melmeans"], data["melvars"]),
        tokenizer=Tokenizer(hw.sentpiece_model_binary),
        sample_rate=int(features["sample_rate"]),
        step=hw.step,
        kind="hardware",
        # The file keeps no audio_dataset block: the settings of every shipped config.
        text={
            "normalize_transcripts": "lowercase",
            "labels": data["labels"],
            "replacements": None,
            "remove_tags": True,
        },
        scoring={"standardize": True, "error_rate": "word"},
        embedded_ngram=hw.ngram,
    )


def load_for_validation(path: Path, model_config: Optional[Path], device: torch.device) -> Validatable:
    """Read ``path`` and dispatch on its content: hardware or training checkpoint.

    Warns in one line when the weights hold NaN or Inf (the WER then means nothing).
    """
    # mmap: deciding the kind touches no tensor, so a big training checkpoint costs little here.
    ckpt = read_checkpoint(path)
    if is_hardware_checkpoint(ckpt):
        del ckpt
        target = load_hardware_checkpoint(path, device)
    else:
        target = load_training_checkpoint(path, ckpt, model_config, device)
    bad = first_non_finite(target.model.state_dict())
    if bad is not None:
        warnings.warn(
            f"{path}: weight '{bad}' holds NaN or Inf (training diverged); its WER means nothing",
            stacklevel=2,
        )
    return target


def decoder_for(
    target: Validatable, args: argparse.Namespace, source: Path, max_symbols_per_step: int = 8
) -> Decoder:
    """The decoder ``add_decoder_args``'s flags ask for, with ``target``'s n-gram and frame rate."""
    return build_decoder(
        args,
        target.tokenizer,
        frame_seconds=encoder_frame_seconds(target.pipeline, target.model, target.sample_rate),
        source=str(source),
        embedded_ngram=target.embedded_ngram,
        config_ngram=target.config_ngram,
        max_symbols_per_step=max_symbols_per_step,
    )


def dev_loader(target: Validatable, entries: list[dict], dataset_dir: Path, batch_size: int) -> DataLoader:
    """Batches of ``entries`` in manifest order, transcripts normalised as ``target`` was trained."""
    dataset = AudioDataset(entries, dataset_dir, target.sample_rate, **target.text)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
