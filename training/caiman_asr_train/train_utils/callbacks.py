"""Finalize callbacks: work that runs once when training ends.

Training ends normally or on SIGTERM/SIGINT after the last checkpoint is saved;
either way ``run_finalize`` calls every callback in order on every rank (a
callback decides itself which ranks do work), then all ranks meet at a barrier,
so a failing callback on rank 0 never leaves other ranks waiting. A failure is
reported and turns into a non-zero exit status; the training checkpoints are
never touched. Callbacks report through the context's ``log``/``log_error``, so
their lines reach ``train.log`` as well as the console.
"""

import os
import shlex
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from caiman_asr_train.core.errors import UserError
from caiman_asr_train.export import hardware_ckpt
from caiman_asr_train.export.checkpointer import read_checkpoint, recorded_config
from caiman_asr_train.export.hardware_ckpt import hw_path
from caiman_asr_train.train_utils.distributed import DistInfo, barrier


def _print_error(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class FinalizeContext:
    """What a finalize callback may need to know about the finished run."""

    best_path: Path  # best training checkpoint (may not exist: no validation improved)
    last_path: Path  # last training checkpoint (always written before finalize)
    config_path: Path
    dist: DistInfo
    reason: str  # "finished" or the signal name that stopped training
    # The config as the run loaded it at start: for checkpoints that record none (saved by older versions).
    config: Optional[dict] = None
    log: Callable[[str], None] = print  # a console line (train.py: also into train.log)
    log_error: Callable[[str], None] = _print_error  # an error line for stderr (and train.log)


FinalizeCallback = Callable[[FinalizeContext], None]


def shown_path(path: Union[str, os.PathLike]) -> str:
    """A path as a user would type it here: relative to the cwd when inside it."""
    path = Path(path).absolute()
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


class HardwareExportCallback:
    """On rank 0, write ``*.hw.pt`` next to the best and last training checkpoints.

    Uses ``create_hardware_ckpt`` with ``skip_ngram``/``skip_state_dict_check``
    as given, and the config each checkpoint recorded (never the YAML as it is
    on disk now, which may have been edited during the run). If an export
    fails, reports why and the exact ``hardware_ckpt.py`` command that redoes
    it, and raises ``ExportFailed`` after trying both.
    """

    def __init__(self, skip_ngram: bool = False, skip_state_dict_check: bool = False) -> None:
        self.skip_ngram = skip_ngram
        self.skip_state_dict_check = skip_state_dict_check
        self.written: list[Path] = []

    def command(self, ckpt: Path, config: Optional[Path], output: Path) -> str:
        """The shell command that makes ``output`` from ``ckpt`` by hand (``config``: None when recorded)."""
        parts = [shown_path(sys.executable), shown_path(hardware_ckpt.__file__), "--ckpt", shown_path(ckpt)]
        if config is not None:
            parts += ["--config", shown_path(config)]
        parts += ["--output_ckpt", shown_path(output)]
        if self.skip_ngram:
            parts.append("--skip_ngram")
        if self.skip_state_dict_check:
            parts.append("--skip_state_dict_check")
        return " ".join(parts)

    def __call__(self, ctx: FinalizeContext) -> None:
        if not ctx.dist.is_main:
            return
        failed = []
        for ckpt in (ctx.best_path, ctx.last_path):
            if not ckpt.is_file():
                ctx.log(f"hardware export: {ckpt} does not exist (no validation improved on it); skipped")
                continue
            output = hw_path(ckpt)
            # Checkpoints saved before they recorded their config are exported with the run's.
            config = None
            try:
                if recorded_config(read_checkpoint(ckpt, mmap=True)) is None:
                    config = ctx.config_path
                hw = hardware_ckpt.create_hardware_ckpt(
                    ckpt,
                    None if config is None else (ctx.config or config),
                    skip_ngram=self.skip_ngram,
                    skip_state_dict_check=self.skip_state_dict_check,
                )
                hardware_ckpt.save_hardware_ckpt(hw, output)
            except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                reason = (
                    str(exc)
                    if isinstance(exc, UserError)
                    else "".join(traceback.format_exception_only(exc)).strip()
                )
                ctx.log_error(
                    f"error: hardware export of {ckpt} failed: {reason}\n"
                    f"  the training checkpoint is intact; fix the cause and rerun:\n"
                    f"  {self.command(ckpt, config, output)}"
                )
                failed.append(ckpt)
                continue
            self.written.append(output)
            ctx.log(f"hardware checkpoint written: {shown_path(output)}")
        if failed:
            raise ExportFailed(f"hardware export failed for {', '.join(str(p) for p in failed)}")


class ExportFailed(RuntimeError):
    """A finalize export failed; its message was already printed."""


def run_finalize(callbacks: Sequence[FinalizeCallback], ctx: FinalizeContext) -> int:
    """Run every callback once; return 0, or 1 if any failed. All ranks return together."""
    status = 0
    for callback in callbacks:
        try:
            callback(ctx)
        except ExportFailed:
            status = 1
        except Exception:  # noqa: BLE001 - a broken callback must not strand other ranks
            traceback.print_exc()
            status = 1
    barrier(ctx.dist)
    return status
