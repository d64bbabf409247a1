"""Resident-memory readings and memory-limited cgroups for the benchmarks (Linux)."""

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _own_cgroup(controller: str) -> Optional[Path]:
    """This process's cgroup directory for ``controller`` (v1), or the unified one (v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_ROOT / controller / path.lstrip("/")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    return None


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Optional[Path]]:
    """A child memory cgroup limited to ``limit_bytes`` (None where cgroups are not writable here).

    A process joins it by writing its pid to ``<cgroup>/cgroup.procs`` (``join``);
    the directory is removed on exit, once its processes have ended.
    """
    parent = _own_cgroup("memory")
    group = None
    if parent is not None:
        try:
            group = parent / f"bench-{uuid.uuid4().hex[:8]}"
            group.mkdir()
            v1 = (group / "memory.limit_in_bytes").exists()
            (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit_bytes))
            if v1 and (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        except OSError:
            with contextlib.suppress(OSError):
                if group is not None:
                    group.rmdir()
            group = None
    try:
        yield group
    finally:
        if group is not None:
            with contextlib.suppress(OSError):
                group.rmdir()


def join(group: Optional[Path]) -> None:
    """Move this process into ``group`` (from ``memory_cgroup``); nothing if None."""
    if group is not None:
        (group / "cgroup.procs").write_text(str(os.getpid()))
