"""The host's CPU resources: how many cores this process may use, spreading work over them, and how
its C heap behaves.
"""

import ctypes
import ctypes.util
import multiprocessing
import os
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 256 * 1024 * 1024


def available_cores() -> int:
    """The cores in this process's affinity mask (a container's or taskset's limit), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def keep_freed_heap() -> bool:
    """Let glibc's malloc reuse freed blocks of up to 32 MiB instead of returning them to the kernel.

    A CPU training step allocates and frees the same tensors, many of a few
    MiB, every step. glibc serves such blocks with fresh ``mmap`` pages (and
    trims its heap on free), so each step pays the kernel to zero and fault in
    the same memory again: a batch's float32 filterbank took 13-16 ms instead
    of 9-10 ms, one demo training process about 4% longer a step (two
    processes sharing two cores: within the noise). With blocks up to
    32 MiB kept in the heap and up to 256 MiB of free heap kept before it is
    trimmed, the process holds on to about its step's peak. Larger blocks are
    still mapped and unmapped. Processes forked later (DataLoader workers)
    inherit the setting.

    Returns False (and changes nothing) when the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the trim threshold first: setting either turns off glibc's dynamic thresholds
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    )


def map_in_processes(fn: Callable[[T], R], tasks: Sequence[T], workers: int) -> Iterator[R]:
    """``fn`` of every task, in order: in a pool of ``workers`` processes, or here when one would do.

    The pool forks where it can (workers inherit the imported modules instead of
    re-importing torch). ``fn`` may set torch's thread count for its process;
    run here, the caller's count is restored afterwards.
    """
    if workers <= 1 or len(tasks) < 2:
        threads = torch.get_num_threads()
        try:
            yield from map(fn, tasks)
        finally:
            torch.set_num_threads(threads)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(fn, tasks)
