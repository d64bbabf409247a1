"""Write manifest transcripts as SentencePiece pieces, the text KenLM's ``lmplz`` reads.

The n-gram scores what the decoder emits, which is pieces, not words: each
output line is one transcript's pieces (``Tokenizer.pieces``, word by word,
best segmentation) separated by spaces, e.g. ``▁the ▁c at ▁sat``. Transcripts
are normalised exactly as for training the SentencePiece model
(``manifest_transcripts``; with ``--config``, the YAML's settings and model).

Example::

    python -m caiman_asr_train.lm.prep_kenlm_data --config training/configs/demo.yaml \\
        --dataset_dir datasets/demo --manifests train.json \\
        --output datasets/demo/ngram/transcripts.txt
    scripts/generate_ngram.sh 4 datasets/demo/ngram/transcripts.txt \\
        datasets/demo/ngram/ngram.arpa datasets/demo/ngram/ngram.binary
"""

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from caiman_asr_train.core.errors import UserError
from caiman_asr_train.data.spm.spm_from_json import (
    add_manifest_arguments,
    add_text_arguments,
    manifest_transcripts,
    text_arguments,
)
from caiman_asr_train.data.tokenizer import UNK_POLICIES, Tokenizer
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cli import run_cli

PathLike = Union[str, os.PathLike]


def pieces_text(transcripts: Iterable[str], tokenizer: Tokenizer) -> str:
    """One line per transcript: its pieces separated by single spaces."""
    return "".join(" ".join(tokenizer.pieces(t)) + "\n" for t in transcripts)


def prep_kenlm_data(
    manifests: Sequence[PathLike],
    spm_model: PathLike,
    output: PathLike,
    dataset_dir: Optional[PathLike] = None,
    unk: str = "fail",
    **text: Any,
) -> int:
    """Write the piece text of ``manifests`` to ``output`` (atomically).

    Args:
        manifests: JSON manifests, relative to ``dataset_dir`` when given.
        spm_model: the SentencePiece model the acoustic model uses.
        output: text file to write.
        dataset_dir: directory the manifest paths are relative to.
        unk: ``Tokenizer`` policy for characters the model does not know.
        text: the normalisation keywords of ``manifest_transcripts`` (e.g.
            ``**text_settings(cfg)``); use the ones the model was trained with.

    Returns:
        Number of lines written.

    Raises:
        DataError: bad manifests or no transcripts.
        TokenizerError: bad model, or ``<unk>`` with ``unk="fail"``.
    """
    transcripts = manifest_transcripts(manifests, dataset_dir, **text)
    tokenizer = Tokenizer(spm_model, unk=unk)
    atomic_write_bytes(output, pieces_text(transcripts, tokenizer).encode("utf-8"))
    return len(transcripts)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write manifest transcripts as SentencePiece pieces, one sentence a line, for lmplz."
    )
    add_manifest_arguments(parser)
    parser.add_argument(
        "--spm_model",
        default=None,
        help="SentencePiece .model whose pieces the n-gram is over "
        "(default: the config's tokenizer.sentpiece_model)",
    )
    parser.add_argument("--output", required=True, help="text file to write")
    parser.add_argument(
        "--unk",
        choices=UNK_POLICIES,
        default="fail",
        help="a character unknown to the model: fail (default) or warn and write <unk>",
    )
    add_text_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    text, cfg = text_arguments(args)
    spm_model = args.spm_model
    if spm_model is None:
        if cfg is None:
            raise UserError("pass --spm_model, or --config to use its tokenizer.sentpiece_model")
        spm_model = config.tokenizer(cfg)["sentpiece_model"]
    lines = prep_kenlm_data(args.manifests, spm_model, args.output, args.dataset_dir, args.unk, **text)
    print(f"wrote {lines} lines to {Path(args.output)}")


if __name__ == "__main__":
    run_cli(main)
