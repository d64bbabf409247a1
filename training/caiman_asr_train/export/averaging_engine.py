"""Average the weights of several single-file training checkpoints of one run.

Selection in a run directory: every ``*.pt``/``*.ckpt`` file except hardware
checkpoints, ``last`` files (the end-of-training state, which the step
checkpoints already cover), earlier averaging outputs (they carry an
``averaging`` key), and a ``best`` file whose step has its own step checkpoint
(the same weights twice would count double); then the rules of
``averaging_selection``.

Averaging. ``state_dict`` and, when every input has one, ``ema_state_dict`` are
averaged key by key in float64 and cast back to the first input's dtype. Inputs
with weight 0 are skipped (a NaN in them cannot leak in); a NaN or Inf in an
input that counts is refused, naming the file and tensor. Integer and bool
tensors (step counters, indices) are not averaged: when the inputs disagree the
value comes from the most-weighted input (ties: the highest step, then the later
input), with a note. Every input must have the same keys, shapes and dtypes.
The inputs are memory-mapped (``weights_only``) and read one chunk at a time,
so the memory the process owns is the output plus one chunk, whatever the
number of inputs. The pages read from the mapped files do count in its
resident set until the end, but they are clean page cache that the kernel
reclaims under pressure: 5 base-size inputs average in the same time under a
memory limit of 2.5x one model's weights as with no limit (benchmarks/averaging.py).

The result is a training checkpoint (docs/formats.md section 8): averaged ``state_dict``
and ``ema_state_dict`` (the averaged raw weights again when some input has no
EMA), ``optimizer`` None, ``epoch``, ``step`` and ``best_wer`` of the newest
input, ``tokenizer_kw`` of the first, ``logmel_norm_weight`` (all inputs must
agree), the newest input's self-description (``config_path``, ``model_config``,
``config``, ``asset_sha256``) when present, so that the average exports and
validates without ``--model_config`` as its inputs do, and
``averaging``: the inputs, their steps, WERs, WER sources and weights. It has no
``dev_wer``: nobody has measured the average yet.
"""

import contextlib
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm import tqdm

from caiman_asr_train.core.errors import CheckpointError, UserError
from caiman_asr_train.core.load_hw import is_hardware_checkpoint, read_checkpoint
from caiman_asr_train.export.averaging_selection import (
    WER_EPS,
    CheckpointInfo,
    check_distinct,
    choose,
    inspect_checkpoint,
    log_weights,
    most_weighted,
    resolve_weights,
    stem,
)
from caiman_asr_train.export.checkpointer import SELF_DESCRIPTION_KEYS, TRAINING_CHECKPOINT_KEYS

__all__ = ["AVERAGING_KEY", "average_checkpoints", "select_checkpoints"]

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

# The extra key that records how an averaged checkpoint was made.
AVERAGING_KEY = "averaging"
WEIGHT_ENTRIES = ("state_dict", "ema_state_dict")
# Averaging also reads upstream checkpoints saved without EMA weights or optimizer state.
REQUIRED_KEYS = tuple(key for key in TRAINING_CHECKPOINT_KEYS if key not in ("ema_state_dict", "optimizer"))
CHECKPOINT_SUFFIXES = (".pt", ".ckpt")
# Elements per accumulation chunk: the float64 accumulator and conversion buffer (1 MiB each) stay in cache.
_CHUNK = 1 << 17

_LAST_NAME = re.compile(r"(?:^|[-_.])last(?:[-_.]|$)")


def select_checkpoints(
    checkpoint_dir: PathLike,
    *,
    top_n: Optional[int] = None,
    last_n: Optional[int] = None,
    steps: Optional[Sequence[int]] = None,
    log: Log = print,
) -> list[CheckpointInfo]:
    """Choose training checkpoint files in ``checkpoint_dir`` (module docstring; ``averaging_selection.choose``).

    Raises:
        UserError: bad arguments, a missing directory, or too few eligible checkpoints.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise UserError(f"--checkpoint_dir {directory} is not a directory; give the training --output_dir")
    candidates, excluded = _scan(directory)
    return choose(directory, candidates, excluded, top_n=top_n, last_n=last_n, steps=steps, log=log)


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
        A docs/formats.md section 8 checkpoint dict with an extra ``averaging`` key.

    Raises:
        CheckpointError: an unreadable input, a hardware checkpoint, a missing
            key, non-finite weights, or inputs whose keys, shapes, dtypes or
            ``logmel_norm_weight`` differ.
        UserError: no inputs, a repeated input, or bad weights.
    """
    if not paths:
        raise UserError("no checkpoints to average; give --ckpts or --checkpoint_dir")
    inputs = _open_inputs([Path(p) for p in paths])
    infos = [inspect_checkpoint(x.path, x.ckpt) for x in inputs]
    resolved, weighting = resolve_weights(
        [i.wer for i in infos], weights, equal=equal_weights, wer_eps=wer_eps
    )
    entries = _check_compatible(inputs)
    logmel_norm_weight = _common_logmel_norm_weight(inputs)
    _warn_if_tokenizers_differ(inputs, log)

    what = "checkpoint(s), weights {how}; " + " and ".join(entries)
    log_weights(infos, resolved, weighting, wer_eps=wer_eps, equal_asked=equal_weights, what=what, log=log)
    if "ema_state_dict" not in entries:
        log(
            "  note: not every input has ema_state_dict; the output's EMA weights are the averaged raw weights"
        )

    newest = max(range(len(inputs)), key=lambda i: (infos[i].step if infos[i].step is not None else -1, i))
    keeper = most_weighted(infos, resolved)
    total = sum(_weight_bytes(inputs[0].ckpt[entry]) for entry in entries) * len(inputs)
    averaged = {}
    with (
        one_thread(),
        tqdm(total=total, unit="B", unit_scale=True, desc="averaging", disable=not progress) as bar,
    ):
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
    for key in SELF_DESCRIPTION_KEYS:
        if key in newest_ckpt:
            result[key] = newest_ckpt[key]
    return result


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
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


def non_finite_error(source: object, key: str) -> CheckpointError:
    """The refusal of an input whose weights that count hold NaN or Inf."""
    return CheckpointError(
        f"{source}: '{key}' holds NaN or Inf values; average checkpoints with finite weights "
        "(leave this one out, or give it weight 0 with --weights)"
    )


# --- inputs -------------------------------------------------------------------------------------


class _Input:
    """One memory-mapped input checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        self.ckpt = read_checkpoint(path, mmap=True)


def _open_inputs(paths: list[Path]) -> list[_Input]:
    check_distinct(paths)
    inputs = []
    for path in paths:
        item = _Input(path)
        reason = _not_training_reason(item.ckpt)
        if reason:
            raise CheckpointError(
                f"{path}: {reason}; average training checkpoints (RNN-T_step*_checkpoint.pt)"
            )
        for key in REQUIRED_KEYS:
            if key not in item.ckpt:
                raise CheckpointError(
                    f"{path}: key '{key}' is missing; average training checkpoints saved by train.py (docs/formats.md section 8)"
                )
        inputs.append(item)
    return inputs


def _not_training_reason(ckpt: Mapping) -> Optional[str]:
    """Why ``ckpt`` is not a training checkpoint to average, or None if it is one."""
    if is_hardware_checkpoint(ckpt):
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
        if _LAST_NAME.search(stem(path)):
            excluded.append(
                (path, "a 'last' file: the end-of-training state, covered by the step checkpoints")
            )
            continue
        try:
            ckpt = read_checkpoint(path, mmap=True)
        except CheckpointError as exc:
            excluded.append((path, f"unreadable ({exc})"))
            continue
        reason = _not_training_reason(ckpt)
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
            excluded.append(
                (c.path, f"same step ({c.step}) as {by_step[c.step].path.name}: the same weights twice")
            )
        else:
            kept.append(c)
    return kept, excluded


# --- averaging ----------------------------------------------------------------------------------


def _check_compatible(inputs: list[_Input]) -> list[str]:
    """The weight entries to average; every input must match the first's keys, shapes and dtypes."""
    entries = [e for e in WEIGHT_ENTRIES if all(isinstance(x.ckpt.get(e), Mapping) for x in inputs)]
    ref = inputs[0]
    for entry in entries:
        for x in inputs:
            for key, value in x.ckpt[entry].items():
                if not isinstance(value, Tensor):
                    raise CheckpointError(
                        f"{x.path}: {entry}['{key}'] is a {type(value).__name__}, not a tensor"
                    )
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


def _average_entry(
    inputs: list[_Input], entry: str, weights: list[float], keeper: int, bar: tqdm, log: Log
) -> "OrderedDict[str, Tensor]":
    """Weighted average of one state dict over the inputs.

    Floating tensors go chunk by chunk: a float64 accumulator of ``_CHUNK``
    elements stays in the CPU cache while every input's slice is converted
    and added to it, so each input byte is read once and the accumulator
    never travels to main memory. A non-finite sum means a non-finite input
    (float64 does not overflow on float32 weights), found only then.
    """
    acc = torch.empty(_CHUNK, dtype=torch.float64)
    converted = torch.empty(_CHUNK, dtype=torch.float64)
    # Zero-weight inputs are skipped, so NaN/inf in them cannot reach the sum.
    used = [(x, w) for x, w in zip(inputs, weights) if w > 0]
    out: OrderedDict[str, Tensor] = OrderedDict()
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
                if not bool(torch.isfinite(total).all()):
                    bad = next(x for x, _ in used if not bool(torch.isfinite(flat[id(x)][start:end]).all()))
                    raise non_finite_error(bad.path, f"{entry}.{key}")
                result[start:end].copy_(total)
            out[key] = result.view(first.shape)
        else:
            if not all(torch.equal(first, t) for t in tensors[1:]):
                log(
                    f"  note: {entry}['{key}'] ({first.dtype}) differs between inputs and is not averaged; "
                    f"taken from the most-weighted input {inputs[keeper].path}"
                )
            out[key] = tensors[keeper].clone()
        bar.update(first.numel() * first.element_size() * len(inputs))
    return out
