"""Datasets in memory: the built-in ones by name, or your own by path.

    >>> from lenet.data import load_dataset
    >>> data = load_dataset("fashion-mnist")          # built in: found, fetched, verified
    >>> data = load_dataset("~/scans/digits")          # train/<class>/*.png (and test/<class>/)
    >>> data = load_dataset("fashion-mnist_train.csv") # Kaggle CSV: label,pixel1,...,pixel784
    >>> data = load_dataset("~/data/kmnist")           # a folder of IDX files (+ classes.txt)

The whole dataset lives in memory as uint8 tensors (Fashion-MNIST train is 47 MB); batches are
made by indexing those tensors, not by a per-sample ``Dataset``. Pixels become floats in [0, 1]
only inside a batch (:func:`to_float`). A path is recognised by what it holds (:func:`detect`);
a dataset without a test split gets a seeded, stratified held-out one (``test_fraction`` of
each class). Decoded arrays are cached under the hash of the files they came from
(:mod:`.cache`), so a second start skips decoding and a changed file is decoded again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._util import cache_dir, to_float  # noqa: F401 (part of this package's face)
from ..errors import DataError
from . import csvfile, folders, idx
from .builtin import (DATASETS, DEBIAN_ROOT, DatasetSpec, FileSpec, candidate_dirs, default_data_root,  # noqa: F401
                      download_root, fetch, get_spec, load_builtin, locate, verify, verify_file)
from .cache import Entry, file_digest
from .dataset import Dataset, Split, from_arrays, stratified_split, synthetic_dataset  # noqa: F401
from .idx import check_pair, parse_idx, read_idx  # noqa: F401

KINDS = ("images", "csv", "idx")


def load_dataset(name: str = "fashion-mnist", data_root=None, *, test_fraction: float = 0.1, image_size: int = 28,
                 download: bool | None = None, verify_checksums: bool = True, log=print) -> Dataset:
    """A built-in dataset by name (``data_root``, ``download`` and ``verify_checksums`` apply), or
    the dataset at path ``name`` (``test_fraction`` and, for image files, ``image_size`` apply)."""
    if name in DATASETS:
        return load_builtin(name, data_root, download=download, verify_checksums=verify_checksums, log=log)
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction {test_fraction}: must be between 0 and 1")
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"dataset {name!r}: not a built-in one ({', '.join(DATASETS)}) and no such file or folder")
    kind = detect(path)
    arrays, notes = _decode_cached(path, kind, image_size)
    return _assemble(path, kind, arrays, notes, test_fraction)


def detect(path: Path) -> str:
    """What kind of dataset ``path`` holds: "images", "csv" or "idx"."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"{path}: a dataset file must be CSV (.csv); for images or IDX files give their folder")
    if "train_images" in idx.idx_files(path):
        return "idx"
    if any(p.suffix.lower() == ".csv" for p in path.iterdir()):
        return "csv"
    if folders.is_image_tree(path):
        return "images"
    raise DataError(f"{path}: no dataset found: expected class folders of images (train/<class>/*.png), "
                    f"CSV files (label,pixel1,...) or IDX files (train-images-idx3-ubyte.gz, ...)")


def _sources(path: Path, kind: str) -> tuple[dict[str, list], list[str]]:
    """The files to read by split ({"train": [...], "test": [...]}) and notes on what is left out."""
    notes: list[str] = []
    if kind == "images":
        roots = {"train": path / "train", "test": path / "test"} if (path / "train").is_dir() else {"train": path}
        split_files = {}
        for split, root in roots.items():
            if split == "test" and not root.is_dir():
                continue
            classes, files, skipped = folders.scan(root)
            split_files[split] = (classes, files)
            if skipped:
                notes.append(f"skipped {len(skipped)} non-image file(s) in {root} (e.g. {skipped[0].relative_to(path)})")
        return split_files, notes
    if kind == "csv":
        train, test = csvfile.csv_files(path) if path.is_dir() else (path, None)
        return {"train": [train], **({"test": [test]} if test else {})}, notes
    files = idx.idx_files(path)
    return {split: [files[k] for k in (f"{split}_images", f"{split}_labels") if k in files]
            for split in ("train", "test") if split == "train" or f"{split}_images" in files}, notes


def _decode_cached(path: Path, kind: str, image_size: int) -> tuple[dict[str, np.ndarray], list[str]]:
    sources, notes = _sources(path, kind)
    if kind == "images":
        start = len(str(path)) + 1
        digests = [(str(f)[start:], file_digest(f)) for _, (_, files) in sources.items() for f, _ in files]
        params = {"size": image_size}  # the class of each file is in its name
    else:
        digests = [(str(f), file_digest(f)) for files in sources.values() for f in files]
        params = {}
    entry = Entry(kind, str(path.resolve()), params, digests)
    arrays = entry.load()
    if arrays is None:
        arrays = _decode(path, kind, sources, image_size)
        entry.save(arrays)
    return arrays, notes + [str(n) for n in arrays.pop("notes", np.array([], dtype=str))]


def _decode(path: Path, kind: str, sources: dict, image_size: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    if kind == "idx":
        arrays.update(idx.read_idx_folder(path))
    for split, src in sources.items():
        if kind == "images":
            classes, files = src
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = folders.decode(files, image_size)
            arrays[f"{split}_classes"] = np.array(classes)
        elif kind == "csv":
            images, labels = csvfile.read_csv(src[0])
            if labels is None and split == "test":
                notes.append(f"{src[0]} has no label column (a competition file): left out; the test split is "
                             "held out from the training set instead")
                continue
            if labels is None:
                raise DataError(f"{src[0]}: no label column; a training set needs labels (label,pixel1,...)")
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    arrays["notes"] = np.array(notes, dtype=str)
    return arrays


def _classes(path: Path, kind: str, arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Class names: the class folders, else classes.txt beside the data, else the label numbers."""
    if kind == "images":
        train = tuple(str(c) for c in arrays["train_classes"])
        test = tuple(str(c) for c in arrays.get("test_classes", arrays["train_classes"]))
        if train != test:
            only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
            raise DataError(f"{path}: train and test have different classes (only in train: "
                            f"{', '.join(only_train) or 'none'}; only in test: {', '.join(only_test) or 'none'})")
        return train
    folder = path if path.is_dir() else path.parent
    names = idx.read_classes_txt(folder / "classes.txt")
    top = int(max(arrays[k].max() for k in ("train_labels", "test_labels") if k in arrays and arrays[k].size))
    if names is None:
        return tuple(str(i) for i in range(top + 1))
    if top >= len(names):
        raise DataError(f"{path}: label {top} is outside the {len(names)} classes of {folder / 'classes.txt'}")
    return names


def _assemble(path: Path, kind: str, arrays: dict[str, np.ndarray], notes: list[str], test_fraction: float) -> Dataset:
    if arrays["train_labels"].size == 0:
        raise DataError(f"{path}: the training set is empty")
    classes = _classes(path, kind, arrays)
    train = (arrays["train_images"], arrays["train_labels"])
    if "test_labels" in arrays:
        unseen = sorted(set(np.unique(arrays["test_labels"]).tolist()) - set(np.unique(train[1]).tolist()))
        if unseen:
            raise DataError(f"{path}: the test split has classes the training split lacks: "
                            f"{', '.join(classes[i] for i in unseen)}")
        test, split = (arrays["test_images"], arrays["test_labels"]), "given"
    else:
        train_idx, test_idx = stratified_split(train[1], test_fraction)
        test = (train[0][test_idx], train[1][test_idx])
        train = (train[0][train_idx], train[1][train_idx])
        split = f"held-out {test_fraction:g}"
        notes.append(f"no test split: held out {test_fraction:.0%} of each class (seeded, stratified): "
                     f"{len(test_idx):,} test images")
    name = path.stem if path.is_file() else path.resolve().name
    return from_arrays(name, classes, train, test, folder=path if path.is_dir() else path.parent, notes=notes,
                       source=str(path.resolve()), split=split)


def is_builtin(name: str) -> bool:
    return name in DATASETS


def pixel_stats(images) -> dict[str, float]:
    """Mean and standard deviation of the pixels in [0, 1], and their range (uint8 images)."""
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    return {"mean": float(arr.mean(dtype=np.float64)) / 255, "std": float(arr.std(dtype=np.float64)) / 255,
            "min": int(arr.min()), "max": int(arr.max())}
