"""Small helpers every layer of lenet uses: the cache folder, atomic writes, pixel scaling and an
evaluation-mode context. Nothing here imports another lenet module."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn


def cache_dir() -> Path:
    """lenet's cache folder: $LENET_CACHE_DIR, else $XDG_CACHE_HOME/lenet, else ~/.cache/lenet."""
    if os.environ.get("LENET_CACHE_DIR"):
        return Path(os.environ["LENET_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lenet"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename: readers never see half a
    file. The folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], the book's scaling."""
    return images.unsqueeze(1).to(torch.float32) / 255.0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode (no dropout, BatchNorm's running statistics), then
    put it back in the mode it was in, whatever the block raised."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
