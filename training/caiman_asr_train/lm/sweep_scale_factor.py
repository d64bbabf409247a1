"""Find the n-gram scale factor that gives the lowest WER: beam-decode a dev set once per value.

The audio is featurised and encoded once; only the beam search runs per scale
factor (the n-gram is loaded once too). Prints a table of scale factor and
WER, then the best value. With ``--output_hw`` the best value is written into
a copy of the hardware checkpoint (atomically; the input is left as it is).

Example, from the repository root::

    python -m caiman_asr_train.lm.sweep_scale_factor --ckpt results/RNN-T_best_checkpoint.hw.pt \\
        --val_manifests datasets/demo/dev.json --output_hw results/best.tuned.hw.pt
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from caiman_asr_train.core.errors import CheckpointError, DataError, UserError
from caiman_asr_train.core.load_hw import read_checkpoint
from caiman_asr_train.data.manifest import read_manifests
from caiman_asr_train.evaluate.decoding import Decoder, add_decoder_args
from caiman_asr_train.evaluate.evaluator import featurize
from caiman_asr_train.evaluate.validation_args import add_validation_args
from caiman_asr_train.evaluate.wer import word_error_rate
from caiman_asr_train.export.hardware_ckpt import save_hardware_ckpt
from caiman_asr_train.train_utils.checkpoints import Validatable, decoder_for, dev_loader, load_for_validation
from caiman_asr_train.utils.cli import run_cli

DEFAULT_SCALE_FACTORS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


@dataclass
class Encoded:
    """One batch's encoder output f[B, T', enc_n_hid], f_lens[B] and reference transcripts."""

    f: torch.Tensor
    f_lens: torch.Tensor
    refs: list[str]


@torch.no_grad()
def encode_dev_set(
    target: Validatable,
    entries: list[dict],
    dataset_dir: Path,
    *,
    batch_size: int,
    final_padding_secs: float,
    seed: int,
    device: torch.device,
) -> list[Encoded]:
    """Featurise (as validation does) and encode every utterance once."""
    loader = dev_loader(target, entries, dataset_dir, batch_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    target.model.eval()
    target.pipeline.eval().to(device)
    encoded = []
    for batch in loader:
        x, x_lens = featurize(
            batch, target.pipeline, target.sample_rate, final_padding_secs, device, generator
        )
        f, f_lens, _ = target.model.encode(x, x_lens)
        encoded.append(Encoded(f, f_lens, list(batch.transcripts)))
    return encoded


def sweep(
    target: Validatable, decoder: Decoder, encoded: list[Encoded], scale_factors: Sequence[float]
) -> list[tuple[float, float]]:
    """(scale factor, WER as a fraction) for each scale factor, decoding ``encoded`` with ``decoder``'s beam search."""
    refs = [ref for batch in encoded for ref in batch.refs]
    results = []
    for scale in scale_factors:
        hyps = transcribe(target, decoder.with_ngram_scale(scale), encoded)
        wer, _, _ = word_error_rate(hyps, refs, **target.scoring)
        results.append((scale, wer))
    return results


def transcribe(target: Validatable, decoder: Decoder, encoded: list[Encoded]) -> list[str]:
    """Beam-search transcripts of every encoded utterance, in order."""
    search = decoder.search(target.model)
    return [
        target.tokenizer.detokenize(ids)
        for batch in encoded
        for ids in search.decode_encoded(batch.f, batch.f_lens)
    ]


def write_scale_factor(source: Path, output: Path, scale_factor: float) -> None:
    """Copy hardware checkpoint ``source`` to ``output`` with its n-gram scale factor replaced (atomic write)."""
    hw = read_checkpoint(source)
    if hw["ngram"]["binary"] is None:
        raise CheckpointError(f"{source} carries no n-gram (exported with --skip_ngram); nothing to tune")
    save_hardware_ckpt(
        dict(hw, ngram={"binary": hw["ngram"]["binary"], "scale_factor": float(scale_factor)}), output
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Beam-decode a dev set once per n-gram scale factor; print the WER table and the best value."
    )
    parser.add_argument(
        "--ckpt", type=Path, required=True, help="hardware checkpoint (*.hw.pt) or training checkpoint"
    )
    add_validation_args(parser)
    parser.add_argument("--val_manifests", nargs="+", required=True, help="dev manifest(s) to decode")
    parser.add_argument(
        "--scale_factors",
        type=float,
        nargs="+",
        default=list(DEFAULT_SCALE_FACTORS),
        help=f"n-gram scale factors to try (default: {' '.join(map(str, DEFAULT_SCALE_FACTORS))})",
    )
    parser.add_argument(
        "--output_hw",
        type=Path,
        default=None,
        help="write a copy of the hardware checkpoint --ckpt with the best scale factor here",
    )
    add_decoder_args(parser)
    args = parser.parse_args(argv)
    args.decoder = "beam"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.skip_ngram:
        raise UserError("--skip_ngram leaves nothing to sweep; drop it")
    if any(s < 0 for s in args.scale_factors):
        raise UserError(f"--scale_factors must be >= 0, got {args.scale_factors}")
    if args.output_hw is not None and args.output_hw.resolve() == args.ckpt.resolve():
        raise UserError("--output_hw must differ from --ckpt (the input is never overwritten)")
    device = torch.device("cpu")
    dataset_dir = args.dataset_dir or Path(args.val_manifests[0]).parent
    entries = read_manifests(args.val_manifests, dataset_dir)[: args.num_utterances]
    if not entries:
        raise DataError(f"manifests {' '.join(args.val_manifests)} hold no utterances")
    target = load_for_validation(args.ckpt, args.model_config, device)
    if args.output_hw is not None and target.kind != "hardware":
        raise CheckpointError(
            f"{args.ckpt} is a training checkpoint; --output_hw needs a hardware checkpoint as --ckpt"
        )
    decoder = decoder_for(target, args, args.ckpt)
    if decoder.ngram is None:
        raise UserError(f"{args.ckpt} has no n-gram to sweep; pass --override_ngram_path FILE")
    encoded = encode_dev_set(
        target,
        entries,
        dataset_dir,
        batch_size=args.val_batch_size,
        final_padding_secs=args.val_final_padding_secs,
        seed=args.seed,
        device=device,
    )
    results = sweep(target, decoder, encoded, args.scale_factors)
    print(f"{'scale_factor':>12}  WER")
    for scale, wer in results:
        print(f"{scale:>12g}  {wer * 100:.3f}%")
    best_scale, best_wer = min(results, key=lambda r: (r[1], r[0]))
    print(f"best scale_factor: {best_scale:g} (WER {best_wer * 100:.3f}%)")
    if args.output_hw is not None:
        write_scale_factor(args.ckpt, args.output_hw, best_scale)
        print(f"wrote {args.output_hw} with scale_factor {best_scale:g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
