"""File digests: the sha256 that checkpoints, bundles and converted repositories record of their files."""

import hashlib
import os
from typing import Union

# Read in blocks so a multi-gigabyte checkpoint never sits in memory whole.
BLOCK_BYTES = 1 << 20


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of the file at ``path``, read in ``BLOCK_BYTES`` blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
