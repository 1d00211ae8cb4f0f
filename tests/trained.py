"""A small real MNIST model trained once per test session, and digit images rendered with a font.

Shared by test_predict.py, test_export.py and test_serve.py (each asks for it through a fixture
that calls :func:`mnist_run`; the first call trains, later calls reuse the run folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_RUNS: dict[str, Path] = {}

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts",
             "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf")


def mnist_run(base: Path, data) -> Path:
    """Train the classic LeNet (ReLU, max-pool, Adam) on 30k MNIST images for 2 epochs (~98% test acc)."""
    if "mnist" not in _RUNS:
        from lenet.training import TrainConfig, train

        subset = data.head(30000, 2000)
        cfg = TrainConfig(model="classic", overrides={"activation": "relu", "pool": "max"}, dataset="mnist",
                          epochs=2, lr=0.002, optimizer="adam", batch_size=128, device="cpu")
        result = train(cfg, data=subset, out=base / "mnist-run")
        assert result.test_acc > 0.95, result.book_lines()
        _RUNS["mnist"] = result.run_dir
    return _RUNS["mnist"]


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
