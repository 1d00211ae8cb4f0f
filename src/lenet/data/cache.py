"""A cache of decoded arrays, keyed by the content of the files they were decoded from.

Every start reads the source files' bytes and hashes them (SHA-256: about 20 ms for Fashion-MNIST's
30 MB of gzip files); decoding (gunzip and the checksum of the decompressed bytes, or one image
file at a time) is what the cache saves. A file that is changed, corrupted or replaced hashes
differently, so the next start decodes it again and sees the problem; the entries decoded from
its earlier content are removed when the new one is written.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from .._util import atomic_write_bytes, cache_dir

VERSION = 1  # bump when what a loader stores changes


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes as stored (compressed or not)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class Entry:
    """One cache entry: what was read (``files``: (name, content digest) pairs), by which loader
    (``kind``) with which ``params``, for the dataset at ``source``."""

    def __init__(self, kind: str, source: str, params: dict, files: Iterable[tuple[str, str]]):
        self.group = hashlib.sha256(f"{kind}\0{source}".encode()).hexdigest()[:12]
        text = json.dumps({"v": VERSION, "kind": kind, "params": params, "files": sorted(files)}, sort_keys=True)
        self.path = cache_dir() / "decoded" / f"{kind}-{self.group}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.npz"

    def load(self) -> dict[str, np.ndarray] | None:
        """The arrays stored for exactly this content, or None."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError):
            self.path.unlink(missing_ok=True)
            return None

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Store ``arrays`` (a read-only cache only costs speed) and drop this source's older entries."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            atomic_write_bytes(self.path, buf.getvalue())
            for old in self.path.parent.glob(f"{self.path.name.rsplit('-', 1)[0]}-*.npz"):
                if old != self.path:
                    old.unlink(missing_ok=True)
        except OSError:
            pass
