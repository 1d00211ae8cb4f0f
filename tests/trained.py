"""Small real models trained once per test session, and pictures of digits and clothes as people
have them.

Shared by test_predict.py, test_export.py and test_serve.py (each asks for a model through a
fixture that calls :func:`mnist_run` or :func:`fashion_run`; the first call trains, later calls
reuse the run folder) and by benchmarks/predict_families.py, which measures the same families
with a fully trained model. The families (:data:`FAMILIES`, :func:`make_family`) are made from
MNIST *test* images and from fonts, reproducibly (seeded); :func:`textbook` is the textbook MNIST
preparation they are compared with; :func:`fashion_picture` pastes a Fashion-MNIST test item
onto a larger background.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

_RUNS: dict[str, Path] = {}

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts",
             "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf")


def _small_run(key: str, dataset: str, base: Path, data, min_acc: float) -> Path:
    """Train the classic LeNet (ReLU, max-pool, Adam) on 30k images of ``data`` for 2 epochs, once per session."""
    if key not in _RUNS:
        from lenet.training import TrainConfig, train

        subset = data.head(30000, 2000)
        cfg = TrainConfig(model="classic", overrides={"activation": "relu", "pool": "max"}, dataset=dataset,
                          epochs=2, lr=0.002, optimizer="adam", batch_size=128, device="cpu")
        result = train(cfg, data=subset, out=base / f"{key}-run")
        assert result.test_acc > min_acc, result.book_lines()
        _RUNS[key] = result.run_dir
    return _RUNS[key]


def mnist_run(base: Path, data) -> Path:
    """The small MNIST model (~98% test acc)."""
    return _small_run("mnist", "mnist", base, data, 0.95)


def fashion_run(base: Path, data) -> Path:
    """The small Fashion-MNIST model."""
    return _small_run("fashion", "fashion-mnist", base, data, 0.8)


def fonts() -> list[str]:
    found = []
    for folder in FONT_DIRS:
        for name in FONT_NAMES:
            path = Path(folder) / name
            if path.is_file() and str(path) not in found:
                found.append(str(path))
    return found


def render_digit(digit: int, variant: int, path: Path) -> Path:
    """A photo-like picture of a printed digit: dark (or blue) ink on light, noisy, slightly tilted
    paper, at one of several sizes, saved as PNG or JPEG, in colour or grey."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(1000 * variant + digit)
    size = (48, 72, 110, 160, 220)[(digit + variant) % 5]
    width, height = int(size * rng.uniform(1.2, 2.0)), int(size * rng.uniform(1.3, 1.9))
    paper = np.array((236, 229, 212) if (digit + variant) % 3 == 0 else (246, 246, 244))
    canvas = np.clip(paper + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    available = fonts()
    if available:
        font = ImageFont.truetype(available[(digit + variant) % len(available)], size)
    else:  # Pillow >= 10.1 scales its built-in font
        font = ImageFont.load_default(size)
    ink = ((20, 20, 28), (28, 40, 150), (90, 20, 20))[(digit + 2 * variant) % 3]
    x0, y0, x1, y1 = draw.textbbox((0, 0), str(digit), font=font)
    dx = int(rng.integers(-size // 8, size // 8 + 1))
    draw.text(((width - (x1 - x0)) / 2 - x0 + dx, (height - (y1 - y0)) / 2 - y0), str(digit), font=font, fill=ink)
    img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC,
                     fillcolor=tuple(int(v) for v in paper))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if (digit + variant) % 4 == 3:
        img = img.convert("L")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=88)
    else:
        img.save(path)
    return path


def render_set(folder: Path, variants: int = 2) -> list[tuple[Path, int]]:
    """``variants`` pictures of each digit 0-9 (PNG and JPEG alternate)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for variant in range(variants):
        for digit in range(10):
            ext = ".jpg" if (digit + variant) % 2 else ".png"
            out.append((render_digit(digit, variant, folder / f"digit{digit}-v{variant}{ext}"), digit))
    return out


def save_mnist_pngs(folder: Path, images, count: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"mnist-test-{i:04d}.png"
        Image.fromarray(images[i].numpy()).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Image families


FAMILY_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf", "LiberationSans-Regular.ttf",
              "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf", "LiberationSansNarrow-Regular.ttf")


def _family_fonts():
    out = []
    for name in FAMILY_FONTS:
        for d in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation"):
            p = Path(d) / name
            if p.is_file():
                out.append(str(p))
                break
    return out


# ---- building blocks


def _bbox(a, level=0.1):
    rows = np.flatnonzero((a > level).any(axis=1))
    cols = np.flatnonzero((a > level).any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def digit_alpha(x28, extent, resample=Image.Resampling.BICUBIC):
    """The MNIST digit as an ink map in [0, 1] whose ink spans ``extent`` px along its longer side."""
    y0, y1, x0, x1 = _bbox(x28.astype(np.float32) / 255)
    scale = extent / max(y1 - y0, x1 - x0)
    size = max(8, round(28 * scale))
    a = np.asarray(Image.fromarray(x28).resize((size, size), resample), np.float32) / 255
    return np.clip(a, 0, 1)


def frame(alpha, rng, margin=(0.1, 0.3), touch=False):
    """Crop/pad the ink map so the ink has the given margins (fractions of its longer side) on each side;
    ``touch``: at least one side (random) has no margin at all (strokes touch that edge)."""
    y0, y1, x0, x1 = _bbox(alpha)
    ext = max(y1 - y0, x1 - x0)
    m = [rng.uniform(*margin) for _ in range(4)]
    if touch:  # cut at the edge of the strokes' core (where the ink is half its full strength)
        sides = rng.random(4) < 0.6
        sides[rng.integers(4)] = True
        m = [None if s else rng.uniform(0.0, 0.06) for s in sides]
        core = _bbox(alpha, 0.5)
        outer = (y0, y1, x0, x1)
        m = [v if v is not None else -abs(core[i] - outer[i]) / ext for i, v in enumerate(m)]
    top, bottom, left, right = (int(round(v * ext)) for v in m)
    pad = ext * 4
    big = np.pad(alpha, pad)
    return big[pad + y0 - top: pad + y1 + bottom, pad + x0 - left: pad + x1 + right]


def paper(h, w, rng, colour=None, noise=(2, 5)):
    colour = np.array(colour if colour is not None else
                      [(247, 247, 245), (240, 236, 225), (252, 252, 252), (235, 238, 242)][rng.integers(4)], np.float32)
    return colour + rng.normal(0, rng.uniform(*noise), (h, w, 1)).astype(np.float32)


def compose(alpha, bg, ink):
    a = alpha[..., None]
    return bg * (1 - a) + np.asarray(ink, np.float32) * a


def to_img(arr):
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


DARK_INKS = [(15, 15, 20), (35, 35, 40), (20, 30, 90), (50, 45, 40)]
COLOUR_INKS = [(30, 50, 170), (190, 30, 40), (20, 120, 50), (110, 40, 150), (0, 110, 160)]


def _std(x28, rng, extent=(60, 170), margin=(0.1, 0.35), touch=False, ink=None):
    a = frame(digit_alpha(x28, rng.integers(*extent)), rng, margin, touch)
    ink = ink if ink is not None else DARK_INKS[rng.integers(len(DARK_INKS))]
    return a, ink


def _photo(x28, rng, **kw):
    a, ink = _std(x28, rng, **kw)
    return to_img(compose(a, paper(*a.shape, rng), ink))


def _skeleton(b):
    """Zhang-Suen thinning of a boolean image."""
    img = np.pad(b.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            P = np.pad(img, 1)
            p2, p3, p4, p5 = P[:-2, 1:-1], P[:-2, 2:], P[1:-1, 2:], P[2:, 2:]
            p6, p7, p8, p9 = P[2:, 1:-1], P[2:, :-2], P[1:-1, :-2], P[:-2, :-2]
            nb = [p2, p3, p4, p5, p6, p7, p8, p9]
            B = sum(n.astype(np.int32) for n in nb)
            seq = nb + [p2]
            A = sum(((seq[i] == 0) & (seq[i + 1] == 1)).astype(np.int32) for i in range(8))
            if step == 0:
                c = ((p2 * p4 * p6) == 0) & ((p4 * p6 * p8) == 0)
            else:
                c = ((p2 * p4 * p8) == 0) & ((p2 * p6 * p8) == 0)
            m = (img == 1) & (B >= 2) & (B <= 6) & (A == 1) & c
            if m.any():
                img[m] = 0
                changed = True
    return img[1:-1, 1:-1].astype(bool)


def pen_alpha(x28, extent, radius):
    """The digit redrawn with a round pen of ``radius`` px along its skeleton (ink spans ~``extent`` px)."""
    a = digit_alpha(x28, extent)
    sk = _skeleton(a > 0.5)
    ss = 4  # supersampling
    h, w = a.shape
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    r = radius * ss
    for y, x in zip(*np.nonzero(sk)):
        cx, cy = (x + 0.5) * ss, (y + 0.5) * ss
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), np.float32) / 255


# ---- the families: name -> f(x28, rng) -> PIL image (and how to save it)


def fam_tight(x28, rng):
    if rng.random() < 0.5:
        return _photo(x28, rng, touch=True)
    ext = int(rng.integers(60, 170))  # a pen a little broader than MNIST's strokes
    a = frame(pen_alpha(x28, ext, ext * rng.uniform(0.04, 0.08)), rng, touch=True)
    return to_img(compose(a, paper(*a.shape, rng), DARK_INKS[rng.integers(4)]))


def fam_small_margin(x28, rng):
    return _photo(x28, rng, margin=(0.03, 0.12))


def fam_large_margin(x28, rng):
    return _photo(x28, rng, extent=(40, 110), margin=(0.6, 1.6))


def fam_blurred(x28, rng):
    return _photo(x28, rng, extent=(70, 140)).filter(ImageFilter.GaussianBlur(rng.uniform(2, 4.5)))


def fam_low_res(x28, rng):
    """A digit 8-16 px along its longer side (half of them filling the frame), scaled up to 64-200 px."""
    a = frame(digit_alpha(x28, 80), rng, touch=True) if rng.random() < 0.5 else frame(digit_alpha(x28, 80), rng)
    small = int(rng.integers(8, 17))
    h, w = a.shape
    sh, sw = max(1, round(small * h / max(h, w))), max(1, round(small * w / max(h, w)))
    lo = np.asarray(Image.fromarray(a).resize((sw, sh), Image.Resampling.BOX), np.float32)
    img = to_img(compose(np.clip(lo, 0, 1), paper(sh, sw, rng, noise=(0, 1)), DARK_INKS[rng.integers(4)]))
    size = int(rng.integers(64, 201))
    method = [Image.Resampling.BILINEAR, Image.Resampling.NEAREST][rng.integers(2)]
    return img.resize((max(1, round(size * sw / max(sh, sw))), max(1, round(size * sh / max(sh, sw)))), method)


def fam_dark_on_light(x28, rng):
    return _photo(x28, rng)


def fam_light_on_dark(x28, rng):
    a, _ = _std(x28, rng)
    screen = [(12, 12, 16), (30, 34, 40), (20, 28, 60), (45, 45, 45), (0, 0, 0)][rng.integers(5)]
    ink = [(255, 255, 255), (230, 230, 220), (200, 220, 255), (250, 240, 120)][rng.integers(4)]
    return to_img(compose(a, paper(*a.shape, rng, colour=screen), ink))


def fam_coloured_ink(x28, rng):
    a, _ = _std(x28, rng)
    return to_img(compose(a, paper(*a.shape, rng), COLOUR_INKS[rng.integers(len(COLOUR_INKS))]))


def fam_low_contrast(x28, rng):
    a, _ = _std(x28, rng)
    level = rng.uniform(170, 240)
    tint = np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.9, 1.0)])
    bg = paper(*a.shape, rng, colour=level * tint, noise=(1.5, 3))
    return to_img(compose(a, bg, 0.6 * level * tint))


def _ramp(h, w, rng):
    t = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w]
    p = np.cos(t) * xs + np.sin(t) * ys
    return (p - p.min()) / max(1e-6, p.max() - p.min())


def fam_gradient(x28, rng):
    a, ink = _std(x28, rng)
    lo = rng.uniform(0.3, 0.55)
    light = lo + (1 - lo) * _ramp(*a.shape, rng)
    return to_img(compose(a, paper(*a.shape, rng), ink) * light[..., None])


def fam_shadow(x28, rng):
    a, ink = _std(x28, rng)
    h, w = a.shape
    ramp = _ramp(h, w, rng)
    edge = rng.uniform(0.3, 0.7)
    soft = rng.uniform(0.02, 0.1)
    inside = 1 / (1 + np.exp(-(ramp - edge) / soft))
    light = 1 - rng.uniform(0.4, 0.6) * inside
    return to_img(compose(a, paper(h, w, rng), ink) * light[..., None])


def _ruled(h, w, rng, ext, vertical):
    bg = paper(h, w, rng, colour=(250, 250, 248))
    colour = np.array([(150, 185, 225), (180, 180, 185), (140, 200, 200)][rng.integers(3)], np.float32)
    spacing = ext * rng.uniform(0.25, 0.4)
    width = int(rng.integers(1, 3))
    mask = np.zeros((h, w), bool)
    for y in np.arange(rng.uniform(0, spacing), h, spacing).astype(int):
        mask[y:y + width] = True
    if vertical:
        for x in np.arange(rng.uniform(0, spacing), w, spacing).astype(int):
            mask[:, x:x + width] = True
    elif rng.random() < 0.4:  # a red margin line
        x = int(rng.integers(0, max(1, w // 4)))
        bg[:, x:x + 2] = (230, 120, 120)
    bg[mask] = colour
    return bg


def fam_lined_paper(x28, rng):
    a, ink = _std(x28, rng)
    ext = max(_bbox(a)[1] - _bbox(a)[0], 1)
    return to_img(compose(a, _ruled(*a.shape, rng, ext, False), ink))


def fam_squared_paper(x28, rng):
    a, ink = _std(x28, rng)
    ext = max(_bbox(a)[1] - _bbox(a)[0], 1)
    return to_img(compose(a, _ruled(*a.shape, rng, ext, True), ink))


def fam_jpeg30(x28, rng):
    buf = io.BytesIO()
    _photo(x28, rng).save(buf, format="JPEG", quality=30)
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.info["file_bytes"] = buf.getvalue()  # save_family writes these bytes as they are
    return img


def fam_thick(x28, rng):
    ext = int(rng.integers(80, 170))
    a = frame(pen_alpha(x28, ext, ext * rng.uniform(0.07, 0.1)), rng, (0.1, 0.35))
    return to_img(compose(a, paper(*a.shape, rng), DARK_INKS[rng.integers(4)]))


def fam_thin(x28, rng):
    ext = int(rng.integers(100, 200))
    a = frame(pen_alpha(x28, ext, rng.uniform(0.8, 1.6)), rng, (0.1, 0.35))
    return to_img(compose(a, paper(*a.shape, rng), DARK_INKS[rng.integers(4)]))


def fam_rotated(x28, rng):
    a, ink = _std(x28, rng, margin=(0.2, 0.4))
    angle = rng.uniform(5, 15) * (1 if rng.random() < 0.5 else -1)
    a = np.asarray(Image.fromarray(a).rotate(angle, resample=Image.Resampling.BICUBIC), np.float32)
    return to_img(compose(np.clip(a, 0, 1), paper(*a.shape, rng), ink))


def fam_transparent(x28, rng):
    a, _ = _std(x28, rng)
    ink = [(0, 0, 0), (0, 0, 0), (20, 40, 160), (255, 255, 255)][rng.integers(4)]
    rgba = np.zeros(a.shape + (4,), np.uint8)
    rgba[..., :3] = ink if rng.random() < 0.5 else 0  # what lies under transparent pixels varies
    rgba[a > 0, :3] = ink
    rgba[..., 3] = np.clip(np.rint(a * 255), 0, 255)
    return Image.fromarray(rgba, "RGBA")


FAMILIES = {
    "tight crop (touches an edge)": fam_tight,
    "small margin": fam_small_margin,
    "large margin": fam_large_margin,
    "blurred (Gaussian 2-4.5 px)": fam_blurred,
    "low resolution (8-16 px up to 64-200)": fam_low_res,
    "dark ink on light paper": fam_dark_on_light,
    "light ink on a dark screen": fam_light_on_dark,
    "coloured ink": fam_coloured_ink,
    "low contrast (ink at 60%)": fam_low_contrast,
    "brightness gradient": fam_gradient,
    "shadow": fam_shadow,
    "lined paper": fam_lined_paper,
    "squared paper": fam_squared_paper,
    "JPEG quality 30": fam_jpeg30,
    "thick strokes": fam_thick,
    "thin strokes": fam_thin,
    "rotated (5-15 degrees)": fam_rotated,
    "RGBA, transparent background": fam_transparent,
}


def printed(digit, rng, fonts):
    size = int(rng.integers(50, 180))
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], size)
    bbox = font.getbbox(str(digit))
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    m = rng.uniform(0.1, 0.4, 4) * max(w, h)
    W, H = int(w + m[0] + m[1]), int(h + m[2] + m[3])
    bg = to_img(paper(H, W, rng))
    ImageDraw.Draw(bg).text((m[0] - bbox[0], m[2] - bbox[1]), str(digit), font=font,
                            fill=DARK_INKS[rng.integers(4)])
    return bg


def make_family(name, images, labels, seed=0):
    """[(PIL image, label)]: one family's pictures of ``images`` (MNIST uint8 28x28), reproducible."""
    out = []
    if name == "printed digits (fonts)":
        fonts = _family_fonts()
        for i in range(len(images)):
            rng = np.random.default_rng([seed, 99, i])
            d = int(labels[i])
            out.append((printed(d, rng, fonts), d))
        return out
    idx = list(FAMILIES).index(name)
    f = FAMILIES[name]
    for i, (x, y) in enumerate(zip(images, labels)):
        rng = np.random.default_rng([seed, idx, i])
        out.append((f(np.asarray(x, np.uint8), rng), int(y)))
    return out


FAMILY_NAMES = list(FAMILIES) + ["printed digits (fonts)"]


def save_family(folder: Path, items, prefix: str = "img") -> list[Path]:
    """Write each picture as a file (PNG; the JPEG family's own bytes as .jpg); their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(items):
        if "file_bytes" in img.info:
            path = folder / f"{prefix}-{i:04d}-{label}.jpg"
            path.write_bytes(img.info["file_bytes"])
        else:
            path = folder / f"{prefix}-{i:04d}-{label}.png"
            img.save(path)
        paths.append(path)
    return paths


def textbook(img) -> np.ndarray:
    """The textbook MNIST preparation, for comparison (not lenet's method): greyscale (PIL's
    convert("L"), which ignores transparency), invert when the image is mostly light, crop to the
    pixels above 10% of the brightest, resize the longer side to 20 keeping the aspect ratio, paste
    into 28x28 and shift (whole pixels, zero fill) so the centre of mass is at the centre."""
    g = np.asarray(img.convert("L"), np.float32)
    if g.mean() > 127.5:
        g = 255 - g
    ys, xs = np.nonzero(g > 0.1 * g.max())
    if len(ys) == 0:
        return np.zeros((28, 28), np.uint8)
    crop = g[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    s = 20 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS), np.float32)
    out = np.zeros((28, 28), np.float32)
    top, left = (28 - nh) // 2, (28 - nw) // 2
    out[top:top + nh, left:left + nw] = small
    total = out.sum()
    if total > 0:
        yy, xx = np.indices(out.shape)
        cy, cx = (yy * out).sum() / total, (xx * out).sum() / total
        dy, dx = int(np.round(14 - cy)), int(np.round(14 - cx))
        out = shift(out, dy, dx)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def shift(a, dy, dx):  # noqa: D401
    """Shift with zero fill (scipy.ndimage.shift by whole pixels)."""
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


# ---- Fashion-MNIST items as product pictures


def _fill_holes(b):
    """Fill the holes of a boolean mask: whatever the border cannot reach through False pixels."""
    outside = np.zeros_like(b)
    free = ~b
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if (grown == outside).all():
            return ~outside
        outside = grown


BACKDROPS = [(255, 255, 255), (242, 242, 240), (250, 228, 228), (220, 235, 250), (200, 230, 200),
             (255, 240, 200), (150, 150, 150), (90, 140, 200), (210, 80, 70), (240, 200, 60)]
DARK_PAGES = [(0, 0, 0), (40, 40, 40), (15, 25, 60), (20, 50, 30), (60, 20, 40)]


def fashion_picture(f28, rng):
    """A Fashion-MNIST test item as a product picture: the item as photographed on white (the
    dataset's image negated), tinted a little, pasted onto a larger background of another colour,
    plain or a gradient, touching its edges or not. Dark backgrounds get the dataset's light-on-dark
    image itself (a screenshot of it on a dark page)."""
    item = f28.astype(np.float32) / 255
    mask = _fill_holes(f28 > 10)
    size = int(rng.integers(56, 220))
    up = lambda a: np.clip(np.asarray(Image.fromarray(a.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC), np.float32), 0, 1)
    item_up, alpha = up(item), up(mask.astype(np.float32))
    ys, xs = np.nonzero(alpha > 0.5)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ext = max(y1 - y0, x1 - x0)
    if rng.random() < 0.4:  # touch one or more edges
        m = [0 if rng.random() < 0.6 else int(rng.uniform(0, 0.1) * ext) for _ in range(4)]
    else:
        m = [int(rng.uniform(0.05, 0.5) * ext) for _ in range(4)]
    pad = ext
    item_up, alpha = np.pad(item_up, pad), np.pad(alpha, pad)
    sl = (slice(pad + y0 - m[0], pad + y1 + m[1]), slice(pad + x0 - m[2], pad + x1 + m[3]))
    item_up, alpha = item_up[sl], alpha[sl]
    h, w = alpha.shape
    photo = rng.random() < 0.75
    choices = BACKDROPS if photo else DARK_PAGES
    c1 = np.array(choices[rng.integers(len(choices))], np.float32)
    if rng.random() < 0.5:  # a gradient to another colour
        c2 = np.array(choices[rng.integers(len(choices))], np.float32)
        t = _ramp(h, w, rng)[..., None]
        bg = c1 * (1 - t) + c2 * t
    else:
        bg = np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    bg = bg + rng.normal(0, 2, (h, w, 1))
    if photo:
        tint = rng.uniform(0.85, 1.0, 3)
        colour = (1 - item_up)[..., None] * 255 * tint
    else:
        colour = np.repeat(item_up[..., None] * 255, 3, axis=2)
    return to_img(compose(alpha, bg, 0) + alpha[..., None] * colour)
