"""Averaging of torch.distributed.checkpoint (DCP) directories, a block of rows at a time.

A DCP directory (PyTorch's, or Megatron's ``torch_dist``) holds ``*.distcp``
data files and a pickled ``.metadata``. Megatron pickles its own classes into
``.metadata``, and unpickling runs whatever a pickle names, so ``.metadata`` is
read with a restricted unpickler (``read_metadata``): torch's DCP metadata
classes, dtypes and plain containers load; any other class becomes an inert
placeholder; nothing is called.

Each stored chunk of a floating tensor is a ``torch.save`` archive whose raw
elements ``sharded_distcp.locate`` finds (its ``data.pkl`` compared with what
``torch.save`` writes for the tensor, or read by ``torch.load(weights_only=True)``
on the meta device). The output keeps the
most-weighted input's chunks; each is averaged a block of rows at a time: the
block is read from every input with ``os.preadv`` (gathered from several
stored chunks when an input was saved with another parallelism) into one
stack, summed in float64 and cast back with one round-to-nearest-even
(``averaging_kernels``), and appended to the output's archive of that chunk
(``sharded_distcp.write_item``). Memory holds a few blocks, never a tensor,
whatever its size and the number of inputs. Integer
tensors and non-tensor entries (extra state) are copied byte for byte from the
most-weighted input, without unpickling them. Everything goes into one data
file, ``__0_0.distcp``; the output's ``.metadata`` is written last. An input's
items that were read from disk leave the page cache once averaged; an input
that was cached stays cached.
"""

import collections
import concurrent.futures
import dataclasses
import enum
import functools
import math
import os
import pickle
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.export.averaging_engine import non_finite_error
from caiman_asr_train.export.averaging_kernels import WeightedSum, thread_stack
from caiman_asr_train.export.sharded_averaging import (
    DCP_METADATA,
    is_optimizer_key,
    not_cached,
    page_cache_hint,
    slice_elements,
    worker_threads,
)
from caiman_asr_train.export.sharded_distcp import (
    AVERAGED_DTYPES,
    StoredChunk,
    locate,
    read_rows,
    write_item,
)
from caiman_asr_train.utils.atomic import atomic_write

__all__ = ["DATA_FILE", "average", "read_metadata"]

Log = Callable[[str], None]

DATA_FILE = "__0_0.distcp"
# A thread's stack: each block reads ``READ_BYTES / N`` of every input with one ``preadv`` apiece, and the
# kernel's own read-ahead, which follows each input's sequential reads, fetches what comes next. Asking it
# for every item ahead (POSIX_FADV_WILLNEED) with 1 MiB stacks, as before, was slower: 5 base-size
# checkpoints from a cold cache took 0.96 s against 1.22 s (medians of 12 paired runs, all 12 faster),
# and 1.27 s against 1.40 s in another hour (8 of 10 faster); 1 MiB without the hint took 1.07 s, 8 MiB
# 0.95 s, 4 MiB with the hint 1.29 s. With MAX_THREADS threads and their blocks in flight, memory stays
# under twice the largest stored chunk of a base-size model.
READ_BYTES = 4 << 20
_IN_FLIGHT = 2  # blocks queued per thread: enough to keep every thread busy while the writer catches up
_COPY_BLOCK = 1 << 20  # bytes per read when copying an entry: memory stays flat for large copied tensors
_ALLOWED = {
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    ("torch.serialization", "_get_layout"),  # how torch pickles a layout: a lookup by name
    *(
        ("builtins", name)
        for name in ("object", "set", "frozenset", "slice", "tuple", "list", "dict", "bytearray")
    ),
}


class _Placeholder:
    """Stands in for a class that ``.metadata`` names but that is not ours to run (Megatron's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _member(owner: Any, name: str) -> Any:
    """``getattr`` as a pickle may call it, for enum members only.

    Python before 3.11.5 pickles an enum member as ``getattr(EnumClass,
    name)`` (DCP's ``_MEM_FORMAT_ENCODING`` in every tensor's properties);
    a class that is only a placeholder gets a placeholder member.
    """
    if isinstance(owner, type) and issubclass(owner, enum.Enum) and name in owner.__members__:
        return owner[name]
    if isinstance(owner, type) and issubclass(owner, _Placeholder):
        return owner(name)
    raise pickle.UnpicklingError(f"getattr({owner!r}, {name!r}) is not an enum member")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _member
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        return type(name, (_Placeholder,), {"__module__": f"placeholder.{module}"})


def read_metadata(directory: Path) -> Metadata:
    """The ``.metadata`` of a DCP directory, read with the restricted unpickler (module docstring).

    Raises:
        CheckpointError: a missing or corrupt ``.metadata``.
    """
    path = directory / DCP_METADATA
    try:
        with open(path, "rb") as f:
            metadata = _RestrictedUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unreadable DCP metadata ({exc}); is the checkpoint complete?"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata")
    return metadata


def average(
    inputs: list[Path], build: Path, weights: list[float], keeper: int, keep_optimizer: bool, log: Log
) -> dict:
    """Write the weighted average of the DCP checkpoints ``inputs`` into the empty directory ``build``.

    Returns:
        Counts for ``averaging.json``: tensors averaged, tensors and other entries copied.
    """
    metas = [read_metadata(path) for path in inputs]
    _check_compatible(inputs, metas)
    stored = [_stored_by_key(meta) for meta in metas]
    used = [i for i, weight in enumerate(weights) if weight > 0]  # a NaN in a zero-weight input cannot count
    ref = metas[keeper]
    state_dict_metadata: dict = {}
    storage_data: dict = {}
    planner_data: dict = {}
    averaged = copied = 0
    threads = worker_threads()
    wanted = [key for key in ref.state_dict_metadata if keep_optimizer or not is_optimizer_key(key)]
    to_average = [key for key in wanted if _is_averaged(key, ref.state_dict_metadata[key])]
    for key in to_average:
        if ref.state_dict_metadata[key].properties.dtype not in AVERAGED_DTYPES:
            raise CheckpointError(
                f"{inputs[keeper]}: '{key}' is {ref.state_dict_metadata[key].properties.dtype}; averaging "
                "reads bfloat16, float16, float32 and float64 tensors"
            )
    # Each averaged item of a data file that is read from disk leaves the page cache once averaged: the
    # next reads recycle its pages, and averaging does not push the rest of the cache out with N
    # checkpoints that it will not read again. Inputs that were cached stay cached. Where a VM hands the
    # memory that stays free back to its host (virtio-balloon free page reporting, as on the 2-core
    # machine of the README), pages taken fresh from the free memory are faulted in again by the host
    # as the disk fills them: 5 base-size checkpoints from a cold cache took 0.52 s instead of 0.75 s
    # (medians of 10 paired runs, 9 faster); from a warm cache the same 0.24 s. Dropping zarr's chunk
    # files once read was slower (1.04 s against 0.80 s, 0 of 8 faster), so zarr does not.
    uncached = _read_from_disk(inputs, stored, used, to_average)
    following = dict(zip(to_average, to_average[1:]))
    with (
        open(build / DATA_FILE, "wb") as out,
        _Files() as files,
        concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool,
    ):

        def sources_of(key: str) -> list[_Source]:
            """Every used input's stored chunks of ``key``, located."""
            return [
                _Source(inputs[i], weights[i], _stored_chunks(inputs[i], metas[i], stored[i], key))
                for i in used
            ]

        # The next tensor's items are located on the pool while this one is averaged, so that the
        # threads do not wait for the locating between tensors (5 base-size checkpoints from a cold
        # cache: 2.02 s instead of 2.13 s, medians of 8 runs).
        located = {key: pool.submit(sources_of, key) for key in to_average[:1]}
        for key in wanted:
            md = ref.state_dict_metadata[key]
            if key in located:
                if key in following:
                    located[following[key]] = pool.submit(sources_of, following[key])
                sources = located.pop(key).result()
                ours = sources[used.index(keeper)]
                for (index, info), chunk in zip(stored[keeper][key], ours.chunks):
                    start = out.tell()
                    blocks = functools.partial(
                        _averaged_blocks,
                        key,
                        md,
                        chunk.offsets,
                        chunk.sizes,
                        sources,
                        files,
                        pool,
                        _IN_FLIGHT * threads,
                        out.fileno(),
                    )
                    length = write_item(out, md.properties.dtype, chunk.sizes, blocks)
                    # Start writing the item to disk now, while the next is computed: the sync before
                    # the rename then has little left to wait for (and the output leaves the page cache).
                    out.flush()
                    page_cache_hint(out.fileno(), start, length, "DONTNEED")
                    storage_data[index] = dataclasses.replace(
                        info, relative_path=DATA_FILE, offset=start, length=length
                    )
                for i in used:
                    for _, info in stored[i].get(key, []):
                        path = inputs[i] / info.relative_path
                        if path in uncached:
                            page_cache_hint(files.fd(path), info.offset, info.length, "DONTNEED")
                averaged += 1
            else:
                _copy_entry(inputs[keeper], stored[keeper].get(key, []), key, out, storage_data)
                copied += 1
            state_dict_metadata[key] = md
            nested = ref.planner_data.get(key) if isinstance(ref.planner_data, dict) else None
            # The default planner's entry (the key's path in the nested state dict that was saved);
            # another planner's objects are its own business and are not carried over.
            if isinstance(nested, tuple) and all(isinstance(part, (str, int)) for part in nested):
                planner_data[key] = nested
    metadata = Metadata(
        state_dict_metadata=state_dict_metadata, planner_data=planner_data, storage_data=storage_data
    )
    atomic_write(build / DCP_METADATA, lambda f: pickle.dump(metadata, f))
    log(f"  {averaged} tensor(s) averaged, {copied} entries copied from {inputs[keeper]}")
    return {"tensors_averaged": averaged, "entries_copied": copied}


def _is_averaged(key: str, md: Any) -> bool:
    """Whether ``key`` is averaged (a floating tensor of the model), not copied from the most-weighted input."""
    return (
        isinstance(md, TensorStorageMetadata)
        and md.properties.dtype.is_floating_point
        and not is_optimizer_key(key)
    )


def _check_compatible(inputs: list[Path], metas: list[Metadata]) -> None:
    ref = metas[0].state_dict_metadata
    for path, meta in zip(inputs[1:], metas[1:]):
        theirs = meta.state_dict_metadata
        for key in sorted(set(ref) ^ set(theirs)):
            holder, other = (inputs[0], path) if key in ref else (path, inputs[0])
            raise CheckpointError(
                f"{other}: no entry '{key}' (which {holder} has); average checkpoints of the same model"
            )
        for key, ours in ref.items():
            other = theirs[key]
            if type(ours) is not type(other):
                raise CheckpointError(
                    f"{path}: '{key}' is a {type(other).__name__} but {inputs[0]} has a {type(ours).__name__}"
                )
            if isinstance(ours, TensorStorageMetadata):
                if tuple(other.size) != tuple(ours.size):
                    raise CheckpointError(
                        f"{path}: '{key}' has shape {list(other.size)} but {inputs[0]} has {list(ours.size)}; "
                        "average checkpoints of the same model"
                    )
                if other.properties.dtype != ours.properties.dtype:
                    raise CheckpointError(
                        f"{path}: '{key}' is {other.properties.dtype} but {inputs[0]} has {ours.properties.dtype}; "
                        "average checkpoints saved with the same precision"
                    )


def _stored_by_key(meta: Metadata) -> dict[str, list[tuple[Any, Any]]]:
    """``storage_data`` grouped by key: each key's (``MetadataIndex``, ``_StorageInfo``) pairs, in file order."""
    grouped: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in meta.storage_data.items():
        grouped.setdefault(index.fqn, []).append((index, info))
    return grouped


def _read_from_disk(
    inputs: list[Path], stored: list[dict[str, list[tuple[Any, Any]]]], used: list[int], averaged: list[str]
) -> set[Path]:
    """The data files of the ``used`` inputs whose first item to average is not in the page cache."""
    first: dict[Path, int] = {}
    for i in used:
        for key in averaged:
            for _, info in stored[i].get(key, []):
                path = inputs[i] / info.relative_path
                first[path] = min(first.get(path, info.offset), info.offset)
    return {path for path, offset in first.items() if not_cached(path, offset)}


def _stored_chunks(
    path: Path, meta: Metadata, stored: dict[str, list[tuple[Any, Any]]], key: str
) -> list[StoredChunk]:
    """Where every stored chunk of ``key`` lies in ``path``'s files, in ``stored[key]``'s order.

    Raises:
        CheckpointError: a chunk without its data, or chunks that do not cover the tensor.
    """
    md = meta.state_dict_metadata[key]
    sizes_at = {tuple(chunk.offsets): tuple(chunk.sizes) for chunk in md.chunks}
    chunks = []
    for index, info in stored.get(key, []):
        offsets = tuple(index.offset) if index.offset is not None else None
        if offsets not in sizes_at:
            raise CheckpointError(
                f"{path}: '{key}' has stored data at {offsets} that .metadata does not list; re-save the checkpoint"
            )
        chunks.append(locate(path, key, info, offsets, sizes_at[offsets], md.properties.dtype))
    covered = sum(math.prod(chunk.sizes) for chunk in chunks)
    if len({chunk.offsets for chunk in chunks}) != len(sizes_at) or covered != math.prod(md.size):
        raise CheckpointError(
            f"{path}: '{key}' is stored as {covered} of its {math.prod(md.size)} elements; is the checkpoint complete?"
        )
    return chunks


class _Files:
    """The inputs' data files, each opened once for the whole average."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def __enter__(self) -> "_Files":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)


@dataclasses.dataclass
class _Source:
    """One input's stored chunks of the tensor being averaged, and its weight."""

    path: Path
    weight: float
    chunks: list[StoredChunk]

    def read(
        self, files: _Files, key: str, offsets: tuple, sizes: tuple, start: int, stop: int, out: np.ndarray
    ) -> None:
        """Rows ``[start, stop)`` of the output chunk at ``offsets`` of size ``sizes``, into the flat ``out``.

        An input stored with the same chunk there is read with one ``preadv``; otherwise the rows are
        gathered from every stored chunk that overlaps them (inputs saved with another parallelism),
        reading those chunks' rows only.
        """
        where = f"{self.path}: '{key}'"
        for chunk in self.chunks:
            if chunk.offsets == offsets and chunk.sizes == sizes:
                read_rows(files.fd(chunk.path), chunk, start, stop, out, where)
                return
        low = (offsets[0] + start, *offsets[1:])
        high = (offsets[0] + stop, *(o + n for o, n in zip(offsets[1:], sizes[1:])))
        dest = out[: (stop - start) * math.prod(sizes[1:])].reshape(stop - start, *sizes[1:])
        for chunk in self.chunks:
            lo = [max(a, c) for a, c in zip(low, chunk.offsets)]
            hi = [min(b, c + n) for b, c, n in zip(high, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            first, last = lo[0] - chunk.offsets[0], hi[0] - chunk.offsets[0]
            rows = np.empty((last - first) * chunk.row, out.dtype)
            read_rows(files.fd(chunk.path), chunk, first, last, rows, where)
            inner = tuple(slice(a - c, b - c) for a, b, c in zip(lo[1:], hi[1:], chunk.offsets[1:]))
            dest[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, low))] = rows.reshape(
                last - first, *chunk.sizes[1:]
            )[(slice(None), *inner)]


def _averaged_blocks(
    key: str,
    md: TensorStorageMetadata,
    offsets: tuple,
    sizes: tuple,
    sources: list[_Source],
    files: _Files,
    pool: concurrent.futures.Executor,
    in_flight: int,
    out: int,
    at: int,
) -> Iterator[np.ndarray]:
    """The averaged stored bits of the output chunk at ``offsets``, a block of rows at a time, in order,
    each written to the file ``out`` from offset ``at`` on by the thread that averaged it.

    A block is as many rows (of the whole tensor's row length) as fit in ``slice_elements`` of a
    ``READ_BYTES`` stack, at least one. Blocks are averaged on ``pool``'s threads
    (``_average_block``), at most ``in_flight`` at a time: memory holds a few blocks, whatever the
    tensor's size and the number of inputs.
    """
    sums = WeightedSum(md.properties.dtype)
    rows = sizes[0] if sizes else 1
    per_block = max(
        1, slice_elements(len(sources), sums.storage.itemsize, READ_BYTES) // max(1, math.prod(md.size[1:]))
    )
    weights = np.array([source.weight for source in sources], np.float64)
    window: collections.deque = collections.deque()
    try:
        for start in range(0, rows, per_block):
            rows_of_block = (start, min(rows, start + per_block))
            window.append(
                pool.submit(
                    _average_block,
                    key,
                    sums,
                    offsets,
                    sizes,
                    rows_of_block,
                    sources,
                    weights,
                    files,
                    out,
                    at,
                )
            )
            if len(window) >= in_flight:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:  # on an error, no block may still be reading when the files are closed
        for future in window:
            future.cancel()
        concurrent.futures.wait(window)


def _average_block(
    key: str,
    sums: WeightedSum,
    offsets: tuple,
    sizes: tuple,
    rows: tuple[int, int],
    sources: list[_Source],
    weights: np.ndarray,
    files: _Files,
    out: int,
    at: int,
) -> np.ndarray:
    """``rows`` of the output chunk: read from every input into this thread's stack, averaged, rounded,
    and written to the file ``out``, whose chunk elements start at offset ``at``.

    Returns a new array of the rounded bits (for the archive's CRC).
    """
    row = math.prod(sizes[1:])
    n = (rows[1] - rows[0]) * row
    stack = thread_stack(sums.storage, len(sources), n)
    for source, values in zip(sources, stack):
        source.read(files, key, offsets, sizes, *rows, values)
    rounded = np.empty(n, stack.dtype)
    if not sums.average(rounded, stack, weights):
        raise non_finite_error(
            _holding_non_finite(sources, files, key, offsets, sizes, rows, sums, stack), key
        )
    if os.pwrite(out, rounded, at + rows[0] * row * rounded.itemsize) != rounded.nbytes:
        raise OSError(f"short write of '{key}' to the averaged checkpoint")
    return rounded


def _holding_non_finite(
    sources: list[_Source],
    files: _Files,
    key: str,
    offsets: tuple,
    sizes: tuple,
    rows: tuple[int, int],
    sums: WeightedSum,
    stack: np.ndarray,
) -> Path:
    """The first input whose ``rows`` hold NaN or Inf (the sum was checked; this runs only when it is not)."""
    one = stack[:1]
    scratch = np.empty(one.shape[1], one.dtype)
    for source in sources:
        source.read(files, key, offsets, sizes, *rows, one[0])
        if not sums.average(scratch, one, np.ones(1)):
            return source.path
    return sources[0].path  # finite inputs whose sum overflows float64: none is at fault, name the first


def _copy_entry(
    source: Path, entries: list[tuple[Any, Any]], key: str, out: BinaryIO, storage_data: dict
) -> None:
    """Append the stored bytes of ``key`` (every chunk) to ``out``, as they are, without unpickling."""
    for index, info in entries:
        start = out.tell()
        try:
            with open(source / info.relative_path, "rb") as f:
                f.seek(info.offset)
                left = info.length
                while left:
                    data = f.read(min(left, _COPY_BLOCK))
                    if not data:
                        raise CheckpointError(
                            f"{source}: '{key}' in {info.relative_path} is truncated; is the checkpoint complete?"
                        )
                    out.write(data)
                    left -= len(data)
        except OSError as exc:
            raise CheckpointError(
                f"{source}: cannot read '{key}' from {info.relative_path} ({exc}); is the checkpoint complete?"
            ) from None
        storage_data[index] = dataclasses.replace(info, relative_path=DATA_FILE, offset=start)
