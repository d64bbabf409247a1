"""Memory and time of averaging sharded checkpoints (zarr and torch DCP) of a base-size model.

Usage (from the repository root):

    .venv/bin/python benchmarks/sharded_averaging.py              # zarr and dcp, N = 2 and 5, warm and cold

Writes 5 sharded checkpoints of the base FPGA model (training/configs/base-8703sp.yaml,
n_classes 8704, 84.7M parameters, bfloat16 as Megatron trains it) in each layout, with the
real libraries: zarr arrays through tensorstore with Megatron's ``.zarray`` fields, every
2-D tensor split in two chunks along its rows as a 2-way tensor-parallel run writes it;
DCP directories through ``torch.distributed.checkpoint.save`` (one chunk per tensor). Then
averages the first N (N = 2 and 5) in a fresh Python process each time and prints:

    memory ratio = (peak RSS while averaging - RSS just before) / the largest stored chunk's bytes
                   (zarr: the largest chunk file; DCP: the largest stored tensor); target <= 4, the
                   same for every N. The RSS before the averaging is the interpreter's baseline,
                   taken after a warm-up average of two tiny checkpoints (libraries imported and
                   initialised, numba's compiled kernels loaded from its cache or, the first time
                   on a machine, compiled).
    time ratio   = averaging time / (N x the time to read one checkpoint); target <= 1.5. The
                   time to read one is the mean over the N inputs, each read on its own, with
                   the reader the averaging uses: every stored chunk's elements read with
                   ``os.preadv`` into a buffer of its own (zarr: the raw chunk files; DCP: the
                   elements ``sharded_distcp.locate`` finds in the ``.distcp`` items). Both are
                   measured from the same page-cache state:
                   warm: every input is in the page cache (read just before; the read is the best of 3);
                   cold: the inputs are evicted from the page cache (``posix_fadvise(DONTNEED)`` on
                   every file; they were synced when written) before the read and before the averaging.
                   The averaging time includes writing the output and syncing it to disk (its
                   atomicity needs that), which a read does not do.
    IO alone     = the IO every averaging does, without its arithmetic, from the same cache
                   state: the N inputs read with the baseline's reader while another thread writes
                   one checkpoint's bytes and syncs them (``io_alone``). "IO / N reads" is the time
                   ratio an averaging would reach if its arithmetic cost nothing and its reads went
                   as fast as the baseline's: above 1.5, an averaging meets the target only by
                   reading faster than the baseline's reader does, while it writes and syncs its
                   output. "average / IO" is how far the averaging is from it.

The machine may be shared: times vary with the load (printed beside each row, the 1-minute
load average, and the averaging process's CPU seconds, user and system, all threads), ratios less so; ``--repeats`` runs each average several times. Every file is
written in a temporary directory (``--work_dir``) that is deleted at the end.
"""

import argparse
import concurrent.futures
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from caiman_asr_train.utils.page_cache import evict

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "training/configs/base-8703sp.yaml"
N_CLASSES = 8704
WRITE_BLOCK = 4 << 20  # io_alone's writes
MEGATRON_METADATA = {
    "sharded_backend": "zarr",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def base_weights() -> dict[str, torch.Tensor]:
    """The base model's weights in bfloat16."""
    from caiman_asr_train.rnnt import config
    from caiman_asr_train.rnnt.model import RNNT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base config names GPU-only options (custom_lstm...)
        kwargs = config.rnnt(config.load(BASE_CONFIG))
    torch.manual_seed(0)
    return {k: v.to(torch.bfloat16) for k, v in RNNT(N_CLASSES, **kwargs).state_dict().items()}


def chunks_of(shape: tuple[int, ...]) -> list[int]:
    """Two chunks along the rows of a 2-D tensor (2-way tensor parallel), one chunk otherwise."""
    return [math.ceil(shape[0] / 2), *shape[1:]] if len(shape) == 2 else list(shape)


def write_zarr(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    import tensorstore as ts

    directory.mkdir()
    for key, tensor in weights.items():
        array = tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        metadata = {
            "shape": list(array.shape),
            "chunks": chunks_of(array.shape),
            "dtype": "bfloat16",
            "compressor": None,
            "fill_value": None,
            "order": "C",
            "filters": None,
            "dimension_separator": ".",
            "zarr_format": 2,
        }
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(directory / key)},
            "metadata": metadata,
        }
        ts.open(spec, create=True).result().write(array).result()
    torch.save({"iteration": 1}, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))


def write_dcp(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": weights}, storage_writer=dcp.FileSystemWriter(directory))


def make_checkpoints(root: Path, fmt: str, count: int) -> tuple[list[Path], int]:
    """``count`` checkpoints of ``fmt`` with different weights, and the largest chunk's bytes."""
    weights = base_weights()
    paths = []
    for i in range(count):
        noisy = {
            k: (v.float() + 0.01 * (i + 1) * torch.randn(v.shape)).to(torch.bfloat16)
            for k, v in weights.items()
        }
        path = root / f"{fmt}-step={1000 * (i + 1)}"
        (write_zarr if fmt == "zarr" else write_dcp)(path, noisy)
        paths.append(path)
    if fmt == "zarr":
        largest = max(math.prod(chunks_of(tuple(v.shape))) for v in weights.values()) * 2
    else:
        largest = max(v.numel() for v in weights.values()) * 2
    params = sum(v.numel() for v in weights.values())
    print(
        f"  {fmt}: {count} checkpoints of {params / 1e6:.1f}M bfloat16 parameters; largest chunk {largest / 1e6:.1f} MB",
        flush=True,
    )
    return paths, largest


def read_one(path: Path, fmt: str) -> float:
    """Seconds to read every stored chunk of one checkpoint's tensors with the averaging's reader."""
    start = time.perf_counter()
    for file, offset, nbytes in stored_chunks(path, fmt):
        buffer = np.empty(nbytes, np.uint8)
        fd = os.open(file, os.O_RDONLY)
        try:
            if os.preadv(fd, [buffer], offset) != nbytes:
                raise EOFError(file)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def mean_read(paths: list[Path], fmt: str, cache: str) -> float:
    """Seconds to read one checkpoint: the mean over ``paths`` (each input read from the given cache state).

    warm: each is read once to bring it into the page cache, then timed as the best of 3 reads;
    cold: each is evicted from the page cache and read once.
    """
    seconds = []
    for path in paths:
        if cache == "warm":
            read_one(path, fmt)
            seconds.append(min(read_one(path, fmt) for _ in range(3)))
        else:
            evict([path])
            seconds.append(read_one(path, fmt))
    return sum(seconds) / len(seconds)


def stored_chunks(path: Path, fmt: str) -> list[tuple[Path, int, int]]:
    """Every stored chunk of the checkpoint's tensors: its file, the offset of its elements and their bytes.

    Found as the averaging finds them: zarr chunk files are the chunk's raw bytes; a DCP item's
    elements are located in its ``torch.save`` archive (this is part of the timed read).
    """
    if fmt == "zarr":
        from caiman_asr_train.export.sharded_zarr import chunk_keys

        chunks = []
        for array in sorted(p for p in path.iterdir() if (p / ".zarray").is_file()):
            meta = json.loads((array / ".zarray").read_text())
            itemsize = 2 if meta["dtype"] == "bfloat16" else np.dtype(meta["dtype"]).itemsize
            for name, _ in chunk_keys(meta):
                chunks.append((array / name, 0, math.prod(meta["chunks"]) * itemsize))
        return chunks
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from caiman_asr_train.export.sharded_dcp import read_metadata
    from caiman_asr_train.export.sharded_distcp import locate

    metadata = read_metadata(path)
    sizes = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            for chunk in md.chunks:
                sizes[key, tuple(chunk.offsets)] = (tuple(chunk.sizes), md.properties.dtype)
    chunks = []
    for index, info in metadata.storage_data.items():
        if index.offset is None:
            continue
        shape, dtype = sizes[index.fqn, tuple(index.offset)]
        chunk = locate(path, index.fqn, info, tuple(index.offset), shape, dtype)
        chunks.append((chunk.path, chunk.data_offset, math.prod(shape) * dtype.itemsize))
    return chunks


@functools.lru_cache(maxsize=1)
def incompressible(nbytes: int) -> np.ndarray:
    """``nbytes`` random bytes (made once per size: every row of a layout writes as many)."""
    return np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)


def io_alone(paths: list[Path], fmt: str, cache: str, root: Path) -> float:
    """Seconds of the IO that averaging ``paths`` cannot avoid, without its arithmetic.

    Every stored chunk of the inputs is read with the timed reader (``read_one``, one input after
    the other) while a second thread writes as many bytes as one checkpoint stores to a new file
    and syncs it, as the averaged output must be synced. Measured from the page-cache state
    ``cache``, as the read and the averaging are. Where the disk serves reads and writes at the
    same time this is about the longer of the two; where it does one after the other, their sum.
    """
    nbytes = sum(n for _, _, n in stored_chunks(paths[0], fmt))
    payload = incompressible(nbytes)
    if cache == "cold":
        evict(paths)
    else:
        for path in paths:
            read_one(path, fmt)
    target = root / "io-alone"

    def write() -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in range(0, nbytes, WRITE_BLOCK):
                os.pwrite(fd, payload[offset : offset + WRITE_BLOCK], offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        written = pool.submit(write)
        for path in paths:
            read_one(path, fmt)
        written.result()
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def worker(output: str, paths: list[str]) -> None:
    """Average ``paths`` into ``output`` in this fresh process; print seconds and the RSS increase as JSON.

    A warm-up average of two tiny checkpoints of the same layout first brings in what the
    libraries load and allocate on first use (thread pools, lazily imported modules), so that
    the baseline is the interpreter's with the libraries ready, not part of the increase.
    """
    from memory_probe import reset_peak, status_kb

    from caiman_asr_train.export.sharded_averaging import average_sharded, sharded_format

    fmt = sharded_format(paths[0])
    with tempfile.TemporaryDirectory() as tmp:
        tiny = [Path(tmp) / f"tiny-step={i}" for i in (1, 2)]
        for path in tiny:
            (write_zarr if fmt == "zarr" else write_dcp)(path, {"w": torch.ones(4, 4, dtype=torch.bfloat16)})
        average_sharded(tiny, Path(tmp) / "out", log=lambda line: None)
    reset = reset_peak()
    before = status_kb("VmRSS")
    cpu = time.process_time()
    start = time.perf_counter()
    average_sharded(paths, output, log=lambda line: None)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "increase_bytes": (status_kb("VmHWM") - before) * 1024,
                "baseline_bytes": before * 1024,
                "hwm_reset": reset,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work_dir",
        default=None,
        help="where to write the checkpoints (default: the system temporary directory)",
    )
    parser.add_argument(
        "--formats", nargs="+", default=["zarr", "dcp"], choices=["zarr", "dcp"], help="layouts to measure"
    )
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[2, 5], help="numbers of checkpoints to average"
    )
    parser.add_argument(
        "--caches",
        nargs="+",
        default=["warm", "cold"],
        choices=["warm", "cold"],
        help="page-cache states to measure from (module docstring)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="averaging runs per N and cache state (each against its own read)",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1:])
        return
    if args.work_dir is not None and not Path(args.work_dir).is_dir():
        parser.error(f"--work_dir {args.work_dir}: no such directory; create it or choose another")
    if min(args.counts) < 1 or args.repeats < 1:
        parser.error("--counts and --repeats take positive numbers")
    print(f"torch {torch.__version__}; the machine may be shared, so times vary with its load", flush=True)
    for fmt in args.formats:
        with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="sharded-averaging-bench-") as tmp:
            root = Path(tmp)
            paths, largest = make_checkpoints(root, fmt, max(args.counts))
            evict(paths)  # synced once here; eviction later only drops clean pages
            print(
                f"  {'N':>2} {'cache':>5} {'read s':>6} {'average s':>9} {'time ratio':>10} {'RSS increase':>13} "
                f"{'/ largest chunk':>15} {'baseline':>9} {'load':>5} {'cpu s':>5} {'IO s':>6} {'IO / N reads':>12} {'average / IO':>12}"
            )
            for cache in args.caches:
                for n in args.counts:
                    for _ in range(args.repeats):
                        read = mean_read(paths[:n], fmt, cache)
                        io = io_alone(paths[:n], fmt, cache, root)
                        output = root / f"averaged-{n}"
                        if cache == "cold":
                            evict(paths[:n])
                        result = subprocess.run(
                            [sys.executable, __file__, "--worker", str(output), *map(str, paths[:n])],
                            capture_output=True,
                            text=True,
                            check=True,
                        )
                        r = json.loads(result.stdout.strip().splitlines()[-1])
                        shutil.rmtree(output)
                        print(
                            f"  {n:>2} {cache:>5} {read:>6.3f} {r['seconds']:>9.3f} {r['seconds'] / (n * read):>10.2f} "
                            f"{r['increase_bytes'] / 1e6:>10.1f} MB {r['increase_bytes'] / largest:>15.2f} "
                            f"{r['baseline_bytes'] / 1e6:>6.0f} MB {os.getloadavg()[0]:>5.1f} {r['cpu_seconds']:>5.2f} {io:>6.3f} "
                            f"{io / (n * read):>12.2f} {r['seconds'] / io:>12.2f}"
                            + ("" if r["hwm_reset"] else "  (VmHWM not resettable)"),
                            flush=True,
                        )
    print("\ntargets: memory ratio <= 4 and flat in N; time ratio <= 1.5")


if __name__ == "__main__":
    main()
