"""Crash-safe file writes: temporary file in the same directory, flush, fsync, rename.

A reader never sees a partially written file under its final name: either the
old file (or none) or the complete new one.
"""

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]

# Protocol 2 is what torch.load(weights_only=True) and the inference server read.
PICKLE_PROTOCOL = 2


def _default_mode() -> int:
    """0o666 minus the process umask: what open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: PathLike, write_fn) -> None:
    """Call ``write_fn(binary_file)`` on a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_name, _default_mode())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` with pickle protocol 2, atomically."""
    import torch  # imported here so that commands writing only JSON or audio start fast

    atomic_write(path, lambda f: torch.save(obj, f, pickle_protocol=PICKLE_PROTOCOL))


def torch_bytes(obj: Any) -> bytes:
    """Serialise ``obj`` as ``torch.save`` would write it (protocol 2)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_protocol=PICKLE_PROTOCOL)
    return buffer.getvalue()
