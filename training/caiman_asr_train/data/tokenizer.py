"""Transcripts to SentencePiece token ids and back (docs/formats.md section 7).

Words are encoded one by one and their ids concatenated, so a word is always
split the same way whatever its neighbours: the pieces the model learns are
the pieces the n-gram (built from ``Tokenizer.pieces``) scores. In training,
subword sampling (SentencePiece's unigram sampling) replaces a word's best
segmentation with a random one with probability ``sampling``; it regularises
the model towards robustness to segmentation.

The SentencePiece model is read from a file or given as the model's bytes (as
stored in a hardware checkpoint); ``model_bytes`` gives them back so both
routes yield identical tokenizers.
"""

import os
import random
import warnings
from pathlib import Path
from typing import Union

import sentencepiece as spm

from caiman_asr_train.core.errors import TokenizerError

PathLike = Union[str, os.PathLike]

UNK_POLICIES = ("fail", "warn")

# Smoothing of SentencePiece's unigram sampling: lower is closer to uniform
# over segmentations, 1.0 follows the model's probabilities. 0.1 is the value
# of the subword-regularisation paper and SentencePiece's documentation.
DEFAULT_SAMPLING_ALPHA = 0.1

# Words whose best segmentation a Tokenizer remembers (a few MB at most).
_BEST_CACHE_WORDS = 1 << 17

_MAKE_MODEL = "make one with python -m caiman_asr_train.data.spm.spm_from_json"


def _load(model: bytes, source: str) -> spm.SentencePieceProcessor:
    # An empty proto is silently accepted by SentencePiece as "no model".
    if not model:
        raise TokenizerError(f"SentencePiece model {source} is empty; {_MAKE_MODEL}")
    try:
        processor = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError:
        raise TokenizerError(
            f"SentencePiece model {source} is corrupt or not a SentencePiece model; {_MAKE_MODEL}"
        ) from None
    if processor.get_piece_size() == 0:
        raise TokenizerError(f"SentencePiece model {source} has no pieces; {_MAKE_MODEL}")
    return processor


class Tokenizer:
    """SentencePiece tokenizer that encodes word by word.

    Args:
        sentpiece_model: path of a ``.model`` file, or the model's bytes.
        sampling: probability, per word, of subword sampling when
            ``tokenize(..., sample=True)`` (training); 0 disables it.
        unk: what an ``<unk>`` token in a transcript does: ``"fail"`` raises
            ``TokenizerError``, ``"warn"`` warns once and keeps the token.
        sampling_alpha: SentencePiece's sampling smoothing (see
            ``DEFAULT_SAMPLING_ALPHA``).

    The model that predicts these tokens has ``num_labels + 1`` classes: the
    SentencePiece ids ``0 .. num_labels-1`` and the blank last.

    Raises:
        TokenizerError: missing or corrupt model, bad ``sampling`` or ``unk``.
    """

    def __init__(
        self,
        sentpiece_model: Union[PathLike, bytes],
        sampling: float = 0.0,
        unk: str = "fail",
        sampling_alpha: float = DEFAULT_SAMPLING_ALPHA,
    ) -> None:
        if isinstance(sentpiece_model, (bytes, bytearray)):
            self.source = f"({len(sentpiece_model)} bytes given in memory)"
            model = bytes(sentpiece_model)
        else:
            self.source = str(sentpiece_model)
            try:
                model = Path(sentpiece_model).read_bytes()
            except FileNotFoundError:
                raise TokenizerError(
                    f"SentencePiece model {self.source} not found; check "
                    f"tokenizer.sentpiece_model in the config or {_MAKE_MODEL}"
                ) from None
            except OSError as exc:
                raise TokenizerError(
                    f"SentencePiece model {self.source} cannot be read ({exc.strerror})"
                ) from None
        if not 0.0 <= sampling <= 1.0:
            raise TokenizerError(f"tokenizer.sampling must be a probability in [0, 1], got {sampling}")
        if unk not in UNK_POLICIES:
            raise TokenizerError(f"unk must be one of {', '.join(UNK_POLICIES)}, got {unk!r}")
        self._model = model
        self._sp = _load(model, self.source)
        self.sampling = float(sampling)
        self.sampling_alpha = float(sampling_alpha)
        self.unk = unk
        self._unk_id = self._sp.unk_id()
        self._warned_unk = False
        # word -> ids of its best segmentation; training tokenizes every
        # transcript again each epoch, and SentencePiece's encode is most of
        # a cached item's loading time
        self._best: dict[str, list[int]] = {}

    # Pickled as the model bytes, so DataLoader workers (fork or spawn) get
    # their own processor.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_sp"], state["_best"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sp = _load(self._model, self.source)
        self._best = {}

    @property
    def num_labels(self) -> int:
        """SentencePiece vocabulary size (the blank is not included)."""
        return self._sp.get_piece_size()

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model, as loaded."""
        return self._model

    def _encode_word(self, word: str, sample: bool) -> list[int]:
        # random (the module) rather than a private generator: DataLoader
        # workers reseed it, so each worker samples differently.
        if sample and self.sampling > 0.0 and random.random() < self.sampling:
            return self._sp.encode(word, enable_sampling=True, alpha=self.sampling_alpha, nbest_size=-1)
        ids = self._best.get(word)
        if ids is None:
            ids = self._sp.encode(word)
            if len(self._best) < _BEST_CACHE_WORDS:
                self._best[word] = ids
        return ids

    def tokenize(self, transcript: str, sample: bool = False) -> list[int]:
        """Token ids of ``transcript``, encoded word by word (split on whitespace).

        Args:
            transcript: normalised text.
            sample: allow subword sampling (training only); each word is then
                sampled with probability ``sampling``.

        Raises:
            TokenizerError: the transcript has characters the model does not
                know (``<unk>``) and ``unk == "fail"``.
        """
        ids = [i for word in transcript.split() for i in self._encode_word(word, sample)]
        if self._unk_id in ids:
            self._on_unk(transcript)
        return ids

    def _on_unk(self, transcript: str) -> None:
        unknown = sorted(
            {
                piece
                for word in transcript.split()
                for i, piece in zip(self._sp.encode(word), self._sp.encode(word, out_type=str))
                if i == self._unk_id
            }
        )
        message = (
            f"transcript {transcript!r} has characters {unknown} that SentencePiece model "
            f"{self.source} encodes as <unk>; normalise the transcripts "
            "(audio_dataset.normalize_transcripts, replacements) or retrain the model "
            "on data that contains them (spm_from_json)"
        )
        if self.unk == "fail":
            raise TokenizerError(message)
        if not self._warned_unk:
            self._warned_unk = True
            warnings.warn(f"{message} (warned once; later <unk> tokens are kept silently)", stacklevel=3)

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids (as from ``tokenize`` or a decoder; no blanks).

        Raises:
            TokenizerError: an id outside ``0 .. num_labels-1`` (e.g. the blank).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.num_labels]
        if bad:
            raise TokenizerError(
                f"token ids {bad[:5]} are outside the vocabulary of {self.source} "
                f"(0..{self.num_labels - 1}); remove blanks before detokenizing"
            )
        return self._sp.decode(ids)

    def pieces(self, transcript: str) -> list[str]:
        """Piece strings of ``transcript`` (best segmentation, word by word).

        These are the n-gram's words: ``["▁the", "▁c", "at"]`` for "the cat".
        Unknown characters appear as ``<unk>``, under the same ``unk`` policy
        as ``tokenize``.
        """
        return [self._sp.id_to_piece(i) for i in self.tokenize(transcript)]
