"""The multi-process path as a user drives it: ./train.sh --num_gpus 2 with real signals.

Every process the run starts (the launcher, both gloo ranks, their loader
workers) must stop with it: a first SIGTERM/SIGINT finishes the step, saves the
last checkpoint and exports; a second exits at once; a user error prints one
line, not one per rank and no launcher traceback.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from caiman_asr_train.core.load_hw import load_hw_checkpoint, read_checkpoint

_spec = importlib.util.spec_from_file_location("_train_tests", Path(__file__).with_name("test_train.py"))
_train_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_tests)
corpus = _train_tests.corpus
run_args = _train_tests.run_args
_wait_for_line = _train_tests._wait_for_line

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")


def _start_train_sh(corpus, output_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CAIMAN_PYTHON": sys.executable}
    command = [
        str(REPO_ROOT / "train.sh"),
        *run_args(corpus, output_dir, "--num_gpus", "2", "--device", "cpu", *extra),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run_processes(process: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process below it (ranks, loader workers)."""
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def _alive(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_for_ranks(process: subprocess.Popen, count: int = 2, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes = _run_processes(process)
        if sum("caiman_asr_train" in " ".join(p.cmdline()) for p in processes[1:]) >= count:
            return processes
        time.sleep(0.2)
    raise AssertionError("the ranks did not start")


def test_sigterm_to_train_sh_finishes_saves_exports_and_leaves_no_process(corpus, tmp_path):
    out = tmp_path / "run"
    process = _start_train_sh(corpus, out, "--training_steps", "100000", "--save_frequency", "0")
    _wait_for_line(process, r"^step 3/", timeout=240)
    processes = _wait_for_ranks(process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    # rank 0 reports the stop once; a rank that got the signal twice would have
    # exited at once without saving ("again: exiting now")
    assert stderr.count("SIGTERM received") == 1 and "again: exiting now" not in stderr, stderr
    assert "Traceback" not in stderr
    last = read_checkpoint(out / "RNN-T_last_checkpoint.pt")
    assert 3 <= last["step"] < 100000
    for name in ("best", "last"):
        assert load_hw_checkpoint(out / f"RNN-T_{name}_checkpoint.hw.pt").step >= 1
    time.sleep(0.5)
    assert _alive(processes) == []


def test_second_sigint_exits_at_once_with_nothing_left_running(corpus, tmp_path):
    out = tmp_path / "run"
    process = _start_train_sh(corpus, out, "--training_steps", "100000", "--save_frequency", "0")
    _wait_for_line(process, r"^step 2/", timeout=240)
    processes = _wait_for_ranks(process)
    process.send_signal(signal.SIGINT)
    # The second signal must come after the ranks handled the first (two
    # signals that arrive before Python runs the handler count as one) and
    # before they finish saving and exporting: send it as soon as rank 0 has
    # logged the first.
    deadline = time.monotonic() + 60
    while "SIGINT received" not in (out / "train.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGINT, stderr
    assert time.monotonic() - start < 30
    assert "SIGINT again: exiting now" in stderr
    time.sleep(0.5)
    assert _alive(processes) == []


def test_a_user_error_on_every_rank_prints_one_line_and_no_traceback(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "RNN-T_step2_checkpoint.pt").write_bytes(b"")
    process = _start_train_sh(corpus, out, "--training_steps", "2")
    _, stderr = process.communicate(timeout=240)

    assert process.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already holds checkpoints" in errors[0], stderr
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
