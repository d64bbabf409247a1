"""Run command-line entry points so that expected mistakes print one line, not a traceback."""

import os
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn, Optional, TextIO

from caiman_asr_train.core.errors import UserError

# Set by the multi-process launcher (train_utils/launcher.py): a rank writes its
# error line there and the launcher prints each distinct line once, instead of
# one copy per rank.
ERROR_DIR_ENV = "CAIMAN_ERROR_DIR"


def report_error(line: str) -> None:
    """Print a one-line error, or hand it to the launcher when running as one of its ranks."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir:
        try:
            (Path(error_dir) / f"rank{os.environ.get('RANK', '0')}").write_text(line + "\n")
            return
        except OSError:
            pass  # the launcher is gone: print it ourselves
    print(line, file=sys.stderr, flush=True)


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: Optional[str] = None
) -> str:
    """``warning: <message on one line>``: no source file, line number or code line (``warnings.formatwarning``)."""
    return f"warning: {' '.join(str(message).split())}\n"


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Optional[TextIO] = None,
    line: Optional[str] = None,
) -> None:
    (file or sys.stderr).write(format_warning(message, category, filename, lineno, line))


def run_cli(main: Callable[[], object]) -> NoReturn:
    """Call ``main()``; on ``UserError`` print ``error: <message>`` and exit 2.

    Warnings print as ``warning: <message>``, one line each. ``KeyboardInterrupt``
    exits 130 quietly. Anything else is a bug and keeps its traceback.
    """
    warnings.showwarning = _show_warning
    try:
        status = main()
    except UserError as exc:
        report_error(f"error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
