"""Weight quantization of a trained model: size, WER and decode speed of every type, against float32, in one run.

Usage (from the repository root, after ./train.sh):

    .venv/bin/python benchmarks/quantization.py
    .venv/bin/python benchmarks/quantization.py --ckpt results/RNN-T_best_checkpoint.hw.pt \\
        --manifest datasets/demo/dev.json --num_utterances 200

For each target (an ONNX Runtime bundle, a PyTorch ``*.q.pt``) it exports the
checkpoint in float32 and with each of the four quantize types
(``export_inference``, no gate), then greedy-decodes the manifest with each
artefact (ONNX Runtime: ``runtime.Recognizer``, one thread; PyTorch: the
``load_hw_checkpoint`` model, one thread) and prints per artefact:

- bytes / fp32: the encoder, predictor and joint ``.onnx`` graphs, or the
  weight tensors of the checkpoint (values and scales); tokenizer, n-gram and
  the features graph are excluded
- WER and its change in absolute points against the same target in float32
- speed: float32 decode time / this artefact's decode time (above 1 is faster;
  a ``*.q.pt`` is dequantized when loaded, so PyTorch decodes at float speed)

and checks the targets: int8_per_channel within 0.5 WER points of float32 at
<= 0.30x its bytes; int4_blockwise at <= 0.17x.
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from caiman_asr_train.core.load_hw import read_checkpoint
from caiman_asr_train.deploy.onnxruntime_bundle import HW_TEXT
from caiman_asr_train.deploy.quantize import MODEL_GRAPHS, QUANTIZE_TYPES, quantized_weight_bytes
from caiman_asr_train.export.inference import (
    HW_FILE,
    QUANTIZED_FILE,
    export_inference,
    load_source,
    pytorch_transcriber,
)
from caiman_asr_train.runtime.evaluate import evaluate_transcriber
from caiman_asr_train.runtime.recognizer import Recognizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("onnxruntime", "pytorch")
# (quantize type, largest bytes / fp32, largest WER increase in points or None)
GOALS = (("int8_per_channel", 0.30, 0.5), ("int4_blockwise", 0.17, None))


def artefact_bytes(target: str, directory: Path) -> int:
    """Bytes of the model weights in an export directory (see the module docstring)."""
    if target == "onnxruntime":
        return sum((directory / name).stat().st_size for name in MODEL_GRAPHS[target])
    path = directory / QUANTIZED_FILE if (directory / QUANTIZED_FILE).exists() else directory / HW_FILE
    return quantized_weight_bytes(read_checkpoint(path))


def transcriber(target: str, directory: Path) -> Callable:
    if target == "onnxruntime":
        return Recognizer(directory, num_threads=1).transcribe
    path = directory / QUANTIZED_FILE if (directory / QUANTIZED_FILE).exists() else directory / HW_FILE
    return pytorch_transcriber(path)


def measure(args: argparse.Namespace, hw: dict, target: str, quantize_type, work: Path) -> dict:
    """Export, then decode the manifest once: bytes, WER (fraction) and decode seconds."""
    directory = work / f"{target}-{quantize_type or 'fp32'}"
    export_inference(
        args.ckpt,
        target,
        directory,
        quantize_type=quantize_type,
        block_size=args.block_size,
        config=args.config,
    )
    transcribe = transcriber(target, directory)
    features = hw["rnnt_config"]["input_val"]["filterbank_features"]
    start = time.perf_counter()
    result = evaluate_transcriber(
        transcribe,
        [args.manifest],
        args.dataset_dir or Path(args.manifest).parent,
        sample_rate=int(features["sample_rate"]),
        text={"labels": list(hw["rnnt_config"]["tokenizer"]["labels"]), **HW_TEXT},
        num_utterances=args.num_utterances,
    )
    return {
        "bytes": artefact_bytes(target, directory),
        "wer": result.wer,
        "seconds": time.perf_counter() - start,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ckpt",
        type=Path,
        default=REPO_ROOT / "results/RNN-T_best_checkpoint.hw.pt",
        help="hardware or training checkpoint to quantize "
        "(default: results/RNN-T_best_checkpoint.hw.pt in the repository)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config of a training checkpoint (default: the one it recorded)",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=REPO_ROOT / "datasets/demo/dev.json",
        help="manifest to decode (default: datasets/demo/dev.json in the repository)",
    )
    parser.add_argument(
        "--dataset_dir", type=Path, default=None, help="audio root of the manifest (default: its directory)"
    )
    parser.add_argument(
        "--block_size", type=int, default=128, help="input-axis block of the blockwise types (default: 128)"
    )
    parser.add_argument(
        "--num_utterances", type=int, default=None, help="decode only the first N utterances (default: all)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    hw = load_source(args.ckpt, args.config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantization-") as scratch:
        for target in TARGETS:
            fp32 = measure(args, hw, target, None, Path(scratch))
            rows.append((target, "fp32", fp32, fp32))
            for quantize_type in QUANTIZE_TYPES:
                rows.append(
                    (target, quantize_type, measure(args, hw, target, quantize_type, Path(scratch)), fp32)
                )
    print(f"{'target':<12} {'type':<17} {'bytes/fp32':>10} {'WER %':>7} {'dWER':>6} {'speed':>6}")
    failures = []
    for target, name, m, fp32 in rows:
        ratio, increase = m["bytes"] / fp32["bytes"], 100 * (m["wer"] - fp32["wer"])
        print(
            f"{target:<12} {name:<17} {ratio:>9.3f}x {100 * m['wer']:>7.2f} {increase:>+6.2f} "
            f"{fp32['seconds'] / m['seconds']:>5.2f}x"
        )
        for goal_type, max_ratio, max_increase in GOALS:
            if name == goal_type and (
                ratio > max_ratio or (max_increase is not None and increase > max_increase)
            ):
                failures.append(f"{target} {name}: {ratio:.3f}x bytes, {increase:+.2f} WER points")
    print("targets met" if not failures else "targets missed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
