"""Averaging of zarr sharded checkpoints (Megatron-Core ``dist_checkpointing``), one chunk at a time.

Each tensor is a zarr v2 array directory (``.zarray`` plus chunk files).
Arrays are read and written with tensorstore, which Megatron itself used for
them and which reads the ``bfloat16`` dtype name (zarr-python 3.1+ does not).
Every other entry of the directory (``common.pt``, extra-state shard
directories) is copied verbatim from the most-weighted input.
"""

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Callable, Optional

import ml_dtypes
import numpy as np
import tensorstore as ts
import torch

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.export.sharded_averaging import (
    AVERAGING_JSON,
    METADATA_JSON,
    add_weighted,
    is_optimizer_key,
    round_half_even,
)

__all__ = ["average", "chunk_keys"]

Log = Callable[[str], None]

ZARRAY = ".zarray"
_GRID_FIELDS = ("shape", "chunks", "dtype")
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
        _average_array(inputs, build, key, metas[0], weights)
        averaged += 1
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
    return ts.open(spec, **options).result()


def _average_array(inputs: list[Path], build: Path, key: str, meta: dict, weights: list[float]) -> None:
    chunks = chunk_keys(meta)
    for path in inputs:
        for name, _ in chunks:
            if not (path / key / name).is_file():
                raise CheckpointError(
                    f"{path}: array '{key}' has no chunk file '{name}'; the checkpoint is incomplete, re-copy or re-save it"
                )
    sources = [_open(path / key, open=True, read=True) for path in inputs]
    target = _open(build / key, meta, create=True, write=True)
    dtype = _torch_dtype(meta["dtype"])
    used = [(source, path, w) for source, path, w in zip(sources, inputs, weights) if w > 0]
    for _, region in chunks:
        total = None
        for i, (source, path, weight) in enumerate(used):
            piece = _to_torch(source[region].read().result())
            if total is None:
                total = torch.empty(piece.shape, dtype=torch.float64)
            add_weighted(total, piece, weight, i == 0, path, key)
        target[region].write(_to_numpy(round_half_even(total, dtype))).result()


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
