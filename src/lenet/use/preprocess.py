"""Make a photo, scan or drawing look like a dataset image: 28x28, light content on black.

Two recipes, chosen by the dataset the model was trained on (:func:`mode_for_dataset`):

``"digits"`` (MNIST and other digit sets), for ink strokes on paper or a screen:

1. grey-scale; transparent parts become the paper the strokes contrast with (white under dark
   strokes, black under light ones);
2. **polarity**: is the ink darker or lighter than its surroundings?  Judged locally (each pixel
   against the median of its neighbourhood, so a shadow or a gradient does not fool it), or by the
   border when that is undecided (very thick strokes);
3. **background**: the paper's level is modelled at each pixel (a grey-scale opening, wider than
   the strokes, smoothed), so uneven lighting, gradients and shadows fall away; on paper the ink's
   contrast is taken relative to the local paper brightness (a shadow dims ink and paper alike);
4. the ink's contrast is measured and stretched to full brightness; what is weaker than the
   noise (or than ruled or squared paper's lines, when there are such lines) is cleared, and small
   specks apart from the digit are dropped;
5. strokes much thinner than MNIST's (a fine pen on a large picture) are thickened;
6. crop to the content, scale so the longer side fills a **20x20 box**, and place it in 28x28 so
   its **centre of mass** is at the centre (14, 14): the recipe that made MNIST.

``"fit"`` (Fashion-MNIST and other sets), for an item on a plain background:

1. the background's colour is fitted as a plane per channel (a gradient is a plane) on the
   picture's border, ignoring the parts of the border the item crosses;
2. the item is what differs from the background (colour distance above the noise);
3. as the dataset does, the item is shown as its brightness negated (a product photographed on
   white, negated) -- or as is on a dark background -- and the background is black;
4. crop to the item, scale its longer side to 28, centre it, stretch its brightest pixel to 255.

Every guess is recorded in :attr:`Prepared.decisions` (``lenet predict --json`` prints it), and
:attr:`Prepared.blank` says when no content was found: the image is then not classified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..images import contrasting_paper, has_alpha, resize, to_grey, to_rgb, to_uint8

SIZE = 28
DIGIT_BOX = 20
DIGIT_CENTRE = 14.0  # where MNIST's centres of mass are (mean over the test set: 13.99, 14.01)
MODES = ("digits", "fit", "none")
DIGIT_DATASETS = ("mnist", "emnist", "kmnist", "qmnist")

WORK = 256  # pictures are shrunk (area average) to at most this many pixels along their longer side
COARSE = 64  # the background and the polarity are judged at this size
MIN_CONTRAST = 0.04  # ink must differ from the paper by 4% of full brightness...
MIN_SNR = 6.0  # ...and by 6 times the noise, or the image is blank
SPECK = 0.05  # a separate blob with less than 5% of the largest blob's ink is a speck
THIN_STROKE = 1.0  # strokes thinner than this (pixels, at 28x28) are thickened towards MNIST's 1.8
MNIST_STROKE = 1.8
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def mode_for_dataset(dataset: str) -> str:
    """The preprocessing that makes an image look like ``dataset``: digits (MNIST recipe) or fit."""
    return "digits" if dataset.lower() in DIGIT_DATASETS else "fit"


@dataclass
class Prepared:
    """What the network sees for one image, and how it was made."""

    pixels: np.ndarray  # uint8 (28, 28), light on dark
    mode: str
    inverted: bool = False  # dark content on a light background was turned light on dark
    blank: bool = False  # no content found: the image is not classified
    decisions: dict[str, Any] = field(default_factory=dict)


def preprocess(img, mode: str = "digits") -> Prepared:
    """Make a PIL image look like a dataset image: uint8 (28, 28), light content on black."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return Prepared(to_uint8(resize(to_grey(img), SIZE, SIZE)), mode)
    decisions: dict[str, Any] = {"size": [int(img.width), int(img.height)]}
    paper = contrasting_paper(img)
    if has_alpha(img) and float(np.asarray(img.convert("RGBA"))[..., 3].min()) < 255:
        decisions["transparent"] = f"shown on {paper}"
    if mode == "digits":
        return _digits(to_grey(img, paper), decisions)
    return _fit(to_rgb(img, paper), decisions)


# --------------------------------------------------------------------------------------------
# Small image operations (numpy only)


def _shrink(arr: np.ndarray, limit: int) -> tuple[np.ndarray, float]:
    """Area-average ``arr`` (H, W) or (H, W, C) so its longer side is at most ``limit``; the scale used."""
    h, w = arr.shape[:2]
    if max(h, w) <= limit:
        return arr, 1.0
    scale = limit / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if arr.ndim == 2:
        return resize(arr, nw, nh, "box"), scale
    return np.stack([resize(arr[..., c], nw, nh, "box") for c in range(arr.shape[2])], axis=2), scale


def _rank(a: np.ndarray, size: int, op) -> np.ndarray:
    """A separable square filter of ``size`` (odd), edges replicated: ``op`` is np.minimum
    (erosion), np.maximum (dilation) or np.add (a box mean)."""
    if size <= 1:
        return a
    r = size // 2
    out = a
    for axis in (0, 1):
        n = out.shape[axis]
        if axis == 0:  # replicate the edges (np.pad is slow on small arrays)
            padded = np.concatenate([np.repeat(out[:1], r, axis=0), out, np.repeat(out[-1:], r, axis=0)], axis=0)
        else:
            padded = np.concatenate([np.repeat(out[:, :1], r, axis=1), out, np.repeat(out[:, -1:], r, axis=1)], axis=1)
        acc = (padded[0:n] if axis == 0 else padded[:, 0:n]).copy()
        for i in range(1, size):
            op(acc, padded[i:i + n] if axis == 0 else padded[:, i:i + n], out=acc)
        out = acc / size if op is np.add else acc
    return out


def _quantile(a: np.ndarray, q: float) -> float:
    """The ``q`` quantile (0-1) of ``a`` by partial sorting (np.percentile is slow on small arrays)."""
    flat = a.reshape(-1)
    k = min(flat.size - 1, max(0, int(round(q * (flat.size - 1)))))
    return float(np.partition(flat, k)[k])


def _block_median(a: np.ndarray, size: int) -> np.ndarray:
    """Each pixel's neighbourhood median, taken over blocks of ``size`` x ``size`` (a coarse but
    cheap stand-in for a sliding median)."""
    h, w = a.shape
    bh, bw = -(-h // size), -(-w // size)
    padded = np.pad(a, ((0, bh * size - h), (0, bw * size - w)), mode="edge")
    blocks = padded.reshape(bh, size, bw, size).transpose(0, 2, 1, 3).reshape(bh, bw, size * size)
    medians = np.median(blocks, axis=2)
    return np.repeat(np.repeat(medians, size, axis=0), size, axis=1)[:h, :w]


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """The threshold that best splits ``values`` in two classes (Otsu's method)."""
    values = values.reshape(-1)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    width = (high - low) / bins
    hist = np.bincount(np.minimum(((values - low) / width).astype(np.int64), bins - 1), minlength=bins)
    centres = low + (np.arange(bins) + 0.5) * width
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(centres[int(np.argmax(between))])


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of a boolean image (0: background); their count.

    Works on runs of pixels with a union-find over the runs: a few hundred runs for a picture of
    a digit, so plain Python is fast enough."""
    h, w = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    run_rows, run_starts = np.nonzero(edges == 1)
    rows, starts, ends = run_rows.tolist(), run_starts.tolist(), np.nonzero(edges == -1)[1].tolist()
    parent = list(range(len(rows)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    row_first = 0  # the first run of the current row
    above = (0, 0)  # runs [above[0], above[1]) lie on the row above
    for n, (y, s, e) in enumerate(zip(rows, starts, ends)):
        if n == 0 or y != rows[n - 1]:
            above = (row_first, n) if n and rows[n - 1] == y - 1 else (n, n)
            row_first = n
        j = above[0]
        while j < above[1] and ends[j] < s:  # runs [ps, pe) and [s, e) touch (8-connected) if ps <= e and pe >= s
            j += 1
        while j < above[1] and starts[j] <= e:
            a, b = find(j), find(n)
            if a != b:
                parent[max(a, b)] = min(a, b)
            j += 1
    labels = np.zeros((h, w), np.int32)
    final: dict[int, int] = {}
    for n, (y, s, e) in enumerate(zip(rows, starts, ends)):
        labels[y, s:e] = final.setdefault(find(n), len(final) + 1)
    return labels, len(final)


def _drop_specks(level: np.ndarray, solid: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Clear the blobs of ``solid`` whose content is under SPECK of the largest blob's; returns the
    cleaned level, the mask of the blobs kept, and how many were dropped."""
    labels, count = _components(solid)
    if count == 0:
        return level, solid, 0
    mass = np.bincount(labels.ravel(), weights=level.ravel(), minlength=count + 1)
    mass[0] = 0
    keep = mass >= SPECK * mass.max()
    keep[0] = False
    kept = keep[labels]
    dropped = (labels > 0) & ~kept
    if dropped.any():
        # clear each dropped blob with its faint rim: the pixels of level > 0 next to it
        rim = _rank(dropped.astype(np.float32), 3, np.maximum) > 0
        level = np.where(rim & ~kept, 0.0, level)
    return level, kept, int(count - int(keep[1:].sum()))


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _original_box(box: tuple[int, int, int, int], scale: float, decisions: dict) -> None:
    y0, y1, x0, x1 = box
    w, h = decisions["size"]
    decisions["box"] = [max(0, int(x0 / scale)), max(0, int(y0 / scale)),
                        min(w, int(np.ceil(x1 / scale))), min(h, int(np.ceil(y1 / scale)))]


def _blank(mode: str, decisions: dict, reason: str, inverted: bool = False) -> Prepared:
    decisions["blank"] = reason
    return Prepared(np.zeros((SIZE, SIZE), np.uint8), mode, inverted, blank=True, decisions=decisions)


# --------------------------------------------------------------------------------------------
# Digits: ink strokes


def _polarity(grey: np.ndarray, decisions: dict) -> bool:
    """True when the ink is darker than the paper."""
    coarse, _ = _shrink(grey, COARSE)
    size = max(3, int(round(max(coarse.shape) / 3)) | 1)
    deviation = coarse - _block_median(coarse, size)
    dark, light = -_quantile(deviation, 0.005), _quantile(deviation, 0.995)
    if abs(dark - light) > 0.25 * max(dark, light, 1e-6):
        decisions["polarity_from"] = "local contrast"
        inverted = dark > light
    else:  # undecided (strokes as wide as the neighbourhood): the border is mostly paper
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        low, high = _quantile(grey, 0.005), _quantile(grey, 0.995)
        decisions["polarity_from"] = "border"
        middle, paper = (low + high) / 2, _quantile(border, 0.5)
        inverted = bool(paper > middle if abs(paper - middle) > 1e-3 else paper > 0.5)
    decisions["polarity"] = "dark on light" if inverted else "light on dark"
    return bool(inverted)


def _plane(coarse: np.ndarray) -> np.ndarray:
    """The paper's overall slope: a plane a + b x + c y fitted to the pixels darker than the
    content (twice, the second time on what the first plane leaves)."""
    ys, xs = np.indices(coarse.shape, dtype=np.float32)
    terms = np.stack([np.ones(coarse.size, np.float32), xs.ravel() / max(1, coarse.shape[1] - 1),
                      ys.ravel() / max(1, coarse.shape[0] - 1)], axis=1)
    values, plane = coarse.ravel(), np.zeros(coarse.size, np.float32)
    for _ in range(2):
        rest = values - plane
        paper = rest <= _otsu(rest)
        coef, *_ = np.linalg.lstsq(terms[paper], values[paper], rcond=None)
        plane = terms @ coef
    return plane.reshape(coarse.shape).astype(np.float32)


def _background(v: np.ndarray) -> np.ndarray:
    """The paper's level under light-on-dark ``v``: an opening (min then max filter) at the coarse
    size, wider than a third of the picture, raised where the opening of what the paper's overall
    slope (:func:`_plane`) leaves lies higher; smoothed, kept under its own envelope, scaled back.

    The opening follows shadows and uneven light but falls short of a gradient near the picture's
    edges, by its own radius; the plane takes the gradient to the edges."""
    h, w = v.shape
    coarse, scale = _shrink(v, COARSE)
    size = max(3, int(round(max(coarse.shape) / 3)) | 1)

    def envelope(a: np.ndarray) -> np.ndarray:  # opened, smoothed, kept under the opening
        opened = _rank(_rank(a, size, np.minimum), size, np.maximum)
        return np.minimum(_rank(opened, max(1, (size // 2) | 1), np.add), opened)

    smooth = envelope(coarse)
    if coarse.size >= 16:  # both lie under the paper: take the higher
        plane = _plane(coarse)
        smooth = np.maximum(smooth, plane + envelope(coarse - plane))
    smooth = np.clip(smooth, 0.0, 1.0)
    return resize(smooth, w, h, "bilinear") if scale < 1 else smooth


def _line_bands(lit: np.ndarray) -> list[tuple[int, int]]:
    """The runs [start, end) of True in a 1-D profile."""
    edges = np.diff(np.concatenate(([0], lit.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _ruled_lines(level: np.ndarray, floor: float) -> tuple[float, np.ndarray]:
    """Ruled or squared paper's lines: rows (or columns) along which nearly every pixel is lit,
    in two or more thin bands (plus, on such paper, a single thin margin line across it).

    Returns the lines' level (0: no lines) and a mask of their rows and columns."""
    h, w = level.shape
    rows_k, cols_k = int(0.15 * (w - 1)), int(0.15 * (h - 1))
    profiles = (np.partition(level, rows_k, axis=1)[:, rows_k], np.partition(level, cols_k, axis=0)[cols_k])
    bands = []
    for profile in profiles:
        lit = profile > max(0.08, floor)
        bands.append([(a, b) for a, b in _line_bands(lit) if b - a <= max(3, 0.04 * len(profile))])
    if max(len(b) for b in bands) < 2:
        return 0.0, np.zeros_like(level, bool)
    mask = np.zeros_like(level, bool)
    values = []
    for axis, (profile, found) in enumerate(zip(profiles, bands)):
        for a, b in found:
            lo, hi = max(0, a - 1), b + 1  # with the lines' soft edges
            if axis == 0:
                mask[lo:hi] = True
            else:
                mask[:, lo:hi] = True
            values.append(profile[a:b])
    return max(_quantile(np.concatenate(values), 0.9), 1e-3), mask


def _digits(grey: np.ndarray, decisions: dict) -> Prepared:
    grey, scale = _shrink(grey, WORK)
    inverted = _polarity(grey, decisions)
    v = 1.0 - grey if inverted else grey
    b = _background(v)
    contrast = v - b
    if inverted:  # paper reflects: ink and paper dim together in a shadow, so compare them by ratio
        contrast = contrast / np.maximum(1.0 - b, 0.05)
    paper_level = (1.0 - b) if inverted else b
    decisions["background"] = round(_quantile(paper_level, 0.5), 3)
    decisions["background_range"] = round(float(paper_level.max() - paper_level.min()), 3)
    # the paper's grain, from neighbouring pixels' differences (most pairs lie on paper or on ink)
    step = np.abs(np.diff(v, axis=1)) if v.shape[1] > 1 else np.abs(np.diff(v, axis=0))
    noise = max(1.4826 * _quantile(step, 0.5) / np.sqrt(2), 1 / 255) if step.size else 1 / 255
    paper = contrast[contrast < _otsu(contrast)] if contrast.size > 1 else contrast
    contrast = contrast - (_quantile(paper, 0.5) if paper.size else 0.0)
    decisions["noise"] = round(float(noise), 4)
    above = contrast[contrast > 3 * noise]
    if above.size < 4:
        return _blank("digits", decisions, "nothing stands out from the background", inverted)
    strong = above[above >= _otsu(above)]
    ink = _quantile(strong, 0.9) if strong.size else float(above.max())
    decisions["ink_contrast"] = round(ink, 3)
    if ink < max(MIN_CONTRAST, MIN_SNR * noise):
        need = max(MIN_CONTRAST, MIN_SNR * noise)
        return _blank("digits", decisions, f"the strongest marks ({ink:.3f}) are fainter than the {need:.3f} needed "
                      f"(4% of full brightness and 6 times the paper's noise)", inverted)
    level = np.clip(contrast / ink, 0.0, 1.0)
    cut = min(0.5, 3 * noise / ink)
    lines, on_lines = _ruled_lines(level, cut)
    decisions["ruled_lines"] = bool(lines > 0)
    if lines >= 0.5:  # lines as strong as the strongest marks: erase them where they run
        level = np.where(on_lines, 0.0, level)
    elif lines > 0:  # fainter than the ink: clear everything as faint as they are
        cut = max(cut, min(0.65, 1.25 * lines))
    decisions["cut"] = round(float(cut), 3)  # levels below this share of the ink's contrast were cleared
    level = np.clip((level - cut) / (1.0 - cut), 0.0, 1.0)
    level, kept, specks = _drop_specks(level, level > 0.2)
    decisions["specks_removed"] = specks
    if not kept.any():
        return _blank("digits", decisions, "no marks left once the paper's noise and lines are cleared", inverted)
    y0, y1, x0, x1 = _box(kept)
    _original_box((y0, y1, x0, x1), scale, decisions)
    if max(y1 - y0, x1 - x0) < 3 or float(level.sum()) < 4:
        return _blank("digits", decisions, f"only a dot ({x1 - x0}x{y1 - y0} pixels) was found", inverted)
    crop = level[y0:y1, x0:x1]
    fit = DIGIT_BOX / max(crop.shape)
    solid = crop >= 0.5
    area = int(solid.sum())
    perimeter = int((solid[:, 1:] != solid[:, :-1]).sum() + (solid[1:] != solid[:-1]).sum()
                    + 2 * solid[:, [0, -1]].sum() + 2 * solid[[0, -1]].sum())
    stroke = 2 * area / max(perimeter, 1) * fit  # width of a long stroke of this area and perimeter
    decisions["stroke_width"] = round(stroke, 2)
    grow = int(round((MNIST_STROKE - stroke) / 2 / fit)) if stroke < THIN_STROKE else 0
    if grow >= 1:  # a fine pen: widen its strokes by `grow` working pixels on each side
        crop = _rank(np.pad(crop, grow), 2 * grow + 1, np.maximum)
        fit = DIGIT_BOX / max(crop.shape)
    decisions["thickened"] = grow
    return Prepared(_place_digit(crop, fit), "digits", inverted, decisions=decisions)


def _place_digit(crop: np.ndarray, fit: float) -> np.ndarray:
    """Scale ``crop`` into the 20x20 box, stretch its brightest pixel to 255, put its centre of mass at (14, 14)."""
    h, w = crop.shape
    nh, nw = max(1, min(DIGIT_BOX, round(h * fit))), max(1, min(DIGIT_BOX, round(w * fit)))
    patch = resize(crop, nw, nh)
    top_value = float(patch.max())
    if top_value > 0:
        patch = np.clip(patch / top_value, 0.0, 1.0)
    total = float(patch.sum())
    ys, xs = np.indices(patch.shape)
    cy = float((ys * patch).sum()) / total if total else (nh - 1) / 2
    cx = float((xs * patch).sum()) / total if total else (nw - 1) / 2
    top = int(np.clip(round(DIGIT_CENTRE - cy), 0, SIZE - nh))
    left = int(np.clip(round(DIGIT_CENTRE - cx), 0, SIZE - nw))
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top:top + nh, left:left + nw] = patch
    return to_uint8(out)


# --------------------------------------------------------------------------------------------
# Fit: an item on a plain background


_TRIPLES: dict[int, np.ndarray] = {}


def _triples(n: int) -> np.ndarray:
    """Every (i, j, k) with i < j < k < n, as an (T, 3) array (cached)."""
    if n not in _TRIPLES:
        from itertools import combinations

        _TRIPLES[n] = np.array(list(combinations(range(n), 3)), dtype=np.int64).reshape(-1, 3)
    return _TRIPLES[n]


def _plane_background(rgb: np.ndarray, pieces: int = 8) -> tuple[np.ndarray, float]:
    """The background's colour as a plane a + b x + c y per channel, fitted to the border band,
    and the noise around it.

    The band is cut into 4 * ``pieces`` segments. A segment an item crosses is not uniform and never
    counts; of the planes through three uniform segments' median colours, the one that agrees
    with the most segments wins, and is refitted by least squares on their pixels."""
    h, w, _ = rgb.shape
    band = max(1, round(0.02 * max(h, w)))
    ys, xs = np.mgrid[0:h, 0:w]
    xn, yn = (xs / max(w - 1, 1)).astype(np.float32), (ys / max(h - 1, 1)).astype(np.float32)
    segments = []
    for side in range(4):
        length = w if side < 2 else h
        for k in range(pieces):
            a, b = k * length // pieces, max((k + 1) * length // pieces, k * length // pieces + 1)
            if side < 2:
                segments.append((slice(0, band) if side == 0 else slice(h - band, h), slice(a, b)))
            else:
                segments.append((slice(a, b), slice(0, band) if side == 2 else slice(w - band, w)))
    medians = np.array([np.median(rgb[s].reshape(-1, 3), axis=0) for s in segments], np.float32)
    where = np.array([[1.0, float(np.median(xn[s])), float(np.median(yn[s]))] for s in segments], np.float32)
    spread = np.array([float(np.median(np.abs(rgb[s].reshape(-1, 3) - m).max(axis=1)))
                       for s, m in zip(segments, medians)], np.float32)
    n = len(segments)
    triples = _triples(n)
    systems = where[triples]
    usable = np.abs(np.linalg.det(systems)) > 1e-3
    usable &= (spread[triples] <= 0.04).all(axis=1)
    if usable.any():
        triples, systems = triples[usable], systems[usable]
        planes = np.linalg.solve(systems, medians[triples])  # (T, 3 terms, 3 channels)
        error = np.abs(np.einsum("sk,tkc->tsc", where, planes) - medians[None]).max(axis=2)
        tolerance = (0.03 + 2 * spread)[None]
        agree = (error <= tolerance) & (spread <= 0.04)[None]
        score = agree.sum(axis=1) - np.minimum(error, tolerance).sum(axis=1) / float(tolerance.max())
        chosen = agree[int(np.argmax(score))]
    else:  # no three uniform segments: use the whole border
        chosen = np.ones(n, bool)
    mask = np.zeros((h, w), bool)
    for s, ok in zip(segments, chosen):
        if ok:
            mask[s] = True
    terms = np.stack([np.ones(int(mask.sum()), np.float32), xn[mask], yn[mask]], axis=1)
    values = rgb[mask]
    keep = np.ones(len(values), bool)
    noise = 0.004
    for _ in range(3):
        plane, *_ = np.linalg.lstsq(terms[keep], values[keep], rcond=None)
        distance = np.abs(values - terms @ plane).max(axis=1)
        noise = max(1.4826 * float(np.median(distance[keep])), 0.004)
        keep = distance <= max(4 * noise, 0.03)
        if not keep.any():
            break
    full = np.stack([np.ones(h * w, np.float32), xn.ravel(), yn.ravel()], axis=1) @ plane
    return full.reshape(h, w, 3).astype(np.float32), noise


def _fit(rgb: np.ndarray, decisions: dict) -> Prepared:
    rgb, scale = _shrink(rgb, WORK)
    background, noise = _plane_background(rgb)
    lum = rgb @ LUMA
    back_lum = background @ LUMA
    level = float(np.median(back_lum))
    decisions["background"] = round(level, 3)
    decisions["background_colour"] = [int(round(float(c) * 255)) for c in np.median(background.reshape(-1, 3), axis=0)]
    decisions["background_range"] = round(float(back_lum.max() - back_lum.min()), 3)
    decisions["noise"] = round(float(noise), 4)
    dark_page = level < 0.3
    inverted = not dark_page
    decisions["polarity"] = "light on dark" if dark_page else "dark on light"
    threshold = max(4 * noise, MIN_CONTRAST)
    decisions["cut"] = round(threshold, 3)  # colour distances from the background below this are background
    distance = np.abs(rgb - background).max(axis=2)
    alpha = np.clip((distance - threshold) / threshold, 0.0, 1.0)
    alpha, kept, specks = _drop_specks(alpha, alpha >= 0.5)
    decisions["specks_removed"] = specks
    if not kept.any():
        return _blank("fit", decisions, "nothing differs from the background", inverted)
    y0, y1, x0, x1 = _box(kept)
    _original_box((y0, y1, x0, x1), scale, decisions)
    if max(y1 - y0, x1 - x0) < 3:
        return _blank("fit", decisions, f"only a dot ({x1 - x0}x{y1 - y0} pixels) was found", inverted)
    content = alpha * (lum if dark_page else 1.0 - lum)
    crop = content[y0:y1, x0:x1]
    h, w = crop.shape
    fit = SIZE / max(h, w)
    nh, nw = max(1, min(SIZE, round(h * fit))), max(1, min(SIZE, round(w * fit)))
    patch = resize(crop, nw, nh)
    top_value = float(patch.max())
    if top_value <= 0:
        return _blank("fit", decisions, "the item is as bright as the background", inverted)
    patch = np.clip(patch / top_value, 0.0, 1.0)
    out = np.zeros((SIZE, SIZE), np.float32)
    top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
    out[top:top + nh, left:left + nw] = patch
    return Prepared(to_uint8(out), "fit", inverted, decisions=decisions)
