"""Read and validate YAML model configs (docs/formats.md section 4).

``load`` returns the config as plain dicts with relative paths resolved against
the YAML file's directory; the accessors return validated pieces of it with
defaults filled in. Every mistake raises ``ConfigError`` naming the file, the
section and the key.
"""

import warnings
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import ValidationError

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.core.export_schema import (
    LR_FACTOR_KEYS,
    FilterbankFeaturesSchema,
    FrameSplicingSchema,
    ModelSchema,
    RNNTInferenceConfigSchema,
    TokenizerSchema,
    in_feats_mismatch,
)

AUDIO_DATASET_KEYS = frozenset(
    {
        "sample_rate",
        "trim_silence",
        "normalize_transcripts",
        "standardize_wer",
        "replacements",
        "remove_tags",
        "error_rate",
    }
)
TRAIN_ONLY_AUDIO_DATASET_KEYS = frozenset(
    {"max_duration", "max_transcript_len", "min_duration", "speed_perturbation", "standardize_text"}
)
SPEED_PERTURBATION_KEYS = frozenset({"min_rate", "max_rate", "p"})
SPEC_AUGMENT_KEYS = frozenset({"freq_masks", "min_freq", "max_freq", "time_masks", "min_time", "max_time"})
GRAD_NOISE_KEYS = frozenset({"noise_level", "decay_const", "start_step"})
NGRAM_KEYS = frozenset({"ngram_path", "scale_factor"})
REQUIRED_SECTIONS = ("tokenizer", "input_val", "rnnt")
OPTIONAL_SECTIONS = ("input_train", "grad_noise_scheduler", "ngram", "user_tokens")

# Training-only rnnt keys with their defaults. Keys the plain-PyTorch model
# cannot honour are listed in UNSUPPORTED_RNNT_DEFAULTS and warn when changed.
RNNT_DEFAULTS: dict[str, Any] = {
    "enc_dropout": 0.0,
    "pred_dropout": 0.0,
    "joint_dropout": 0.0,
    "forget_gate_bias": 1.0,
    "hidden_hidden_bias_scale": 0.0,
    "weights_init_scale": 1.0,
    "enc_freeze": False,
    "joint_apex_transducer": None,
    "joint_apex_relu_dropout": False,
    "gpu_unavailable": False,
    "prefix_token_map": {},
    **{key: 1.0 for key in sorted(LR_FACTOR_KEYS)},
}
UNSUPPORTED_RNNT_DEFAULTS: dict[str, Any] = {
    "custom_lstm": False,
    "quantize": False,
    "enc_rw_dropout": 0.0,
    "pred_rw_dropout": 0.0,
    "enc_batch_norm": False,
    "pred_batch_norm": False,
    "hard_activation_functions": False,
}

PathLike = Union[str, Path]


def load(path: PathLike) -> dict:
    """Read, validate and return the YAML config at ``path``.

    Paths inside (``tokenizer.sentpiece_model``, ``*.filterbank_features.stats_path``,
    ``ngram.ngram_path``) are made absolute relative to the YAML file's directory.
    YAML anchors and merge keys give independent copies: changing one section of
    the returned dict never changes another.
    """
    path = Path(path)
    if path.suffix.lower() == ".toml":
        raise ConfigError(f"{path}: TOML configs are not supported; convert it to YAML (.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty; start from training/configs/testing-1023sp.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    cfg = _unshare(data)
    _validate(cfg, path)
    _resolve_paths(cfg, path.parent.resolve())
    return cfg


def rnnt(cfg: dict) -> dict:
    """Keyword arguments for the training ``RNNT`` (every key, defaults filled in)."""
    section = dict(cfg["rnnt"])
    kwargs = {**RNNT_DEFAULTS, **UNSUPPORTED_RNNT_DEFAULTS}
    kwargs.update(section)
    for key, default in UNSUPPORTED_RNNT_DEFAULTS.items():
        if kwargs[key] != default:
            warnings.warn(
                f"rnnt.{key}={kwargs[key]!r} is not supported by the plain-PyTorch model "
                f"and is ignored (training behaves as {key}={default!r})",
                stacklevel=2,
            )
    return kwargs


def input(cfg: dict, split: str) -> dict:  # noqa: A001 - the name mirrors the YAML sections
    """The input pipeline of ``split`` ("train" or "val") as validated dicts.

    Returns ``{"audio_dataset", "filterbank_features", "frame_splicing",
    "spec_augment", "speed_perturbation", "max_duration", "min_duration",
    "max_transcript_len", "standardize_text"}``; the train-only entries are None
    (or False) for "val".
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    section_name = f"input_{split}"
    if section_name not in cfg:
        raise ConfigError(f"config: section '{section_name}' is missing; add it (see training/configs/)")
    section = cfg[section_name]
    audio = dict(section["audio_dataset"])
    train_only = {key: audio.pop(key, None) for key in TRAIN_ONLY_AUDIO_DATASET_KEYS}
    return {
        "audio_dataset": audio,
        "filterbank_features": dict(section["filterbank_features"]),
        "frame_splicing": dict(section["frame_splicing"]),
        "spec_augment": dict(section["spec_augment"]) if section.get("spec_augment") else None,
        "speed_perturbation": train_only["speed_perturbation"],
        "max_duration": train_only["max_duration"],
        "min_duration": train_only["min_duration"],
        "max_transcript_len": train_only["max_transcript_len"],
        "standardize_text": bool(train_only["standardize_text"]),
    }


def tokenizer(cfg: dict) -> dict:
    """``{"sentpiece_model": absolute path str, "labels": list, "sampling": float}``."""
    section = cfg["tokenizer"]
    return {
        "sentpiece_model": section["sentpiece_model"],
        "labels": list(section["labels"]),
        "sampling": float(section.get("sampling", 0.0)),
    }


def ngram(cfg: dict) -> dict:
    """``{"ngram_path": absolute directory str, "scale_factor": float}``."""
    if "ngram" not in cfg:
        raise ConfigError(
            "config: section 'ngram' is missing; add ngram_path and scale_factor, or pass --skip_ngram"
        )
    section = cfg["ngram"]
    return {"ngram_path": section["ngram_path"], "scale_factor": float(section["scale_factor"])}


def _unshare(obj: Any) -> Any:
    """Rebuild containers so that YAML aliases no longer share objects."""
    if isinstance(obj, dict):
        return {key: _unshare(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_unshare(value) for value in obj]
    return obj


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _check_keys(section: Any, known: frozenset, where: str, path: Path) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section '{where}' must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in known:
            raise ConfigError(
                f"{path}: unknown key '{key}' in section '{where}'; "
                f"remove it or use one of: {', '.join(sorted(known))}"
            )


def _validate(cfg: dict, path: Path) -> None:
    for name in REQUIRED_SECTIONS:
        if name not in cfg:
            raise ConfigError(f"{path}: required section '{name}' is missing")
    _check_keys(cfg, frozenset(REQUIRED_SECTIONS + OPTIONAL_SECTIONS), "top level", path)
    _check_keys(cfg["tokenizer"], TokenizerSchema.known_keys(), "tokenizer", path)
    _check_keys(cfg["rnnt"], ModelSchema.known_keys() | frozenset(UNSUPPORTED_RNNT_DEFAULTS), "rnnt", path)
    for split in ("val", "train"):
        name = f"input_{split}"
        if name not in cfg:
            continue
        section = cfg[name]
        blocks = {"audio_dataset", "filterbank_features", "frame_splicing"}
        _check_keys(
            section, frozenset(blocks | ({"spec_augment"} if split == "train" else set())), name, path
        )
        for block in sorted(blocks):
            if block not in section:
                raise ConfigError(f"{path}: section '{name}' is missing '{block}'")
        audio_keys = AUDIO_DATASET_KEYS | (TRAIN_ONLY_AUDIO_DATASET_KEYS if split == "train" else frozenset())
        _check_keys(section["audio_dataset"], audio_keys, f"{name}.audio_dataset", path)
        if section["audio_dataset"].get("speed_perturbation"):
            _check_keys(
                section["audio_dataset"]["speed_perturbation"],
                SPEED_PERTURBATION_KEYS,
                f"{name}.audio_dataset.speed_perturbation",
                path,
            )
        _check_keys(
            section["filterbank_features"],
            FilterbankFeaturesSchema.known_keys(),
            f"{name}.filterbank_features",
            path,
        )
        _check_keys(
            section["frame_splicing"], FrameSplicingSchema.known_keys(), f"{name}.frame_splicing", path
        )
        if section.get("spec_augment"):
            _check_keys(section["spec_augment"], SPEC_AUGMENT_KEYS, f"{name}.spec_augment", path)
        _check_consistency(cfg, section, name, path)
    if "grad_noise_scheduler" in cfg:
        _check_keys(cfg["grad_noise_scheduler"], GRAD_NOISE_KEYS, "grad_noise_scheduler", path)
    if "ngram" in cfg:
        _check_keys(cfg["ngram"], NGRAM_KEYS, "ngram", path)
    if "user_tokens" in cfg and not isinstance(cfg["user_tokens"], (dict, type(None))):
        raise ConfigError(f"{path}: section 'user_tokens' must map names to token strings")
    try:
        RNNTInferenceConfigSchema.model_validate(cfg)
        if "input_train" in cfg:
            FilterbankFeaturesSchema.model_validate(cfg["input_train"]["filterbank_features"])
            FrameSplicingSchema.model_validate(cfg["input_train"]["frame_splicing"])
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"{path}: key '{where}': {error['msg']}") from None


def _check_consistency(cfg: dict, section: dict, name: str, path: Path) -> None:
    features = section["filterbank_features"]
    splicing = section["frame_splicing"]
    stacking, subsampling = splicing.get("frame_stacking"), splicing.get("frame_subsampling")
    if stacking != subsampling:
        raise ConfigError(
            f"{path}: {name}.frame_splicing.frame_stacking ({stacking}) must equal "
            f"frame_subsampling ({subsampling})"
        )
    n_filt = features.get("n_filt")
    mismatch = in_feats_mismatch(cfg["rnnt"].get("in_feats"), n_filt, stacking)
    if isinstance(n_filt, int) and isinstance(stacking, int) and mismatch:
        raise ConfigError(f"{path}: {mismatch} in {name}")
    audio_rate = section["audio_dataset"].get("sample_rate")
    feature_rate = features.get("sample_rate")
    if audio_rate != feature_rate:
        raise ConfigError(
            f"{path}: {name}.audio_dataset.sample_rate ({audio_rate}) must equal "
            f"{name}.filterbank_features.sample_rate ({feature_rate})"
        )


def _resolve_paths(cfg: dict, base: Path) -> None:
    def resolve(section: dict, key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value:
            section[key] = str((base / value).resolve()) if not Path(value).is_absolute() else value

    resolve(cfg["tokenizer"], "sentpiece_model")
    for name in ("input_val", "input_train"):
        if name in cfg:
            resolve(cfg[name]["filterbank_features"], "stats_path")
    if "ngram" in cfg:
        resolve(cfg["ngram"], "ngram_path")
