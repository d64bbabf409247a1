"""Keyword boosting for beam search: favour hypotheses that spell chosen words.

A keywords file is JSON ``{"keywords": {"word or phrase": weight, ...}}``.
While a hypothesis spells the start of a keyword, each matching character adds
``weight`` to its score provisionally; when the whole keyword has been spelled
the bonus is kept, and when the match breaks first the provisional bonus is
taken back. So partial matches help a keyword survive the beam long enough to
be completed, but only complete keywords change the final ranking.

Matching is over characters, with SentencePiece's word-boundary mark ``▁`` for
spaces; a keyword must start at a word boundary (a leading ``▁`` is added).
"""

import json
import os
from pathlib import Path
from typing import Union

from caiman_asr_train.core.errors import DataError

PathLike = Union[str, os.PathLike]

WORD_BOUNDARY = "\u2581"

# A match in progress: (trie node, provisional bonus not yet kept).
KeywordState = tuple[tuple[int, float], ...]


class Keywords:
    """A character trie of weighted keywords.

    Args:
        weights: keyword -> bonus per character (nats; > 0 favours the word).
    """

    def __init__(self, weights: dict[str, float]):
        self._edges: list[dict[str, tuple[int, float]]] = [{}]
        self._final: list[bool] = [False]
        for word, weight in weights.items():
            node = 0
            for char in WORD_BOUNDARY + WORD_BOUNDARY.join(word.lower().split()):
                if char not in self._edges[node]:
                    self._edges.append({})
                    self._final.append(False)
                    self._edges[node][char] = (len(self._edges) - 1, float(weight))
                node = self._edges[node][char][0]
            self._final[node] = True
        # Per (state, text) results: hypotheses of a beam share prefixes.
        self._cache: dict[tuple[KeywordState, str], tuple[float, KeywordState]] = {}

    @staticmethod
    def begin_state() -> KeywordState:
        """No match in progress."""
        return ()

    def step(self, state: KeywordState, text: str) -> tuple[float, KeywordState]:
        """(score change, new state) after the hypothesis spells ``text`` (a piece string)."""
        key = (state, text)
        hit = self._cache.get(key)
        if hit is None:
            delta = 0.0
            for char in text:
                advanced = []
                # Every character may also start a new match at the root.
                for node, pending in state + ((0, 0.0),):
                    edge = self._edges[node].get(char)
                    if edge is None:
                        delta -= pending
                        continue
                    child, weight = edge
                    delta += weight
                    # A completed keyword keeps its bonus: nothing left to take back.
                    advanced.append((child, 0.0 if self._final[child] else pending + weight))
                state = tuple(advanced)
            hit = (delta, state)
            self._cache[key] = hit
        return hit


def load_keywords(path: PathLike) -> Keywords:
    """Read a keywords JSON file (see the module docstring).

    Raises:
        DataError: the file is missing, not JSON, or not of the form
            ``{"keywords": {str: number}}``.
    """
    path = Path(path)
    fix = 'write it as {"keywords": {"word": 2.0}}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"keywords file {path} not found; check --keyword_boost_path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"keywords file {path} is not readable JSON ({exc}); {fix}") from None
    words = data.get("keywords") if isinstance(data, dict) else None
    valid = isinstance(words, dict) and all(
        isinstance(k, str) and k.strip() and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in words.items()
    )
    if not valid:
        raise DataError(f'keywords file {path} must hold {{"keywords": {{word: number}}}}; {fix}')
    return Keywords({k: float(v) for k, v in words.items()})
