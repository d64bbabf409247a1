"""Drop files from the page cache (Linux): cold-cache runs of the benchmarks and tests."""

import os
from pathlib import Path
from typing import Iterable, Union


def evict(paths: Iterable[Union[str, Path]]) -> None:
    """Drop every file of ``paths`` (files, or directories walked) from the page cache.

    The next read of them comes from the disk. Each file is synced first: only
    clean pages can be dropped.
    """
    for path in paths:
        if os.path.isdir(path):
            files = [os.path.join(directory, name) for directory, _, names in os.walk(path) for name in names]
        else:
            files = [path]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
