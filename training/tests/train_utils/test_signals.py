"""PreemptionHandler: the first signal sets a flag, the second exits at once."""

import signal
import subprocess
import sys
import textwrap

import pytest

from caiman_asr_train.train_utils.signals import PreemptionHandler

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from caiman_asr_train.train_utils.signals import PreemptionHandler
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.{name})
        time.sleep(0.2)  # the handler runs between bytecodes
        print("stop requested:", handler.stop_requested, handler.signum, flush=True)
        os.kill(os.getpid(), signal.{name})
        time.sleep(5)
        print("still running", flush=True)
    """)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_first_signal_requests_a_stop_and_second_exits_immediately(name):
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(name=name)], capture_output=True, text=True, timeout=60
    )
    signum = int(getattr(signal, name))
    assert result.stdout.splitlines() == [f"stop requested: True {signum}"]
    assert result.returncode == 128 + signum
    assert f"{name} received" in result.stderr and f"{name} again: exiting now" in result.stderr


def test_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGTERM) == handler._handle
        assert not handler.stop_requested
    assert signal.getsignal(signal.SIGTERM) == before
