"""Average sharded distributed checkpoints: one directory per checkpoint, streamed chunk by chunk.

Two layouts, told apart by the directory's ``metadata.json``
(``"sharded_backend"``) or, without one, a ``.metadata`` file:

- **zarr** (Megatron-Core ``dist_checkpointing``, NeMo): one zarr v2 array
  directory per tensor (``.zarray`` plus raw chunk files, ``bfloat16`` stored
  under that dtype name), ``common.pt`` and extra-state shard files
  (``sharded_zarr``);
- **torch DCP** (``torch.distributed.checkpoint``, Megatron's ``torch_dist``):
  ``*.distcp`` files and a pickled ``.metadata``, read through a restricted
  unpickler (``sharded_dcp``; the byte layout of a stored tensor: ``sharded_distcp``).

Floating tensors are averaged in float64, a slice of one chunk of every input
at a time (zarr) or a block of rows of one stored chunk of every input at a
time (DCP), on a few threads, and cast back to their dtype with one
round-to-nearest-even (compiled kernels, ``averaging_kernels``): memory holds
about ``STACK_BYTES`` a thread (DCP: ``sharded_dcp.READ_BYTES``), whatever the
model's size and the number of inputs. Integer tensors, ``common.pt``, extra state and
everything that is not a tensor come from the most-weighted input. Optimizer
state (keys starting with ``optimizer``) no longer matches averaged weights: it
is dropped unless ``keep_optimizer``, which copies the most-weighted input's.

The output directory is built in a hidden temporary directory beside it and
renamed into place once complete, with ``metadata.json`` (and DCP's
``.metadata``) written last; every file is synced before the rename (each is
handed to the disk as soon as it is written, so that little is left to wait
for then). A run killed midway leaves no output, and the next run clears its
leftovers. ``averaging.json`` records the inputs, steps,
WERs and weights.

Selection in a directory of checkpoints (``--checkpoint_dir``): sub-directories
in either layout whose name starts with ``name_prefix``, except ``-last``,
``-EMA`` and earlier averages; then the rules of ``averaging_selection``, the
step and WER coming from NeMo-style names (``step=1000``, ``val_wer=0.0652``)
or Megatron's ``iter_0001000``.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from caiman_asr_train.core.errors import CheckpointError, UserError
from caiman_asr_train.export.averaging_engine import one_thread
from caiman_asr_train.export.averaging_selection import (
    WER_EPS,
    CheckpointInfo,
    check_distinct,
    choose,
    info_from_name,
    log_weights,
    most_weighted,
    resolve_weights,
)
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cores import available_cores

__all__ = [
    "AVERAGING_JSON",
    "STACK_BYTES",
    "average_sharded",
    "default_output",
    "is_optimizer_key",
    "not_cached",
    "page_cache_hint",
    "worker_threads",
    "round_half_even",
    "slice_elements",
    "stored_bits",
    "storage_dtype",
    "sharded_format",
    "select_sharded",
]

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

METADATA_JSON = "metadata.json"
DCP_METADATA = ".metadata"
AVERAGING_JSON = "averaging.json"
AVERAGED_SUFFIX = "-averaged"
_EXCLUDED_NAME = re.compile(r"(?:^|[-_.])(last|EMA|averaged)(?:[-_.]|$)")


def sharded_format(directory: PathLike) -> Optional[str]:
    """``"zarr"`` or ``"dcp"`` for a sharded checkpoint directory, None for anything else.

    Raises:
        CheckpointError: ``metadata.json`` is unreadable or names another backend.
    """
    directory = Path(directory)
    meta = directory / METADATA_JSON
    if meta.is_file():
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{meta}: not a readable metadata.json ({exc}); is the checkpoint complete?"
            ) from None
        if backend == "zarr":
            return "zarr"
        if backend == "torch_dist" or (directory / DCP_METADATA).is_file():
            return "dcp"
        raise CheckpointError(
            f"{meta}: sharded_backend '{backend}' is not one this reads (zarr, torch_dist); convert the checkpoint"
        )
    return "dcp" if (directory / DCP_METADATA).is_file() else None


def is_optimizer_key(key: str) -> bool:
    """Whether a tensor key belongs to the optimizer state (Megatron and NeMo name them ``optimizer.*``)."""
    return key.split(".", 1)[0].startswith("optimizer")


def round_half_even(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` (float64) cast to ``dtype`` with one round-to-nearest-even, as if computed exactly.

    torch casts float64 to bfloat16 and float16 through float32, rounding twice:
    1 + 2**-8 + 2**-30 becomes 1 + 2**-8 in float32, a tie that then rounds to
    1.0 instead of the nearer 1 + 2**-7. Rounding to float32 *to odd* first
    keeps the information a second rounding needs (float32 has more than two
    bits beyond either 16-bit format), so the second rounding is exact.
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return x.to(dtype)
    y = x.to(torch.float32)
    back = y.to(torch.float64)
    towards_zero = torch.where(back.abs() > x.abs(), torch.nextafter(y, torch.zeros_like(y)), y)
    inexact = (towards_zero.to(torch.float64) != x).to(torch.int32)
    odd = (towards_zero.view(torch.int32) | inexact).view(torch.float32)
    return odd.to(dtype)


# Bytes of input a thread averages at a time: one slice of every input, stacked (the kernels of
# averaging_kernels sum them in one pass), so that memory holds the same few MiB whatever the number of
# inputs and the size of the model. 1 MiB is five 104 Ki-element bfloat16 slices: the Python and system
# calls around each step cost little beside the step, and the stack stays in the last-level cache.
STACK_BYTES = 1 << 20


def slice_elements(inputs: int, itemsize: int, stack_bytes: int = STACK_BYTES) -> int:
    """Elements of each input averaged at a time: ``inputs`` slices of ``itemsize``-byte elements fill ``stack_bytes``."""
    return max(1, stack_bytes // (max(1, inputs) * itemsize))


def storage_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that holds ``dtype``'s stored bits (bfloat16 and float16: their uint16 bit patterns)."""
    if dtype in (torch.bfloat16, torch.float16):
        return np.dtype(np.uint16)
    return torch.empty((), dtype=dtype).numpy().dtype


# Threads that average chunks: one per core, at most MAX_THREADS, each with one stack (STACK_BYTES; DCP: READ_BYTES)
# and a few blocks of rounded output: memory stays flat (a few MB; DCP about 20 MB) on many-core
# machines, where the disk rather than the arithmetic sets the pace. Two per core (so that one computes while another
# waits for the disk) measured slower on the 2-core benchmark machine: the kernel's read-ahead,
# started by POSIX_FADV_WILLNEED, already keeps the disk busy, and four threads thrash two cores'
# caches (5 zarr checkpoints from a cold cache, before the kernels were compiled: 1.10-1.35x N reads
# with four threads, 0.82-0.89x with two).
MAX_THREADS = 4


def worker_threads() -> int:
    """How many threads average chunks on this machine (``MAX_THREADS``)."""
    return min(MAX_THREADS, available_cores())


def page_cache_hint(fd: int, offset: int, length: int, advice: str) -> None:
    """``posix_fadvise(fd, offset, length, POSIX_FADV_<advice>)`` where the system has it (Linux), else nothing.

    ``WILLNEED`` starts reading a range from disk in the background; ``DONTNEED`` on freshly written
    data starts writing it back (and drops it from the page cache once written). Both are hints:
    correctness never depends on them, and the output is still synced before it is renamed.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))


def not_cached(path: Path, offset: int = 0) -> bool:
    """Whether the byte at ``offset`` of the file ``path`` is not in the page cache (reading it would wait
    for the disk).

    Asked with a one-byte read that may not wait (``RWF_NOWAIT``, Linux); False where that cannot tell
    (another system, a file system without such reads, a file that cannot be opened).
    """
    if not hasattr(os, "RWF_NOWAIT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def stored_bits(tensor: Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous tensor's stored bits (``storage_dtype``)."""
    flat = tensor.reshape(-1)
    return (flat.view(torch.uint16) if storage_dtype(tensor.dtype) == np.uint16 else flat).numpy()


def select_sharded(
    checkpoint_dir: PathLike,
    *,
    name_prefix: Optional[str] = None,
    top_n: Optional[int] = None,
    last_n: Optional[int] = None,
    steps: Optional[Sequence[int]] = None,
    log: Log = print,
) -> list[CheckpointInfo]:
    """Choose sharded checkpoint directories in ``checkpoint_dir`` (module docstring).

    With none of ``top_n``, ``last_n`` and ``steps``, every eligible directory (NeMo's default).

    Raises:
        UserError: a missing directory, or too few eligible checkpoints.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise UserError(
            f"--checkpoint_dir {directory} is not a directory; give the directory of the checkpoints"
        )
    candidates: list[CheckpointInfo] = []
    excluded: list[tuple[Path, str]] = []
    for path in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sharded_format(path) is None or (name_prefix and not path.name.startswith(name_prefix)):
            continue
        named = _EXCLUDED_NAME.search(path.name[len(name_prefix or "") :])
        if named:
            excluded.append((path, f"a '-{named.group(1)}' checkpoint"))
        elif (path / AVERAGING_JSON).is_file():
            excluded.append((path, f"an averaged checkpoint (it has {AVERAGING_JSON})"))
        else:
            candidates.append(info_from_name(path))
    if not candidates:
        prefix = f" named {name_prefix}*" if name_prefix else ""
        raise UserError(f"--checkpoint_dir {directory}: no sharded checkpoint directories{prefix} to average")
    return choose(
        directory, candidates, excluded, top_n=top_n, last_n=last_n, steps=steps, all_if_none=True, log=log
    )


def default_output(
    checkpoint_dir: PathLike,
    name_prefix: Optional[str],
    output_dir: Optional[PathLike],
    output_name: Optional[str],
) -> Path:
    """``<output_dir or checkpoint_dir>/<output_name or name_prefix-averaged>`` (NeMo's naming)."""
    name = output_name or f"{name_prefix or 'checkpoint'}{AVERAGED_SUFFIX}"
    return Path(output_dir or checkpoint_dir) / name


def average_sharded(
    paths: Sequence[PathLike],
    output: PathLike,
    weights: Optional[Sequence[float]] = None,
    *,
    infos: Optional[Sequence[CheckpointInfo]] = None,
    equal_weights: bool = False,
    wer_eps: float = WER_EPS,
    keep_optimizer: bool = False,
    log: Log = print,
) -> dict:
    """Average sharded checkpoint directories into the new directory ``output`` (module docstring).

    Args:
        paths: the checkpoint directories, all zarr or all DCP, each at most once.
        output: the directory to create; must not exist.
        weights: explicit weights (``resolve_weights``); default inverse-WER or equal.
        infos: the inputs' steps and WERs when already known (selection), else read from their names.
        equal_weights, wer_eps: as for ``resolve_weights``.
        keep_optimizer: copy the most-weighted input's optimizer state instead of dropping it.
        log: receives the weights, notes and warnings, one line each.

    Returns:
        The ``averaging.json`` record written into ``output``.

    Raises:
        CheckpointError: inputs of different layouts, or keys, shapes, dtypes, chunk
            grids or chunk files that do not match, or non-finite weights (naming
            the directory and key).
        UserError: no inputs, a repeated input, an output that exists or is an input, bad weights.
    """
    try:  # each pulls in its storage library, and both the compiled kernels
        from caiman_asr_train.export import sharded_dcp, sharded_zarr
    except ModuleNotFoundError as exc:
        raise UserError(
            f"averaging sharded checkpoints needs {exc.name}, which is not installed; "
            "install the 'sharded' extra: pip install -e 'training[sharded]'"
        ) from None

    if not paths:
        raise UserError("no checkpoints to average; give --ckpts or --checkpoint_dir")
    inputs = [Path(p) for p in paths]
    output = Path(output)
    _check_paths(inputs, output)
    formats = {p: sharded_format(p) for p in inputs}
    for p, fmt in formats.items():
        if fmt is None:
            raise CheckpointError(
                f"{p}: not a sharded checkpoint (no metadata.json or .metadata); give a checkpoint directory"
            )
    if len(set(formats.values())) > 1:
        raise CheckpointError(
            f"{inputs[0]} and the other inputs have different layouts ({', '.join(sorted(set(formats.values())))}); average one kind"
        )
    fmt = formats[inputs[0]]
    infos = list(infos) if infos is not None else [info_from_name(p) for p in inputs]
    resolved, weighting = resolve_weights(
        [i.wer for i in infos], weights, equal=equal_weights, wer_eps=wer_eps
    )
    keeper = most_weighted(infos, resolved)
    what = f"{fmt} checkpoint(s), weights {{how}}"
    log_weights(infos, resolved, weighting, wer_eps=wer_eps, equal_asked=equal_weights, what=what, log=log)
    if keep_optimizer:
        log(
            f"warning: --keep_optimizer copies {inputs[keeper]}'s optimizer state, which does not match the "
            "averaged weights; resuming from it restarts the optimizer moments from another model"
        )

    _remove_leftovers(output, log)
    output.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        backend = sharded_zarr if fmt == "zarr" else sharded_dcp
        with one_thread():
            counts = backend.average(inputs, build, resolved, keeper, keep_optimizer, log)
        record = {
            "format": fmt,
            "inputs": [str(i.path) for i in infos],
            "steps": [i.step for i in infos],
            "wers": [i.wer for i in infos],
            "wer_sources": [i.wer_source for i in infos],
            "weights": resolved,
            "weighting": weighting,
            "wer_eps": wer_eps,
            "copied_from": str(inputs[keeper]),
            "optimizer": "copied" if keep_optimizer else "dropped",
            **counts,
        }
        _sync_tree(build)
        atomic_write_bytes(build / AVERAGING_JSON, (json.dumps(record, indent=2) + "\n").encode())
        if (inputs[keeper] / METADATA_JSON).is_file():  # last: a directory with it is complete
            atomic_write_bytes(build / METADATA_JSON, (inputs[keeper] / METADATA_JSON).read_bytes())
        os.chmod(build, 0o777 & ~_umask())
        os.rename(build, output)
        _fsync(output.parent)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return record


def _check_paths(inputs: list[Path], output: Path) -> None:
    real = check_distinct(inputs)
    for p in inputs:
        if not p.is_dir():
            raise CheckpointError(f"{p}: not a directory; give sharded checkpoint directories")
    if os.path.realpath(output) in real:
        raise UserError(f"output {output} is one of the inputs; write the average to a new directory")
    if output.exists():
        raise UserError(f"output {output} already exists; remove it or give another --output_name")


def _sync_tree(root: Path) -> None:
    """fsync every file and directory below ``root``: the data is on disk before the directory is renamed."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


def _fsync(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(output: Path, log: Log) -> None:
    """Delete the temporary directories of runs that were killed before renaming their output."""
    if not output.parent.is_dir():
        return
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        log(f"  note: removing {stale}, left by an interrupted run")
        shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
