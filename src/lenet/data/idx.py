"""IDX files (the MNIST format): parsing, checks, and a folder of any 28x28 IDX set.

A folder of IDX files in the MNIST layout (``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]``, ``t10k-...`` or ``test-...``; prefixes such as
``emnist-balanced-`` or ``qmnist-`` are allowed) loads as a dataset, with class names from an
optional ``classes.txt`` (one per line), else the label numbers.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError, IdxFormatError

# IDX type codes (first two bytes are zero, third is the type, fourth the number of dimensions).
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it is gzip (detected by its magic, not its name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxFormatError(
                f"{path}: corrupt or truncated gzip ({exc}); delete it and fetch the data again "
                "(lenet data fetch)") from None
    return raw


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array; raise :class:`IdxFormatError` naming ``source`` if malformed."""
    if len(data) == 0:
        raise IdxFormatError(f"{source}: file is empty")
    if len(data) < 4:
        raise IdxFormatError(f"{source}: only {len(data)} bytes, too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IdxFormatError(
            f"{source}: bad IDX magic 0x{data[:4].hex()} (must start with two zero bytes); "
            "this is not an IDX file")
    if type_code not in _IDX_TYPES:
        raise IdxFormatError(f"{source}: unknown IDX element type 0x{type_code:02x}")
    if ndim == 0:
        raise IdxFormatError(f"{source}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(
            f"{source}: truncated header: {ndim} dimensions need {header} bytes, file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        shape = "x".join(map(str, dims))
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{source}: {what}: header declares {shape} = {expected} bytes of data, file has {actual}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a numpy array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def check_pair(images: np.ndarray, labels: np.ndarray, num_classes: int,
               images_src: str = "images", labels_src: str = "labels") -> None:
    """Check that an image file and a label file belong together."""
    if images.ndim != 3:
        raise IdxFormatError(f"{images_src}: expected 3 dimensions (count, rows, cols), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise IdxFormatError(f"{images_src}: expected unsigned byte pixels, got {images.dtype}")
    if labels.ndim != 1:
        raise IdxFormatError(f"{labels_src}: expected 1 dimension (count), got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"{labels_src}: {labels.shape[0]} labels for {images.shape[0]} images in {images_src}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.max()) if labels.max() >= num_classes else int(labels.min())
        raise IdxFormatError(f"{labels_src}: label {bad} outside the class range 0..{num_classes - 1}")


# --------------------------------------------------------------------------------------------
# A folder of IDX files


_IDX_NAME = re.compile(r"(?:^|[-_.])(train|t10k|test)[-_.](images|labels)[-_.]idx\d[-_.]", re.IGNORECASE)


def idx_files(folder: Path) -> dict[str, Path]:
    """The IDX files of ``folder`` by role ("train_images", "test_labels", ...): names in the MNIST
    layout, with or without a prefix (``emnist-balanced-``) and ``.gz``. Two files for one role
    are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        m = _IDX_NAME.search(path.name)
        if not m or not path.is_file():
            continue
        role = f"{'train' if m.group(1).lower() == 'train' else 'test'}_{m.group(2).lower()}"
        if role in found:
            raise DataError(f"{folder}: two IDX files for the {role.replace('_', ' ')}: {found[role].name} "
                            f"and {path.name}; keep one")
        found[role] = path
    return found


def read_classes_txt(path: Path) -> tuple[str, ...] | None:
    """Class names from ``classes.txt`` (one per line, blank lines ignored), or None if there is none."""
    if not path.is_file():
        return None
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    if len(set(names)) != len(names) or len(names) < 2:
        raise DataError(f"{path}: needs at least two distinct class names, one per line")
    return names


def read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of an IDX folder: train images and labels, and test ones if present. Labels with
    several columns (QMNIST's extended labels) keep their first, the class."""
    files = idx_files(folder)
    for role in ("train_images", "train_labels"):
        if role not in files:
            raise DataError(f"{folder}: no {role.replace('_', ' ')} IDX file (e.g. train-{role[6:]}-idx"
                            f"{3 if role.endswith('images') else 1}-ubyte.gz)")
    if ("test_images" in files) != ("test_labels" in files):
        have = "test_images" if "test_images" in files else "test_labels"
        raise DataError(f"{files[have]}: its test {'labels' if have == 'test_images' else 'images'} file is missing")
    arrays = {}
    for role, path in files.items():
        arr = read_idx(path)
        if role.endswith("labels") and arr.ndim == 2:
            arr = arr[:, 0]
        if role.endswith("labels") and not np.issubdtype(arr.dtype, np.integer):
            raise IdxFormatError(f"{path}: labels must be integers, not {arr.dtype}")
        arrays[role] = arr
    for split in ("train", "test"):
        if f"{split}_images" in arrays:
            check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], np.iinfo(np.int64).max,
                       str(files[f"{split}_images"]), str(files[f"{split}_labels"]))
    return arrays
