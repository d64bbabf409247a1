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


NOTIFY_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from caiman_asr_train.train_utils.signals import PreemptionHandler
    log = open(sys.argv[1], "a")

    def notify(message):
        log.write(message + "\\n")
        log.flush()

    with PreemptionHandler(notify=notify):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    """)


def test_both_notices_go_to_the_given_callable_before_the_exit(tmp_path):
    log = tmp_path / "train.log"
    result = subprocess.run(
        [sys.executable, "-c", NOTIFY_CHILD, str(log)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 128 + signal.SIGTERM
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("SIGTERM received: finishing this step")
    assert lines[1] == "SIGTERM again: exiting now without saving"
