"""A dataset of image files, one folder per class.

    PATH/train/<class>/*.png|jpg|...   and   PATH/test/<class>/...     (a given test split)
    PATH/<class>/*.png|jpg|...                                          (a held-out split is made)

Class names are the folder names, in natural order ("2" before "10"); files are read in name
order. Every image is turned into a ``size`` x ``size`` grey image once, at load:

1. grey-scale (ITU-R 601 luma; transparent pixels count as white paper; EXIF rotation applied);
2. scaled, keeping its aspect ratio, so its longer side is ``size`` pixels (Lanczos);
3. centred on a square canvas whose padding takes the median of the image's own border pixels,
   so a dark background stays dark and white paper stays white.

An image already ``size`` x ``size`` and grey is used exactly as stored. Nothing is inverted: a
model learns the polarity its data has. Files that are not images by their extension (notes,
``.DS_Store``, ``Thumbs.db``) are skipped and counted; an image file that cannot be decoded, or
is larger than :data:`lenet.images.MAX_PIXELS`, stops the load with its name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageError
from ..images import decode_image, resize, to_grey, to_uint8

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}


def natural_key(name: str) -> list:
    """Sort "class2" before "class10"."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def is_image_tree(path: Path) -> bool:
    """Whether ``path`` looks like a class-folder tree (train/<class>/ or <class>/ with images)."""
    root = path / "train" if (path / "train").is_dir() else path
    return any(d.is_dir() and any(_images_in(d)) for d in root.iterdir())


def _images_in(folder: Path):
    return (f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def scan(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
    """(class names, [(image file, class index)], skipped non-image files) of one split's folder."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    classes = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
    if not classes:
        raise DataError(f"{root}: no class folders; put each class's images in a folder named after it")
    files, skipped = [], []
    for index, name in enumerate(classes):
        with os.scandir(root / name) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: natural_key(e.name))
        is_image = [os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file() for e in entries]
        skipped += [Path(e.path) for e, ok in zip(entries, is_image) if not ok]
        if not any(is_image):
            raise DataError(f"{root / name}: class folder with no images (.png, .jpg, ...); add images or remove it")
        files += [(Path(e.path), index) for e, ok in zip(entries, is_image) if ok]
    return classes, files, skipped


def square_grey(img, size: int) -> np.ndarray:
    """A PIL image -> uint8 (size, size): grey, longer side scaled to ``size``, padded with the
    median of its border."""
    if img.mode == "L" and img.size == (size, size):
        return np.asarray(img, dtype=np.uint8).copy()
    grey = to_grey(img)
    h, w = grey.shape
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = np.full((size, size), float(np.median(border)), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = resize(grey, nw, nh)
    return to_uint8(canvas)


def decode(files: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, size, size) uint8 and labels (N,) of ``files``; a bad image stops it."""
    images = np.empty((len(files), size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            images[i] = square_grey(decode_image(path.read_bytes(), str(path)), size)
        except ImageError as exc:
            raise DataError(f"{exc}; remove or replace the file") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return images, np.array([label for _, label in files], dtype=np.int64)
