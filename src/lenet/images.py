"""Image files, read safely: decoding with limits, grey-scale, and resizing.

Used by prediction (:mod:`lenet.use.predict`) and by datasets of image files
(:mod:`lenet.data.folders`). Every way a file can fail to be an image ends as one
:class:`~lenet.errors.ImageError` naming it; an image with more than :data:`MAX_PIXELS` pixels
is refused from its header, before it is decoded.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from .errors import ImageError
from .options import MAX_PIXELS


class NotAnImageError(ImageError):
    """The bytes are not an image format Pillow can read (or the file is empty)."""


class CorruptImageError(ImageError):
    """The file looks like an image but cannot be decoded (truncated, damaged)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than :data:`MAX_PIXELS`."""


def decode_image(data: bytes, name: str = "<upload>", max_pixels: int = MAX_PIXELS):
    """Decode image bytes (PNG, JPEG, GIF, BMP, WebP, ... anything Pillow reads) into a PIL image.

    The size is read from the header first: an image of more than ``max_pixels`` pixels (a
    decompression bomb: a few kilobytes that would decode to gigabytes) is refused before decoding.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise NotAnImageError(f"{name}: empty file, not an image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image file Pillow can read (expected PNG, JPEG, ...)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own limit, from the header
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(size.group(1)):,} pixels" if size else "too many pixels"
        raise ImageTooLargeError(f"{name}: image is {pixels}, more than the {max_pixels:,} allowed; "
                                 "scale it down first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"{name}: cannot read image header ({exc})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise CorruptImageError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name}: image is {w}x{h} pixels, more than the {max_pixels:,} "
                                 "allowed; scale it down first")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"{name}: image is too large to decode safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = f"{img.format} image" if img.format else "image"
        raise CorruptImageError(f"{name}: corrupt or truncated {kind} ({exc})") from None
    return img


def load_image(path: str | os.PathLike):
    """Read an image file, turning every way it can fail into one :class:`ImageError` line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path))


def has_alpha(img) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def contrasting_paper(img) -> str:
    """For a picture with transparent parts: "white" when what is drawn is dark, else "black".

    A canvas or drawing app saves strokes on a transparent background; the colour stored under
    the transparent pixels means nothing, so the strokes (weighted by their opacity) decide which
    paper they stand out on. Opaque pictures: "white"."""
    if not has_alpha(img):
        return "white"
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3]
    if float(alpha.min()) >= 1.0:
        return "white"
    weight = float(alpha.sum())
    if weight <= 0:
        return "white"
    lum = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return "white" if float((lum * alpha).sum()) / weight < 0.5 else "black"


def _on_paper(img, paper: str):
    """``img`` with its transparent parts shown on white or black ``paper`` (opaque images as they are)."""
    from PIL import Image

    if not has_alpha(img):
        return img
    rgba = img.convert("RGBA")
    ground = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if paper == "white" else (0, 0, 0, 255))
    return Image.alpha_composite(ground, rgba)


def to_rgb(img, paper: str = "white") -> np.ndarray:
    """A PIL image -> float32 (H, W, 3) in [0, 1]; transparent parts become ``paper`` (white or black)."""
    img = _on_paper(img, paper)
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: to_grey knows their ranges
        grey = to_grey(img)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def to_grey(img, paper: str = "white") -> np.ndarray:
    """A PIL image -> float32 (H, W) in [0, 1]; transparent parts become ``paper`` (white or black)."""
    img = _on_paper(img, paper)
    if img.mode.startswith("I;16"):  # 16-bit grey: scale by the type's range
        return (np.asarray(img, dtype=np.float64) / 65535.0).astype(np.float32)
    if img.mode in ("I", "F"):  # 32-bit: no fixed range, stretch to [0, 1]
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def resize(arr: np.ndarray, width: int, height: int, method: str = "lanczos") -> np.ndarray:
    """Resize a float [0, 1] image (H, W) with antialiasing: "lanczos" (default), "box" (area
    average, for shrinking) or "bilinear"."""
    from PIL import Image

    if arr.shape == (height, width):
        return arr.astype(np.float32)
    resample = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
                "bilinear": Image.Resampling.BILINEAR}[method]
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    out = np.asarray(img.resize((width, height), resample), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
