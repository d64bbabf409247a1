"""Build the pieces of a run from a config dict: tokenizer, feature pipeline, model, text settings.

``train.py`` and ``val.py`` build through these, so a config means the same
model, features and transcript handling in training, validation during
training, and validation of a saved checkpoint.
"""

import torch

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.data.features import FeaturePipeline, load_mel_stats
from caiman_asr_train.data.spm.spm_from_json import text_settings
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT


def build_tokenizer(cfg: dict, *, sampling: bool = False) -> Tokenizer:
    """The config's SentencePiece tokenizer; subword sampling (training) only with ``sampling``."""
    section = config.tokenizer(cfg)
    return Tokenizer(section["sentpiece_model"], sampling=section["sampling"] if sampling else 0.0)


def build_pipeline(cfg: dict, split: str) -> FeaturePipeline:
    """The feature pipeline of ``split`` ("train": with SpecAugment, or "val"), with its mel statistics.

    Training computes the filterbank in float32 (a third of a CPU step in
    float64); validation keeps the float64 front end that export and the
    inference servers are held to, so the WER it reports is the deployed one.

    Raises:
        ConfigError: ``input_{split}.filterbank_features.stats_path`` is not set.
        DataError: the statistics are missing or do not fit ``n_filt``.
    """
    inp = config.input(cfg, split)
    features = inp["filterbank_features"]
    if not features.get("stats_path"):
        raise ConfigError(
            f"config key input_{split}.filterbank_features.stats_path is not set; point it at the "
            "directory written by python -m caiman_asr_train.data.generate_mel_stats"
        )
    melmeans, melvars, _ = load_mel_stats(features["stats_path"], features["n_filt"])
    compute_dtype = torch.float32 if split == "train" else torch.float64
    return FeaturePipeline(
        features, inp["frame_splicing"], melmeans, melvars, inp["spec_augment"], compute_dtype=compute_dtype
    )


def build_model(cfg: dict, tokenizer: Tokenizer) -> RNNT:
    """The training RNNT of ``cfg`` with one output class per SentencePiece piece plus blank."""
    return RNNT(tokenizer.num_labels + 1, **config.rnnt(cfg))


def scoring_settings(cfg: dict) -> dict:
    """``word_error_rate`` keyword arguments of the validation set: standardize, error_rate."""
    audio = config.input(cfg, "val")["audio_dataset"]
    return {
        "standardize": bool(audio.get("standardize_wer", True)),
        "error_rate": audio.get("error_rate", "word"),
    }


def sample_rate(cfg: dict, split: str = "val") -> int:
    """Audio samples per second of ``split``."""
    return int(config.input(cfg, split)["audio_dataset"]["sample_rate"])


__all__ = [
    "build_model",
    "build_pipeline",
    "build_tokenizer",
    "sample_rate",
    "scoring_settings",
    "text_settings",
]
