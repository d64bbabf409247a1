"""Training logs: console progress, a log file and TensorBoard scalars in the output directory.

Only rank 0 logs; on other ranks every method is a no-op. While a logger is
open on rank 0, warnings go to stderr and ``train.log`` as one line each, so
the log holds everything the console shows.
"""

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from caiman_asr_train.utils.cli import format_warning

LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"


def format_seconds(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``, ``65`` -> ``"1m05s"``."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class TrainLogger:
    """Console + ``train.log`` text lines and TensorBoard scalars under ``output_dir``.

    Args:
        output_dir: where ``train.log`` (appended to on resume) and
            ``tensorboard/`` go.
        enabled: False on ranks other than 0.
    """

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._writer = None
        self._log_file: Optional[logging.FileHandler] = None
        self._previous_showwarning = warnings.showwarning
        self._logger = logging.getLogger("caiman_asr_train.train")
        if not enabled:
            return
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        for handler in list(self._logger.handlers):
            self._logger.removeHandler(handler)
            handler.close()
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        log_file = logging.FileHandler(output_dir / LOG_FILE)
        log_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self._logger.addHandler(console)
        self._logger.addHandler(log_file)
        self._log_file = log_file
        warnings.showwarning = self._show_warning
        # Imported here: it pulls in tensorboard, which other ranks never need.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))

    def info(self, message: str) -> None:
        if self.enabled:
            self._logger.info(message)

    def error(self, message: str) -> None:
        """An error line: on stderr and in ``train.log`` (rank 0 only, like ``info``)."""
        if not self.enabled:
            return
        print(message, file=sys.stderr, flush=True)
        if self._log_file is not None:
            self._log_file.handle(
                self._logger.makeRecord(self._logger.name, logging.ERROR, "", 0, message, None, None)
            )

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """``warnings.showwarning`` while open: one ``warning:`` line on stderr and in ``train.log``."""
        self.error(format_warning(message, category, filename, lineno, line).rstrip("\n"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars at ``step`` (names such as ``train/loss``)."""
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for handler in list(self._logger.handlers):
            self._logger.removeHandler(handler)
            handler.close()
        if self._log_file is not None:
            warnings.showwarning = self._previous_showwarning
        self._log_file = None


class Throughput:
    """Steps and audio seconds per second over the steps since the last report, and an ETA."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.total_steps = total_steps
        self._mark(start_step)
        self._rate: Optional[float] = None

    def _mark(self, step: int) -> None:
        self._time = time.perf_counter()
        self._step = step
        self._audio = 0.0

    def add_audio(self, seconds: float) -> None:
        """Audio seconds processed (by all ranks) since the last report."""
        self._audio += seconds

    def pause(self, seconds: float) -> None:
        """Exclude ``seconds`` spent outside training steps (validation, saving)."""
        self._time += seconds

    def report(self, step: int) -> dict[str, float]:
        """``{"steps_per_sec", "audio_sec_per_sec", "eta_sec"}`` since the last report."""
        elapsed = max(time.perf_counter() - self._time, 1e-9)
        steps = max(step - self._step, 0)
        result = {
            "steps_per_sec": steps / elapsed,
            "audio_sec_per_sec": self._audio / elapsed,
        }
        if steps:
            self._rate = result["steps_per_sec"]
        result["eta_sec"] = (self.total_steps - step) / self._rate if self._rate else float("nan")
        self._mark(step)
        return result
