"""Run command-line entry points so that expected mistakes print one line, not a traceback."""

import sys
import warnings
from typing import Callable, NoReturn, Optional, TextIO

from caiman_asr_train.core.errors import UserError


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
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
