"""Preemption: the first SIGTERM/SIGINT asks training to stop cleanly, a second one exits at once."""

import os
import signal
import sys
import threading
from types import FrameType
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class PreemptionHandler:
    """Turns the first SIGTERM or SIGINT into a flag the training loop polls.

    The loop finishes the optimizer step it is in, saves the last checkpoint,
    runs the finalize callbacks and exits. A second signal exits immediately
    with status 128 + signal number (files are written atomically, so nothing
    is left half-written). Use as a context manager; the previous handlers come
    back on exit. Only the main thread can install signal handlers, so
    elsewhere this is a no-op that never fires.

    Args:
        notify: called with the one-line notice of each signal, before any exit
            (the trainer passes its logger, so the notices reach ``train.log``
            too); default: print to stderr.
    """

    def __init__(self, notify: Callable[[str], None] = _to_stderr) -> None:
        self.notify = notify
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def stop_requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self.notify(f"{name} again: exiting now without saving")
            os._exit(128 + signum)
        self.signum = signum
        self.notify(
            f"{name} received: finishing this step, then saving the last checkpoint and "
            f"exporting (send it again to exit at once)"
        )

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
