"""One tensor item of a ``.distcp`` file: where its elements lie on disk, and how to write one.

``torch.distributed.checkpoint.FileSystemWriter`` stores each tensor chunk
(the whole tensor, or one rank's shard of it) as a ``torch.save`` archive
placed at ``offset`` in a ``.distcp`` file, ``length`` bytes long (the
``_StorageInfo`` of ``.metadata``'s ``storage_data``). The archive is an
uncompressed zip: ``archive/data.pkl`` (how to rebuild the tensor: dtype,
shape, strides, storage offset), ``archive/byteorder`` and the storage's raw
bytes in ``archive/data/0``.

``locate`` reads the item's first page: its local headers, ``data.pkl`` and
the local header of ``data/0``. A ``data.pkl`` byte for byte what ``torch.save``
writes for a contiguous tensor of the shape and dtype ``.metadata`` gives (DCP's
items are) says all it needs. Any other item is read through the zip's
directory at its end, its ``data.pkl`` with ``torch.load(weights_only=True,
map_location="meta")`` (nothing is unpickled outside torch's allow-list, and no
element is read). The result says at which file offset the chunk's row-major
elements start, so that averaging reads any rows of it with ``os.preadv`` into
a buffer of its own. ``write_item`` writes an archive that ``torch.load`` and
DCP read back, its elements written in blocks by the caller's threads, so that
no whole tensor is ever held in memory.
"""

import collections
import functools
import io
import math
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np
import torch

from caiman_asr_train.core.errors import CheckpointError

__all__ = ["StoredChunk", "locate", "read_rows", "write_item"]

# The storage classes torch pickles for the dtypes that are averaged (other dtypes are copied as bytes).
_STORAGE_CLASS = {
    torch.float64: torch.DoubleStorage,
    torch.float32: torch.FloatStorage,
    torch.float16: torch.HalfStorage,
    torch.bfloat16: torch.BFloat16Storage,
}
AVERAGED_DTYPES = frozenset(_STORAGE_CLASS)
# A zip local header: signature, version, flags, method, (time and date), CRC, sizes, name and extra lengths
_LOCAL = struct.Struct("<4sHHH4xIIIHH")
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_HEAD_BYTES = 4096  # an item's first page: torch.save's small records and the local header of its elements
_DESCRIPTOR = struct.Struct("<4sIII")  # a data descriptor: signature, CRC, compressed and uncompressed sizes
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
ARCHIVE = "archive"


@dataclass(frozen=True)
class StoredChunk:
    """One stored chunk of a tensor: its place in the whole tensor and in a file.

    Elements are stored row-major (C order) from byte ``data_offset`` of ``path``.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    data_offset: int
    itemsize: int

    @property
    def row(self) -> int:
        """Elements per index of the first dimension (1 for 0-d and 1-d chunks)."""
        return math.prod(self.sizes[1:])


class _FileView(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a read-only seekable file (read with ``preadv``)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        got = os.preadv(self._fd, [view[:n]], self._start + self._pos) if n else 0
        self._pos += got
        return got

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


def locate(
    directory: Path, key: str, info: Any, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype
) -> StoredChunk:
    """Where the elements of one stored chunk of ``key`` lie (module docstring).

    Args:
        info: the chunk's ``_StorageInfo`` (``relative_path``, ``offset``, ``length``).
        offsets, sizes: the chunk's place in the whole tensor (``.metadata``).
        dtype: the tensor's dtype (``.metadata``).

    Raises:
        CheckpointError: a missing or truncated file, an item that is not a plain
            ``torch.save`` archive of a row-major tensor of that shape and dtype.
    """
    path = directory / info.relative_path
    where = f"{directory}: '{key}' in {info.relative_path}"
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            f"{where} is stored through {list(info.transform_descriptors)}; "
            "averaging reads plain torch_save items only, re-save without storage extensions"
        )
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot open it ({exc}); is the checkpoint complete?") from None
    try:
        if os.fstat(fd).st_size < info.offset + info.length:
            raise CheckpointError(f"{where} is truncated; is the checkpoint complete?")
        head = os.pread(fd, min(info.length, _HEAD_BYTES), info.offset)
        start = _data_start(head, dtype, tuple(sizes))
        if start is not None:
            # A plain item: its head alone says where the elements start (no read of the zip's directory at
            # the item's end, a second place on disk to wait for while the inputs are read)
            if start + math.prod(sizes) * dtype.itemsize > info.length:
                raise CheckpointError(
                    f"{where}: its elements run past the item's end; re-save the checkpoint"
                )
            return StoredChunk(tuple(offsets), tuple(sizes), path, info.offset + start, dtype.itemsize)
        view = _FileView(fd, info.offset, info.length)
        try:
            with zipfile.ZipFile(view) as archive:
                records = {name.split("/", 1)[-1]: archive.getinfo(name) for name in archive.namelist()}
                byteorder = archive.read(records["byteorder"]) if "byteorder" in records else b"little"
                stored_pickle = archive.read(records["data.pkl"])
            if stored_pickle == _plain_pickle(dtype, tuple(sizes)):
                # What torch.save writes for a contiguous tensor of this dtype and shape that owns its
                # storage: no need to unpickle it (most items; 0.4 ms each through torch.load)
                layout = torch.empty(sizes, dtype=dtype, device="meta")
            else:
                view.seek(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    layout = torch.load(view, weights_only=True, map_location="meta")
            data = records["data/0"]
            view.seek(data.header_offset)
            signature, *_, name_length, extra_length = _LOCAL.unpack(view.read(_LOCAL.size))
        except (
            RuntimeError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            KeyError,
            struct.error,
            ValueError,
            EOFError,
        ) as exc:
            raise CheckpointError(
                f"{where}: not a readable torch.save item ({str(exc).splitlines()[0]}); is the checkpoint complete?"
            ) from None
    finally:
        os.close(fd)
    itemsize = layout.element_size() if isinstance(layout, torch.Tensor) else 0
    if (
        not isinstance(layout, torch.Tensor)
        or layout.dtype != dtype
        or tuple(layout.shape) != tuple(sizes)
        or not layout.is_contiguous()
        or signature != _LOCAL_HEADER_SIGNATURE
        or data.compress_type != zipfile.ZIP_STORED
        or byteorder != b"little"
        or data.file_size < (layout.storage_offset() + layout.numel()) * itemsize
    ):
        raise CheckpointError(
            f"{where}: not a little-endian, uncompressed, row-major {dtype} tensor of shape {list(sizes)} "
            "(as torch.distributed.checkpoint saves one); re-save the checkpoint"
        )
    data_offset = (
        info.offset
        + data.header_offset
        + _LOCAL.size
        + name_length
        + extra_length
        + layout.storage_offset() * itemsize
    )
    return StoredChunk(tuple(offsets), tuple(sizes), path, data_offset, itemsize)


def _data_start(head: bytes, dtype: torch.dtype, sizes: tuple[int, ...]) -> int | None:
    """Where ``data/0``'s bytes start in an item whose first bytes are ``head``, read from its local headers.

    Only for an item as ``torch.save`` writes a contiguous tensor of this dtype and shape: uncompressed
    records whose sizes are in the local header or in a data descriptor after the data (as torch writes
    them), a ``data.pkl`` byte for byte ``tensor_pickle``'s, a ``byteorder`` (if any) of ``little``,
    all before ``data/0``. ``None`` for anything else: ``locate`` then reads the zip's directory.
    """
    expected = _plain_pickle(dtype, sizes)
    pos, plain = 0, False
    while pos + _LOCAL.size <= len(head):
        signature, _, flags, method, _, size, _, name_length, extra_length = _LOCAL.unpack_from(head, pos)
        start = pos + _LOCAL.size + name_length + extra_length
        if (
            signature != _LOCAL_HEADER_SIGNATURE
            or method != zipfile.ZIP_STORED
            or flags & 1
            or start > len(head)
        ):
            return None
        member = head[pos + _LOCAL.size : pos + _LOCAL.size + name_length].split(b"/", 1)[-1]
        if member == b"data/0":
            return start if plain and expected else None
        end = start + size
        if flags & 8:  # the sizes follow the data: the first descriptor whose size matches ends the record
            end = head.find(_DESCRIPTOR_SIGNATURE, start)
            while end >= 0 and (
                end + _DESCRIPTOR.size > len(head)
                or _DESCRIPTOR.unpack_from(head, end)[2:] != (end - start,) * 2
            ):
                end = head.find(_DESCRIPTOR_SIGNATURE, end + 1)
            if end < 0:
                return None
        if end > len(head):
            return None
        if member == b"data.pkl":
            plain = head[start:end] == expected
        elif member == b"byteorder" and head[start:end] != b"little":
            return None
        pos = end + (_DESCRIPTOR.size if flags & 8 else 0)
    return None


def read_rows(fd: int, chunk: StoredChunk, start: int, stop: int, out: np.ndarray, where: str) -> None:
    """Rows ``[start, stop)`` (of the first dimension) of ``chunk``, read from ``fd`` into the flat ``out``.

    Raises:
        CheckpointError: the file ends before the rows (truncated since it was located).
    """
    count = (stop - start) * chunk.row
    buffer = out[:count]
    if os.preadv(fd, [buffer], chunk.data_offset + start * chunk.row * chunk.itemsize) != buffer.nbytes:
        raise CheckpointError(f"{where} is truncated; is the checkpoint complete?")


class _Region(io.RawIOBase):
    """A writable file seen from ``start``: a zip archive written here has offsets relative to its own start,
    as an item of a ``.distcp`` file must.

    While ``skipping``, a write moves past bytes that somebody else writes (``write_item``).
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file, self._start = file, file.tell()
        self.skipping = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.skipping:
            n = memoryview(data).nbytes
            self._file.seek(n, io.SEEK_CUR)
            return n
        return self._file.write(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos += self._start
        return self._file.seek(pos, whence) - self._start

    def tell(self) -> int:
        return self._file.tell() - self._start

    def flush(self) -> None:
        self._file.flush()


class _Storage:
    """Pickled as torch pickles a tensor's storage: a persistent id naming its class, key, device and size."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.persistent_id = ("storage", _STORAGE_CLASS[dtype], "0", "cpu", numel)


class _Tensor:
    """Pickled as ``torch.save`` pickles a contiguous CPU tensor of this shape that owns its storage."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.storage = _Storage(dtype, math.prod(shape))
        self.shape = tuple(shape)

    def __reduce__(self) -> tuple:
        # torch's contiguous strides: a zero-size dimension counts as 1
        strides = tuple(math.prod(max(n, 1) for n in self.shape[i + 1 :]) for i in range(len(self.shape)))
        rebuild = torch._utils._rebuild_tensor_v2  # what torch.load(weights_only=True) allows for tensors
        return rebuild, (self.storage, 0, self.shape, strides, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.persistent_id if isinstance(obj, _Storage) else None


def tensor_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``data.pkl`` that ``torch.save`` writes for a contiguous tensor of ``dtype`` and ``shape``."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(_Tensor(dtype, shape))
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _plain_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    return tensor_pickle(dtype, shape) if dtype in _STORAGE_CLASS else b""


def write_item(
    file: BinaryIO,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    blocks: Callable[[int], Iterable[np.ndarray]],
) -> int:
    """Append to ``file`` a ``torch.save`` archive of a tensor whose row-major stored bits come in blocks.

    ``blocks(offset)`` gets the offset in ``file`` at which the elements start and yields the
    blocks in order, each already written at its place (``os.pwrite`` on ``file.fileno()``), so
    that several threads write at once. The zip module sees every block as it is yielded, for its
    CRC and sizes, and moves past it. Returns the item's length in bytes (its
    ``_StorageInfo.length``).
    """
    start = file.tell()
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    region = _Region(file)
    with zipfile.ZipFile(region, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(zipfile.ZipInfo(f"{ARCHIVE}/data.pkl"), tensor_pickle(dtype, shape))
        archive.writestr(zipfile.ZipInfo(f"{ARCHIVE}/byteorder"), b"little")
        record = zipfile.ZipInfo(f"{ARCHIVE}/data/0")
        record.file_size = nbytes  # lets the zip module choose zip64 up front for items over 4 GiB
        written = 0
        with archive.open(record, "w") as out:
            file.flush()  # the headers reach the file before the elements are written beside them
            region.skipping = True
            try:
                for block in blocks(file.tell()):
                    written += out.write(memoryview(block).cast("B"))
            finally:
                region.skipping = False
        if written != nbytes:
            raise AssertionError(f"wrote {written} bytes of a {nbytes}-byte tensor")
        archive.writestr(zipfile.ZipInfo(f"{ARCHIVE}/version"), b"3\n")
    return file.tell() - start
