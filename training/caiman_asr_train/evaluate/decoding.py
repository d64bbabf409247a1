"""Decoder choice for evaluation: the command-line flags and the factory that builds a decoder from them.

``add_decoder_args`` adds CAIMAN-ASR's decoding flags to a parser
(``--decoder {greedy,beam}``, beam settings, keyword boosting, n-gram
overrides). ``build_decoder`` turns the parsed flags, the tokenizer and the
checkpoint's n-gram into a ``Decoder``:

- a hardware checkpoint decodes with the n-gram it carries (its embedded
  KenLM bytes and scale factor), never with a file named in some YAML;
- a training checkpoint uses its config's ``ngram`` section (the directory's
  ``ngram.binary`` or ``ngram.arpa`` and ``scale_factor``);
- ``--skip_ngram`` decodes without one, ``--override_ngram_path FILE`` uses
  another, ``--ngram_scale_factor`` replaces the scale factor.

The n-gram and keywords only affect beam search; greedy decoding is the
default, as upstream.
"""

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from caiman_asr_train.core.beam import BeamOptions, BeamSearch, sentencepiece_pieces, user_token_ids
from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.errors import UserError
from caiman_asr_train.core.keywords import Keywords, load_keywords
from caiman_asr_train.core.model import RNNT
from caiman_asr_train.core.ngram_scorer import NgramScorer
from caiman_asr_train.data.ngram import find_ngram
from caiman_asr_train.data.tokenizer import Tokenizer

DECODERS = ("greedy", "beam")
DEFAULTS = BeamOptions()


@dataclass
class Decoder:
    """Greedy or beam decoding with fixed settings, applied to whatever model it is given.

    Attributes:
        kind: "greedy" or "beam".
        pieces: SentencePiece piece string of every token id.
        max_symbols_per_step: most tokens per encoder frame.
        beam: beam settings (beam only).
        ngram: shallow-fusion n-gram (beam only), or None.
        keywords: keyword boosting (beam only), or None.
        frame_seconds: one encoder frame in seconds (forced finals), or None.
        procs: CPU processes beam search spreads a batch over.
        prefix_tokens: token ids fed to the prediction network first.
    """

    kind: str
    pieces: list[str]
    max_symbols_per_step: int = 8
    beam: BeamOptions = DEFAULTS
    ngram: Optional[NgramScorer] = None
    keywords: Optional[Keywords] = None
    frame_seconds: Optional[float] = None
    procs: int = 1
    prefix_tokens: list[int] = field(default_factory=list)

    def __call__(self, model: RNNT, x: Tensor, x_lens: Tensor) -> list[list[int]]:
        """x[T, B, in_feats] spliced features, x_lens[B] frames -> token ids per utterance."""
        if self.kind == "greedy":
            return greedy_decode(
                model,
                x,
                x_lens,
                max_symbols_per_step=self.max_symbols_per_step,
                prefix_tokens=self.prefix_tokens,
            )
        return self.search(model)(x, x_lens)

    def search(self, model: RNNT) -> BeamSearch:
        """The beam search of these settings over ``model`` (its ``decode_encoded`` reuses encoder output)."""
        return BeamSearch(
            model,
            self.pieces,
            self.beam,
            ngram=self.ngram,
            keywords=self.keywords,
            user_tokens=user_token_ids(self.pieces),
            frame_seconds=self.frame_seconds,
            prefix_tokens=self.prefix_tokens,
            procs=self.procs,
        )

    def with_ngram_scale(self, scale_factor: float) -> "Decoder":
        """The same decoder with the n-gram's scale factor replaced (0 keeps the n-gram loaded but weightless)."""
        if self.ngram is None:
            raise UserError(
                "this decoder has no n-gram to rescale; drop --skip_ngram or pass --override_ngram_path"
            )
        return replace(self, ngram=self.ngram.with_scale(scale_factor))

    @property
    def description(self) -> str:
        """What decoded, for result lines: e.g. "greedy" or "beam search, width 4, n-gram scale 0.05"."""
        if self.kind == "greedy":
            return "greedy"
        parts = [f"beam search, width {self.beam.beam_width}"]
        parts.append(f"n-gram scale {self.ngram.scale_factor:g}" if self.ngram is not None else "no n-gram")
        if self.keywords is not None:
            parts.append("keyword boosting")
        return ", ".join(parts)


def encoder_frame_seconds(pipeline: torch.nn.Module, model: RNNT, sample_rate: int) -> float:
    """Seconds per encoder frame: feature hop x frame subsampling x the encoder's stack-time factor."""
    hop_seconds = pipeline.filterbank.hop_length / sample_rate
    return hop_seconds * pipeline.subsampling * model.config.enc_stack_time_factor


def result_line(wer: float, manifests: str, decoder: Decoder) -> str:
    """``Word Error Rate: 12.345% on "<manifests>" (<decoder description>)``; ``wer`` is a fraction."""
    return f'Word Error Rate: {wer * 100:.3f}% on "{manifests}" ({decoder.description})'


def add_decoder_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the decoding flags (CAIMAN-ASR's names) to ``parser``, in their own group."""
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--decoder",
        choices=DECODERS,
        default="greedy",
        help="greedy (default, as upstream) or beam: adaptive beam search with the checkpoint's n-gram",
    )
    group.add_argument(
        "--beam_width",
        type=int,
        default=DEFAULTS.beam_width,
        help=f"hypotheses carried from frame to frame (default: {DEFAULTS.beam_width})",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=DEFAULTS.temperature,
        help=f"beam search divides the logits by this before the softmax (default: {DEFAULTS.temperature})",
    )
    group.add_argument(
        "--beam_prune_topk_thresh",
        type=float,
        default=DEFAULTS.prune_topk_thresh,
        help="tokens whose log-probability is more than this below the frame's best are not expanded; "
        f"< 0 disables (default: {DEFAULTS.prune_topk_thresh})",
    )
    group.add_argument(
        "--beam_prune_score_thresh",
        type=float,
        default=DEFAULTS.prune_score_thresh,
        help="hypotheses whose score per token is more than this below the best are dropped; "
        f"< 0 disables (default: {DEFAULTS.prune_score_thresh})",
    )
    group.add_argument(
        "--beam_final_emission_thresh",
        type=float,
        default=DEFAULTS.final_emission_thresh,
        help="seconds without a final after which the worst hypotheses are dropped until one is made; "
        f"< 0 disables (default: {DEFAULTS.final_emission_thresh})",
    )
    group.add_argument(
        "--keyword_boost_path",
        type=Path,
        default=None,
        help='JSON {"keywords": {"word": bonus}}: beam search favours these words (default: none)',
    )
    group.add_argument(
        "--skip_ngram",
        action="store_true",
        help="beam search without the n-gram of the checkpoint or config",
    )
    group.add_argument(
        "--override_ngram_path",
        type=Path,
        default=None,
        help="KenLM n-gram file (binary or ARPA) to use instead of the checkpoint's or config's",
    )
    group.add_argument(
        "--ngram_scale_factor",
        type=float,
        default=None,
        help="weight of the n-gram's natural-log score per piece (default: the checkpoint's or config's)",
    )
    group.add_argument(
        "--beam_decoder_procs",
        type=int,
        default=1,
        help="CPU processes beam search spreads each batch's utterances over (default: 1)",
    )
    return parser


def check_decoder_args(args: argparse.Namespace) -> None:
    """One-line errors for flag values that cannot work.

    Raises:
        UserError: naming the flag.
    """
    if args.beam_width < 1:
        raise UserError(f"--beam_width must be >= 1, got {args.beam_width}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    for flag in ("beam_prune_topk_thresh", "beam_prune_score_thresh"):
        if getattr(args, flag) == 0:
            raise UserError(
                f"--{flag} 0 keeps only the best; use --decoder greedy, a value > 0, or < 0 to disable"
            )
    if args.beam_decoder_procs < 1:
        raise UserError(f"--beam_decoder_procs must be >= 1, got {args.beam_decoder_procs}")
    if args.ngram_scale_factor is not None and args.ngram_scale_factor < 0:
        raise UserError(f"--ngram_scale_factor must be >= 0, got {args.ngram_scale_factor}")
    if args.skip_ngram and args.override_ngram_path is not None:
        raise UserError("--skip_ngram and --override_ngram_path contradict each other; pass one")
    if args.decoder == "greedy" and args.keyword_boost_path is not None:
        raise UserError("--keyword_boost_path needs --decoder beam")


def build_decoder(
    args: argparse.Namespace,
    tokenizer: Tokenizer,
    *,
    frame_seconds: Optional[float],
    source: str,
    embedded_ngram: Optional[dict] = None,
    config_ngram: Optional[dict] = None,
    max_symbols_per_step: int = 8,
    prefix_tokens: Optional[list[int]] = None,
) -> Decoder:
    """The decoder the flags of ``add_decoder_args`` ask for.

    Args:
        args: parsed flags.
        tokenizer: the model's tokenizer (its pieces are the n-gram's words).
        frame_seconds: one encoder frame in seconds
            (``core.beam.frame_seconds``).
        source: the checkpoint's path, for error messages.
        embedded_ngram: a hardware checkpoint's ``{"binary", "scale_factor"}``.
        config_ngram: a training checkpoint's config ``ngram`` section
            (``{"ngram_path": dir, "scale_factor"}``), or None if it has none.
        max_symbols_per_step: most tokens per encoder frame.
        prefix_tokens: token ids fed to the prediction network first.

    Raises:
        UserError: bad flags, an unreadable keywords file or n-gram, or no
            n-gram where one is needed.
    """
    check_decoder_args(args)
    common = dict(
        pieces=sentencepiece_pieces(tokenizer.model_bytes),
        max_symbols_per_step=max_symbols_per_step,
        prefix_tokens=list(prefix_tokens or []),
    )
    if args.decoder == "greedy":
        return Decoder("greedy", **common)
    return Decoder(
        "beam",
        beam=BeamOptions(
            beam_width=args.beam_width,
            temperature=args.temperature,
            prune_topk_thresh=args.beam_prune_topk_thresh,
            prune_score_thresh=args.beam_prune_score_thresh,
            final_emission_thresh=args.beam_final_emission_thresh,
            max_symbols_per_step=max_symbols_per_step,
        ),
        ngram=_ngram(args, source, embedded_ngram, config_ngram),
        keywords=None if args.keyword_boost_path is None else load_keywords(args.keyword_boost_path),
        frame_seconds=frame_seconds,
        procs=args.beam_decoder_procs,
        **common,
    )


def _ngram(
    args: argparse.Namespace, source: str, embedded: Optional[dict], config_ngram: Optional[dict]
) -> Optional[NgramScorer]:
    if args.skip_ngram:
        return None
    own_scale = (embedded or config_ngram or {}).get("scale_factor")
    scale = args.ngram_scale_factor if args.ngram_scale_factor is not None else own_scale
    has_ngram = (
        args.override_ngram_path is not None
        or (embedded or config_ngram or {}).get("binary" if embedded is not None else "ngram_path")
        is not None
    )
    if has_ngram and scale is None:
        raise UserError(f"{source} has no n-gram scale factor; pass --ngram_scale_factor")
    if args.override_ngram_path is not None:
        return NgramScorer.from_path(args.override_ngram_path, scale)
    if embedded is not None:
        if embedded["binary"] is None:
            # Exported with --skip_ngram: there is nothing to fuse.
            return None
        return NgramScorer.from_bytes(embedded["binary"], scale, source)
    if config_ngram is not None:
        return NgramScorer.from_path(find_ngram(config_ngram["ngram_path"]), scale)
    return None
