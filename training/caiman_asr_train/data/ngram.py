"""Find and read the KenLM n-gram named by the config's ``ngram.ngram_path`` (docs/formats.md section 7).

``ngram_path`` is a directory holding ``ngram.binary`` (KenLM's binary format,
preferred) and/or ``ngram.arpa``. Hardware checkpoints embed only the binary
form; whether a file is one is decided by its content (KenLM's magic header),
not its name, since a renamed ARPA file would otherwise slip through.
"""

import os
from pathlib import Path
from typing import Union

from caiman_asr_train.core.errors import DataError

PathLike = Union[str, os.PathLike]

# Every KenLM binary (probing or trie) starts with these bytes.
KENLM_MAGIC = b"mmap lm http://kheafield.com/code"

NGRAM_NAMES = ("ngram.binary", "ngram.arpa")

_MAKE_NGRAM = "build one with scripts/generate_ngram.sh (or pass --skip_ngram)"


def find_ngram(ngram_dir: PathLike) -> Path:
    """Path of the n-gram in ``ngram_dir``: ``ngram.binary`` if present, else ``ngram.arpa``.

    Raises:
        DataError: the directory is missing or holds neither file.
    """
    directory = Path(ngram_dir)
    if not directory.is_dir():
        raise DataError(f"n-gram directory {directory} not found; check ngram.ngram_path or {_MAKE_NGRAM}")
    for name in NGRAM_NAMES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise DataError(f"no {' or '.join(NGRAM_NAMES)} in n-gram directory {directory}; {_MAKE_NGRAM}")


def is_kenlm_binary(path: PathLike) -> bool:
    """True when the file starts with KenLM's binary magic header.

    Raises:
        DataError: the file is missing or unreadable.
    """
    try:
        with open(path, "rb") as f:
            return f.read(len(KENLM_MAGIC)) == KENLM_MAGIC
    except OSError as exc:
        raise DataError(f"n-gram {path} cannot be read ({exc.strerror}); {_MAKE_NGRAM}") from None


def read_kenlm_binary(path: PathLike) -> bytes:
    """The bytes of a KenLM binary n-gram, e.g. to embed in a hardware checkpoint.

    Raises:
        DataError: the file is missing, unreadable, or not a KenLM binary
            (an ARPA file, whatever its name).
    """
    if not is_kenlm_binary(path):
        raise DataError(
            f"n-gram {path} is not a KenLM binary (no KenLM header; an ARPA text file?); "
            "convert it with build_binary, e.g. scripts/generate_ngram.sh"
        )
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"n-gram {path} cannot be read ({exc.strerror})") from None
