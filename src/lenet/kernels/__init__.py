"""lenet's batch-last CPU kernels: ``csrc/blconv.cpp`` and its Python face, :mod:`.ops` (build,
load, self-check, the autograd functions and :func:`batch_last`). ``lenet.blconv`` is the same
module under its earlier name."""

from .ops import BatchLast, batch_last, library, problem

__all__ = ["BatchLast", "batch_last", "library", "problem"]
