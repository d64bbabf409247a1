"""Save, find and load training checkpoints (SPEC section 8).

Files in ``save_dir``:

    {model_name}_step{N}_checkpoint.pt   every save without is_best/is_last/filepath
    {model_name}_best_checkpoint.pt      is_best=True (EMA dev WER improved)
    {model_name}_last_checkpoint.pt      is_last=True (end of training)

Each is a plain dict of tensors and built-in types pickled with protocol 2, so
``torch.load(..., weights_only=True)`` reads it. Writes are atomic (temporary
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
from caiman_asr_train.core.load_hw import read_checkpoint
from caiman_asr_train.utils.atomic import atomic_torch_save

__all__ = ["Checkpointer", "LoadReport", "read_checkpoint", "to_plain"]

PathLike = Union[str, os.PathLike]


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


@dataclasses.dataclass
class LoadReport:
    """What a non-strict load did: keys copied, keys the module kept, keys ignored."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; missing {self.missing or 'none'}; "
            f"unexpected {self.unexpected or 'none'}; shape mismatch {self.mismatched or 'none'}"
        )


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
        **extra: Any,
    ) -> Optional[Path]:
        """Write a checkpoint atomically; return its path on rank 0 and None on other ranks.

        The file is ``filepath`` if given, else the best or last path, else the
        step path of ``step``. Keys: SPEC section 8 (epoch, step, best_wer
        [fraction], state_dict, ema_state_dict, optimizer, tokenizer_kw,
        logmel_norm_weight), ``config_path``, and ``extra`` (e.g. dev_wer,
        rng_state, data_state, config_text), all converted by ``to_plain``.
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
        reserved = {"epoch", "step", "best_wer", "state_dict", "ema_state_dict", "optimizer",
                    "tokenizer_kw", "logmel_norm_weight", "config_path"} & set(extra)
        if reserved:
            raise ValueError(f"extra keys {sorted(reserved)} would overwrite checkpoint keys")

        _barrier()
        written = None
        try:
            if _is_writer():
                checkpoint = {
                    "epoch": int(epoch),
                    "step": int(step),
                    "best_wer": float(best_wer),
                    "state_dict": _state_dict(model),
                    "ema_state_dict": _state_dict(ema_model),
                    "optimizer": to_plain(optimizer.state_dict()) if optimizer is not None else None,
                    "tokenizer_kw": to_plain(tokenizer_kw),
                    "logmel_norm_weight": float(logmel_norm_weight),
                    "config_path": None if config_path is None else os.fspath(config_path),
                    **to_plain(extra),
                }
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
            warnings.warn(f"skipping {path}: it has no integer 'step'; not a training checkpoint", stacklevel=3)
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
                raise CheckpointError(f"checkpoint {path}: key '{key}' is missing; it is not a training checkpoint")
            self.load_reports[key] = _load_weights(_unwrap(module), checkpoint[key], strict, f"{path} [{key}]")
        if optimizer is not None:
            state = checkpoint.get("optimizer")
            complete = all(not (r.missing or r.unexpected or r.mismatched) for r in self.load_reports.values())
            if state is None:
                warnings.warn(f"checkpoint {path} has no optimizer state; the optimizer starts afresh", stacklevel=2)
            elif not complete:
                warnings.warn(f"{path}: weights loaded partially, so the optimizer state is not loaded", stacklevel=2)
            else:
                try:
                    optimizer.load_state_dict(state)
                except (ValueError, KeyError) as exc:
                    raise CheckpointError(
                        f"checkpoint {path}: optimizer state does not fit this optimizer ({exc}); "
                        "use the same optimizer and parameter groups, or load with strict=False"
                    ) from None
        return checkpoint


def _load_weights(module: nn.Module, state_dict: Mapping, strict: bool, source: str) -> LoadReport:
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    report = LoadReport(
        loaded=[k for k in own if k in state_dict and k not in mismatched],
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
    )
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(
            f"checkpoint {source} does not fit the model ({report}); use the config it was trained "
            "with, or load with strict=False"
        )
    module.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    if missing or unexpected or mismatched:
        warnings.warn(f"partial load of {source}: {report}", stacklevel=3)
    return report
