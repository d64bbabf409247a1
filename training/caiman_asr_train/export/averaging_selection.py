"""Which checkpoints to average and with what weights: shared by single files and sharded directories.

Dev WER of a checkpoint, in this order: its ``dev_wer`` key (the WER measured at
its own step); for a ``best`` file its ``best_wer`` (the best file is written
when that WER is measured, so it is its own); a NeMo-style ``val_wer=0.0652`` in
the file or directory name. Nothing else: a step checkpoint's ``best_wer`` is
the run's best *so far*, usually measured at an earlier step, so ranking or
weighting by it would credit a checkpoint with another one's score.

Steps come from the ``step`` key, else the name: ``RNN-T_step1000_checkpoint.pt``,
NeMo's ``step=1000`` or Megatron's ``iter_0001000``.

Weights. Explicit weights are normalised to sum 1. Otherwise inverse-WER
``1 / (WER + wer_eps)``, normalised, when every input has a dev WER, and equal
weights when any lacks one. ``wer_eps`` (default 0.01, one WER point) keeps a
WER of 0 finite: a perfect score then weighs at most ``(max WER + 0.01) / 0.01``
times the worst input, and WERs within a fraction of a point of each other get
nearly equal weights.
"""

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from torch import Tensor

from caiman_asr_train.core.errors import UserError

__all__ = [
    "WER_EPS",
    "CheckpointInfo",
    "choose",
    "most_weighted",
    "stem",
    "check_distinct",
    "log_weights",
    "info_from_name",
    "inspect_checkpoint",
    "parse_steps",
    "resolve_weights",
]

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

# Added to every WER (a fraction) before inverting it, so that WER 0 gets a finite weight.
WER_EPS = 0.01

_STEP_NAME = re.compile(r"(?:_step(\d+)_checkpoint\.pt$|(?:^|[-_])step=(\d+)|(?:^|[-_])iter_(\d+))")
_NAME_WER = re.compile(r"(?:^|[-_])val_wer=(\d*\.?\d+(?:[eE][-+]?\d+)?)")
_BEST_NAME = re.compile(r"(?:^|[-_.])best(?:[-_.]|$)")
CHECKPOINT_SUFFIXES = (".hw.pt", ".pt", ".ckpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """What selection and weighting know about one checkpoint (a file or a sharded directory).

    Attributes:
        path: the file or directory.
        step: optimizer steps (the ``step`` key, else from the name), None if unknown.
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


def stem(path: Path) -> str:
    """The name without a checkpoint suffix (``.hw.pt``, ``.pt``, ``.ckpt``)."""
    name = path.name
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def info_from_name(path: PathLike) -> CheckpointInfo:
    """Step and dev WER of a checkpoint known only by its name (NeMo and Megatron directories)."""
    path = Path(path)
    match = _NAME_WER.search(path.name)
    if match:
        wer, source = float(match.group(1)), f"val_wer in the {'directory' if path.is_dir() else 'file'} name"
    else:
        wer, source = None, "no val_wer= in its name"
    return CheckpointInfo(path=path, step=_step_from_name(path), wer=wer, wer_source=source)


def inspect_checkpoint(path: PathLike, ckpt: Mapping) -> CheckpointInfo:
    """The step and own dev WER of a loaded (memory-mapped) training checkpoint (module docstring)."""
    path = Path(path)
    named = info_from_name(path)
    is_best = bool(_BEST_NAME.search(stem(path)))
    step = ckpt.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        step = named.step
    wer, source = _as_wer(ckpt.get("dev_wer")), "dev_wer stored in the checkpoint"
    if wer is None and is_best:
        wer, source = (
            _as_wer(ckpt.get("best_wer")),
            "best_wer of a best checkpoint, saved when it was measured",
        )
    if wer is None and named.wer is not None:
        wer, source = named.wer, named.wer_source
    if wer is None:
        source = "no dev_wer in it and no val_wer= in its name (its best_wer is the run's best so far, not its own)"
    return CheckpointInfo(path=path, step=step, wer=wer, wer_source=source, is_best=is_best)


def parse_steps(values: Optional[Sequence[str]]) -> Optional[list[int]]:
    """``--steps`` as NeMo documents it (``1000,2000``) or as it parses it (``1000 2000``), or mixed.

    Raises:
        UserError: a value that is not a non-negative integer.
    """
    if values is None:
        return None
    steps = []
    for part in ",".join(values).split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise UserError(f"--steps: '{part}' is not a step number; give steps as 1000,2000 or 1000 2000")
        steps.append(int(part))
    return steps


def choose(
    directory: Path,
    candidates: list[CheckpointInfo],
    excluded: list[tuple[Path, str]],
    *,
    top_n: Optional[int] = None,
    last_n: Optional[int] = None,
    steps: Optional[Sequence[int]] = None,
    all_if_none: bool = False,
    log: Log = print,
) -> list[CheckpointInfo]:
    """Choose among ``candidates`` by lowest dev WER, newest steps, or given steps, and log why.

    Give exactly one of ``top_n`` (returned best WER first), ``last_n`` or
    ``steps`` (returned oldest first), or none of them with ``all_if_none``
    (every candidate, as NeMo averages). ``excluded`` holds the files the caller
    already ruled out with their reasons; ``log`` gets one line per entry.

    Raises:
        UserError: bad arguments or too few eligible checkpoints.
    """
    picks = sum(x is not None for x in (top_n, last_n, steps))
    if picks != 1 and not (picks == 0 and all_if_none):
        raise UserError("give exactly one of --top_n, --last_n and --steps with --checkpoint_dir")
    count = top_n if top_n is not None else last_n
    if count is not None and count < 1:
        raise UserError(f"--{'top_n' if top_n is not None else 'last_n'} must be at least 1, got {count}")
    if steps is not None and not steps:
        raise UserError("--steps needs at least one step")
    excluded = list(excluded)
    step_files = [c for c in candidates if not c.is_best]
    if picks == 0:
        chosen = sorted(candidates, key=lambda c: (c.step is None, c.step or 0, c.path.name))
        why = {c.path: "every checkpoint (no --steps, --top_n or --last_n)" for c in chosen}
    elif top_n is not None:
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
            raise UserError(
                f"--weights: got {len(weights)} weight(s) for {n} checkpoint(s); give one per checkpoint"
            )
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


def log_weights(
    infos: Sequence[CheckpointInfo],
    weights: Sequence[float],
    weighting: str,
    *,
    wer_eps: float,
    equal_asked: bool,
    what: str,
    log: Log,
) -> None:
    """Log how the weights were chosen (``what`` names the inputs and entries), then one line per input."""
    how = {
        "custom": "--weights, normalised",
        "inverse_wer": f"inverse-WER, 1 / (WER + {wer_eps:g}), normalised",
        "equal": "equal" + ("" if equal_asked else ": not every input records its dev WER"),
    }[weighting]
    log(f"averaging {len(infos)} {what.format(how=how)}:")
    for i, (info, weight) in enumerate(zip(infos, weights), start=1):
        log(f"  [{i}/{len(infos)}] weight {weight:.4f}  {info.path} {info.summary()}")


def check_distinct(paths: Sequence[Path]) -> set[str]:
    """The real paths of ``paths``; each checkpoint may be given once.

    Raises:
        UserError: a checkpoint given twice (under any name).
    """
    seen: dict[str, Path] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(
                f"{path} is given twice (as {seen[real]} too); list each checkpoint once "
                "and use --weights to weight it more"
            )
        seen[real] = path
    return set(seen)


def most_weighted(infos: Sequence[CheckpointInfo], weights: Sequence[float]) -> int:
    """Index of the input whose integer tensors and extra files the output keeps.

    The highest weight; ties go to the highest step, then to the later input.
    """
    return max(
        range(len(infos)), key=lambda i: (weights[i], infos[i].step if infos[i].step is not None else -1, i)
    )


def _step_from_name(path: Path) -> Optional[int]:
    match = _STEP_NAME.search(path.name)
    return int(next(g for g in match.groups() if g is not None)) if match else None


def _as_wer(value: object) -> Optional[float]:
    """``value`` as a WER fraction if it is a finite number >= 0, else None."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None
