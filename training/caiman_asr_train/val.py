"""Validate a checkpoint: greedy or beam decoding and word error rate on manifests (docs/formats.md section 10).

``--ckpt`` is one of:

- a training checkpoint (``*.pt`` from train.py): its EMA weights are
  validated with the model, features, mel statistics and tokenizer of the
  config the checkpoint recorded, or of ``--model_config`` when given (older
  checkpoints record none: then the default is the demo config);
- a hardware checkpoint (``*.hw.pt``, recognised by its content): weights,
  feature settings, mel statistics and tokenizer all come from the file, and
  ``--model_config`` is not read; a weight-quantized ``*.q.pt`` is validated
  the same way, its weights dequantized;
- an ONNX Runtime bundle directory (it holds a ``bundle.json``, as
  ``python -m caiman_asr_train.export.inference --target onnxruntime`` writes
  it): decoded greedily with the torch-free recogniser of ``runtime/``;
- a directory: every ``*.pt`` file and bundle directory in it is validated
  and a table of file, step and WER is printed.

``--decoder beam`` (and the other flags of ``evaluate.decoding``) decodes with
beam search and the n-gram the checkpoint carries or its config names.

Per checkpoint, the predictions (``[{"hyp", "ref", "fname"}, ...]``) are
written to ``<output_dir>/<checkpoint name without .pt>.predictions.json``.
The last line printed for a single checkpoint is::

    Word Error Rate: 12.345% on "datasets/demo/dev.json" (greedy)

with the manifests as given on the command line, joined by spaces, and the
decoder in brackets (e.g. ``beam search, width 4, n-gram scale 0.05``). Example,
from the repository root::

    python training/caiman_asr_train/val.py --ckpt results/RNN-T_best_checkpoint.hw.pt
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import torch

from caiman_asr_train.core.errors import CheckpointError, DataError, UserError
from caiman_asr_train.data.manifest import read_manifests
from caiman_asr_train.evaluate.decoding import Decoder, add_decoder_args, check_decoder_args, result_line
from caiman_asr_train.evaluate.evaluator import EvalResult, evaluate
from caiman_asr_train.evaluate.validation_args import add_validation_args
from caiman_asr_train.runtime.bundle import is_bundle
from caiman_asr_train.runtime.evaluate import evaluate_bundle
from caiman_asr_train.train_utils.checkpoints import Validatable, decoder_for, dev_loader, load_for_validation
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.cores import keep_freed_heap
from caiman_asr_train.utils.paths import REPO_ROOT

DEFAULT_VAL_MANIFEST = "datasets/demo/dev.json"
DEFAULT_OUTPUT_DIR = "results/val"


def validate(
    target: Validatable,
    entries: list[dict],
    dataset_dir: Path,
    *,
    batch_size: int,
    final_padding_secs: float,
    max_symbols_per_step: int,
    seed: int,
    device: torch.device,
    decoder: Optional[Decoder] = None,
) -> EvalResult:
    """Decode ``entries`` with ``target`` (greedily when ``decoder`` is None) and score them."""
    loader = dev_loader(target, entries, dataset_dir, batch_size)
    # Seeded per checkpoint: every checkpoint sees the same dither noise.
    generator = torch.Generator(device=device).manual_seed(seed)
    return evaluate(
        target.model,
        loader,
        target.pipeline,
        target.tokenizer,
        sample_rate=target.sample_rate,
        final_padding_secs=final_padding_secs,
        max_symbols_per_step=max_symbols_per_step,
        device=device,
        generator=generator,
        decoder=decoder,
        **target.scoring,
    )


def predictions_path(output_dir: Path, ckpt: Path) -> Path:
    """``<output_dir>/<ckpt name without .pt>.predictions.json``."""
    name = ckpt.name[: -len(".pt")] if ckpt.name.endswith(".pt") else ckpt.name
    return output_dir / f"{name}.predictions.json"


def write_predictions(predictions: list[dict], path: Path) -> None:
    """The ``[{"hyp", "ref", "fname"}, ...]`` list as JSON, atomically."""
    text = json.dumps(predictions, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def format_wer(rate: float) -> str:
    """A fraction as a percentage with three decimals: 0.12345 -> "12.345%"."""
    return f"{rate * 100:.3f}%"


def _natural_key(path: Path) -> list:
    # step9 before step10
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def checkpoints_in(directory: Path) -> list[Path]:
    """Every ``*.pt`` file and ONNX Runtime bundle directory of ``directory`` (not recursive), in natural
    name order."""
    files = sorted(
        (p for p in directory.iterdir() if (p.is_file() and p.suffix == ".pt") or is_bundle(p)),
        key=_natural_key,
    )
    if not files:
        raise CheckpointError(
            f"{directory}: no *.pt checkpoints or bundle directories in this directory; pass a file or "
            "another directory"
        )
    return files


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Decode manifests with a training checkpoint, a hardware checkpoint, an ONNX Runtime "
        "bundle or every one of them in a directory, and report the word error rate.",
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        help="training checkpoint (*.pt: EMA weights, with the config it recorded), hardware checkpoint "
        "(*.hw.pt or quantized *.q.pt: self-contained), ONNX Runtime bundle directory (greedy only) or a "
        "directory of them",
    )
    add_validation_args(parser)
    parser.add_argument(
        "--val_manifests",
        nargs="+",
        default=None,
        help=f"manifest(s) to validate on, relative to --dataset_dir or the current directory "
        f"(default: {DEFAULT_VAL_MANIFEST} in the repository)",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help=f"where <checkpoint>.predictions.json files go (default: {DEFAULT_OUTPUT_DIR} in the repository)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--max_symbol_per_sample",
        type=int,
        default=8,
        help="decoding emits at most this many symbols per encoder frame (default: 8)",
    )
    add_decoder_args(parser)
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    for flag, minimum in (("val_batch_size", 1), ("max_symbol_per_sample", 1), ("num_utterances", 1)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise UserError(f"--{flag} must be >= {minimum}, got {value}")
    if args.val_final_padding_secs < 0:
        raise UserError(f"--val_final_padding_secs must be >= 0, got {args.val_final_padding_secs}")
    if not args.ckpt.exists():
        raise CheckpointError(f"{args.ckpt}: no such checkpoint file or directory; check --ckpt")
    check_decoder_args(args)
    if args.decoder != "greedy" and is_bundle(args.ckpt):
        raise UserError(
            f"{args.ckpt}: ONNX Runtime bundles decode greedily; drop --decoder {args.decoder} or pass "
            "the hardware checkpoint it was exported from"
        )


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    _check_args(args)
    device = _device(args.device)
    if device.type == "cpu":
        keep_freed_heap()
    model_config = args.model_config
    manifests = args.val_manifests or [str(REPO_ROOT / DEFAULT_VAL_MANIFEST)]
    shown_manifests = " ".join(args.val_manifests or [DEFAULT_VAL_MANIFEST])
    dataset_dir = args.dataset_dir or Path(manifests[0]).parent
    output_dir = args.output_dir or REPO_ROOT / DEFAULT_OUTPUT_DIR
    entries = read_manifests(manifests, dataset_dir)
    if not entries:
        raise DataError(f"manifests {shown_manifests} hold no utterances; pass a non-empty --val_manifests")
    if args.num_utterances is not None:
        entries = entries[: args.num_utterances]
    torch.manual_seed(args.seed)

    def run(ckpt: Path) -> tuple[Optional[int], float, str]:
        """Validate ``ckpt``, write its predictions; (step, error rate as a fraction, result line)."""
        if is_bundle(ckpt):
            # The torch-free recogniser reads the audio itself: the same entries, the same WER.
            result = evaluate_bundle(
                ckpt,
                manifests,
                dataset_dir,
                num_utterances=args.num_utterances,
                max_symbols_per_step=args.max_symbol_per_sample,
                final_padding_secs=args.val_final_padding_secs,
                progress=True,
            )
            step, kind, decoder = None, "ONNX Runtime bundle", Decoder("greedy", pieces=[])
        else:
            target = load_for_validation(ckpt, model_config, device)
            decoder = decoder_for(target, args, ckpt, args.max_symbol_per_sample)
            result = validate(
                target,
                entries,
                dataset_dir,
                batch_size=args.val_batch_size,
                final_padding_secs=args.val_final_padding_secs,
                max_symbols_per_step=args.max_symbol_per_sample,
                seed=args.seed,
                device=device,
                decoder=decoder,
            )
            step, kind = target.step, f"{target.kind} checkpoint"
        path = predictions_path(output_dir, ckpt)
        write_predictions(result.predictions, path)
        print(f"{ckpt.name}: {kind}, {decoder.description}, predictions in {path}", file=sys.stderr)
        return step, result.wer, result_line(result.wer, shown_manifests, decoder)

    if not args.ckpt.is_dir() or is_bundle(args.ckpt):
        print(run(args.ckpt)[2])
        return 0

    rows = []
    failed = 0
    for ckpt in checkpoints_in(args.ckpt):
        try:
            step, wer, _ = run(ckpt)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            rows.append((ckpt.name, "-", "error"))
            failed += 1
            continue
        rows.append((ckpt.name, "-" if step is None else str(step), format_wer(wer)))
    print(format_table(rows, f'WER on "{shown_manifests}"'))
    # Status 2, as for any user error, when some checkpoint could not be validated.
    return 2 if failed else 0


def format_table(rows: list[tuple[str, str, str]], wer_header: str = "WER") -> str:
    """Left-aligned columns file, step, WER."""
    header = ("file", "step", wer_header)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def cli() -> NoReturn:
    """Console entry point (``caiman-val``)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
