"""Memory and time of checkpoint averaging on base-size checkpoints.

Usage (from the repository root):

    .venv/bin/python benchmarks/averaging.py                 # 5 checkpoints in a temporary directory
    .venv/bin/python benchmarks/averaging.py --cold          # also with the inputs evicted from the page cache

Writes 5 training checkpoints of the base FPGA model (training/configs/base-8703sp.yaml,
n_classes 8704; float32 raw and EMA weights, 677.5 MB of weights per file) with the
Checkpointer, then averages the first N (N = 2 and 5) in a fresh Python process each
time and prints:

    time ratio   = averaging time / (N x time to read one input's weights)
                   (reading = torch.load(weights_only=True) of one input checkpoint, which holds
                   the raw and EMA weights the averaging must read; target <= 1.5)
    RSS increase = peak resident memory increase while averaging, and the part of it that is
                   anonymous memory the process owns (RssAnon: the output and one chunk; the
                   rest is clean page cache of the memory-mapped inputs, which the kernel
                   reclaims under pressure), each over one model's weight bytes (338.8 MB)
    limited      = the same run inside a memory cgroup limited to 2.5x one model's weight bytes
                   (the worker joins it after its imports, so the limit covers the averaging):
                   whether it succeeds and how long it takes. Needs a writable cgroup
                   (v1 or v2); without one the column says so.

The peak is the worker's VmHWM (reset through /proc/self/clear_refs just before
averaging where the kernel allows it) minus its VmRSS just before. Averaging time is
``average_checkpoints`` alone; writing the result is reported separately. By default
the inputs are in the page cache (they were just written), for reading and averaging
alike; ``--cold`` repeats both after evicting the files with posix_fadvise. The
limited runs always start cold, so that the inputs' pages are charged to the cgroup.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from memory_probe import memory_cgroup

from caiman_asr_train.utils.page_cache import evict

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "training/configs/base-8703sp.yaml"
N_CLASSES = 8704


def make_checkpoints(directory: Path, count: int) -> list[Path]:
    """``count`` base-size training checkpoints with distinct raw and EMA weights."""
    from caiman_asr_train.export.checkpointer import Checkpointer
    from caiman_asr_train.rnnt import config
    from caiman_asr_train.rnnt.model import RNNT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base config names GPU-only options (custom_lstm...)
        kwargs = config.rnnt(config.load(BASE_CONFIG))
    torch.manual_seed(0)
    model, ema = RNNT(N_CLASSES, **kwargs), RNNT(N_CLASSES, **kwargs)
    checkpointer = Checkpointer(directory)
    paths = []
    for i in range(count):
        with torch.no_grad():
            for module in (model, ema):
                for param in module.parameters():
                    param.add_(torch.randn_like(param), alpha=0.01)
        step = 1000 * (i + 1)
        paths.append(
            checkpointer.save(
                model,
                ema,
                None,
                epoch=i,
                step=step,
                best_wer=0.1,
                dev_wer=0.1 + 0.01 * i,
                tokenizer_kw={"sentpiece_model": "spm.model", "labels": [], "sampling": 0.0},
                logmel_norm_weight=1.0,
                config_path=str(BASE_CONFIG),
            )
        )
        print(f"  wrote {paths[-1].name} ({paths[-1].stat().st_size / 1e6:.1f} MB)", flush=True)
    return paths


def read_time(path: Path, cold: bool, repeats: int = 3) -> float:
    """Median seconds of ``torch.load(path, weights_only=True)`` (every tensor read into memory)."""
    times = []
    for _ in range(repeats):
        if cold:
            evict([path])
        start = time.perf_counter()
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        times.append(time.perf_counter() - start)
        del loaded
    return statistics.median(times)


def worker(paths: list[str], output: str, group: str) -> None:
    """Average ``paths`` in this (fresh) process, inside ``group`` if given; print time and memory as JSON."""
    from memory_probe import join, reset_peak, status_kb

    from caiman_asr_train.export.averaging_engine import average_checkpoints
    from caiman_asr_train.utils.atomic import atomic_torch_save

    join(Path(group) if group else None)
    reset = reset_peak()
    rss_before, anon_before = status_kb("VmRSS"), status_kb("RssAnon")
    start = time.perf_counter()
    averaged = average_checkpoints(paths, progress=False, log=lambda line: None)
    seconds = time.perf_counter() - start
    peak, anon = status_kb("VmHWM"), status_kb("RssAnon")
    start = time.perf_counter()
    atomic_torch_save(averaged, output)
    save_seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "save_seconds": save_seconds,
                "increase_bytes": (peak - rss_before) * 1024,
                "anon_bytes": (anon - anon_before) * 1024,
                "hwm_reset": reset,
            }
        )
    )


def run_worker(paths: list[Path], output: Path, group: Optional[Path] = None) -> Optional[dict]:
    """The worker's JSON, or None when it was killed (out of memory under a cgroup limit)."""
    result = subprocess.run(
        [sys.executable, __file__, "--worker", str(output), str(group or ""), *map(str, paths)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if group is None:
            raise RuntimeError(result.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work_dir",
        default=None,
        help="where to write the checkpoints (default: the system temporary directory)",
    )
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[2, 5], help="numbers of checkpoints to average"
    )
    parser.add_argument(
        "--cold", action="store_true", help="also measure with the inputs evicted from the page cache"
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=2.5,
        help="memory cgroup limit for the limited runs, in model weight bytes",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[2:], args.worker[0], args.worker[1])
        return

    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="averaging-bench-") as tmp:
        directory = Path(tmp)
        print(f"writing {max(args.counts)} base-size checkpoints to {directory}", flush=True)
        paths = make_checkpoints(directory, max(args.counts))
        state_dict = torch.load(paths[0], mmap=True, weights_only=True)["state_dict"]
        params = sum(t.numel() for t in state_dict.values())
        model_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
        del state_dict
        print(
            f"base model: {params:,} parameters; one model's weights {model_bytes / 1e6:.1f} MB; "
            f"one input checkpoint's weights (raw + EMA) {2 * model_bytes / 1e6:.1f} MB; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        )
        for cold in [False, True] if args.cold else [False]:
            cache = "cold (evicted from the page cache)" if cold else "warm (in the page cache)"
            read = read_time(paths[0], cold)
            print(f"\ninputs {cache}: reading one input checkpoint takes {read:.3f} s (median of 3)")
            print(
                f"{'N':>2} {'average s':>9} {'time ratio':>10} {'RSS increase':>13} {'/ one model':>11} "
                f"{'anon / model':>12} {'save s':>7} {'limited to ' + str(args.limit) + 'x one model':>30}"
            )
            for n in args.counts:
                if cold:
                    evict(paths[:n])
                r = run_worker(paths[:n], directory / "avg.pt")
                ratio = r["seconds"] / (n * read)
                with memory_cgroup(int(args.limit * model_bytes)) as group:
                    if group is None:
                        limited = "no writable memory cgroup here"
                    else:
                        evict(paths[:n])
                        lr = run_worker(paths[:n], directory / "avg.pt", group)
                        limited = "killed (out of memory)" if lr is None else f"ok, {lr['seconds']:.3f} s"
                print(
                    f"{n:>2} {r['seconds']:>9.3f} {ratio:>10.2f} {r['increase_bytes'] / 1e6:>10.1f} MB "
                    f"{r['increase_bytes'] / model_bytes:>11.2f} {r['anon_bytes'] / model_bytes:>12.2f} "
                    f"{r['save_seconds']:>7.2f} {limited:>30}"
                    + ("" if r["hwm_reset"] else "  (VmHWM not resettable: peak includes start-up)"),
                    flush=True,
                )
        print(
            "\ntargets: time ratio <= 1.5; anonymous memory (/ one model) < 2.5 for every N; "
            f"success under the {args.limit}x limit"
        )


if __name__ == "__main__":
    main()
