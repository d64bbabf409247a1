"""How many CPU cores this process may use."""

import os


def available_cores() -> int:
    """The cores in this process's affinity mask (a container's or taskset's limit), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
