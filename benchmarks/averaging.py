"""Memory and time of checkpoint averaging on base-size checkpoints (issue 6).

Usage (from the repository root):

    .venv/bin/python benchmarks/averaging.py                 # 5 checkpoints in a temporary directory
    .venv/bin/python benchmarks/averaging.py --cold          # also with the inputs evicted from the page cache

Writes 5 training checkpoints of the base FPGA model (training/configs/base-8703sp.yaml,
n_classes 8704; float32 raw and EMA weights, 677.5 MB of weights per file) with the
Checkpointer, then averages the first N (N = 2 and 5) in a fresh Python process each
time and prints:

    memory ratio = peak resident memory increase while averaging / one model's weight bytes
                   (one state dict, 338.8 MB; target < 2.5, the same for every N)
    time ratio   = averaging time / (N x time to read one input's weights)
                   (reading = torch.load(weights_only=True) of one input checkpoint, which holds
                   the raw and EMA weights the averaging must read; target <= 1.5)

The peak is the worker's VmHWM (reset through /proc/self/clear_refs just before
averaging where the kernel allows it) minus its VmRSS just before. Averaging time is
``average_checkpoints`` alone; writing the result is reported separately. By default
the inputs are in the page cache (they were just written), for reading and averaging
alike; ``--cold`` repeats both after evicting the files with posix_fadvise.
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

import torch

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
                model, ema, None, epoch=i, step=step, best_wer=0.1, dev_wer=0.1 + 0.01 * i,
                tokenizer_kw={"sentpiece_model": "spm.model", "labels": [], "sampling": 0.0},
                logmel_norm_weight=1.0, config_path=str(BASE_CONFIG),
            )
        )
        print(f"  wrote {paths[-1].name} ({paths[-1].stat().st_size / 1e6:.1f} MB)", flush=True)
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(paths: list[str], output: str) -> None:
    """Average ``paths`` in this (fresh) process; print time and resident memory as JSON."""
    from caiman_asr_train.export.checkpoint_averaging import average_checkpoints
    from caiman_asr_train.utils.atomic import atomic_torch_save

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    rss_before = _status_kb("VmRSS")
    start = time.perf_counter()
    averaged = average_checkpoints(paths, progress=False, log=lambda line: None)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    start = time.perf_counter()
    atomic_torch_save(averaged, output)
    save_seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds,
        "save_seconds": save_seconds,
        "increase_bytes": (peak - rss_before) * 1024,
        "peak_after_save_bytes": (_status_kb("VmHWM") - rss_before) * 1024,
        "hwm_reset": reset,
    }))


def run_worker(paths: list[Path], output: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", str(output), *map(str, paths)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work_dir", default=None, help="where to write the checkpoints (default: the system temporary directory)"
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 5], help="numbers of checkpoints to average")
    parser.add_argument("--cold", action="store_true", help="also measure with the inputs evicted from the page cache")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[1:], args.worker[0])
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
                f"{'N':>2} {'average s':>9} {'time ratio':>10} {'RSS increase':>13} "
                f"{'/ one model':>11} {'/ one input':>11} {'save s':>7}"
            )
            for n in args.counts:
                if cold:
                    evict(paths[:n])
                r = run_worker(paths[:n], directory / "avg.pt")
                ratio = r["seconds"] / (n * read)
                print(
                    f"{n:>2} {r['seconds']:>9.3f} {ratio:>10.2f} {r['increase_bytes'] / 1e6:>10.1f} MB "
                    f"{r['increase_bytes'] / model_bytes:>11.2f} {r['increase_bytes'] / (2 * model_bytes):>11.2f} "
                    f"{r['save_seconds']:>7.2f}"
                    + ("" if r["hwm_reset"] else "  (VmHWM not resettable: peak includes start-up)"),
                    flush=True,
                )
        print("\ntargets: memory ratio (/ one model) < 2.5 for every N; time ratio <= 1.5")


if __name__ == "__main__":
    main()
