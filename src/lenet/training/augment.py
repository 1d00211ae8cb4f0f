"""Data augmentation computed in the training step, on the uint8 batch, from torch's global RNG.

Two transformations, each drawn afresh for every example of every batch:

* ``shift``: a random translation by up to ``shift`` pixels in each direction (the picture moves
  over a zero background: the dataset's background, as uint8 0). This is a random crop of the
  picture padded by ``shift`` on every side, the usual "random crop" of CIFAR-style training;
* ``flip``: a mirror image (left-right) for half of the examples. It suits clothes (a left shoe
  mirrored is a right shoe) and not digits (a mirrored 2 is no digit).

The draws come from torch's global CPU RNG (also when training on a GPU), which every checkpoint
saves: a resumed run draws the same augmentations as the uninterrupted one. Evaluation never
augments.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def augment(x: torch.Tensor, shift: int = 0, flip: bool = False) -> torch.Tensor:
    """x: a batch of images (N, H, W) or (N, C, H, W); returns the augmented batch (``x`` itself
    when ``shift`` is 0 and ``flip`` is off). One gather does both: output pixel (r, c) of example
    i reads pixel (r + dy_i, c' + dx_i) of the picture padded by ``shift``, where c' = c, or
    W - 1 - c for a mirrored example. Mirror images alone take a cheaper path with the same
    draws and the same result."""
    if not shift and not flip:
        return x
    return _gather(x, shift, flip) if shift else _mirror(x)


def _gather(x: torch.Tensor, shift: int, flip: bool) -> torch.Tensor:
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    grid = F.pad(x.reshape(n, -1, h, w), (shift, shift, shift, shift))  # [N, C, H + 2s, W + 2s]
    wide = w + 2 * shift
    # Drawn on the CPU whatever the device: the CPU generator is the one every checkpoint saves.
    dy = torch.randint(0, 2 * shift + 1, (n, 1, 1))
    dx = torch.randint(0, 2 * shift + 1, (n, 1, 1))
    cols = torch.arange(w).view(1, 1, w)
    if flip:
        cols = torch.where(torch.rand(n, 1, 1) < 0.5, w - 1 - cols, cols)
    rows = torch.arange(h).view(1, h, 1)
    index = ((rows + dy) * wide + cols + dx).reshape(n, 1, h * w).to(x.device)
    return grid.reshape(n, grid.shape[1], -1).gather(2, index.expand(n, grid.shape[1], h * w)).reshape(x.shape)


def _mirror(x: torch.Tensor) -> torch.Tensor:
    """``augment(x, 0, True)`` without the gather: the same random draws (the zero shifts are drawn
    too, so the random stream and every later batch stay those of the gather), then a select
    between x and its mirror image: half the time of building and applying a gather index."""
    n = x.shape[0]
    torch.randint(0, 1, (n, 1, 1))
    torch.randint(0, 1, (n, 1, 1))
    mirror = (torch.rand(n, 1, 1) < 0.5).view(n, *([1] * (x.dim() - 1))).to(x.device)
    return torch.where(mirror, x.flip(-1), x)
