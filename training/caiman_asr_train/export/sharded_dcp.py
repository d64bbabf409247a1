"""Averaging of torch.distributed.checkpoint (DCP) directories, one tensor at a time.

A DCP directory (PyTorch's, or Megatron's ``torch_dist``) holds ``*.distcp``
data files and a pickled ``.metadata``. Megatron pickles its own classes into
``.metadata``, and unpickling runs whatever a pickle names, so ``.metadata`` is
read with ``SafeFileSystemReader``: torch's DCP metadata classes, dtypes and
plain containers load; any other class becomes an inert placeholder; nothing
is called.

Each floating tensor is loaded whole from every input (``torch.distributed.
checkpoint.load`` reassembles its shards), accumulated in float64 and written
with ``torch.distributed.checkpoint.save`` as one unsharded tensor. Integer
tensors and non-tensor entries (extra state) are copied byte for byte from the
most-weighted input, without unpickling them. The output's ``.metadata`` joins
the parts and is written last.
"""

import dataclasses
import math
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.export.averaging_engine import non_finite_error
from caiman_asr_train.export.sharded_averaging import (
    DCP_METADATA,
    SLICE,
    WeightedSum,
    is_optimizer_key,
    stored_bits,
)
from caiman_asr_train.utils.atomic import atomic_write

__all__ = ["SafeFileSystemReader", "average", "read_metadata"]

Log = Callable[[str], None]

COPIED_FILE = "__copied_0.distcp"
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


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
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


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Read once: every tensor is loaded on its own, and unpickling .metadata each time costs more than the tensor.
        if getattr(self, "_metadata", None) is None:
            self._metadata = read_metadata(Path(self.path))
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
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
    readers = [SafeFileSystemReader(path) for path in inputs]
    ref = metas[keeper]
    state_dict_metadata: dict = {}
    storage_data: dict = {}
    planner_data: dict = {}
    averaged = copied = 0
    with open(build / COPIED_FILE, "wb") as copies:
        for n, (key, md) in enumerate(ref.state_dict_metadata.items()):
            optimizer = is_optimizer_key(key)
            if optimizer and not keep_optimizer:
                continue
            if (
                isinstance(md, TensorStorageMetadata)
                and md.properties.dtype.is_floating_point
                and not optimizer
            ):
                part = _average_tensor(inputs, readers, key, md, weights, build / f".part{n}")
                _merge_part(part, build, f"__avg{n}_", state_dict_metadata, storage_data)
                shutil.rmtree(part)
                averaged += 1
            else:
                _copy_entry(inputs[keeper], ref, key, copies, storage_data)
                state_dict_metadata[key] = md
                copied += 1
            nested = ref.planner_data.get(key) if isinstance(ref.planner_data, dict) else None
            # The default planner's entry (the key's path in the nested state dict that was saved);
            # another planner's objects are its own business and are not carried over.
            if isinstance(nested, tuple) and all(isinstance(part, (str, int)) for part in nested):
                planner_data[key] = nested
        copies.flush()
        os.fsync(copies.fileno())
    metadata = Metadata(
        state_dict_metadata=state_dict_metadata, planner_data=planner_data, storage_data=storage_data
    )
    atomic_write(build / DCP_METADATA, lambda f: pickle.dump(metadata, f))
    log(f"  {averaged} tensor(s) averaged, {copied} entries copied from {inputs[keeper]}")
    return {"tensors_averaged": averaged, "entries_copied": copied}


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


def _average_tensor(
    inputs: list[Path],
    readers: list[SafeFileSystemReader],
    key: str,
    md: TensorStorageMetadata,
    weights: list[float],
    part: Path,
) -> Path:
    """Average one tensor over the inputs and save it as a one-tensor DCP checkpoint in ``part``.

    Memory: the float64 sum and one input's tensor, whatever the number of inputs.
    """
    total = np.empty(math.prod(md.size))
    sums = WeightedSum(md.properties.dtype)
    tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    bits = stored_bits(tensor)
    used = [(path, reader, weight) for path, reader, weight in zip(inputs, readers, weights) if weight > 0]
    for i, (path, reader, weight) in enumerate(used):  # a NaN in a zero-weight input cannot reach the sum
        _load(path, reader, key, tensor)
        for start in range(0, bits.size, SLICE):
            sums.add(total[start : start + SLICE], bits[start : start + SLICE], weight, i == 0)
    for start in range(0, bits.size, SLICE):  # the last input's tensor is free again: it holds the result
        if not sums.finite(total[start : start + SLICE]).all():
            raise non_finite_error(_holding_non_finite(used, key, tensor), key)
        sums.round_into(bits[start : start + SLICE], total[start : start + SLICE])
    del total
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {key: tensor},
            storage_writer=dcp.FileSystemWriter(part, single_file_per_rank=True, thread_count=1),
        )
    return part


def _load(path: Path, reader: SafeFileSystemReader, key: str, tensor: Tensor) -> None:
    """Load ``key`` of one input into ``tensor``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
            dcp.load({key: tensor}, storage_reader=reader)
    except Exception as exc:  # DCP wraps a missing or truncated file in its own exception types
        raise CheckpointError(
            f"{path}: cannot read '{key}' ({str(exc).splitlines()[0]}); is the checkpoint complete?"
        ) from None


def _holding_non_finite(
    used: list[tuple[Path, SafeFileSystemReader, float]], key: str, tensor: Tensor
) -> Path:
    """The first input whose ``key`` holds NaN or Inf (the sum was checked; this runs only when it is not finite)."""
    for path, reader, _ in used:
        _load(path, reader, key, tensor)
        if not bool(torch.isfinite(tensor).all()):
            return path
    return used[0][0]  # finite inputs whose sum overflows float64: none is at fault, name the first


def _merge_part(part: Path, build: Path, prefix: str, state_dict_metadata: dict, storage_data: dict) -> None:
    """Move a one-tensor checkpoint's data files into ``build`` and add its metadata to the joined one."""
    meta = read_metadata(part)
    state_dict_metadata.update(meta.state_dict_metadata)
    moved: set[str] = set()
    for index, info in meta.storage_data.items():
        name = prefix + info.relative_path
        if info.relative_path not in moved:
            (part / info.relative_path).rename(build / name)
            moved.add(info.relative_path)
        storage_data[index] = dataclasses.replace(info, relative_path=name)


def _copy_entry(source: Path, meta: Metadata, key: str, copies, storage_data: dict) -> None:
    """Append the stored bytes of ``key`` (every chunk) to ``copies``, as they are, without unpickling."""
    for index, info in meta.storage_data.items():
        if index.fqn != key:
            continue
        try:
            with open(source / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as exc:
            raise CheckpointError(
                f"{source}: cannot read '{key}' from {info.relative_path} ({exc}); is the checkpoint complete?"
            ) from None
        if len(data) != info.length:
            raise CheckpointError(
                f"{source}: '{key}' in {info.relative_path} is truncated; is the checkpoint complete?"
            )
        storage_data[index] = dataclasses.replace(info, relative_path=COPIED_FILE, offset=copies.tell())
        copies.write(data)
