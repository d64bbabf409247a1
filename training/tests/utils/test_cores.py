"""keep_freed_heap: freed blocks of a few MiB are reused instead of faulted in again from the kernel."""

import subprocess
import sys

import pytest
import torch

from caiman_asr_train.utils.cores import available_cores, map_in_processes

# 20 times: allocate and touch four 8 MiB blocks, then free them (as a training
# step's tensors come and go); print the page faults of the last 19 rounds.
_PROBE = """
import ctypes, resource, sys
from caiman_asr_train.utils.cores import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 << 20
def cycle():
    blocks = [libc.malloc(size) for _ in range(4)]
    for p in blocks:
        ctypes.memset(p, 1, size)
    for p in blocks:
        libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_heap_stops_refaulting_freed_blocks():
    pages = 19 * 4 * (8 << 20) // 4096
    # glibc's defaults map such blocks afresh or trim them off the heap when freed
    default = _faults("default")
    kept = _faults("keep")
    assert default > pages // 2, f"plain malloc refaulted only {default} of {pages} pages"
    assert kept < pages // 100, f"{kept} page faults for 19 reuses of four freed 8 MiB blocks"


def test_available_cores_is_positive():
    assert available_cores() >= 1


def _one_thread_square(x: int) -> int:
    torch.set_num_threads(1)
    return x * x


def test_map_in_processes_keeps_order_and_the_callers_threads():
    tasks = list(range(7))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert list(map_in_processes(_one_thread_square, tasks, workers=1)) == [x * x for x in tasks]
        assert torch.get_num_threads() == 2
        assert list(map_in_processes(_one_thread_square, tasks, workers=2)) == [x * x for x in tasks]
    finally:
        torch.set_num_threads(before)
