"""Build hardware checkpoints (``*.hw.pt``) for the FPGA inference server (docs/formats.md section 9).

A hardware checkpoint is a plain dict pickled with protocol 2:

    state_dict            OrderedDict[str, float32 Tensor]  the training checkpoint's EMA weights
    epoch, step           int                                copied from the training checkpoint
    best_wer              float                              copied (a fraction)
    melmeans, melvars     float32 Tensor[n_filt]             from filterbank_features.stats_path
    melalpha              float                              always 0.0
    sentpiece_model       bytes                              the whole SentencePiece .model file
    ngram                 {"binary": bytes|None, "scale_factor": float|None}
    version               str                                HW_CKPT_VERSION
    rnnt_config           dict                               inference_only_config(cfg)
    raw_prefix_token_map  dict[str, list[int]]               rnnt.prefix_token_map ({} if unset)

The config is the one the training checkpoint recorded (``config`` key, see
``export/checkpointer.py``) unless one is given; checkpoints written before
that key existed need it given. Every refusal raises ``HardwareCheckpointError``
before anything is written: besides the documented refusals, non-finite weights
(naming the tensor), weights that do not fit the config (whatever
``skip_state_dict_check`` says), and a SentencePiece model or statistics file
whose bytes differ from the hash the training run recorded (unless
``allow_changed_assets``).
The training checkpoint is opened with mmap, so only the EMA weights are read
from disk; the optimizer state and raw weights are never pulled into memory.

Command line (from the repository root):

    python training/caiman_asr_train/export/hardware_ckpt.py --ckpt results/RNN-T_best_checkpoint.pt \\
        --output_ckpt results/RNN-T_best_checkpoint.hw.pt
"""

import argparse
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from pydantic import ValidationError

from caiman_asr_train.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HardwareCheckpointError,
    TokenizerError,
    UserError,
)
from caiman_asr_train.core.export_schema import RNNTInferenceConfigSchema, in_feats_mismatch
from caiman_asr_train.core.load_hw import (
    HW_CKPT_VERSION,
    is_hardware_checkpoint,
    read_checkpoint,
    validate_hw_checkpoint,
)
from caiman_asr_train.core.model import RNNT as CoreRNNT
from caiman_asr_train.data.features import load_mel_stats
from caiman_asr_train.data.ngram import find_ngram, is_kenlm_binary
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.export.checkpointer import (
    changed_assets,
    check_training_checkpoint,
    first_non_finite,
    recorded_config,
    weights_report,
)
from caiman_asr_train.export.model_schema import (
    CheckpointNotSupportedError,
    check_model_schema,
    return_schemas,
)
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.config import load as load_config
from caiman_asr_train.rnnt.model import config_rnnt
from caiman_asr_train.utils.atomic import atomic_torch_save
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.paths import REPO_ROOT

__all__ = [
    "HW_CKPT_VERSION",
    "create_hardware_ckpt",
    "fpga_variant",
    "hw_path",
    "inference_only_config",
    "is_hardware_checkpoint",
    "save_hardware_ckpt",
]

PathLike = Union[str, Path]

# The config hardware_ckpt.py falls back to for checkpoints that record none (upstream behaviour).
DEFAULT_CONFIG = Path("training/configs/demo.yaml")
_NGRAM_HINT = (
    "build one with scripts/generate_ngram.sh, pass --override_ngram_path FILE, or pass --skip_ngram"
)


def inference_only_config(cfg_or_path: Union[dict, str, Path]) -> dict:
    """The inference config (the hardware checkpoint's ``rnnt_config``) of a config dict or YAML path."""
    cfg = cfg_or_path if isinstance(cfg_or_path, dict) else config.load(cfg_or_path)
    try:
        return RNNTInferenceConfigSchema.model_validate(cfg).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"config key '{where}': {error['msg']}") from None


def fpga_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The FPGA-supported variant ("base" or "large") whose schema the weights match, else None."""
    try:
        return check_model_schema(state_dict, return_schemas())
    except CheckpointNotSupportedError:
        return None


def hw_path(ckpt: PathLike) -> Path:
    """``X.pt`` -> ``X.hw.pt`` next to it (RNN-T_best_checkpoint.pt -> RNN-T_best_checkpoint.hw.pt).

    A name without ``.pt`` gets ``.hw.pt`` appended.
    """
    ckpt = Path(ckpt)
    stem = ckpt.name[: -len(".pt")] if ckpt.name.endswith(".pt") else ckpt.name
    return ckpt.with_name(f"{stem}.hw.pt")


def create_hardware_ckpt(
    ckpt: Union[Mapping, PathLike],
    config: Union[dict, PathLike, None] = None,
    *,
    skip_ngram: bool = False,
    override_ngram_path: Optional[PathLike] = None,
    skip_state_dict_check: bool = False,
    allow_changed_assets: bool = False,
) -> dict:
    """Build the hardware-checkpoint dict (layout in the module docstring) from a training checkpoint.

    Args:
        ckpt: a training checkpoint dict or the path of one (read with mmap).
        config: the model's config dict (``rnnt.config.load``) or YAML path;
            None uses the config the checkpoint recorded.
        skip_ngram: store no n-gram (``binary`` and ``scale_factor`` None).
        override_ngram_path: a KenLM binary (or a directory holding
            ``ngram.binary``) to embed instead of the config's ``ngram.ngram_path``.
        skip_state_dict_check: accept weights that match no FPGA variant; the
            result is then for software use only and a warning says so. Weights
            must still fit ``config``.
        allow_changed_assets: embed the SentencePiece model and mel statistics
            even when they differ from the files the training run recorded.

    Raises:
        HardwareCheckpointError: ``logmel_norm_weight`` is not 1.0; mel
            statistics, SentencePiece model or n-gram missing; n-gram not a
            KenLM binary; weights matching no FPGA variant (its subclass
            ``CheckpointNotSupportedError``); non-finite weights; weights that
            do not fit the config; changed tokenizer or statistics; no config
            given or recorded; or not a training checkpoint.
        ConfigError, CheckpointError: unreadable config or checkpoint.
    """
    source = "training checkpoint" if isinstance(ckpt, Mapping) else f"training checkpoint {ckpt}"
    training = ckpt if isinstance(ckpt, Mapping) else read_checkpoint(ckpt, mmap=True)
    try:
        check_training_checkpoint(training, source)
    except CheckpointError as exc:
        raise HardwareCheckpointError(str(exc)) from None
    if config is None:
        cfg = recorded_config(training)
        if cfg is None:
            raise HardwareCheckpointError(
                f"{source} records no config (it was saved before checkpoints carried one); "
                "pass the YAML it was trained with (--config)"
            )
    else:
        cfg = config if isinstance(config, dict) else load_config(config)
    mismatch = in_feats_mismatch(
        cfg["rnnt"].get("in_feats"),
        cfg["input_val"]["filterbank_features"].get("n_filt"),
        cfg["input_val"]["frame_splicing"].get("frame_stacking"),
    )
    if mismatch:
        raise HardwareCheckpointError(f"config: {mismatch}; fix the config")
    if not allow_changed_assets:
        changed = changed_assets(training, cfg)
        if changed:
            name, path = changed[0]
            raise HardwareCheckpointError(
                f"{path} ({name}) is not the file {source} was trained with (its sha256 differs from the "
                "recorded one); restore that file, or pass --allow_changed_assets to embed this one on purpose"
            )

    weight = training["logmel_norm_weight"]
    if weight != 1.0:
        raise HardwareCheckpointError(
            f"{source}: logmel_norm_weight is {weight}, not 1.0 (the normalisation ramp has not "
            "finished, and the server uses dataset statistics only); train past --norm_ramp_end_step "
            "and export a later checkpoint"
        )
    state_dict = _float32_state_dict(training["ema_state_dict"], source)
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise HardwareCheckpointError(
            f"{source}: EMA weight '{bad}' holds NaN or Inf (training diverged); export an earlier checkpoint"
        )
    if fpga_variant(state_dict) is None:
        if not skip_state_dict_check:
            check_model_schema(state_dict, return_schemas())  # raises with the closest difference
        warnings.warn(
            "the EMA weights match no FPGA-supported model (base or large): this hardware "
            "checkpoint is for software use only (val.py, load_hw_checkpoint), not for the FPGA server",
            stacklevel=2,
        )
    n_classes = state_dict["joint_net.2.weight"].shape[0] if "joint_net.2.weight" in state_dict else None
    melmeans, melvars = _mel_stats(cfg)
    sentpiece_model = _sentencepiece_model(cfg, n_classes)
    _check_fits_config(state_dict, cfg, source)
    try:
        epoch, step, best_wer = int(training["epoch"]), int(training["step"]), float(training["best_wer"])
    except (TypeError, ValueError):
        raise HardwareCheckpointError(
            f"{source}: epoch and step must be ints and best_wer a float; export a checkpoint saved by train.py"
        ) from None
    return {
        "state_dict": state_dict,
        "epoch": epoch,
        "step": step,
        "best_wer": best_wer,
        "melmeans": melmeans,
        "melvars": melvars,
        "melalpha": 0.0,
        "sentpiece_model": sentpiece_model,
        "ngram": _ngram(cfg, skip_ngram, override_ngram_path),
        "version": HW_CKPT_VERSION,
        "rnnt_config": inference_only_config(cfg),
        "raw_prefix_token_map": _prefix_token_map(cfg, n_classes),
    }


def _check_fits_config(state_dict: Mapping[str, torch.Tensor], cfg: dict, source: str) -> None:
    """Refuse weights whose names or shapes differ from the model ``cfg`` describes."""
    n_classes = Tokenizer(cfg["tokenizer"]["sentpiece_model"]).num_labels + 1
    # On the meta device the model costs no memory: only names and shapes are compared.
    with torch.device("meta"):
        own = CoreRNNT(config_rnnt(n_classes, **config.rnnt(cfg))).state_dict()
    report = weights_report(own, state_dict)
    if not report.complete:
        raise HardwareCheckpointError(
            f"{source}: the EMA weights do not fit the config's model ({report.describe(own, state_dict)}); "
            "export with the config the checkpoint was trained with"
        )


def save_hardware_ckpt(hw: dict, path: PathLike) -> None:
    """Check ``hw``'s layout and write it to ``path`` atomically (pickle protocol 2).

    Raises:
        CheckpointError: a key is missing or has the wrong type.
    """
    validate_hw_checkpoint(hw, f"hardware checkpoint for {path}")
    atomic_torch_save(hw, path)


def _float32_state_dict(weights: Mapping, source: str) -> "OrderedDict[str, torch.Tensor]":
    if not isinstance(weights, Mapping) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise HardwareCheckpointError(f"{source}: ema_state_dict is not a dict of tensors")
    return OrderedDict(
        (name, _own_storage(tensor.detach().to(torch.float32))) for name, tensor in weights.items()
    )


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied only when it is a view of a larger buffer (torch.save would write all of it)."""
    whole = (
        tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )
    return tensor if whole and tensor.is_contiguous() else tensor.clone(memory_format=torch.contiguous_format)


def _mel_stats(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    features = cfg["input_val"]["filterbank_features"]
    stats_path = features.get("stats_path")
    if not stats_path:
        raise HardwareCheckpointError(
            "config key input_val.filterbank_features.stats_path is not set; point it at the directory "
            "of melmeans.pt and melvars.pt (python -m caiman_asr_train.data.generate_mel_stats makes them)"
        )
    try:
        melmeans, melvars, _ = load_mel_stats(stats_path, features["n_filt"])
    except DataError as exc:
        raise HardwareCheckpointError(str(exc)) from None
    return melmeans.contiguous(), melvars.contiguous()


def _sentencepiece_model(cfg: dict, n_classes: Optional[int]) -> bytes:
    path = Path(cfg["tokenizer"]["sentpiece_model"])
    if not path.is_file():
        raise HardwareCheckpointError(
            f"SentencePiece model {path} (tokenizer.sentpiece_model) not found; point the config at the "
            "model the network was trained with"
        )
    try:
        num_labels = Tokenizer(str(path)).num_labels
    except TokenizerError as exc:
        raise HardwareCheckpointError(str(exc)) from None
    if n_classes is not None and n_classes != num_labels + 1:
        raise HardwareCheckpointError(
            f"SentencePiece model {path} has {num_labels} pieces but the weights have {n_classes} classes "
            f"({num_labels + 1} expected: pieces + blank); use the tokenizer the model was trained with"
        )
    return path.read_bytes()


def _ngram(cfg: dict, skip_ngram: bool, override_ngram_path: Optional[PathLike]) -> dict:
    if skip_ngram:
        return {"binary": None, "scale_factor": None}
    section = cfg.get("ngram") or {}
    if "scale_factor" not in section or (override_ngram_path is None and "ngram_path" not in section):
        raise HardwareCheckpointError(
            f"config has no ngram.ngram_path and ngram.scale_factor; add them, or {_NGRAM_HINT}"
        )
    try:
        if override_ngram_path is None:
            path = find_ngram(section["ngram_path"])
        elif Path(override_ngram_path).is_dir():
            path = find_ngram(override_ngram_path)
        else:
            path = Path(override_ngram_path)
            if not path.is_file():
                raise HardwareCheckpointError(
                    f"n-gram {path} (--override_ngram_path) not found; give an existing KenLM binary"
                )
        binary = is_kenlm_binary(path)
    except DataError as exc:
        raise HardwareCheckpointError(str(exc)) from None
    if not binary:
        raise HardwareCheckpointError(
            f"n-gram {path} is not a KenLM binary (no KenLM header: an ARPA file or another format); "
            f"convert it with KenLM's build_binary (scripts/generate_ngram.sh does both steps), or pass --skip_ngram"
        )
    return {"binary": path.read_bytes(), "scale_factor": float(section["scale_factor"])}


def _prefix_token_map(cfg: dict, n_classes: Optional[int]) -> dict:
    raw = cfg["rnnt"].get("prefix_token_map") or {}
    prefix_map = {}
    for tag, ids in raw.items():
        if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise HardwareCheckpointError(
                f"config key rnnt.prefix_token_map.{tag} must be a list of token ids"
            )
        out_of_range = [i for i in ids if i < 0 or (n_classes is not None and i >= n_classes - 1)]
        if out_of_range:
            raise HardwareCheckpointError(
                f"config key rnnt.prefix_token_map.{tag}: token ids {out_of_range} are not SentencePiece ids "
                f"(0..{'n_classes-2' if n_classes is None else n_classes - 2}); fix the map"
            )
        prefix_map[str(tag)] = [int(i) for i in ids]
    return prefix_map


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export a training checkpoint as a hardware checkpoint (*.hw.pt)."
    )
    parser.add_argument(
        "--ckpt", required=True, help="training checkpoint to export (its EMA weights are used)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML model config to export with (default: the config the checkpoint recorded; for checkpoints "
        f"that record none, {DEFAULT_CONFIG} in the repository)",
    )
    parser.add_argument(
        "--output_ckpt",
        default=None,
        help="where to write the hardware checkpoint (default: --ckpt with .hw.pt)",
    )
    parser.add_argument("--skip_ngram", action="store_true", help="embed no n-gram language model")
    parser.add_argument(
        "--override_ngram_path",
        default=None,
        help="KenLM binary to embed instead of the config's ngram.ngram_path",
    )
    parser.add_argument(
        "--skip_state_dict_check",
        action="store_true",
        help="accept weights that match no FPGA-supported variant (the file is then for software use only); "
        "the weights must still fit the config",
    )
    parser.add_argument(
        "--allow_changed_assets",
        action="store_true",
        help="embed the config's SentencePiece model and mel statistics even when their bytes differ from "
        "the files the training run recorded",
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    output = Path(args.output_ckpt) if args.output_ckpt else hw_path(args.ckpt)
    if output.resolve() == Path(args.ckpt).resolve():
        raise UserError(f"--output_ckpt {output} is the input --ckpt; choose another output path")
    config_arg = args.config
    if config_arg is None and recorded_config(read_checkpoint(args.ckpt, mmap=True)) is None:
        config_arg = REPO_ROOT / DEFAULT_CONFIG
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hw = create_hardware_ckpt(
            args.ckpt,
            config_arg,
            skip_ngram=args.skip_ngram,
            override_ngram_path=args.override_ngram_path,
            skip_state_dict_check=args.skip_state_dict_check,
            allow_changed_assets=args.allow_changed_assets,
        )
    save_hardware_ckpt(hw, output)
    for warning in caught:
        print(f"warning: {warning.message}")
    variant = fpga_variant(hw["state_dict"])
    target = f"FPGA variant '{variant}'" if variant else "software use only"
    binary = hw["ngram"]["binary"]
    ngram = f"{len(binary)} bytes, scale {hw['ngram']['scale_factor']}" if binary else "none"
    print(
        f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, layout {hw['version']}, {target}): "
        f"epoch {hw['epoch']}, step {hw['step']}, best WER {100 * hw['best_wer']:.3f}%, n-gram {ngram}"
    )


if __name__ == "__main__":
    run_cli(main)


def hardware_ckpt_with_weights(hw: Mapping, state_dict: Mapping[str, torch.Tensor], **fields: object) -> dict:
    """A copy of the hardware checkpoint dict ``hw`` with ``state_dict``'s weights and ``fields`` in place of its own.

    The weights keep ``hw``'s key order and dtypes; every other key (config,
    statistics, SentencePiece, n-gram, version) is ``hw``'s unless ``fields``
    replaces it (averaging passes ``epoch``, ``step`` and ``best_wer``).

    Raises:
        HardwareCheckpointError: ``state_dict`` lacks one of ``hw``'s weights, has
            one it lacks, or a shape differs; or ``fields`` names an unknown key.
    """
    own = hw["state_dict"]
    for key in own:
        if key not in state_dict:
            raise HardwareCheckpointError(
                f"the hardware checkpoint's weight '{key}' is not in the new weights; "
                "use a hardware checkpoint of the same model"
            )
        if tuple(state_dict[key].shape) != tuple(own[key].shape):
            raise HardwareCheckpointError(
                f"the hardware checkpoint's '{key}' has shape {list(own[key].shape)} but the new weights "
                f"have {list(state_dict[key].shape)}; use a hardware checkpoint of the same model"
            )
    extra = [key for key in state_dict if key not in own]
    if extra:
        raise HardwareCheckpointError(
            f"the hardware checkpoint has no weight '{extra[0]}' that the new weights have; "
            "use a hardware checkpoint of the same model"
        )
    unknown = [key for key in fields if key not in hw]
    if unknown:
        raise HardwareCheckpointError(
            f"'{unknown[0]}' is not a hardware checkpoint key; see docs/formats.md section 9"
        )
    result = dict(hw)
    result["state_dict"] = OrderedDict((key, _own_storage(state_dict[key].to(own[key].dtype))) for key in own)
    result.update(fields)
    return result
