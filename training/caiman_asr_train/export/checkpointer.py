"""Save, find and load training checkpoints (docs/formats.md section 8).

Files in ``save_dir``:

    {model_name}_step{N}_checkpoint.pt   every save without is_best/is_last/filepath
    {model_name}_best_checkpoint.pt      is_best=True (EMA dev WER improved)
    {model_name}_last_checkpoint.pt      is_last=True (end of training)

Each is a plain dict of tensors and built-in types pickled with protocol 2, so
``torch.load(..., weights_only=True)`` reads it. Besides the documented keys
(``TRAINING_CHECKPOINT_KEYS``) a checkpoint describes its own model:

    model_config   dict   ``dataclasses.asdict(ConfigRNNT)`` of the model (its shape)
    config         dict   the parsed YAML config of the run, paths absolute
    asset_sha256   dict   sha256 hex of the files a hardware checkpoint embeds
                          (``sentpiece_model``, ``melmeans.pt``, ``melvars.pt``)

so validation and export need no YAML, and an export can tell when the
tokenizer or statistics on disk are no longer the ones the model was trained
with. Checkpoints written before these keys existed still load; they need an
explicit config. Writes are atomic (temporary
file, fsync, rename): a crash at any moment leaves either the previous file or
the complete new one under the final name. Under ``torch.distributed`` only
rank 0 touches the disk; every rank meets at barriers around a save.
"""

import dataclasses
import enum
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.core.features import STATS_FILES
from caiman_asr_train.core.load_hw import is_hardware_checkpoint, read_checkpoint
from caiman_asr_train.utils.atomic import atomic_torch_save
from caiman_asr_train.utils.digest import sha256_file

__all__ = [
    "TRAINING_CHECKPOINT_KEYS",
    "Checkpointer",
    "LoadReport",
    "asset_files",
    "asset_sha256",
    "changed_assets",
    "check_training_checkpoint",
    "first_non_finite",
    "is_training_checkpoint",
    "load_weights",
    "read_checkpoint",
    "recorded_config",
    "to_plain",
    "training_checkpoint",
]

PathLike = Union[str, os.PathLike]

# docs/formats.md section 8: every training checkpoint has these keys (more may follow).
TRAINING_CHECKPOINT_KEYS = (
    "epoch",
    "step",
    "best_wer",
    "state_dict",
    "ema_state_dict",
    "optimizer",
    "tokenizer_kw",
    "logmel_norm_weight",
)
# What a checkpoint records about itself (module docstring).
SELF_DESCRIPTION_KEYS = ("config_path", "model_config", "config", "asset_sha256")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_writer() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def to_plain(obj: Any) -> Any:
    """``obj`` with every value made loadable by ``torch.load(weights_only=True)``.

    Path -> str, Enum -> its value, NumPy scalar -> int/float/bool, NumPy array
    -> Tensor, dataclass -> dict, set -> sorted list; dicts, lists and tuples are
    converted recursively (OrderedDict stays an OrderedDict). Tensors are kept.
    """
    # Exact types only: subclasses such as IntEnum or np.float64 are converted below.
    if obj is None or isinstance(obj, torch.Tensor) or type(obj) in (bool, int, float, str, bytes):
        return obj
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj))
    if isinstance(obj, OrderedDict):
        return OrderedDict((to_plain(k), to_plain(v)) for k, v in obj.items())
    if isinstance(obj, Mapping):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_plain(v) for v in obj)
    for base in (bool, int, float, str, bytes):
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(
        f"cannot store a {type(obj).__name__} in a checkpoint: only tensors and plain Python types load "
        "with weights_only=True"
    )


def _state_dict(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The module's weights as a fresh OrderedDict (no ``_metadata`` attribute to pickle)."""
    return OrderedDict(_unwrap(module).state_dict())


def check_training_checkpoint(ckpt: Any, source: str) -> None:
    """Raise ``CheckpointError`` naming what makes ``ckpt`` not a training checkpoint.

    ``source`` names the file in the message ("checkpoint results/x.pt").
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if is_hardware_checkpoint(ckpt):
        raise CheckpointError(
            f"{source} is a hardware checkpoint (*.hw.pt), not a training checkpoint saved by train.py"
        )
    for key in TRAINING_CHECKPOINT_KEYS:
        if key not in ckpt:
            raise CheckpointError(
                f"{source}: key '{key}' is missing; use a training checkpoint saved by train.py"
            )
    for key in ("state_dict", "ema_state_dict"):
        weights = ckpt[key]
        if not isinstance(weights, Mapping) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise CheckpointError(
                f"{source}: '{key}' is not a dict of tensors; use a training checkpoint saved by train.py"
            )


def is_training_checkpoint(ckpt: Any) -> bool:
    """True for a training checkpoint's dict: every docs/formats.md section 8 key, weights as dicts of tensors."""
    try:
        check_training_checkpoint(ckpt, "checkpoint")
    except CheckpointError:
        return False
    return True


def recorded_config(ckpt: Mapping) -> Optional[dict]:
    """The YAML config the run recorded in the checkpoint (paths absolute); None for older checkpoints."""
    cfg = ckpt.get("config")
    return cfg if isinstance(cfg, dict) else None


def asset_files(cfg: Mapping) -> dict[str, Path]:
    """The files whose bytes a hardware checkpoint built from ``cfg`` embeds: name -> path.

    Names: ``sentpiece_model`` and the mel statistics files (``STATS_FILES``)
    of ``input_val.filterbank_features.stats_path`` (when set).
    """
    files = {"sentpiece_model": Path(cfg["tokenizer"]["sentpiece_model"])}
    stats_path = cfg["input_val"]["filterbank_features"].get("stats_path")
    if stats_path:
        files.update((name, Path(stats_path) / name) for name in STATS_FILES)
    return files


def asset_sha256(cfg: Mapping) -> dict[str, str]:
    """sha256 hex of each existing file of ``asset_files(cfg)``: name -> digest."""
    return {name: sha256_file(path) for name, path in asset_files(cfg).items() if path.is_file()}


def changed_assets(ckpt: Mapping, cfg: Mapping) -> list[tuple[str, Path]]:
    """``(name, path)`` of each embedded file of ``cfg`` whose bytes differ from the hash ``ckpt`` recorded.

    A file the checkpoint recorded no hash for (older checkpoints record none)
    is not compared, nor is a missing file (whose reader reports it).
    """
    recorded = ckpt.get("asset_sha256") or {}
    return [
        (name, path)
        for name, path in asset_files(cfg).items()
        if name in recorded and path.is_file() and sha256_file(path) != recorded[name]
    ]


def first_non_finite(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or Inf, else None."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


@dataclasses.dataclass
class LoadReport:
    """What a non-strict load did: keys copied, keys the module kept, keys ignored."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> str:
        """``str(self)`` plus the shapes of the first two mismatched tensors (file vs model)."""
        shapes = "".join(
            f"; {k} is {list(state_dict[k].shape)} in the file, {list(own[k].shape)} in the model"
            for k in self.mismatched[:2]
        )
        return f"{self}{shapes}"

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; missing {_first(self.missing)}; "
            f"unexpected {_first(self.unexpected)}; shape mismatch {_first(self.mismatched)}"
        )


def _first(names: list[str], shown: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


class Checkpointer:
    """Writes, retains, finds and loads the training checkpoints of one run.

    Args:
        save_dir: directory of the checkpoints (created on first save).
        model_name: file name prefix.
        keep_last_n: keep only the newest ``keep_last_n`` step files (None keeps
            all). Best and last checkpoints are never deleted.
    """

    def __init__(self, save_dir: PathLike, model_name: str = "RNN-T", keep_last_n: Optional[int] = None):
        if keep_last_n is not None and keep_last_n < 1:
            raise ValueError(f"keep_last_n must be at least 1 or None, got {keep_last_n}")
        self.save_dir = Path(save_dir)
        self.model_name = model_name
        self.keep_last_n = keep_last_n
        self._step_re = re.compile(rf"{re.escape(model_name)}_step(\d+)_checkpoint\.pt")
        self.load_reports: dict[str, LoadReport] = {}

    def step_path(self, step: int) -> Path:
        return self.save_dir / f"{self.model_name}_step{step}_checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.save_dir / f"{self.model_name}_best_checkpoint.pt"

    @property
    def last_path(self) -> Path:
        return self.save_dir / f"{self.model_name}_last_checkpoint.pt"

    def step_of(self, name: str) -> Optional[int]:
        """The step of a step-checkpoint file name (``RNN-T_step200_checkpoint.pt`` -> 200), else None."""
        match = self._step_re.fullmatch(name)
        return int(match.group(1)) if match else None

    def step_files(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every step checkpoint in ``save_dir``, oldest first."""
        if not self.save_dir.is_dir():
            return []
        found = []
        for path in self.save_dir.iterdir():
            step = self.step_of(path.name)
            if step is not None:
                found.append((step, path))
        return sorted(found)

    def save(
        self,
        model: nn.Module,
        ema_model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        epoch: int,
        step: int,
        best_wer: float,
        tokenizer_kw: dict,
        logmel_norm_weight: float,
        config_path: Optional[PathLike],
        is_best: bool = False,
        is_last: bool = False,
        filepath: Optional[PathLike] = None,
        config: Optional[Mapping] = None,
        asset_sha256: Optional[Mapping[str, str]] = None,
        **extra: Any,
    ) -> Optional[Path]:
        """Write a checkpoint atomically; return its path on rank 0 and None on other ranks.

        The file is ``filepath`` if given, else the best or last path, else the
        step path of ``step``. Its dict is ``training_checkpoint(...)``'s.
        Models may be DDP-wrapped. Every rank must call this.
        """
        if sum([is_best, is_last, filepath is not None]) > 1:
            raise ValueError("give at most one of is_best, is_last and filepath")
        if filepath is not None:
            path = Path(filepath)
        elif is_best:
            path = self.best_path
        elif is_last:
            path = self.last_path
        else:
            path = self.step_path(step)

        _barrier()
        written = None
        try:
            if _is_writer():
                checkpoint = training_checkpoint(
                    model,
                    ema_model,
                    optimizer,
                    epoch=epoch,
                    step=step,
                    best_wer=best_wer,
                    tokenizer_kw=tokenizer_kw,
                    logmel_norm_weight=logmel_norm_weight,
                    config_path=config_path,
                    config=config,
                    asset_sha256=asset_sha256,
                    **extra,
                )
                atomic_torch_save(checkpoint, path)
                written = path
                # Only now is the new file in place, so deleting old ones loses nothing.
                if self.keep_last_n is not None:
                    self._prune()
        finally:
            _barrier()
        return written

    def _prune(self) -> None:
        steps = self.step_files()
        for _, old in steps[: max(0, len(steps) - self.keep_last_n)]:
            old.unlink(missing_ok=True)

    def last_checkpoint(self) -> Optional[Path]:
        """The newest readable step or last checkpoint, by training step; None if there is none.

        A file that fails the check (truncated or corrupt, e.g. a copy cut short)
        is skipped with a warning and the next newest is tried. The check opens
        the file with mmap and unpickles its small index, without reading the
        tensors, so it is cheap even for multi-GB checkpoints.
        """
        last_step = self._readable_step(self.last_path) if self.last_path.is_file() else None
        for step, path in reversed(self.step_files()):
            if last_step is not None and last_step >= step:
                break
            if self._readable_step(path) is not None:
                return path
        return self.last_path if last_step is not None else None

    def _readable_step(self, path: Path) -> Optional[int]:
        try:
            step = read_checkpoint(path, mmap=True).get("step")
        except CheckpointError as exc:
            warnings.warn(f"skipping {path}: {exc}", stacklevel=3)
            return None
        if isinstance(step, bool) or not isinstance(step, int):
            warnings.warn(
                f"skipping {path}: it has no integer 'step'; not a training checkpoint", stacklevel=3
            )
            return None
        return step

    def load(
        self,
        path: PathLike,
        model: nn.Module,
        ema_model: Optional[nn.Module] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        strict: bool = True,
    ) -> dict:
        """Load a checkpoint into ``model`` (and ``ema_model``, ``optimizer``); return the checkpoint dict.

        Models may be DDP-wrapped. ``strict`` requires the weights to match the
        model exactly. With ``strict=False`` matching tensors are copied and the
        rest reported (loaded, missing, unexpected, shape mismatch) as a warning
        and in ``self.load_reports``; the optimizer state is then loaded only
        when every weight matched.

        Raises:
            CheckpointError: unreadable file, missing weights key, or (strict)
                weights that do not fit the model.
        """
        checkpoint = read_checkpoint(path, mmap=True)
        self.load_reports = {}
        targets = [("state_dict", model)] + ([("ema_state_dict", ema_model)] if ema_model is not None else [])
        for key, module in targets:
            if not isinstance(checkpoint.get(key), Mapping):
                raise CheckpointError(
                    f"checkpoint {path}: key '{key}' is missing; it is not a training checkpoint"
                )
            self.load_reports[key] = load_weights(
                module, checkpoint[key], strict=strict, source=f"{path} [{key}]"
            )
        if optimizer is not None:
            state = checkpoint.get("optimizer")
            complete = all(report.complete for report in self.load_reports.values())
            if state is None:
                warnings.warn(
                    f"checkpoint {path} has no optimizer state; the optimizer starts afresh", stacklevel=2
                )
            elif not complete:
                warnings.warn(
                    f"{path}: weights loaded partially, so the optimizer state is not loaded", stacklevel=2
                )
            else:
                try:
                    optimizer.load_state_dict(state)
                except (ValueError, KeyError) as exc:
                    raise CheckpointError(
                        f"checkpoint {path}: optimizer state does not fit this optimizer ({exc}); "
                        "use the same optimizer and parameter groups, or load with strict=False"
                    ) from None
        return checkpoint


def training_checkpoint(
    model: nn.Module,
    ema_model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    *,
    epoch: int,
    step: int,
    best_wer: float,
    tokenizer_kw: Mapping,
    logmel_norm_weight: float,
    config_path: Optional[PathLike] = None,
    config: Optional[Mapping] = None,
    asset_sha256: Optional[Mapping[str, str]] = None,
    **extra: Any,
) -> dict:
    """The training-checkpoint dict, the one place its layout is written.

    Keys: docs/formats.md section 8 (epoch, step, best_wer [fraction], state_dict,
    ema_state_dict, optimizer, tokenizer_kw, logmel_norm_weight); the
    self-description of the module docstring (``model_config`` from the model's
    ``ConfigRNNT`` when it has one, ``config``, ``asset_sha256``,
    ``config_path``); and ``extra`` (e.g. dev_wer, rng_state, data_state), all
    converted by ``to_plain``. Models may be DDP-wrapped.
    """
    reserved = (set(TRAINING_CHECKPOINT_KEYS) | set(SELF_DESCRIPTION_KEYS)) & set(extra)
    if reserved:
        raise ValueError(f"extra keys {sorted(reserved)} would overwrite checkpoint keys")
    model_config = getattr(_unwrap(model), "config", None)
    return {
        "epoch": int(epoch),
        "step": int(step),
        "best_wer": float(best_wer),
        "state_dict": _state_dict(model),
        "ema_state_dict": _state_dict(ema_model),
        "optimizer": to_plain(optimizer.state_dict()) if optimizer is not None else None,
        "tokenizer_kw": to_plain(tokenizer_kw),
        "logmel_norm_weight": float(logmel_norm_weight),
        "config_path": None if config_path is None else os.fspath(config_path),
        "model_config": to_plain(model_config) if dataclasses.is_dataclass(model_config) else None,
        "config": None if config is None else to_plain(config),
        "asset_sha256": None if asset_sha256 is None else dict(asset_sha256),
        **to_plain(extra),
    }


def weights_report(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """How ``state_dict`` fits a model whose own weights are ``own`` (names and shapes; values unused)."""
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    return LoadReport(
        loaded=[k for k in own if k in state_dict and k not in mismatched],
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
        mismatched=mismatched,
    )


def load_weights(
    module: nn.Module,
    state_dict: Mapping,
    *,
    strict: bool = True,
    source: str = "checkpoint",
    hint: str = "use the config the checkpoint was trained with, or load with strict=False",
) -> LoadReport:
    """Copy ``state_dict`` into ``module`` (DDP-wrapped or not) and report what matched.

    ``strict`` refuses any missing, unexpected or differently shaped tensor with
    one line naming the first few (``source`` names the file, ``hint`` says
    what to do). Otherwise the
    matching tensors are copied and a warning gives the report.

    Raises:
        CheckpointError: (strict) the weights do not fit the module.
    """
    module = _unwrap(module)
    own = module.state_dict()
    report = weights_report(own, state_dict)
    if strict and not report.complete:
        raise CheckpointError(f"{source} does not fit the model ({report.describe(own, state_dict)}); {hint}")
    module.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    if not report.complete:
        warnings.warn(f"partial load of {source}: {report}", stacklevel=3)
    return report
