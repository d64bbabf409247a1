"""Crash-safe file writes: temporary file in the same directory, flush, fsync, rename.

A reader never sees a partially written file under its final name: either the
old file (or none) or the complete new one. A write the file system refuses
(read-only, permission denied, a directory in the way, no space left, file too
large) raises ``OutputError``: one line naming the path, nothing left behind.
"""

import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

from caiman_asr_train.core.errors import OutputError

PathLike = Union[str, os.PathLike]

# errno -> what to tell the user; other OSErrors are bugs or hardware faults and keep their traceback.
_OUTPUT_PROBLEMS = {
    errno.EACCES: "permission denied; choose a writable location",
    errno.EPERM: "permission denied; choose a writable location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EISDIR: "it is a directory; give a file path",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EFBIG: "the file is too large for this file system or process limit; write elsewhere",
}

# Protocol 2 is what torch.load(weights_only=True) and the inference server read.
PICKLE_PROTOCOL = 2


def _default_mode() -> int:
    """0o666 minus the process umask: what open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable (best effort: some file systems refuse)."""
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


def atomic_write_bytes(path: PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (``durable``: as ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(data), durable)


class _RecordingFile(io.RawIOBase):
    """A binary file that remembers the first OSError of a write.

    torch's zip writer turns a failed write into a RuntimeError about stream
    positions; the recorded error says what really happened.
    """

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self._f = f
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()

    def seekable(self) -> bool:
        return self._f.seekable()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


def _output_error(path: Path, exc: OSError) -> Optional[OutputError]:
    problem = _OUTPUT_PROBLEMS.get(exc.errno)
    return None if problem is None else OutputError(f"cannot write {path}: {problem}")


def atomic_write(path: PathLike, write_fn: Callable[[BinaryIO], Any], durable: bool = True) -> None:
    """Call ``write_fn(binary_file)`` on a temporary file, then rename it to ``path``.

    ``durable=False`` skips the two fsyncs (the file's and its directory's): the
    rename still makes the file appear whole or not at all to every reader, but
    a power cut may lose it. For the many small files of a job that syncs once
    at the end, before it records that the job is complete (the demo corpus).

    Raises:
        OutputError: the file system refused the write (see the module docstring).
    """
    path = Path(path)
    try:
        _write_and_rename(path, write_fn, durable)
    except OSError as exc:
        error = _output_error(path, exc)
        if error is None:
            raise
        raise error from None


def _write_and_rename(path: Path, write_fn: Callable[[BinaryIO], Any], durable: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recording = None
    try:
        with os.fdopen(fd, "wb") as f:
            recording = _RecordingFile(f)
            write_fn(recording)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_name, _default_mode())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if recording is not None and recording.error is not None and not isinstance(exc, OSError):
            raise recording.error from None
        raise
    if durable:
        fsync_dir(path.parent)


def replace_directory(built: PathLike, target: PathLike) -> None:
    """Rename the finished directory ``built`` onto ``target`` (a sibling), durably.

    An existing ``target`` is moved aside first and deleted only once ``built``
    has taken its name, so a reader finds the old directory or the new one,
    never a mix or nothing with a half-built one in its place.
    """
    built, target = Path(built), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{built.name}")
        target.rename(old)
    built.rename(target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


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
