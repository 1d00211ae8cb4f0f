"""Looking at a dataset before training on it: ``lenet data inspect``.

:func:`describe` tells the classes and their counts per split, the image size and the pixel
statistics; :func:`plot_samples` draws a grid of sample images per class (the picture the book
shows of Fashion-MNIST).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import Dataset, pixel_stats
from .plots import new_figure


def describe(data: Dataset) -> str:
    """A few lines about ``data``, then a table of the classes and their counts per split."""
    train_counts = np.bincount(data.train.labels.numpy(), minlength=data.num_classes)
    test_counts = np.bincount(data.test.labels.numpy(), minlength=data.num_classes)
    h, w = data.train.images.shape[-2:]
    stats = pixel_stats(data.train.images)
    split = "given" if data.split == "given" else f"{data.split} (seeded, stratified)"
    lines = [f"{data.name}: {data.num_classes} classes, {len(data.train):,} training and {len(data.test):,} test "
             f"images of {h}x{w} pixels (grey, uint8)",
             f"source: {data.source or data.name}; test split: {split}",
             f"training pixels in [0, 1]: mean {stats['mean']:.4f}, std {stats['std']:.4f}, "
             f"range {stats['min'] / 255:.3f}-{stats['max'] / 255:.3f}"]
    lines += [f"note: {n}" for n in data.notes]
    width = max(8, *(len(c) for c in data.classes))
    lines += ["", f"{'class':<{width}} {'train':>8} {'test':>7}", "-" * (width + 17)]
    lines += [f"{c:<{width}} {int(a):>8,} {int(b):>7,}" for c, a, b in zip(data.classes, train_counts, test_counts)]
    return "\n".join(lines)


def plot_samples(data: Dataset, path: str | Path, per_class: int = 8, seed: int = 0) -> Path:
    """A grid: one row per class (named on the left), ``per_class`` random training images each."""
    rng = np.random.default_rng(seed)
    labels = data.train.labels.numpy()
    rows = data.num_classes
    fig = new_figure(figsize=(1.4 + 0.75 * per_class, 0.3 + 0.75 * rows), dpi=110)
    axes = fig.subplots(rows, per_class, squeeze=False)
    for r, name in enumerate(data.classes):
        members = np.flatnonzero(labels == r)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        for c in range(per_class):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(chosen):
                ax.imshow(data.train.images[chosen[c]].numpy(), cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{data.name}: {per_class} training images per class", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
