"""Averaging of zarr sharded checkpoints (Megatron-Core ``dist_checkpointing``), one chunk at a time.

Each tensor is a zarr v2 array directory (``.zarray`` plus chunk files).
Arrays are created and written with tensorstore, which Megatron itself used
for them and which reads the ``bfloat16`` dtype name (zarr-python 3.1+ does
not). Megatron's chunks are raw (no compressor, no filters, C order): a chunk
file is the chunk's bytes, so every input's chunk is read straight from its
file, and the average written straight to the output's, one cache-sized slice
at a time: memory holds a few slices whatever the chunk size and the number
of inputs. Compressed or filtered arrays are decoded by
tensorstore a chunk at a time instead. Every other entry of the directory
(``common.pt``, extra-state shard directories) is copied verbatim from the
most-weighted input.
"""

import concurrent.futures
import functools
import itertools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import ml_dtypes
import numpy as np
import tensorstore as ts
import torch

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.export.averaging_engine import non_finite_error
from caiman_asr_train.export.averaging_kernels import WeightedSum, thread_stack
from caiman_asr_train.export.sharded_averaging import (
    AVERAGING_JSON,
    METADATA_JSON,
    is_optimizer_key,
    page_cache_hint,
    slice_elements,
    stored_bits,
    worker_threads,
)

__all__ = ["average", "chunk_keys"]

Log = Callable[[str], None]

ZARRAY = ".zarray"
_GRID_FIELDS = ("shape", "chunks", "dtype")
# tensorstore does not sync what it writes (the .zarray, decoded arrays' chunks): the output is synced
# file by file before its directory is renamed into place (sharded_averaging), not at every write.
_CONTEXT = ts.Context({"file_io_sync": False})
_FLOAT_DTYPES = {"bfloat16", "<f2", "<f4", "<f8", ">f2", ">f4", ">f8"}


def average(
    inputs: list[Path], build: Path, weights: list[float], keeper: int, keep_optimizer: bool, log: Log
) -> dict:
    """Write the weighted average of the zarr checkpoints ``inputs`` into the empty directory ``build``.

    Returns:
        Counts for ``averaging.json``: arrays averaged, arrays copied, other entries copied.
    """
    arrays, others = _entries(inputs[0])
    for path in inputs[1:]:
        theirs, _ = _entries(path)
        for key in sorted(arrays ^ theirs):
            holder, other = (inputs[0], path) if key in arrays else (path, inputs[0])
            raise CheckpointError(
                f"{other}: no array '{key}' (which {holder} has); average checkpoints of the same model"
            )
    averaged = copied = 0
    tasks: list[Callable[[], None]] = []  # every array is checked before any is averaged
    for key in sorted(arrays):
        metas = [_zarray(path, key) for path in inputs]
        if is_optimizer_key(key) and not keep_optimizer:
            continue
        if metas[0]["dtype"] not in _FLOAT_DTYPES or is_optimizer_key(key):
            shutil.copytree(inputs[keeper] / key, build / key)
            copied += 1
            continue
        for path, meta in zip(inputs[1:], metas[1:]):
            for field in _GRID_FIELDS:
                if meta[field] != metas[0][field]:
                    raise CheckpointError(
                        f"{path}: array '{key}' has {field} {meta[field]} but {inputs[0]} has {metas[0][field]}; "
                        "average checkpoints of the same model saved with the same precision and chunking"
                    )
        tasks.extend(_chunk_tasks(inputs, build, key, metas[0], weights))
        averaged += 1
    _run_all(tasks)
    for name in sorted(others):
        source = inputs[keeper] / name
        if source.is_dir():
            shutil.copytree(source, build / name)
        else:
            shutil.copy2(source, build / name)
    log(
        f"  {averaged} array(s) averaged, {copied} copied, {len(others)} other entries copied from {inputs[keeper]}"
    )
    return {"arrays_averaged": averaged, "arrays_copied": copied, "entries_copied": len(others)}


def chunk_keys(meta: dict) -> list[tuple[str, tuple[slice, ...]]]:
    """Every chunk of a zarr v2 array: its file name and the region of the array it holds."""
    shape, chunks = meta["shape"], meta["chunks"]
    separator = meta.get("dimension_separator") or "."
    if not shape:
        return [("0", ())]
    grid = [range(math.ceil(n / c)) for n, c in zip(shape, chunks)]
    keys = []
    for index in itertools.product(*grid):
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
        keys.append((separator.join(map(str, index)), region))
    return keys


def _entries(path: Path) -> tuple[set[str], set[str]]:
    """Array keys and other entries (files, extra-state directories) of one checkpoint directory."""
    arrays, others = set(), set()
    for entry in path.iterdir():
        if entry.name in (METADATA_JSON, AVERAGING_JSON):
            continue
        (arrays if (entry / ZARRAY).is_file() else others).add(entry.name)
    return arrays, others


def _zarray(path: Path, key: str) -> dict:
    try:
        meta = json.loads((path / key / ZARRAY).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: array '{key}' has an unreadable .zarray ({exc}); is the checkpoint complete?"
        ) from None
    if meta.get("zarr_format") != 2 or not all(field in meta for field in _GRID_FIELDS):
        raise CheckpointError(
            f"{path}: array '{key}' is not a zarr v2 array (.zarray needs zarr_format 2, shape, chunks, dtype)"
        )
    return meta


def _open(path: Path, metadata: Optional[dict] = None, **options: bool) -> ts.TensorStore:
    """An array directory opened with tensorstore; with ``metadata``, created with that ``.zarray``."""
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
    if metadata is not None:
        # A chunk equal to the fill value is still written: a missing chunk file means an incomplete checkpoint.
        spec.update(metadata=metadata, store_data_equal_to_fill_value=True)
    return ts.open(spec, context=_CONTEXT, **options).result()


def _chunk_tasks(
    inputs: list[Path], build: Path, key: str, meta: dict, weights: list[float]
) -> list[Callable[[], None]]:
    """Create the output array ``key`` (its ``.zarray``) and return one task per chunk that averages it."""
    chunks = chunk_keys(meta)
    for path in inputs:
        for name, _ in chunks:
            if not (path / key / name).is_file():
                raise CheckpointError(
                    f"{path}: array '{key}' has no chunk file '{name}'; the checkpoint is incomplete, "
                    "re-copy or re-save it"
                )
    target = _open(build / key, meta, create=True, write=True)
    used = [(path, weight) for path, weight in zip(inputs, weights) if weight > 0]
    return [
        functools.partial(_average_chunk, used, key, name, region, meta, target, build / key / name)
        for name, region in chunks
    ]


def _run_all(tasks: list[Callable[[], None]]) -> None:
    """Run the chunk tasks on ``worker_threads()`` threads: numpy and file IO release the GIL, chunks are
    independent (no thread waits for another, unlike a thread pool inside every operation), and
    while one thread waits for its input chunks to come from disk another computes."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=worker_threads()) as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _average_chunk(
    used: list[tuple[Path, float]],
    key: str,
    name: str,
    region: tuple[slice, ...],
    meta: dict,
    target: ts.TensorStore,
    output: Path,
) -> None:
    """Average one chunk of every input into the output array."""
    sums = WeightedSum(_torch_dtype(meta["dtype"]))
    if _is_raw(meta):
        finite = _average_raw(used, key, name, meta, region, output, sums)
    else:
        finite = _average_decoded(used, key, region, target, sums)
    if not finite:
        bad = next(p for p, _ in used if not bool(torch.isfinite(_read_region(p / key, region)).all()))
        raise non_finite_error(bad, key)


def _is_raw(meta: dict) -> bool:
    """Whether chunk files are the chunk's bytes as they are (Megatron's layout): uncompressed, unfiltered,
    C order, little-endian or single-byte."""
    little = meta["dtype"] == "bfloat16" or meta["dtype"][0] in "<|"
    return (
        meta.get("compressor") is None
        and not meta.get("filters")
        and meta.get("order", "C") == "C"
        and little
    )


def _average_raw(
    used: list[tuple[Path, float]],
    key: str,
    name: str,
    meta: dict,
    region: tuple[slice, ...],
    output: Path,
    sums: WeightedSum,
) -> bool:
    """One chunk, read from every input's chunk file and written to ``output`` one slice at a time.

    A raw chunk file is the chunk's bytes, so slices are read and written with ``preadv`` and
    ``pwrite``: each step stacks one slice of every input (``slice_elements``) in this thread's stack, so
    that memory holds the same few slices whatever the size of the chunk and the number of inputs.
    False when the average is not finite inside the array (the caller finds the input at fault).
    """
    full = meta["chunks"] or []
    count = math.prod(full)
    item = sums.storage.itemsize
    step = slice_elements(len(used), item)
    weights = np.array([weight for _, weight in used], np.float64)
    rounded = np.empty(min(step, count), sums.storage)
    fds = [os.open(path / key / name, os.O_RDONLY) for path, _ in used]
    for fd in fds:  # every input's chunk is read from disk at once, not a slice at a time
        page_cache_hint(fd, 0, 0, "WILLNEED")
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        for (path, _), fd in zip(used, fds):
            if os.fstat(fd).st_size != count * item:
                raise CheckpointError(
                    f"{path}: array '{key}' chunk '{name}' has {os.fstat(fd).st_size} bytes, not "
                    f"{count * item}; the checkpoint is damaged, re-copy or re-save it"
                )
        for start in range(0, count, step):
            n = min(step, count - start)
            stack = thread_stack(sums.storage, len(used), n)
            for fd, row in zip(fds, stack):
                if os.preadv(fd, [row], start * item) != n * item:
                    raise EOFError  # the size was checked: only a file truncated meanwhile gets here
            # An edge chunk's padding, which the array does not hold, does not count.
            if not sums.average(rounded[:n], stack, weights) and _inside(
                _non_finite(sums, stack, weights) + start, full, region
            ):
                return False
            if os.pwrite(out, rounded[:n], start * item) != n * item:
                raise OSError(f"{output}: short write")
        # Start writing the chunk to disk now, while the other threads compute: the sync before the
        # rename (sharded_averaging) then has little left to wait for, and the output leaves the page cache.
        page_cache_hint(out, 0, 0, "DONTNEED")
    finally:
        for fd in fds:
            os.close(fd)
        os.close(out)
    return True


def _non_finite(sums: WeightedSum, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The indices of the elements whose weighted sum over ``stack``'s rows is NaN or infinite."""
    total = np.empty(stack.shape[1])
    for i, (row, weight) in enumerate(zip(stack, weights)):
        sums.add(total, row, weight, i == 0)
    return np.flatnonzero(~np.isfinite(total))


def _inside(flat: np.ndarray, chunks: list[int], region: tuple[slice, ...]) -> bool:
    """Whether any of the flat element indices of a chunk lies inside the array (not in an edge chunk's padding)."""
    if not chunks:
        return flat.size > 0
    index = np.unravel_index(flat, chunks)
    inside = np.ones(flat.size, dtype=bool)
    for axis, r in zip(index, region):
        inside &= axis < r.stop - r.start
    return bool(inside.any())


def _average_decoded(
    used: list[tuple[Path, float]],
    key: str,
    region: tuple[slice, ...],
    target: ts.TensorStore,
    sums: WeightedSum,
) -> bool:
    """One chunk of compressed or filtered arrays, each input's chunk decoded by tensorstore in turn.

    False when the sum is not finite (the caller finds the input at fault).
    """
    total = None
    for i, (path, weight) in enumerate(used):
        piece = _read_region(path / key, region)
        if total is None:
            total = np.empty(piece.numel())
        sums.add(total, stored_bits(piece), weight, i == 0)
    out = torch.empty(piece.shape, dtype=piece.dtype)
    if not sums.round_into(stored_bits(out), total):
        return False
    target[region].write(_to_numpy(out)).result()
    return True


def _read_region(array: Path, region: tuple[slice, ...]) -> torch.Tensor:
    return _to_torch(_open(array, open=True, read=True)[region].read().result())


def _torch_dtype(name: str) -> torch.dtype:
    if name == "bfloat16":
        return torch.bfloat16
    return {2: torch.float16, 4: torch.float32, 8: torch.float64}[np.dtype(name).itemsize]


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
