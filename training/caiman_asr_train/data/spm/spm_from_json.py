"""Train a SentencePiece unigram model on the transcripts of JSON manifests (docs/formats.md section 7).

Transcripts are normalised as the YAML's ``audio_dataset`` block asks
(``normalize_transcripts``, ``replacements``, ``remove_tags``) and, given
``labels``, restricted to the tokenizer's characters: the same
``normalize_texts`` call ``data.dataset.AudioDataset`` makes, so the model
sees exactly the text training will tokenize. With ``--config`` these
settings come from the YAML. Model settings: unigram, ``<unk>`` id 0, no
BOS/EOS, character coverage 1.0 (every character of the corpus is a piece, so
no training transcript encodes to ``<unk>``), user symbols such as ``<EOS>``
as user-defined pieces.

Example::

    python -m caiman_asr_train.data.spm.spm_from_json --config training/configs/demo.yaml \\
        --dataset_dir datasets/demo --manifests train.json \\
        --output_prefix datasets/demo/spm/demo --vocab_size 256

writes ``datasets/demo/spm/demo.model`` and ``demo.vocab``.
"""

import argparse
import io
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import sentencepiece as spm

from caiman_asr_train.core.errors import DataError, TokenizerError
from caiman_asr_train.data.manifest import read_manifests
from caiman_asr_train.data.normalizers import NORMALIZE_MODES, Replacements, normalize_texts
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.cores import available_cores

PathLike = Union[str, os.PathLike]


def text_settings(cfg: dict, split: Optional[str] = None) -> dict:
    """Transcript normalisation of a loaded config, as keyword arguments.

    ``{"normalize_transcripts", "labels", "replacements", "remove_tags"}`` from
    ``input_{split}.audio_dataset`` and ``tokenizer.labels``: the arguments
    ``manifest_transcripts``, ``spm_from_json``, ``prep_kenlm_data`` and
    ``AudioDataset`` take. ``split`` None means "train", or "val" when the
    config has no training section.
    """
    if split is None:
        split = "train" if "input_train" in cfg else "val"
    audio = config.input(cfg, split)["audio_dataset"]
    return {
        "normalize_transcripts": audio.get("normalize_transcripts", "lowercase"),
        "labels": config.tokenizer(cfg)["labels"],
        "replacements": audio.get("replacements"),
        "remove_tags": bool(audio.get("remove_tags", True)),
    }


def config_user_symbols(cfg: dict) -> list[str]:
    """The config's ``user_tokens`` (name -> token string) as SentencePiece user symbols."""
    return [str(token) for token in (cfg.get("user_tokens") or {}).values()]


def manifest_transcripts(
    manifests: Sequence[PathLike],
    dataset_dir: Optional[PathLike] = None,
    normalize_transcripts: str = "lowercase",
    labels: Optional[Iterable[str]] = None,
    replacements: Replacements = None,
    remove_tags: bool = True,
) -> list[str]:
    """Normalised, non-empty transcripts of ``manifests``, in manifest order.

    Manifest paths are relative to ``dataset_dir`` when given, else to the
    current directory. Audio files are not checked: only text is needed.
    ``normalize_transcripts``, ``labels``, ``replacements`` and ``remove_tags``
    go to ``normalize_transcript`` (see ``text_settings``).

    Raises:
        DataError: a manifest is missing or malformed, or no transcript is left.
        ConfigError: a bad normalisation setting.
    """
    if not manifests:
        raise DataError("no manifests given; pass at least one with --manifests")
    entries = read_manifests(manifests, dataset_dir if dataset_dir is not None else ".", check_files=False)
    texts = [entry["transcript"] for entry in entries]
    normalized = normalize_texts(texts, normalize_transcripts, labels, replacements, remove_tags)
    transcripts = [t for t in normalized if t]
    if not transcripts:
        raise DataError(f"manifests {', '.join(map(str, manifests))} have no non-empty transcripts")
    return transcripts


def train_sentencepiece(
    transcripts: Sequence[str],
    output_prefix: PathLike,
    vocab_size: int,
    user_symbols: Sequence[str] = (),
) -> Path:
    """Train a unigram model on ``transcripts``; write ``PREFIX.model`` and ``PREFIX.vocab``.

    The model is trained in memory and each file written atomically, ``.model``
    last, so an existing ``.model`` is always complete. Training in memory also
    keeps output paths out of the model's stored trainer settings, so the same
    transcripts give byte-identical models. On a corpus too small for
    ``vocab_size`` the model is smaller than asked (SentencePiece's
    ``hard_vocab_limit=False``) instead of failing.

    Returns:
        Path of the ``.model`` file.

    Raises:
        TokenizerError: ``vocab_size`` is smaller than the number of distinct
            characters plus special pieces, or SentencePiece fails.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(transcripts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            user_defined_symbols=list(user_symbols),
            hard_vocab_limit=False,
            # Text is normalised by us (normalize_transcript); SentencePiece's
            # default NFKC rule would change some characters and break the
            # round trip transcript -> ids -> transcript.
            normalization_rule_name="identity",
            num_threads=min(available_cores(), 8),
            minloglevel=2,
        )
    except RuntimeError as exc:
        # Every character is a piece (coverage 1.0), plus <unk> and user symbols.
        needed = len(set("".join(transcripts))) + len(user_symbols) + 1
        reason = str(exc).strip().splitlines()[-1]
        if "smaller than required_chars" in reason:
            reason = f"the corpus has {needed - len(user_symbols) - 1} distinct characters"
        raise TokenizerError(
            f"SentencePiece cannot train {output_prefix}.model with vocab_size={vocab_size} "
            f"({reason}); use a vocab_size of at least {needed}"
        ) from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # The .vocab file in SentencePiece's own format: piece, tab, log probability.
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.get_piece_size())
    )
    atomic_write_bytes(f"{output_prefix}.vocab", vocab.encode("utf-8"))
    atomic_write_bytes(f"{output_prefix}.model", model.getvalue())
    return Path(f"{output_prefix}.model")


def spm_from_json(
    manifests: Sequence[PathLike],
    output_prefix: PathLike,
    vocab_size: int,
    dataset_dir: Optional[PathLike] = None,
    user_symbols: Sequence[str] = (),
    **text: Any,
) -> Path:
    """Train a SentencePiece model on the normalised transcripts of ``manifests``.

    ``text``: the normalisation keywords of ``manifest_transcripts`` (e.g.
    ``**text_settings(cfg)``). Returns the path of the ``.model`` file; see
    ``train_sentencepiece``.
    """
    transcripts = manifest_transcripts(manifests, dataset_dir, **text)
    return train_sentencepiece(transcripts, output_prefix, vocab_size, user_symbols)


def add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    """``--manifests`` and ``--dataset_dir``, the inputs of ``manifest_transcripts`` (shared with prep_kenlm_data)."""
    parser.add_argument(
        "--manifests",
        nargs="+",
        required=True,
        help="JSON manifests (docs/formats.md section 11), relative to --dataset_dir when given",
    )
    parser.add_argument(
        "--dataset_dir",
        default=None,
        help="directory the manifest paths are relative to (default: current directory)",
    )


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and the normalisation flags that override it (shared with prep_kenlm_data)."""
    parser.add_argument(
        "--config",
        default=None,
        help="YAML model config: normalisation (input_train.audio_dataset, tokenizer.labels) "
        "and user symbols (user_tokens) are taken from it; the flags below override it",
    )
    parser.add_argument(
        "--normalize_transcripts",
        choices=NORMALIZE_MODES,
        default=None,
        help="the YAML's audio_dataset.normalize_transcripts (default: the config's, else lowercase)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        help='keep only these characters, e.g. " abcdefghijklmnopqrstuvwxyz\'" '
        "(default: the config's tokenizer.labels, else keep all)",
    )
    parser.add_argument(
        "--remove_tags",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop <tag>-style markup from transcripts, as audio_dataset.remove_tags "
        "(default: the config's, else on)",
    )


def text_arguments(args: argparse.Namespace) -> tuple[dict, Optional[dict]]:
    """Normalisation keywords from ``add_text_arguments`` flags, and the loaded config (or None)."""
    cfg = config.load(args.config) if args.config else None
    text = text_settings(cfg) if cfg is not None else {}
    if args.normalize_transcripts is not None:
        text["normalize_transcripts"] = args.normalize_transcripts
    if args.labels is not None:
        text["labels"] = args.labels
    if args.remove_tags is not None:
        text["remove_tags"] = args.remove_tags
    return text, cfg


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a SentencePiece unigram model on manifest transcripts."
    )
    add_manifest_arguments(parser)
    parser.add_argument(
        "--output_prefix",
        required=True,
        help="output path without extension: writes PREFIX.model and PREFIX.vocab",
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        required=True,
        help="number of pieces, <unk> and user symbols included (fewer on a small corpus)",
    )
    parser.add_argument(
        "--user_symbols",
        nargs="*",
        default=None,
        help="pieces always kept whole, e.g. <EOS> (default: the config's user_tokens, else none)",
    )
    add_text_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    text, cfg = text_arguments(args)
    symbols = args.user_symbols
    if symbols is None:
        symbols = config_user_symbols(cfg) if cfg is not None else []
    model = spm_from_json(
        args.manifests, args.output_prefix, args.vocab_size, args.dataset_dir, symbols, **text
    )
    size = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    print(f"wrote {model} ({size} pieces)")


if __name__ == "__main__":
    run_cli(main)
