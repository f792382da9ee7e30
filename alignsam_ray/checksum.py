"""sha256 of files and streams: the one helper behind store shards, decoder files, bundles and checkpoints."""
from __future__ import annotations

import hashlib

BLOCK = 1 << 22


def stream_sha256(f) -> str:
    """Hex sha256 of a binary file object, read in 4 MiB blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(BLOCK), b""):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)
