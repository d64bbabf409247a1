"""Run command-line entry points so that expected mistakes print one line, not a traceback."""

import sys
from typing import Callable, NoReturn

from caiman_asr_train.core.errors import UserError


def run_cli(main: Callable[[], object]) -> NoReturn:
    """Call ``main()``; on ``UserError`` print ``error: <message>`` and exit 2.

    ``KeyboardInterrupt`` exits 130 quietly. Anything else is a bug and keeps its
    traceback.
    """
    try:
        status = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
