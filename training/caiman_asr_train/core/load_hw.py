"""Read hardware checkpoints (``*.hw.pt``, docs/formats.md section 9) back into a ready-to-run model.

``load_hw_checkpoint`` needs nothing but the file: the weights, the inference
config, the mel statistics and the SentencePiece model are all inside it.

Version rule: the layouts this reader knows (``KNOWN_VERSIONS``: upstream
1.10-1.14, whose files have no ``raw_prefix_token_map`` and whose
``tokenizer.sentpiece_model`` names a path on the machine that wrote them, so
the embedded bytes are used instead; and ours, ``HW_CKPT_VERSION``) load; an
unknown older one loads with a one-line warning; a newer one is refused,
naming the version of caiman_asr_train to upgrade to.

``read_checkpoint`` is the one safe reader of torch files in the project
(training checkpoints re-export it from ``caiman_asr_train.export.checkpointer``):
``weights_only=True`` always, so a file carrying a code-running pickle is
refused before any of it runs.
"""

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import sentencepiece as spm
import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.core.export_schema import (
    FilterbankFeaturesSchema,
    FrameSplicingSchema,
    ModelSchema,
    TokenizerSchema,
    in_feats_mismatch,
)
from caiman_asr_train.core.model import RNNT, ConfigRNNT, TorchConfig
from caiman_asr_train.core.quantized import dequantize_checkpoint, is_quantized_checkpoint

PathLike = Union[str, Path]

# The layout this package writes. Bump it on every layout change the inference
# server must know about (docs/formats.md section 9); readers refuse newer minor versions.
HW_CKPT_VERSION = "1.15.0"
# Layouts read without a warning: the upstream releases and ours.
KNOWN_VERSIONS = ("1.10.0", "1.11.0", "1.12.0", "1.13.0", "1.14.0", HW_CKPT_VERSION)
# Upstream 1.10-1.14 files have only these keys.
HW_CKPT_UPSTREAM_KEYS = (
    "state_dict",
    "epoch",
    "step",
    "best_wer",
    "melmeans",
    "melvars",
    "melalpha",
    "sentpiece_model",
    "ngram",
    "version",
    "rnnt_config",
)
HW_CKPT_KEYS = HW_CKPT_UPSTREAM_KEYS + ("raw_prefix_token_map",)
# raw_prefix_token_map is required from this version on.
_PREFIX_MAP_SINCE = (1, 15)

_EXPORT_HINT = "re-export it with caiman_asr_train/export/hardware_ckpt.py"


@dataclass
class Checkpoint:
    """A loaded hardware checkpoint.

    Attributes:
        model: core ``RNNT`` built through ``ConfigRNNT`` with ``TorchConfig()``,
            in eval mode, on the requested device.
        data_config: what featurisation needs: ``filterbank_features`` (dict of
            ``FilterbankFeaturesSchema`` fields: seconds, Hz), ``frame_splicing``
            (dict), ``melmeans`` and ``melvars`` (float32 Tensor[n_filt]),
            ``melalpha`` (float) and ``labels`` (list).
        sentpiece_model_binary: the whole SentencePiece ``.model`` file.
        ngram: ``{"binary": bytes | None, "scale_factor": float | None}``.
        version: the file's layout version, e.g. "1.15.0".
        prefix_token_map: prefix tag -> token ids (empty for files before 1.15).
        rnnt_config: the inference config stored in the file.
        epoch, step: training progress when the weights were saved.
        best_wer: the lowest dev error rate seen in training (a fraction).
    """

    model: RNNT
    data_config: dict
    sentpiece_model_binary: bytes
    ngram: dict
    version: str
    prefix_token_map: dict
    rnnt_config: dict
    epoch: int
    step: int
    best_wer: float


def is_hardware_checkpoint(ckpt: Any) -> bool:
    """True for a hardware checkpoint's dict: it carries a key only hardware checkpoints have.

    ``rnnt_config`` and ``sentpiece_model`` never occur in a training checkpoint,
    so either one decides (a damaged hardware checkpoint is then reported by
    ``validate_hw_checkpoint``, naming what is missing, rather than as a
    training checkpoint without weights). The file name plays no part.
    """
    return isinstance(ckpt, Mapping) and ("rnnt_config" in ckpt or "sentpiece_model" in ckpt)


def read_checkpoint(path: PathLike, mmap: bool = True) -> dict:
    """Load a torch checkpoint file safely (``weights_only=True``) onto the CPU.

    With ``mmap`` the tensors stay in the file until touched, so reading a few
    entries of a multi-GB checkpoint costs little memory or time. Files in
    torch's legacy (non-zip) format are read without mmap.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, is not a
            dict, or holds pickled objects that safe loading refuses (such a
            payload is never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path (or the training --output_dir)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} refused: it holds a pickled {unsafe.group(1)} object, which could run "
                "code, and only tensors and plain types are loaded; use a checkpoint written by this "
                "toolkit from a source you trust"
            ) from None
        raise CheckpointError(_corrupt_message(path)) from None
    except Exception:
        # Unpickling damaged bytes fails in many ways (KeyError, EOFError,
        # RuntimeError from the zip reader, ...): all mean the file is corrupt.
        raise CheckpointError(_corrupt_message(path)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _corrupt_message(path: Path) -> str:
    return (
        f"checkpoint {path} is truncated or corrupt (not a readable torch file); "
        "use an earlier checkpoint or save it again"
    )


def load_hw_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Read, validate and rebuild the hardware checkpoint at ``path``.

    A weight-quantized ``*.q.pt`` (``core.quantized``) loads the same way, its
    weights dequantized to float32.

    The model's ``n_classes`` is the embedded SentencePiece vocabulary size + 1
    (blank last); it must agree with the rows of ``joint_net.2.weight``.

    Raises:
        CheckpointError: the file is unreadable, a key is missing or has the
            wrong type, the version is newer than this reader, or the weights
            do not fit the stored config.
    """
    hw = read_checkpoint(path, mmap=True)
    if is_quantized_checkpoint(hw):
        hw = dequantize_checkpoint(hw, str(path))
    rnnt_config = validate_hw_checkpoint(hw, str(path))
    model_cfg = rnnt_config["rnnt"]

    vocab_size = _sentencepiece_vocab_size(hw["sentpiece_model"], str(path))
    out_layer = hw["state_dict"].get("joint_net.2.weight")
    out_rows = out_layer.shape[0] if out_layer is not None else vocab_size + 1
    if out_rows != vocab_size + 1:
        raise CheckpointError(
            f"hardware checkpoint {path}: the embedded SentencePiece model has {vocab_size} pieces, so "
            f"joint_net.2.weight needs {vocab_size + 1} rows, found {out_rows}; {_EXPORT_HINT} with "
            "the tokenizer the model was trained with"
        )
    prefix_token_map = {key: list(ids) for key, ids in hw.get("raw_prefix_token_map", {}).items()}
    config = ConfigRNNT(
        n_classes=vocab_size + 1,
        lstm=TorchConfig(),
        prefix_token_map=prefix_token_map,
        **{key: model_cfg[key] for key in ModelSchema.model_fields},
    )
    model = RNNT(config)
    try:
        model.load_state_dict(hw["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"hardware checkpoint {path}: state_dict does not fit its rnnt_config ({detail[:300]}); {_EXPORT_HINT}"
        ) from None
    model.to(device).eval()

    data_config = {
        "filterbank_features": rnnt_config["input_val"]["filterbank_features"],
        "frame_splicing": rnnt_config["input_val"]["frame_splicing"],
        "melmeans": hw["melmeans"].to(torch.float32).clone(),
        "melvars": hw["melvars"].to(torch.float32).clone(),
        "melalpha": float(hw["melalpha"]),
        "labels": list(rnnt_config["tokenizer"]["labels"]),
    }
    ngram = hw["ngram"]
    return Checkpoint(
        model=model,
        data_config=data_config,
        sentpiece_model_binary=bytes(hw["sentpiece_model"]),
        ngram={
            "binary": ngram["binary"],
            "scale_factor": None if ngram["scale_factor"] is None else float(ngram["scale_factor"]),
        },
        version=hw["version"],
        prefix_token_map=prefix_token_map,
        rnnt_config=hw["rnnt_config"],
        epoch=int(hw["epoch"]),
        step=int(hw["step"]),
        best_wer=float(hw["best_wer"]),
    )


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.15.0"`` -> ``(1, 15, 0)``; a missing patch number reads as 0.

    Raises:
        ValueError: not of the form MAJOR.MINOR[.PATCH].
    """
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if not match:
        raise ValueError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def validate_hw_checkpoint(hw: Mapping, source: str = "hardware checkpoint") -> dict:
    """Check a hardware-checkpoint dict's keys, types and version; return its validated inference config.

    ``source`` names the file in error messages. The returned config holds
    validated ``input_val.filterbank_features``, ``input_val.frame_splicing``,
    ``rnnt`` and ``tokenizer`` dicts (keys other readers may have added are
    ignored, since nothing here uses them).

    Raises:
        CheckpointError: naming the key at fault.
    """
    if not isinstance(hw, Mapping):
        raise CheckpointError(f"{source}: holds a {type(hw).__name__}, not a hardware-checkpoint dict")
    version = hw.get("version")
    if not isinstance(version, str):
        raise CheckpointError(f"{source}: key 'version' is missing or not a str; {_EXPORT_HINT}")
    try:
        parsed = parse_version(version)
    except ValueError:
        raise CheckpointError(
            f"{source}: version {version!r} is not MAJOR.MINOR.PATCH; {_EXPORT_HINT}"
        ) from None
    if parsed > parse_version(HW_CKPT_VERSION):
        raise CheckpointError(
            f"{source}: layout version {version} is newer than this reader (caiman_asr_train {HW_CKPT_VERSION} "
            f"reads layouts up to {HW_CKPT_VERSION}); upgrade caiman_asr_train to {'.'.join(map(str, parsed))} "
            "or later to read it"
        )
    if parsed not in {parse_version(known) for known in KNOWN_VERSIONS}:
        warnings.warn(
            f"{source}: layout version {version} is older than the layouts this reader knows (upstream "
            f"1.10-1.14 and {HW_CKPT_VERSION}); reading it as they are read, check its results",
            stacklevel=2,
        )
    required = HW_CKPT_KEYS if parsed[:2] >= _PREFIX_MAP_SINCE else HW_CKPT_UPSTREAM_KEYS
    for key in required:
        if key not in hw:
            raise CheckpointError(f"{source}: key '{key}' is missing (layout {version}); {_EXPORT_HINT}")

    def expect(key: str, types: tuple, what: str) -> None:
        value = hw[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise CheckpointError(
                f"{source}: key '{key}' must be {what}, got {type(value).__name__}; {_EXPORT_HINT}"
            )

    expect("state_dict", (Mapping,), "a dict of tensors")
    for name, tensor in hw["state_dict"].items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise CheckpointError(
                f"{source}: state_dict entry {name!r} is not a named tensor; {_EXPORT_HINT}"
            )
    expect("epoch", (int,), "an int")
    expect("step", (int,), "an int")
    expect("best_wer", (int, float), "a float")
    expect("melmeans", (Tensor,), "a float32 tensor [n_filt]")
    expect("melvars", (Tensor,), "a float32 tensor [n_filt]")
    expect("melalpha", (int, float), "a float")
    expect("sentpiece_model", (bytes,), "the SentencePiece model's bytes")
    expect("ngram", (Mapping,), 'a dict {"binary", "scale_factor"}')
    expect("rnnt_config", (Mapping,), "the inference config dict")
    ngram = hw["ngram"]
    if set(ngram) != {"binary", "scale_factor"}:
        raise CheckpointError(
            f"{source}: key 'ngram' must hold exactly 'binary' and 'scale_factor', got {sorted(ngram)}; {_EXPORT_HINT}"
        )
    if not isinstance(ngram["binary"], (bytes, type(None))):
        raise CheckpointError(f"{source}: ngram.binary must be bytes or None; {_EXPORT_HINT}")
    if isinstance(ngram["scale_factor"], bool) or not isinstance(
        ngram["scale_factor"], (int, float, type(None))
    ):
        raise CheckpointError(f"{source}: ngram.scale_factor must be a float or None; {_EXPORT_HINT}")
    if "raw_prefix_token_map" in hw:
        _check_prefix_token_map(hw["raw_prefix_token_map"], source)

    rnnt_config = _validate_rnnt_config(hw["rnnt_config"], source)
    n_filt = rnnt_config["input_val"]["filterbank_features"]["n_filt"]
    mismatch = in_feats_mismatch(
        rnnt_config["rnnt"]["in_feats"], n_filt, rnnt_config["input_val"]["frame_splicing"]["frame_stacking"]
    )
    if mismatch:
        raise CheckpointError(
            f"{source}: {mismatch} in its rnnt_config; {_EXPORT_HINT} with a consistent config"
        )
    for key in ("melmeans", "melvars"):
        stats = hw[key]
        if not stats.is_floating_point() or tuple(stats.shape) != (n_filt,):
            raise CheckpointError(
                f"{source}: key '{key}' must be a float tensor of shape [{n_filt}] (n_filt), "
                f"got {stats.dtype} {list(stats.shape)}; {_EXPORT_HINT}"
            )
    return rnnt_config


def _check_prefix_token_map(value: Any, source: str) -> None:
    valid = isinstance(value, Mapping) and all(
        isinstance(tag, str)
        and isinstance(ids, (list, tuple))
        and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        for tag, ids in value.items()
    )
    if not valid:
        raise CheckpointError(
            f"{source}: key 'raw_prefix_token_map' must map str tags to lists of int token ids; {_EXPORT_HINT}"
        )


def _validate_rnnt_config(rnnt_config: Mapping, source: str) -> dict:
    sections = {
        ("input_val", "filterbank_features"): FilterbankFeaturesSchema,
        ("input_val", "frame_splicing"): FrameSplicingSchema,
        ("rnnt",): ModelSchema,
        ("tokenizer",): TokenizerSchema,
    }
    validated: dict = {"input_val": {}}
    for where, schema in sections.items():
        node: Any = rnnt_config
        for part in where:
            node = node.get(part) if isinstance(node, Mapping) else None
        name = "rnnt_config." + ".".join(where)
        if not isinstance(node, Mapping):
            raise CheckpointError(f"{source}: {name} is missing or not a dict; {_EXPORT_HINT}")
        value = _validate_section(schema, node, name, source)
        target = validated["input_val"] if where[0] == "input_val" else validated
        target[where[-1]] = value
    return validated


def _validate_section(schema: type[BaseModel], section: Mapping, name: str, source: str) -> dict:
    # Keep only the fields this reader uses: other 1.x writers may store more.
    known = {key: value for key, value in section.items() if key in schema.model_fields}
    try:
        return schema.model_validate(known).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise CheckpointError(f"{source}: {name}.{where}: {error['msg']}; {_EXPORT_HINT}") from None


def _sentencepiece_vocab_size(model: bytes, source: str) -> int:
    try:
        processor = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError:
        processor = None
    if not model or processor is None or processor.get_piece_size() == 0:
        raise CheckpointError(
            f"{source}: key 'sentpiece_model' is not a valid SentencePiece model; {_EXPORT_HINT}"
        )
    return processor.get_piece_size()
