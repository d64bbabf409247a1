"""Average the weights of several training checkpoints of one run.

Averaging the best few checkpoints of a run usually lowers WER a little further
than EMA alone. From the repository root::

    # the 3 checkpoints with the lowest dev WER, inverse-WER weighted
    python -m caiman_asr_train.export.checkpoint_averaging --checkpoint_dir results \\
        --top_n 3 --output_path results/avg.pt

    # the newest 3 step checkpoints, straight into a hardware checkpoint
    python -m caiman_asr_train.export.checkpoint_averaging --checkpoint_dir results \\
        --last_n 3 --output_hw results/avg.hw.pt --model_config training/configs/demo.yaml \\
        --skip_state_dict_check

Selection. ``--ckpts A B ...`` averages exactly those files. ``--checkpoint_dir
D`` looks at every ``*.pt``/``*.ckpt`` file in D and excludes hardware
checkpoints (``*.hw.pt``, or a dict with ``rnnt_config`` and
``sentpiece_model``), ``last`` files (the end-of-training state, which the step
checkpoints already cover), earlier averaging outputs (they carry an
``averaging`` key), and a ``best`` file whose step has its own step checkpoint
(the same weights twice would count double); then ``--top_n N`` keeps the N
lowest dev WERs (ties: the newer step first), ``--last_n N`` the N highest
steps and ``--steps S1 S2 ...`` those steps. It prints every file with what it
decided and why.

Dev WER of a checkpoint, in this order: its ``dev_wer`` key (the WER measured at
its own step); for a ``best`` file its ``best_wer`` (the best file is written
when that WER is measured, so it is its own); a NeMo-style ``val_wer=0.0652`` in
the file name. Nothing else: a step checkpoint's ``best_wer`` is the run's best
*so far*, usually measured at an earlier step, so ranking or weighting by it
would credit a checkpoint with another one's score.

Weights. ``--weights w1 w2 ...`` (normalised to sum 1). Otherwise inverse-WER
``1 / (WER + wer_eps)``, normalised, when every input has a dev WER, and equal
weights when any lacks one (or with ``--equal_weights``). ``wer_eps`` (default
0.01, one WER point) keeps a WER of 0 finite: a perfect score then weighs at
most ``(max WER + 0.01) / 0.01`` times the worst input, and WERs within a
fraction of a point of each other get nearly equal weights.

Averaging. ``state_dict`` and, when every input has one, ``ema_state_dict`` are
averaged key by key in float64 and cast back to the first input's dtype. Inputs
with weight 0 are skipped (a NaN in them cannot leak in). Integer and bool
tensors (step counters, indices) are not averaged: when the inputs disagree the
value comes from the most-weighted input (ties: the highest step, then the later
input), with a note. Every input must have the same keys, shapes and dtypes.
The inputs are memory-mapped (``weights_only``) and read one tensor at a time;
each tensor's pages are handed back to the kernel as soon as it has been added,
so resident memory is the output plus one tensor, whatever the number of inputs.

Outputs (written atomically). ``--output_path``: a training checkpoint (SPEC
section 8): averaged ``state_dict`` and ``ema_state_dict`` (the averaged raw
weights again when some input has no EMA), ``optimizer`` None, ``epoch``,
``step`` and ``best_wer`` of the newest input, ``tokenizer_kw`` of the first,
``logmel_norm_weight`` (all inputs must agree), the newest input's ``config_path``
and ``config_text`` when present, and ``averaging``: the inputs,
their steps, WERs, WER sources and weights. It has no ``dev_wer``: nobody has
measured the average yet. ``train.py --fine_tune`` and ``val.py`` read it like
any checkpoint. ``--output_hw`` with ``--model_config``: a hardware checkpoint
made from it by ``create_hardware_ckpt``. ``--output_hw`` with ``--input_hw``: a
copy of that hardware checkpoint with the averaged EMA weights (and the newest
input's epoch, step and best_wer) in place of its own.
"""

import argparse
import contextlib
import ctypes
import math
import mmap
import os
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm import tqdm

from caiman_asr_train.core.errors import CheckpointError, HardwareCheckpointError, UserError
from caiman_asr_train.core.load_hw import validate_hw_checkpoint
from caiman_asr_train.export.checkpointer import read_checkpoint
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.atomic import atomic_torch_save
from caiman_asr_train.utils.cli import run_cli

__all__ = [
    "WER_EPS",
    "CheckpointInfo",
    "average_checkpoints",
    "averaged_hardware_ckpt",
    "inspect_checkpoint",
    "resolve_weights",
    "select_checkpoints",
]

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

# Added to every WER (a fraction) before inverting it, so that WER 0 gets a finite weight.
WER_EPS = 0.01
# The extra key that records how an averaged checkpoint was made.
AVERAGING_KEY = "averaging"
WEIGHT_ENTRIES = ("state_dict", "ema_state_dict")
TRAINING_KEYS = ("epoch", "step", "best_wer", "tokenizer_kw", "logmel_norm_weight")
CHECKPOINT_SUFFIXES = (".pt", ".ckpt")
HW_SUFFIX = ".hw.pt"
# Elements per accumulation chunk: the float64 accumulator and conversion buffer (1 MiB each) stay in cache.
_CHUNK = 1 << 17
# Released input ranges are rounded out to the kernel's default fault-around window (64 KiB).
_RELEASE_ALIGN = 1 << 16

_STEP_NAME = re.compile(r"(?:_step(\d+)_checkpoint\.pt$|(?:^|[-_])step=(\d+))")
_NAME_WER = re.compile(r"(?:^|[-_])val_wer=(\d*\.?\d+(?:[eE][-+]?\d+)?)")
_LAST_NAME = re.compile(r"(?:^|[-_.])last(?:[-_.]|$)")
_BEST_NAME = re.compile(r"(?:^|[-_.])best(?:[-_.]|$)")


@dataclass(frozen=True)
class CheckpointInfo:
    """What selection and weighting know about one checkpoint file.

    Attributes:
        path: the file.
        step: optimizer steps (the ``step`` key, else from the file name), None if unknown.
        wer: dev WER as a fraction (0.0652), None if the checkpoint does not record its own.
        wer_source: where ``wer`` came from, or why there is none.
        is_best: a ``best`` file (a copy of the weights when the dev WER last improved).
    """

    path: Path
    step: Optional[int]
    wer: Optional[float]
    wer_source: str
    is_best: bool = False

    def summary(self) -> str:
        """``(step N, WER x.xxx%: where the WER came from)``."""
        step = "step ?" if self.step is None else f"step {self.step}"
        wer = "WER unknown" if self.wer is None else f"WER {100 * self.wer:.3f}%"
        return f"({step}, {wer}: {self.wer_source})"


def inspect_checkpoint(path: PathLike, ckpt: Optional[Mapping] = None) -> CheckpointInfo:
    """Read the step and own dev WER of a training checkpoint (module docstring: "Dev WER").

    ``ckpt`` is the already loaded dict, if any; otherwise the file is memory-mapped,
    which reads only its small index.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, mmap=True) if ckpt is None else ckpt
    is_best = bool(_BEST_NAME.search(_stem(path)))
    step = ckpt.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        step = _step_from_name(path)
    wer, source = _as_wer(ckpt.get("dev_wer")), "dev_wer stored in the checkpoint"
    if wer is None and is_best:
        wer, source = _as_wer(ckpt.get("best_wer")), "best_wer of a best checkpoint, saved when it was measured"
    match = _NAME_WER.search(path.name)
    if wer is None and match:
        wer, source = float(match.group(1)), "val_wer in the file name"
    if wer is None:
        source = "no dev_wer in it and no val_wer= in its name (its best_wer is the run's best so far, not its own)"
    return CheckpointInfo(path=path, step=step, wer=wer, wer_source=source, is_best=is_best)


def select_checkpoints(
    checkpoint_dir: PathLike,
    *,
    top_n: Optional[int] = None,
    last_n: Optional[int] = None,
    steps: Optional[Sequence[int]] = None,
    log: Log = print,
) -> list[CheckpointInfo]:
    """Choose checkpoints in ``checkpoint_dir`` by lowest dev WER, newest steps, or given steps.

    Give exactly one of ``top_n`` (returned best WER first), ``last_n`` or
    ``steps`` (returned oldest first). Exclusions are in the module docstring;
    ``log`` gets one line per file saying what was decided and why.

    Raises:
        UserError: bad arguments, a missing directory, or too few eligible checkpoints.
    """
    if sum(x is not None for x in (top_n, last_n, steps)) != 1:
        raise UserError("give exactly one of --top_n, --last_n and --steps with --checkpoint_dir")
    count = top_n if top_n is not None else last_n
    if count is not None and count < 1:
        raise UserError(f"--{'top_n' if top_n is not None else 'last_n'} must be at least 1, got {count}")
    if steps is not None and not steps:
        raise UserError("--steps needs at least one step")
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise UserError(f"--checkpoint_dir {directory} is not a directory; give the training --output_dir")

    candidates, excluded = _scan(directory)
    step_files = [c for c in candidates if not c.is_best]
    if top_n is not None:
        rated = sorted((c for c in candidates if c.wer is not None), key=lambda c: (c.wer, -(c.step or 0)))
        for c in candidates:
            if c.wer is None:
                excluded.append((c.path, f"no dev WER to rank by: {c.wer_source}"))
        if len(rated) < top_n:
            raise UserError(
                f"--top_n {top_n}: only {len(rated)} checkpoint(s) in {directory} record a dev WER; "
                f"lower --top_n, or use --last_n or --steps"
            )
        chosen = rated[:top_n]
        why = {c.path: f"rank {i + 1} by dev WER" for i, c in enumerate(chosen)}
        for i, c in enumerate(rated[top_n:], start=top_n + 1):
            excluded.append((c.path, f"rank {i} by dev WER ({100 * c.wer:.3f}%), not in the top {top_n}"))
    elif last_n is not None:
        dated = sorted((c for c in step_files if c.step is not None), key=lambda c: c.step)
        if len(dated) < last_n:
            raise UserError(
                f"--last_n {last_n}: only {len(dated)} step checkpoint(s) in {directory}; lower --last_n"
            )
        chosen = dated[-last_n:]
        why = {c.path: f"one of the newest {last_n} steps" for c in chosen}
        excluded += [(c.path, f"older than the newest {last_n} steps") for c in dated[:-last_n]]
        excluded += [(c.path, "not a step checkpoint") for c in candidates if c.is_best]
    else:
        chosen = []
        for step in sorted(set(steps)):
            matches = [c for c in step_files if c.step == step]
            if not matches:
                have = sorted(c.step for c in step_files if c.step is not None)
                raise UserError(
                    f"--steps: no step checkpoint for step {step} in {directory} "
                    f"(steps found: {', '.join(map(str, have)) or 'none'})"
                )
            if len(matches) > 1:
                raise UserError(
                    f"--steps: step {step} matches {', '.join(c.path.name for c in matches)} in {directory}; "
                    "pass the one you mean with --ckpts"
                )
            chosen.append(matches[0])
        why = {c.path: "step asked for" for c in chosen}
        excluded += [(c.path, "step not asked for") for c in candidates if c not in chosen]

    log(f"checkpoints in {directory}:")
    for c in chosen:
        log(f"  chosen    {c.path.name} {c.summary()}: {why[c.path]}")
    for path, reason in sorted(excluded, key=lambda item: item[0].name):
        log(f"  excluded  {path.name}: {reason}")
    return chosen


def resolve_weights(
    wers: Sequence[Optional[float]],
    weights: Optional[Sequence[float]] = None,
    *,
    equal: bool = False,
    wer_eps: float = WER_EPS,
) -> tuple[list[float], str]:
    """Normalised averaging weights and how they were chosen ("custom", "inverse_wer" or "equal").

    Args:
        wers: each input's dev WER (a fraction) or None.
        weights: explicit weights, one per input, >= 0 with a positive sum.
        equal: equal weights even when every input has a WER.
        wer_eps: added to each WER before inverting (> 0).

    Raises:
        UserError: wrong number of weights, a negative or non-finite weight, a zero sum, or wer_eps <= 0.
    """
    n = len(wers)
    if weights is not None:
        if equal:
            raise UserError("give --weights or --equal_weights, not both")
        if len(weights) != n:
            raise UserError(f"--weights: got {len(weights)} weight(s) for {n} checkpoint(s); give one per checkpoint")
        for w in weights:
            if not math.isfinite(w) or w < 0:
                raise UserError(f"--weights: {w} is not a finite number >= 0; give non-negative weights")
        total = math.fsum(weights)
        if total <= 0:
            raise UserError("--weights: the weights sum to 0; give at least one positive weight")
        return [w / total for w in weights], "custom"
    if not wer_eps > 0 or not math.isfinite(wer_eps):
        raise UserError(f"--wer_eps must be a positive number, got {wer_eps}")
    if equal or any(wer is None for wer in wers):
        return [1.0 / n] * n, "equal"
    inverse = [1.0 / (wer + wer_eps) for wer in wers]
    total = math.fsum(inverse)
    return [w / total for w in inverse], "inverse_wer"


def average_checkpoints(
    paths: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    equal_weights: bool = False,
    wer_eps: float = WER_EPS,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """Average training checkpoints into a new training checkpoint dict (module docstring).

    Args:
        paths: the training checkpoints, each at most once.
        weights: explicit weights (see ``resolve_weights``); default inverse-WER or equal.
        equal_weights: equal weights even when every input records a dev WER.
        wer_eps: the inverse-WER offset.
        progress: show a tqdm bar over the weight bytes.
        log: receives one line per input (step, WER, weight) and notes.

    Returns:
        A SPEC section 8 checkpoint dict with an extra ``averaging`` key.

    Raises:
        CheckpointError: an unreadable input, a hardware checkpoint, a missing
            key, or inputs whose keys, shapes, dtypes or ``logmel_norm_weight`` differ.
        UserError: no inputs, a repeated input, or bad weights.
    """
    if not paths:
        raise UserError("no checkpoints to average; give --ckpts or --checkpoint_dir")
    inputs = _open_inputs([Path(p) for p in paths])
    infos = [inspect_checkpoint(x.path, x.ckpt) for x in inputs]
    resolved, weighting = resolve_weights([i.wer for i in infos], weights, equal=equal_weights, wer_eps=wer_eps)
    entries = _check_compatible(inputs)
    logmel_norm_weight = _common_logmel_norm_weight(inputs)
    _warn_if_tokenizers_differ(inputs, log)

    how = {
        "custom": "--weights, normalised",
        "inverse_wer": f"inverse-WER, 1 / (WER + {wer_eps:g}), normalised",
        "equal": "equal" + ("" if equal_weights else ": not every input records its dev WER"),
    }[weighting]
    log(f"averaging {len(inputs)} checkpoint(s), weights {how}; {' and '.join(entries)}:")
    for i, (info, weight) in enumerate(zip(infos, resolved), start=1):
        log(f"  [{i}/{len(inputs)}] weight {weight:.4f}  {info.path} {info.summary()}")
    if "ema_state_dict" not in entries:
        log("  note: not every input has ema_state_dict; the output's EMA weights are the averaged raw weights")

    newest = max(range(len(inputs)), key=lambda i: (infos[i].step if infos[i].step is not None else -1, i))
    keeper = max(range(len(inputs)), key=lambda i: (resolved[i], infos[i].step if infos[i].step is not None else -1, i))
    total = sum(_weight_bytes(inputs[0].ckpt[entry]) for entry in entries) * len(inputs)
    averaged = {}
    with _one_thread(), tqdm(total=total, unit="B", unit_scale=True, desc="averaging", disable=not progress) as bar:
        for entry in entries:
            averaged[entry] = _average_entry(inputs, entry, resolved, keeper, bar, log)

    newest_ckpt = inputs[newest].ckpt
    result = {
        "epoch": int(newest_ckpt["epoch"]),
        "step": int(newest_ckpt["step"]),
        "best_wer": float(newest_ckpt["best_wer"]),
        "state_dict": averaged["state_dict"],
        # Without EMA everywhere, the averaged raw weights are the smoothed model (same tensors, stored once).
        "ema_state_dict": averaged.get("ema_state_dict", averaged["state_dict"]),
        "optimizer": None,
        "tokenizer_kw": inputs[0].ckpt["tokenizer_kw"],
        "logmel_norm_weight": logmel_norm_weight,
        AVERAGING_KEY: {
            "inputs": [str(i.path) for i in infos],
            "steps": [i.step for i in infos],
            "wers": [i.wer for i in infos],
            "wer_sources": [i.wer_source for i in infos],
            "weights": resolved,
            "weighting": weighting,
            "wer_eps": wer_eps,
            "ema_averaged": "ema_state_dict" in entries,
        },
    }
    for key in ("config_path", "config_text"):  # which config trained the run, as train.py records it
        if key in newest_ckpt:
            result[key] = newest_ckpt[key]
    return result


def averaged_hardware_ckpt(averaged: Mapping, input_hw: PathLike) -> dict:
    """A copy of the hardware checkpoint ``input_hw`` carrying ``averaged``'s EMA weights.

    The weights keep the hardware checkpoint's key order and dtypes; ``epoch``,
    ``step`` and ``best_wer`` come from ``averaged``, everything else (config,
    statistics, SentencePiece, n-gram, version) from ``input_hw``.

    Raises:
        HardwareCheckpointError: ``logmel_norm_weight`` is not 1.0, or the keys or shapes differ.
        CheckpointError: ``input_hw`` is unreadable or not a hardware checkpoint.
    """
    input_hw = Path(input_hw)
    hw = read_checkpoint(input_hw, mmap=True)
    validate_hw_checkpoint(hw, f"--input_hw {input_hw}")
    _check_hw_ready(averaged)
    own, new = hw["state_dict"], averaged["ema_state_dict"]
    for key in own:
        if key not in new:
            raise HardwareCheckpointError(
                f"--input_hw {input_hw}: its weight '{key}' is not in the averaged checkpoints; "
                "use a hardware checkpoint of the same model"
            )
        if tuple(new[key].shape) != tuple(own[key].shape):
            raise HardwareCheckpointError(
                f"--input_hw {input_hw}: '{key}' has shape {list(own[key].shape)} but the averaged weights "
                f"have {list(new[key].shape)}; use a hardware checkpoint of the same model"
            )
    extra = [key for key in new if key not in own]
    if extra:
        raise HardwareCheckpointError(
            f"--input_hw {input_hw}: it has no weight '{extra[0]}' that the averaged checkpoints have; "
            "use a hardware checkpoint of the same model"
        )
    result = dict(hw)
    result["state_dict"] = OrderedDict((key, new[key].to(own[key].dtype)) for key in own)
    result["epoch"], result["step"], result["best_wer"] = (
        int(averaged["epoch"]),
        int(averaged["step"]),
        float(averaged["best_wer"]),
    )
    return result


# --- inputs -------------------------------------------------------------------------------------


class _Input:
    """One memory-mapped input checkpoint, and the address ranges its file is mapped at."""

    def __init__(self, path: Path):
        self.path = path
        self.ckpt = read_checkpoint(path, mmap=True)
        self._mapped = _file_mappings(path)

    def release(self, tensor: Tensor) -> None:
        """Hand the pages under ``tensor`` (a contiguous slice of an input) back to the kernel.

        Every page read from a mapped file stays in this process's resident set
        until the mapping closes, so without this the resident memory would grow
        by a whole checkpoint per input. For a file mapping MADV_DONTNEED is
        lossless (a later read re-reads the file), so the range is rounded out
        to whole fault-around blocks; on anonymous memory (a checkpoint that
        could not be mapped) it would zero the data, so nothing outside this
        file's mapping is ever touched.
        """
        if _MADVISE is None or not self._mapped or tensor.numel() == 0 or not tensor.is_contiguous():
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for lo, hi in self._mapped:
            if lo <= start and end <= hi:
                first = max(lo, start // _RELEASE_ALIGN * _RELEASE_ALIGN)
                last = min(hi, -(-end // _RELEASE_ALIGN) * _RELEASE_ALIGN)
                _MADVISE(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
                return


def _load_madvise() -> Optional[Callable]:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which ``path`` is memory-mapped in this process (from /proc/self/maps)."""
    try:
        status = os.stat(path)
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}"
    real = os.path.realpath(path)
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        same_inode = fields[3] == device and fields[4] == str(status.st_ino)
        if same_inode or (len(fields) == 6 and fields[5] == real):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _open_inputs(paths: list[Path]) -> list[_Input]:
    seen: dict[str, Path] = {}
    inputs = []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(
                f"{path} is given twice (as {seen[real]} too); list each checkpoint once "
                "and use --weights to weight it more"
            )
        seen[real] = path
        item = _Input(path)
        reason = _not_training_reason(item.ckpt, path)
        if reason:
            raise CheckpointError(f"{path}: {reason}; average training checkpoints (RNN-T_step*_checkpoint.pt)")
        for key in TRAINING_KEYS:
            if key not in item.ckpt:
                raise CheckpointError(
                    f"{path}: key '{key}' is missing; average training checkpoints saved by train.py (SPEC s.8)"
                )
        inputs.append(item)
    return inputs


def _not_training_reason(ckpt: Mapping, path: Path) -> Optional[str]:
    """Why ``ckpt`` is not a training checkpoint to average, or None if it is one."""
    if path.name.endswith(HW_SUFFIX) or ("rnnt_config" in ckpt and "sentpiece_model" in ckpt):
        return "a hardware checkpoint"
    if not isinstance(ckpt.get("state_dict"), Mapping):
        return "no state_dict (not a training checkpoint)"
    return None


def _scan(directory: Path) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """Candidate checkpoints in ``directory`` and the excluded files with reasons."""
    candidates: list[CheckpointInfo] = []
    excluded: list[tuple[Path, str]] = []
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".")
    )
    for path in files:
        if path.name.endswith(HW_SUFFIX):
            excluded.append((path, "a hardware checkpoint"))
            continue
        if _LAST_NAME.search(_stem(path)):
            excluded.append((path, "a 'last' file: the end-of-training state, covered by the step checkpoints"))
            continue
        try:
            ckpt = read_checkpoint(path, mmap=True)
        except CheckpointError as exc:
            excluded.append((path, f"unreadable ({exc})"))
            continue
        reason = _not_training_reason(ckpt, path)
        if reason is None and AVERAGING_KEY in ckpt:
            reason = "an averaged checkpoint (it has an 'averaging' key)"
        if reason:
            excluded.append((path, reason))
            continue
        candidates.append(inspect_checkpoint(path, ckpt))
    by_step = {c.step: c for c in candidates if not c.is_best and c.step is not None}
    kept = []
    for c in candidates:
        if c.is_best and c.step in by_step:
            excluded.append((c.path, f"same step ({c.step}) as {by_step[c.step].path.name}: the same weights twice"))
        else:
            kept.append(c)
    return kept, excluded


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (HW_SUFFIX,) + CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _step_from_name(path: Path) -> Optional[int]:
    match = _STEP_NAME.search(path.name)
    return int(match.group(1) or match.group(2)) if match else None


def _as_wer(value: object) -> Optional[float]:
    """``value`` as a WER fraction if it is a finite number >= 0, else None."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


# --- averaging ----------------------------------------------------------------------------------


def _check_compatible(inputs: list[_Input]) -> list[str]:
    """The weight entries to average; every input must match the first's keys, shapes and dtypes."""
    entries = [e for e in WEIGHT_ENTRIES if all(isinstance(x.ckpt.get(e), Mapping) for x in inputs)]
    ref = inputs[0]
    for entry in entries:
        for x in inputs:
            for key, value in x.ckpt[entry].items():
                if not isinstance(value, Tensor):
                    raise CheckpointError(f"{x.path}: {entry}['{key}'] is a {type(value).__name__}, not a tensor")
        for x in inputs[1:]:
            ours, theirs = ref.ckpt[entry], x.ckpt[entry]
            for key in ours:
                if key not in theirs:
                    raise CheckpointError(
                        f"{x.path}: {entry} has no key '{key}' (which {ref.path} has); "
                        "average checkpoints of the same model"
                    )
            for key in theirs:
                if key not in ours:
                    raise CheckpointError(
                        f"{x.path}: {entry} has key '{key}' that {ref.path} lacks; "
                        "average checkpoints of the same model"
                    )
                a, b = ours[key], theirs[key]
                if a.shape != b.shape:
                    raise CheckpointError(
                        f"{x.path}: {entry}['{key}'] has shape {list(b.shape)} but {ref.path} has "
                        f"{list(a.shape)}; average checkpoints of the same model"
                    )
                if a.dtype != b.dtype:
                    raise CheckpointError(
                        f"{x.path}: {entry}['{key}'] is {b.dtype} but {ref.path} has {a.dtype}; "
                        "average checkpoints saved with the same precision"
                    )
    return entries


def _common_logmel_norm_weight(inputs: list[_Input]) -> float:
    ref = inputs[0]
    value = ref.ckpt["logmel_norm_weight"]
    for x in inputs[1:]:
        if x.ckpt["logmel_norm_weight"] != value:
            raise CheckpointError(
                f"{x.path}: logmel_norm_weight is {x.ckpt['logmel_norm_weight']} but {ref.path} has {value}; "
                "average checkpoints from the same point of the normalisation ramp (after norm_ramp_end_step)"
            )
    return float(value)


def _warn_if_tokenizers_differ(inputs: list[_Input], log: Log) -> None:
    ref = inputs[0]
    for x in inputs[1:]:
        if x.ckpt["tokenizer_kw"] != ref.ckpt["tokenizer_kw"]:
            log(f"  note: {x.path} has different tokenizer_kw from {ref.path}; the output keeps {ref.path}'s")


def _weight_bytes(state_dict: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on the calling thread only, restoring the thread count afterwards.

    Each chunk operation is a few microseconds of memory-bound work: a thread
    pool adds synchronisation and no bandwidth, and on a busy machine one
    descheduled worker stalls every operation (5 base-size checkpoints: 0.9 s
    on one thread, 5-14 s on two, on a loaded 2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _average_entry(
    inputs: list[_Input], entry: str, weights: list[float], keeper: int, bar: tqdm, log: Log
) -> "OrderedDict[str, Tensor]":
    """Weighted average of one state dict over the inputs.

    Floating tensors go chunk by chunk: a float64 accumulator of ``_CHUNK``
    elements stays in the CPU cache while every input's slice is converted
    and added to it, so each input byte is read once and the accumulator
    never travels to main memory.
    """
    acc = torch.empty(_CHUNK, dtype=torch.float64)
    converted = torch.empty(_CHUNK, dtype=torch.float64)
    # Zero-weight inputs are skipped, so NaN/inf in them cannot reach the sum.
    used = [(x, w) for x, w in zip(inputs, weights) if w > 0]
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, first in inputs[0].ckpt[entry].items():
        tensors = [x.ckpt[entry][key] for x in inputs]
        if first.is_floating_point():
            flat = {id(x): t.reshape(-1) for x, t in zip(inputs, tensors)}
            result = torch.empty(first.numel(), dtype=first.dtype)
            for start in range(0, first.numel(), _CHUNK):
                end = min(start + _CHUNK, first.numel())
                total, part = acc[: end - start], converted[: end - start]
                for i, (x, weight) in enumerate(used):
                    piece = flat[id(x)][start:end]
                    if i == 0:
                        total.copy_(piece).mul_(weight)
                    else:
                        total.add_(part.copy_(piece), alpha=weight)
                    x.release(piece)
                result[start:end].copy_(total)
            out[key] = result.view(first.shape)
        else:
            if not all(torch.equal(first, t) for t in tensors[1:]):
                log(
                    f"  note: {entry}['{key}'] ({first.dtype}) differs between inputs and is not averaged; "
                    f"taken from the most-weighted input {inputs[keeper].path}"
                )
            out[key] = tensors[keeper].clone()
        for x, tensor in zip(inputs, tensors):
            x.release(tensor)
        bar.update(first.numel() * first.element_size() * len(inputs))
    return out


def _check_hw_ready(averaged: Mapping) -> None:
    weight = averaged["logmel_norm_weight"]
    if weight != 1.0:
        raise HardwareCheckpointError(
            f"the averaged checkpoints have logmel_norm_weight {weight}, not 1.0 (the normalisation ramp had "
            "not finished); average checkpoints saved after --norm_ramp_end_step"
        )


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Average training checkpoints into a training and/or hardware checkpoint.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpts", nargs="+", metavar="CKPT", help="training checkpoints to average")
    source.add_argument(
        "--checkpoint_dir",
        help="directory of a run's checkpoints (train.py --output_dir); choose with --top_n, --last_n or --steps",
    )
    parser.add_argument("--top_n", type=int, help="with --checkpoint_dir: the N checkpoints with the lowest dev WER")
    parser.add_argument("--last_n", type=int, help="with --checkpoint_dir: the N newest step checkpoints")
    parser.add_argument(
        "--steps", type=int, nargs="+", metavar="STEP", help="with --checkpoint_dir: the checkpoints of these steps"
    )
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="one weight per checkpoint, in the order they are listed (--top_n: best first; --last_n, --steps: "
        "oldest first); normalised to sum 1",
    )
    parser.add_argument(
        "--equal_weights", action="store_true", help="equal weights even when every checkpoint records a dev WER"
    )
    parser.add_argument(
        "--wer_eps",
        type=float,
        default=WER_EPS,
        help=f"inverse-WER weights are 1/(WER + this), WER a fraction (default {WER_EPS})",
    )
    parser.add_argument("--output_path", help="write the averaged training checkpoint here (e.g. results/avg.pt)")
    parser.add_argument(
        "--output_hw", help="write an averaged hardware checkpoint here; needs --model_config or --input_hw"
    )
    parser.add_argument("--model_config", help="with --output_hw: YAML config to build the hardware checkpoint from")
    parser.add_argument(
        "--input_hw",
        help="with --output_hw: hardware checkpoint to copy, with the averaged EMA weights in place of its own",
    )
    parser.add_argument("--skip_ngram", action="store_true", help="with --model_config: embed no n-gram")
    parser.add_argument(
        "--override_ngram_path", help="with --model_config: KenLM binary to embed instead of the config's ngram_path"
    )
    parser.add_argument(
        "--skip_state_dict_check",
        action="store_true",
        help="with --model_config: accept weights matching no FPGA variant (software-only hardware checkpoint)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the selection and weights, write nothing")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    picks = [name for name in ("top_n", "last_n", "steps") if getattr(args, name) is not None]
    if args.checkpoint_dir is None and picks:
        raise UserError(f"--{picks[0]} needs --checkpoint_dir")
    if args.checkpoint_dir is not None and len(picks) != 1:
        raise UserError("--checkpoint_dir needs exactly one of --top_n, --last_n and --steps")
    if not args.dry_run and not (args.output_path or args.output_hw):
        raise UserError("nothing to write; give --output_path and/or --output_hw (or --dry_run)")
    if args.output_hw and bool(args.model_config) == bool(args.input_hw):
        raise UserError("--output_hw needs exactly one of --model_config (build) and --input_hw (copy)")
    if not args.output_hw and (args.model_config or args.input_hw):
        raise UserError("--model_config and --input_hw only apply with --output_hw")
    hw_flags = [f for f in ("skip_ngram", "override_ngram_path", "skip_state_dict_check") if getattr(args, f)]
    if hw_flags and not args.model_config:
        raise UserError(f"--{hw_flags[0]} only applies with --output_hw and --model_config")
    if args.output_hw and args.output_path and Path(args.output_hw).resolve() == Path(args.output_path).resolve():
        raise UserError("--output_path and --output_hw are the same file; give two paths")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    _check_args(args)
    if args.checkpoint_dir is not None:
        chosen = select_checkpoints(args.checkpoint_dir, top_n=args.top_n, last_n=args.last_n, steps=args.steps)
        paths = [c.path for c in chosen]
    else:
        paths = [Path(p) for p in args.ckpts]
    for output in (args.output_path, args.output_hw):
        if output and any(Path(output).resolve() == p.resolve() for p in paths):
            raise UserError(f"output {output} is one of the inputs; write the average to a new file")
    if args.dry_run:
        infos = [inspect_checkpoint(p) for p in paths]
        weights, weighting = resolve_weights(
            [i.wer for i in infos], args.weights, equal=args.equal_weights, wer_eps=args.wer_eps
        )
        print(f"dry run: would average with {weighting} weights:")
        for info, weight in zip(infos, weights):
            print(f"  weight {weight:.4f}  {info.path} {info.summary()}")
        return
    # Fail on a bad config or hardware checkpoint before the averaging, not after it.
    cfg = config.load(args.model_config) if args.model_config else None
    if args.input_hw:
        validate_hw_checkpoint(read_checkpoint(args.input_hw, mmap=True), f"--input_hw {args.input_hw}")

    averaged = average_checkpoints(
        paths, args.weights, equal_weights=args.equal_weights, wer_eps=args.wer_eps, progress=True
    )
    if args.output_path:
        atomic_torch_save(averaged, args.output_path)
        print(f"wrote {args.output_path}: averaged training checkpoint (step {averaged['step']})")
    if args.output_hw:
        if args.input_hw:
            hw = averaged_hardware_ckpt(averaged, args.input_hw)
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hw = create_hardware_ckpt(
                    averaged,
                    cfg,
                    skip_ngram=args.skip_ngram,
                    override_ngram_path=args.override_ngram_path,
                    skip_state_dict_check=args.skip_state_dict_check,
                )
            for warning in caught:
                print(f"warning: {warning.message}")
        save_hardware_ckpt(hw, args.output_hw)
        print(f"wrote {args.output_hw}: hardware checkpoint with the averaged EMA weights")


if __name__ == "__main__":
    run_cli(main)
