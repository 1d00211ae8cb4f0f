"""The in-memory dataset: uint8 images and int64 labels, a split per purpose."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Split:
    """One split held in memory: uint8 images (N, 28, 28) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> "Split":
        """The first ``n`` examples (all of them for None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass
class Dataset:
    """A dataset in memory. ``source`` is what :func:`lenet.data.load_dataset` was given (a
    built-in name or a path) and ``split`` how its test split was made, so a run can load it again."""

    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    folder: Path | None = None
    notes: list[str] = field(default_factory=list)  # what loading skipped or decided, for the user
    source: str = ""
    split: str = "given"  # "given" (the data has a test split) or "held-out <fraction>"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def head(self, train: int | None = None, test: int | None = None) -> "Dataset":
        """The same dataset cut to its first ``train`` training and ``test`` test examples."""
        return dataclasses.replace(self, train=self.train.head(train), test=self.test.head(test))


def from_arrays(name: str, classes, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                **fields) -> Dataset:
    """A Dataset from numpy (images uint8 (N, H, W), labels integer (N,)) pairs."""
    def split(pair):
        images = np.ascontiguousarray(pair[0], dtype=np.uint8)
        if not images.flags.writeable:  # e.g. parsed in place from a file's bytes
            images = images.copy()
        return Split(torch.from_numpy(images), torch.from_numpy(np.asarray(pair[1]).astype(np.int64)))

    return Dataset(name=name, classes=tuple(classes), train=split(train), test=split(test), **fields)


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): ``fraction`` of each class, chosen with a seeded generator,
    goes to the test split (at least one example of every class that has two or more)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(members)))
        test.append(members[:max(k, 1) if len(members) > 1 else 0])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def synthetic_dataset(n_train: int = 512, n_test: int = 256, num_classes: int = 10,
                      seed: int = 0, size: int = 28) -> Dataset:
    """A small learnable dataset (class = position of a bright square) for tests and benchmarks."""
    if not 1 <= num_classes <= 10:
        raise ValueError("synthetic_dataset supports 1 to 10 classes")
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        images = torch.randint(0, 40, (n, size, size), generator=g, dtype=torch.uint8)
        cols = 5
        for i, c in enumerate(labels.tolist()):
            r0, c0 = 2 + (c // cols) * 12, 2 + (c % cols) * 5
            images[i, r0:r0 + 8, c0:c0 + 4] = 255
        return Split(images, labels)

    return Dataset(name="synthetic", classes=tuple(f"class{i}" for i in range(num_classes)),
                   train=make(n_train), test=make(n_test))
