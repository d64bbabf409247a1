"""KenLM n-gram scores for shallow fusion in beam search (docs/formats.md sections 7 and 12).

The n-gram is over SentencePiece piece strings. Beam search adds
``scale_factor * ln P(piece | context)`` per emitted piece; KenLM returns
log10 probabilities, so they are multiplied by ln 10 here.

A hardware checkpoint carries the n-gram as the bytes of a KenLM binary;
KenLM only loads from a file, so the bytes go to a private temporary file that
is removed once the model is loaded (KenLM reads a binary into memory by
default, so nothing needs the file afterwards).

``kenlm`` is imported when a scorer is built, not at module import, so ``core``
stays importable without it.
"""

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Union

from caiman_asr_train.core.errors import CheckpointError, DataError, UserError

PathLike = Union[str, os.PathLike]

LN_10 = math.log(10.0)

# Every KenLM binary starts with this; checked before KenLM sees the bytes,
# since KenLM reports some corrupt files only by aborting the process.
_KENLM_MAGIC = b"mmap lm http://kheafield.com/code"

_INSTALL_HINT = (
    "the kenlm Python module is not installed; install it with `pip install ufal-kenlm` "
    "(or the project's lm extra: pip install -e 'training[lm]'), or decode with --skip_ngram"
)


def _kenlm() -> Any:
    try:
        import kenlm
    except ImportError:
        raise UserError(_INSTALL_HINT) from None
    return kenlm


class NgramScorer:
    """Scores SentencePiece pieces with a KenLM model, scaled for shallow fusion.

    Args:
        model: a loaded ``kenlm.Model``.
        scale_factor: weight of the natural-log n-gram score (>= 0).

    States are ``kenlm.State`` objects (hashable); ``score`` caches its
    results per (state, piece), since hypotheses of a beam share contexts.
    """

    def __init__(self, model: Any, scale_factor: float):
        if not scale_factor >= 0.0:
            raise UserError(f"n-gram scale factor must be >= 0, got {scale_factor}")
        self._kenlm = _kenlm()
        self.model = model
        self.scale_factor = float(scale_factor)
        # (state, piece) -> (ln P, next state); shared by with_scale copies
        self._cache: dict[tuple[Any, str], tuple[float, Any]] = {}

    @classmethod
    def from_bytes(cls, binary: bytes, scale_factor: float, source: str) -> "NgramScorer":
        """Load the KenLM binary ``binary`` (e.g. a hardware checkpoint's ``ngram.binary``).

        ``source`` names where the bytes came from in error messages.

        Raises:
            CheckpointError: the bytes are not a readable KenLM binary.
            UserError: ``kenlm`` is not installed.
        """
        kenlm = _kenlm()
        if not binary.startswith(_KENLM_MAGIC):
            raise CheckpointError(
                f"{source}: the embedded n-gram is not a KenLM binary (corrupt bytes); re-export the "
                "checkpoint with a valid n-gram, pass --override_ngram_path FILE, or decode with --skip_ngram"
            )
        fd, name = tempfile.mkstemp(prefix="ngram.", suffix=".binary")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(binary)
            model = _load(kenlm, name, source)
        finally:
            os.unlink(name)
        return cls(model, scale_factor)

    @classmethod
    def from_path(cls, path: PathLike, scale_factor: float) -> "NgramScorer":
        """Load a KenLM binary or ARPA file.

        Raises:
            DataError: the file is missing or not a readable KenLM model.
            UserError: ``kenlm`` is not installed.
        """
        kenlm = _kenlm()
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"n-gram {path} not found; check --override_ngram_path or the config's ngram.ngram_path"
            )
        return cls(_load(kenlm, str(path), str(path), error=DataError), scale_factor)

    def begin_state(self) -> Any:
        """The context at the start of a sentence (``<s>``)."""
        state = self._kenlm.State()
        self.model.BeginSentenceWrite(state)
        return state

    def score(self, state: Any, piece: str) -> tuple[float, Any]:
        """(``scale_factor * ln P(piece | state)``, the state after ``piece``)."""
        key = (state, piece)
        hit = self._cache.get(key)
        if hit is None:
            out = self._kenlm.State()
            hit = (LN_10 * self.model.BaseScore(state, piece, out), out)
            self._cache[key] = hit
        return self.scale_factor * hit[0], hit[1]

    def with_scale(self, scale_factor: float) -> "NgramScorer":
        """The same loaded model (and score cache) with another scale factor: no reload."""
        scorer = NgramScorer(self.model, scale_factor)
        scorer._cache = self._cache
        return scorer

    # Decoding processes are forked; a scorer is never pickled.
    def __reduce__(self):
        raise TypeError("NgramScorer holds a loaded KenLM model and cannot be pickled; fork instead")


def _load(kenlm: Any, path: str, source: str, error: type = CheckpointError) -> Any:
    try:
        return kenlm.Model(path)
    except (OSError, RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        fix = (
            "rebuild it with scripts/generate_ngram.sh"
            if error is DataError
            else (
                "re-export the checkpoint with a valid n-gram, pass --override_ngram_path FILE, or decode with --skip_ngram"
            )
        )
        raise error(f"{source}: the n-gram cannot be loaded by KenLM ({detail}); {fix}") from None
