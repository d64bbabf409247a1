"""Text normalisation for training targets, references and WER scoring.

Two different jobs live here because both turn raw transcripts into
comparable text:

- ``normalize_transcript`` prepares transcripts the way the YAML's
  ``audio_dataset`` block asks (``normalize_transcripts``, ``replacements``,
  ``remove_tags``): this is what the tokenizer is trained on and what the model
  learns to emit.
- ``standardize`` is the Whisper English normaliser applied to both sides
  before scoring when ``standardize_wer: true`` (docs/formats.md section 10). It maps
  spelling variants that should not count as errors ("Don't" and "do not",
  "twenty five" and "25", "colour" and "color") to one form.
"""

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

from caiman_asr_train.core.errors import ConfigError

NORMALIZE_MODES = ("lowercase", "identity", "none")

# Angle-bracket tags such as <EOS>, <unk>, </s>: markup, never spoken words.
_TAG_RE = re.compile(r"</?[^<>\s]+>")
_WHITESPACE_RE = re.compile(r"\s+")

# {old: new}, [[old, new], ...] or [{old: ..., new: ...}, ...], as upstream YAML allows.
Replacements = Mapping[str, str] | Iterable[list[str] | tuple[str, str] | Mapping[str, str]] | None


def _replacement_pairs(replacements: Replacements) -> list[tuple[str, str]]:
    """Accept every shape upstream YAML allows and return ``(old, new)`` pairs.

    Shapes: ``{old: new, ...}``, ``[[old, new], ...]`` or
    ``[{old: ..., new: ...}, ...]``.
    """
    if replacements is None:
        return []
    if isinstance(replacements, Mapping):
        items = list(replacements.items())
    else:
        items = []
        for item in replacements:
            if isinstance(item, Mapping) and set(item) == {"old", "new"}:
                items.append((item["old"], item["new"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                items.append((item[0], item[1]))
            else:
                raise ConfigError(
                    f"audio_dataset.replacements: bad entry {item!r}; "
                    "use [old, new] pairs or {old: ..., new: ...} mappings"
                )
    for old, new in items:
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise ConfigError(
                f"audio_dataset.replacements: bad pair ({old!r}, {new!r}); "
                "both must be strings and the old one non-empty"
            )
    return items


def normalize_transcript(
    text: str,
    mode: str = "lowercase",
    labels: Iterable[str] | None = None,
    replacements: Replacements = None,
    remove_tags: bool = True,
) -> str:
    """Prepare a transcript for training or as a WER reference.

    Steps, in order: ``replacements`` (on the raw text, so users can match
    the original spelling and case); angle-bracket tags removed when
    ``remove_tags``; lower-casing when ``mode == "lowercase"``; characters not
    in ``labels`` dropped when ``labels`` is given (whitespace is kept as a word
    break); runs of whitespace collapsed and the ends stripped.

    Args:
        text: raw transcript.
        mode: the YAML's ``normalize_transcripts``: ``"lowercase"``, or
            ``"identity"``/``"none"`` to keep the case.
        labels: allowed characters, e.g. the tokenizer's ``labels``.
        replacements: ``{old: new}``, ``[[old, new], ...]`` or
            ``[{old:, new:}, ...]``; applied in order, plain substrings.
        remove_tags: drop ``<EOS>``, ``<unk>``-style tags.

    Raises:
        ConfigError: unknown ``mode`` or malformed ``replacements``.
    """
    return normalize_texts([text], mode, labels, replacements, remove_tags)[0]


def normalize_texts(
    texts: Iterable[str],
    mode: str = "lowercase",
    labels: Iterable[str] | None = None,
    replacements: Replacements = None,
    remove_tags: bool = True,
) -> list[str]:
    """``normalize_transcript`` of each of ``texts``, in order.

    The settings are checked and prepared once for the whole list, which is
    how datasets and tokenizer corpora normalise a manifest's transcripts.

    Raises:
        ConfigError: unknown ``mode`` or malformed ``replacements``.
    """
    if mode not in NORMALIZE_MODES:
        raise ConfigError(
            f"audio_dataset.normalize_transcripts: unknown value {mode!r}; "
            f"use one of {', '.join(NORMALIZE_MODES)}"
        )
    pairs = _replacement_pairs(replacements)
    allowed = None if labels is None else set(labels)
    return [_normalize(text, mode, allowed, pairs, remove_tags) for text in texts]


def _normalize(
    text: str, mode: str, allowed: set[str] | None, pairs: list[tuple[str, str]], remove_tags: bool
) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    if remove_tags:
        text = _TAG_RE.sub(" ", text)
    if mode == "lowercase":
        text = text.lower()
    if allowed is not None:
        text = "".join(c if c in allowed or c.isspace() else "" for c in text)
    return _WHITESPACE_RE.sub(" ", text).strip()


@lru_cache(maxsize=1)
def _english_normalizer():
    # Imported lazily: loading the spelling table costs ~50 ms, and only
    # scoring needs it. The table ships inside the package (no downloads).
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def standardize(text: str) -> str:
    """Whisper-style English normalisation for scoring.

    Lower-cases, removes punctuation and bracketed asides, expands
    contractions ("don't" -> "do not"), writes spoken numbers as digits
    ("twenty five" -> "25"), Americanises spelling and drops hesitations
    ("um", "uh"). Output words are separated by single spaces.
    """
    return _english_normalizer()(text)
