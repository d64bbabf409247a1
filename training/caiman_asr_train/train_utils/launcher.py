"""Start one training process per device on this machine and own their lifetime.

``--num_gpus N`` (N > 1) re-runs the same command N times with the environment
``torchrun --standalone --nproc_per_node N`` would give each process
(``MASTER_ADDR``/``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``), so the processes join one gloo/NCCL group through
``env://``. Unlike a plain ``torchrun`` child, the launcher:

- forwards SIGTERM and SIGINT to every rank exactly once per signal (the ranks
  run in their own session, so a terminal's Ctrl-C reaches them only through
  here): the first means "finish the step, save, export, exit", the second
  "exit now";
- ends every rank when one of them fails, instead of leaving the others blocked
  in a collective, and exits with the failing rank's status;
- prints each distinct user error once (ranks write theirs to a shared
  directory instead of printing one copy each), with no launcher traceback;
- takes its ranks down with it if it is killed (``PR_SET_PDEATHSIG``).

Multi-node jobs use ``torchrun`` directly; a process started by it is detected
by :func:`caiman_asr_train.train_utils.distributed.under_torchrun`.
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Optional, Sequence

from caiman_asr_train.train_utils.signals import STOP_SIGNALS
from caiman_asr_train.utils.cli import ERROR_DIR_ENV

# After one rank fails, the others get this long to exit by themselves.
PEER_GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1
_STOPPED_ON_REQUEST = {128 + int(s) for s in STOP_SIGNALS}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: be killed when the launcher dies, however it dies."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the launcher's own cleanup is all there is
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def _exit_status(returncode: int) -> int:
    """Popen's returncode as a shell would show it (-15 -> 143)."""
    return 128 - returncode if returncode < 0 else returncode


def _command(argv: Sequence[str]) -> list[str]:
    script = os.path.abspath(getattr(sys.modules["__main__"], "__file__", None) or "")
    if script.endswith(".py") and os.path.isfile(script):
        return [sys.executable, script, *argv]
    # started as `python -m caiman_asr_train.train` or as a console script
    return [sys.executable, "-m", "caiman_asr_train.train", *argv]


def launch_local_processes(num_procs: int, argv: Sequence[str]) -> int:
    """Run this training command as ``num_procs`` ranks; return the job's exit status.

    0 when every rank succeeded; the status of the first rank that failed
    otherwise; 128 + signal number when the ranks stopped on a forwarded signal,
    and always after a second one: "exit now" ends the ranks wherever they are,
    and a rank whose peer exits first fails in its collective (a gloo
    "Connection reset by peer") before its own handler runs; that failure is
    the requested exit, not an error of the job.
    """
    command = _command(argv)
    error_dir = Path(tempfile.mkdtemp(prefix="caiman_rank_errors."))
    port = _free_port()
    print(f"launching {num_procs} processes: {' '.join(command)}", flush=True)
    procs: list[subprocess.Popen] = []
    previous = {}
    forwarded: list[int] = []

    def forward(signum: int, frame: Optional[FrameType]) -> None:
        forwarded.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        for rank in range(num_procs):
            env = dict(
                os.environ,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(num_procs),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(num_procs),
                GROUP_RANK="0",
                **{ERROR_DIR_ENV: str(error_dir)},
            )
            procs.append(
                subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)
            )
        status = _wait_all(procs)
        if len(forwarded) >= 2:
            status = 128 + int(forwarded[-1])
    finally:
        for proc in procs:  # only reached with live ranks if the launcher itself failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _print_rank_errors(error_dir)
        shutil.rmtree(error_dir, ignore_errors=True)
    return status


def _wait_all(procs: list[subprocess.Popen]) -> int:
    """Wait for every rank; kill the survivors a grace period after one fails."""
    failed = stopped = 0
    kill_at: Optional[float] = None
    pending = set(range(len(procs)))
    while pending:
        for rank in sorted(pending):
            code = procs[rank].poll()
            if code is None:
                continue
            pending.discard(rank)
            code = _exit_status(code)
            if code in _STOPPED_ON_REQUEST:
                stopped = stopped or code
            elif code:
                failed = failed or code
                if kill_at is None:
                    kill_at = time.monotonic() + PEER_GRACE_SECONDS
        if kill_at is not None and time.monotonic() >= kill_at:
            for rank in pending:
                procs[rank].kill()
        time.sleep(0.1)
    # A real failure (an export that failed after a stop request, say) outranks
    # the stop itself.
    return failed or stopped


def _print_rank_errors(error_dir: Path) -> None:
    """Each distinct error line the ranks wrote, once, in rank order."""
    seen: list[str] = []
    for path in sorted(error_dir.glob("rank*"), key=lambda p: int(p.name[4:] or 0)):
        line = path.read_text(errors="replace").strip()
        if line and line not in seen:
            seen.append(line)
    for line in seen:
        print(line, file=sys.stderr, flush=True)
