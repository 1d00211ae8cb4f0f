"""lenet predict: preprocessing, real predictions on font-rendered digits and MNIST PNGs, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import assert_user_error, run_cli
from lenet.use.predict import SIZE, load_image, preprocess
from .trained import mnist_run, render_set, save_mnist_pngs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist):
    return mnist_run(tmp_path_factory.mktemp("runs"), mnist)


# ---- preprocessing (no model needed)


def _dark_on_light(w=120, h=90, box=(40, 20, 70, 80), ink=20, paper=240):
    a = np.full((h, w), paper, np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = ink
    return Image.fromarray(a)


def test_dark_on_light_is_inverted_cropped_and_fits_the_20px_box():
    p = preprocess(_dark_on_light(), "digits")
    assert p.inverted and not p.blank
    assert p.pixels.shape == (SIZE, SIZE) and p.pixels.dtype == np.uint8
    assert p.pixels[0].max() == 0 and p.pixels[:, 0].max() == 0  # background is black
    rows = np.flatnonzero(p.pixels.max(axis=1) > 0)
    cols = np.flatnonzero(p.pixels.max(axis=0) > 0)
    assert rows[-1] - rows[0] + 1 <= 21 and cols[-1] - cols[0] + 1 <= 21
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 19  # the longest side fills the box
    ys, xs = np.indices(p.pixels.shape)
    mass = p.pixels.astype(float)
    cy, cx = (ys * mass).sum() / mass.sum(), (xs * mass).sum() / mass.sum()
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1  # centred by centre of mass


def test_light_on_dark_is_not_inverted_and_fit_mode_fills_28():
    a = np.zeros((50, 100), np.uint8)
    a[10:40, 5:95] = 200
    p = preprocess(Image.fromarray(a), "fit")
    assert not p.inverted
    cols = np.flatnonzero(p.pixels.max(axis=0) > 0)
    assert cols[-1] - cols[0] + 1 == 28  # the longest side is scaled to 28


def test_colour_transparent_and_blank_images():
    rgba = np.zeros((64, 64, 4), np.uint8)  # dark ink strokes on a transparent background
    rgba[10:54, 28:36] = (200, 0, 0, 255)
    p = preprocess(Image.fromarray(rgba), "digits")
    assert p.inverted and p.pixels.max() == 255
    blank = preprocess(Image.fromarray(np.full((40, 40, 3), 250, np.uint8)), "digits")
    assert blank.blank and blank.pixels.max() == 0
    raw = preprocess(Image.fromarray(np.full((56, 56), 255, np.uint8)), "none")  # as is: no inversion
    assert raw.pixels.shape == (28, 28) and raw.pixels.min() == 255


# ---- real predictions


def test_font_rendered_digits_are_mostly_right(run_dir, tmp_path):
    images = render_set(tmp_path / "digits", variants=2)  # 20 photos: sizes 48-220 px, colour/grey, PNG/JPEG
    proc = run_cli("predict", str(run_dir), *[str(p) for p, _ in images], "--json", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dataset"] == "mnist" and len(out["predictions"]) == len(images)
    right = 0
    for pred, (path, digit) in zip(out["predictions"], images):
        assert pred["file"] == str(path) and pred["preprocess"] == "digits" and pred["inverted"]
        probs = [t["probability"] for t in pred["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        right += pred["top"][0]["class"] == str(digit)
    print(f"font-rendered digits: {right}/{len(images)} right")
    assert right >= 0.7 * len(images), f"only {right}/{len(images)} right"


def test_mnist_pngs_match_the_evaluation_path(run_dir, mnist, tmp_path):
    from lenet.inspect.evaluation import predict_scores
    from lenet.training.runs import load_run

    n = 40
    paths = save_mnist_pngs(tmp_path / "png", mnist.test.images, n)
    scores = predict_scores(load_run(run_dir).model, mnist.test.images[:n])
    probs = torch.softmax(scores, dim=1)
    raw = json.loads(run_cli("predict", str(run_dir), *map(str, paths), "--json", "--no-preprocess").stdout)
    for i, pred in enumerate(raw["predictions"]):
        assert pred["preprocess"] == "none"
        assert pred["top"][0]["index"] == int(scores[i].argmax())
        assert pred["top"][0]["probability"] == pytest.approx(float(probs[i].max()), abs=1e-5)
    # the MNIST recipe applied to an MNIST image leaves it nearly as it was
    cooked = json.loads(run_cli("predict", str(run_dir), *map(str, paths), "--json").stdout)
    same = sum(p["top"][0]["index"] == int(scores[i].argmax()) for i, p in enumerate(cooked["predictions"]))
    assert not any(p["inverted"] for p in cooked["predictions"])
    assert same >= 0.9 * n, f"{same}/{n}"


def test_show_preprocessed_saves_exactly_what_the_network_saw(run_dir, tmp_path):
    (path, _), (path2, _) = render_set(tmp_path / "d", variants=1)[7:9]
    out = tmp_path / "seen.png"
    proc = run_cli("predict", str(run_dir), str(path), "--show-preprocessed", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    seen = Image.open(out)
    assert seen.size == (28, 28) and seen.mode == "L"
    again = json.loads(run_cli("predict", str(run_dir), str(out), "--no-preprocess", "--json").stdout)
    first = json.loads(proc.stdout)
    assert again["predictions"][0]["top"] == first["predictions"][0]["top"]
    strip = tmp_path / "strip.png"
    text = run_cli("predict", str(run_dir), str(path), str(path2), "--show-preprocessed", str(strip))
    assert text.returncode == 0 and Image.open(strip).size == (56, 28)
    assert text.stdout.splitlines()[0].startswith(f"{path}: 7 (")


# ---- user errors


def test_bad_images_fail_fast_with_one_line(run_dir, tmp_path):
    good = render_set(tmp_path / "ok", variants=1)[0][0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("these are not pixels\n")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:200] if good.suffix == ".png" else b"")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases = [(not_image, "not an image file"), (truncated, "corrupt or truncated"), (empty, "empty file"),
             (tmp_path / "missing.png", "not found"), (tmp_path, "is a folder")]
    for bad, fragment in cases:
        proc = run_cli("predict", str(run_dir), str(good), str(bad))
        assert_user_error(proc, str(bad), fragment, code=2)
        assert proc.stdout == ""  # nothing was predicted: every image is read first


def test_other_user_errors(run_dir, tmp_path):
    good = render_set(tmp_path / "ok", variants=1)[0][0]
    assert_user_error(run_cli("predict", str(tmp_path / "norun"), str(good)), "not found", code=2)
    assert_user_error(run_cli("predict", str(run_dir), str(good), "--show-preprocessed",
                              str(tmp_path / "no" / "dir.png")), "does not exist", code=2)
    assert_user_error(run_cli("predict", str(run_dir), str(good), "--top-k", "0"), "--top-k", code=2)


def test_load_image_reads_16_bit_and_palette_images(tmp_path):
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    Image.fromarray(np.zeros((30, 30), np.uint8)).convert("P").save(tmp_path / "pal.gif")
    deep = preprocess(load_image(tmp_path / "deep.png"), "none").pixels
    assert deep.max() >= 245 and deep.min() <= 5 and deep[0, 0] < deep[-1, -1]  # 16-bit range kept
    assert preprocess(load_image(tmp_path / "pal.gif"), "digits").blank


def test_feature_layers_for_every_preset():
    from lenet.models import create_model
    from lenet.use.predict import feature_layers

    assert feature_layers(create_model("classic")) == ["act1", "act2"]
    assert feature_layers(create_model("lenet5")) == ["f1", "f3"]
    assert len(feature_layers(create_model("modern"))) == 2
