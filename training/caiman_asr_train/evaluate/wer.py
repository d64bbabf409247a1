"""Word (or character) error rate, docs/formats.md section 10."""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.data.normalizers import standardize as standardize_text

ERROR_RATES = ("word", "char")


def edit_distance(hyp: Sequence, ref: Sequence) -> int:
    """Levenshtein distance: substitutions + insertions + deletions, each cost 1.

    Works on any sequences of comparable items (words or characters).
    O(len(hyp) * len(ref)) time, O(len(ref)) memory.
    """
    # Shared ends cost nothing; trimming them makes the usual
    # nearly-right hypothesis cheap.
    start = 0
    while start < len(hyp) and start < len(ref) and hyp[start] == ref[start]:
        start += 1
    end_h, end_r = len(hyp), len(ref)
    while end_h > start and end_r > start and hyp[end_h - 1] == ref[end_r - 1]:
        end_h -= 1
        end_r -= 1
    hyp, ref = hyp[start:end_h], ref[start:end_r]
    if not hyp or not ref:
        return len(hyp) + len(ref)

    # prev[j]: distance between hyp[:i] and ref[:j] for the previous row i.
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, start=1):
        cur = [i]
        for j, r in enumerate(ref, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def _units(text: str, error_rate: str) -> list[str]:
    words = text.split()
    if error_rate == "word":
        return words
    # Characters of the words joined by single spaces: a missing or extra
    # word break is one error, but spacing differences are not.
    return list(" ".join(words))


def word_error_rate(
    hyps: list[str],
    refs: list[str],
    standardize: bool = True,
    error_rate: str = "word",
) -> tuple[float, int, int]:
    """Error rate over a corpus: edit errors summed over utterances / reference units.

    Args:
        hyps: one hypothesis string per utterance.
        refs: the matching reference strings.
        standardize: pass both sides through Whisper-style English
            normalisation first (the YAML's ``standardize_wer``).
        error_rate: ``"word"`` scores words (split on whitespace);
            ``"char"`` scores characters, counting one space between
            consecutive words (leading, trailing and repeated whitespace
            ignored).

    Returns:
        ``(rate, errors, ref_units)``: ``rate`` is a fraction (0.123, not
        12.3%) and can exceed 1 when the hypotheses insert many words. When
        there are no reference units at all the rate is 0.0 if there are no
        errors either, else ``math.inf``.

    Raises:
        ValueError: ``hyps`` and ``refs`` differ in length (a programming error).
        ConfigError: unknown ``error_rate``.
    """
    if len(hyps) != len(refs):
        raise ValueError(
            f"word_error_rate: {len(hyps)} hypotheses but {len(refs)} references; "
            "pass one hypothesis per reference"
        )
    if error_rate not in ERROR_RATES:
        raise ConfigError(
            f"audio_dataset.error_rate: unknown value {error_rate!r}; use one of {', '.join(ERROR_RATES)}"
        )
    errors = 0
    ref_units = 0
    for hyp, ref in zip(hyps, refs):
        if standardize:
            hyp, ref = standardize_text(hyp), standardize_text(ref)
        ref_seq = _units(ref, error_rate)
        errors += edit_distance(_units(hyp, error_rate), ref_seq)
        ref_units += len(ref_seq)
    if ref_units == 0:
        return (0.0 if errors == 0 else math.inf), errors, 0
    return errors / ref_units, errors, ref_units


@dataclass
class EvalResult:
    """Scored transcripts of a dev set (``evaluate.evaluator.evaluate``, ``runtime.evaluate``).

    Attributes:
        wer: error rate as a fraction (0.123 is 12.3%); words or characters
            per ``error_rate``.
        errors: edit errors summed over utterances.
        words: reference units (words or characters) they are divided by.
        predictions: one ``{"hyp", "ref", "fname"}`` per utterance, in input order.
    """

    wer: float
    errors: int
    words: int
    predictions: list[dict] = field(default_factory=list)


def score_predictions(
    hyps: list[str],
    refs: list[str],
    fnames: list[str],
    standardize: bool = True,
    error_rate: str = "word",
) -> EvalResult:
    """``word_error_rate`` of ``hyps`` against ``refs``, with each utterance's prediction and audio file name."""
    rate, errors, words = word_error_rate(hyps, refs, standardize=standardize, error_rate=error_rate)
    predictions = [{"hyp": h, "ref": r, "fname": f} for h, r, f in zip(hyps, refs, fnames)]
    return EvalResult(wer=rate, errors=errors, words=words, predictions=predictions)
