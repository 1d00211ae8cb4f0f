"""lenet predict: preprocessing, real predictions on pictures of digits as people have them (every
family of tests/trained.py, against the textbook recipe), Fashion-MNIST items on other backgrounds,
blank images, font-rendered digits and MNIST PNGs, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from . import trained
from .conftest import assert_user_error, run_cli
from lenet.use.predict import SIZE, load_image, preprocess
from .trained import fashion_run, mnist_run, render_set, save_mnist_pngs


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


# ---- pictures as people have them: every family, against the textbook recipe

FAMILY_COUNT = 40  # pictures per family, from MNIST test images 0..39


def _accuracy(predictions, labels) -> float:
    return float(np.mean([bool(p["top"]) and p["top"][0]["index"] == y for p, y in zip(predictions, labels)]))


@pytest.mark.slow
def test_every_family_is_no_worse_than_the_textbook_recipe(run_dir, mnist, tmp_path):
    from lenet.use.predict import Predictor

    images = mnist.test.images[:FAMILY_COUNT].numpy()
    labels = mnist.test.labels[:FAMILY_COUNT].numpy()
    families, paths = {}, []
    for n, name in enumerate(trained.FAMILY_NAMES):
        items = trained.make_family(name, images, labels)
        files = trained.save_family(tmp_path / f"f{n}", items)
        families[name] = (len(paths), len(files), [y for _, y in items])
        paths += files
    proc = run_cli("predict", str(run_dir), *map(str, paths), "--json", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)["predictions"]
    model = Predictor.from_run(run_dir)
    table, ours_all, book_all = [], [], []
    for name, (start, count, ys) in families.items():
        ours = _accuracy(predictions[start:start + count], ys)
        scores, _ = model.forward(np.stack([trained.textbook(Image.open(p)) for p in paths[start:start + count]]))
        book = float((scores.argmax(1).numpy() == np.array(ys)).mean())
        ours_all.append(ours)
        book_all.append(book)
        table.append(f"{name:40s} lenet predict {ours:.3f}  textbook {book:.3f}")
    print("\n".join(table + [f"{'mean':40s} lenet predict {np.mean(ours_all):.3f}  textbook {np.mean(book_all):.3f}"]))
    worse = [t for t, o, b in zip(table, ours_all, book_all) if o < b]
    assert not worse, worse
    assert np.mean(ours_all) >= np.mean(book_all) + 0.05


def test_tight_crops_keep_their_strokes():
    """A digit whose strokes touch the frame: its ink is kept whole, not cleared as background."""
    rng = np.random.default_rng(3)
    a = trained.frame(trained.pen_alpha(_seven(), 120, 9.0), rng, touch=True)
    ys, xs = np.nonzero(a > 0.5)
    a = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]  # touching all four edges
    img = trained.to_img(trained.compose(a, trained.paper(*a.shape, rng), (20, 20, 25)))
    p = preprocess(img, "digits")
    assert not p.blank and p.inverted
    ink = p.pixels >= 128
    assert ink.sum() >= 60  # a whole 7, not "a few scattered blobs"
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 18


def _seven() -> np.ndarray:
    a = np.zeros((28, 28), np.uint8)
    a[6:9, 7:21] = 255
    for y in range(9, 23):
        x = 20 - (y - 9) * 8 // 14
        a[y, x - 1:x + 2] = 255
    return a


@pytest.mark.slow
def test_fashion_items_on_other_backgrounds_are_framed_like_the_dataset(tmp_path, fashion):
    from lenet.use.predict import Predictor

    run = fashion_run(tmp_path / "runs", fashion)
    n = 200
    images, labels = fashion.test.images[:n].numpy(), fashion.test.labels[:n].numpy()
    model = Predictor.from_run(run)
    on_originals = float((model.forward(images)[0].argmax(1).numpy() == labels).mean())
    pictures = [trained.fashion_picture(x, np.random.default_rng([7, i])) for i, x in enumerate(images)]
    paths = trained.save_family(tmp_path / "fashion", list(zip(pictures, labels.tolist())))
    proc = run_cli("predict", str(run), *map(str, paths), "--json", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)["predictions"]
    through = _accuracy(out, labels.tolist())
    print(f"Fashion-MNIST: {on_originals:.3f} on the originals, {through:.3f} through lenet predict on pictures")
    assert abs(through - on_originals) <= 0.05
    assert all(p["preprocess"] == "fit" and not p["blank"] for p in out)
    # the item fills the frame along its longer side, like the dataset's images
    seen = tmp_path / "seen.png"
    assert run_cli("predict", str(run), *map(str, paths[:20]), "--show-preprocessed", str(seen)).returncode == 0
    strip = np.asarray(Image.open(seen))
    for k in range(20):
        tile = strip[:, 28 * k:28 * (k + 1)] > 0
        rows, cols = np.flatnonzero(tile.any(axis=1)), np.flatnonzero(tile.any(axis=0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 27


# ---- blank images, and what the preprocessing decided


def _blank_pictures(folder):
    rng = np.random.default_rng(5)
    folder.mkdir()
    pictures = {
        "white.png": np.full((80, 60), 255, np.uint8),
        "black.png": np.zeros((28, 28), np.uint8),
        "grain.png": np.clip(235 + rng.normal(0, 4, (120, 90)), 0, 255).astype(np.uint8),
        "shaded.jpg": np.clip(np.linspace(120, 250, 150)[None, :] + rng.normal(0, 3, (110, 150)), 0, 255).astype(np.uint8),
        "lined.png": np.asarray(trained.to_img(trained._ruled(140, 120, rng, 100, False))),
        "dot.png": np.full((200, 200), 245, np.uint8),
    }
    pictures["dot.png"][100:102, 100:102] = 30
    paths = []
    for name, array in pictures.items():
        img = Image.fromarray(array)
        img.save(folder / name, **({"quality": 30} if name.endswith(".jpg") else {}))
        paths.append(folder / name)
    return paths


def test_blank_and_near_blank_images_are_reported_not_classified(run_dir, tmp_path):
    paths = _blank_pictures(tmp_path / "blank")
    faint = tmp_path / "faint.png"  # a real digit at low contrast is not blank
    trained.fam_low_contrast(_seven(), np.random.default_rng(1)).save(faint)
    proc = run_cli("predict", str(run_dir), *map(str, paths), str(faint), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)["predictions"]
    for p in out[:-1]:
        assert p["blank"] and p["top"] == [] and p["decisions"]["blank"], p
    assert not out[-1]["blank"] and out[-1]["top"][0]["class"] == "7"
    text = run_cli("predict", str(run_dir), str(paths[0]), str(faint)).stdout.splitlines()
    assert text[0].startswith(f"{paths[0]}: blank, not classified (") and text[1].startswith(f"{faint}: 7 (")


def test_json_says_what_the_preprocessing_decided(run_dir, mnist, tmp_path):
    x = mnist.test.images[0].numpy()  # a 7
    cases = {
        "lined.png": trained.fam_lined_paper(x, np.random.default_rng(2)),
        "screen.png": trained.fam_light_on_dark(x, np.random.default_rng(2)),
        "canvas.png": trained.fam_transparent(x, np.random.default_rng(0)),
        "shadow.png": trained.fam_shadow(x, np.random.default_rng(4)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
    proc = run_cli("predict", str(run_dir), *[str(tmp_path / n) for n in cases], "--json")
    out = {Path(p["file"]).name: p for p in json.loads(proc.stdout)["predictions"]}
    for name, p in out.items():
        d = p["decisions"]
        assert p["top"][0]["class"] == "7", (name, p)
        assert {"size", "polarity", "polarity_from", "background", "noise", "ink_contrast", "cut", "box",
                "stroke_width"} <= set(d), d
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 < x1 <= d["size"][0] and 0 <= y0 < y1 <= d["size"][1]
    assert out["lined.png"]["decisions"]["ruled_lines"] and out["lined.png"]["decisions"]["cut"] > 0.1
    assert out["lined.png"]["decisions"]["polarity"] == "dark on light" and out["lined.png"]["inverted"]
    assert out["screen.png"]["decisions"]["polarity"] == "light on dark" and not out["screen.png"]["inverted"]
    assert out["canvas.png"]["decisions"]["transparent"] in ("shown on white", "shown on black")
    assert out["shadow.png"]["decisions"]["background_range"] > 0.2  # the shadow was modelled, not taken for ink


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


@pytest.mark.slow
def test_a_run_trained_with_test_flips_is_predicted_with_them(tmp_path, fashion):
    """`lenet predict` and `lenet serve` score as `lenet evaluate` does: with the mirror image
    too when the run's recipe had --test-flip; the activation maps stay those of the image."""
    from lenet.inspect.evaluation import predict_scores
    from lenet.training import TrainConfig, train
    from lenet.use.predict import Predictor

    cfg = TrainConfig(model="classic", overrides={"activation": "relu", "pool": "max"}, dataset="fashion-mnist",
                      epochs=1, lr=0.002, optimizer="adam", batch_size=128, flip=True, test_flip=True, device="cpu")
    run = train(cfg, data=fashion.head(6000, 500), out=tmp_path / "run").run_dir
    flipped = Predictor.from_run(run)
    plain = Predictor(flipped.model, flipped.classes)
    assert flipped.test_flip and not plain.test_flip
    images = fashion.test.images[:64]
    scores, maps = flipped.forward(images.numpy(), activations=True)
    plain_scores, plain_maps = plain.forward(images.numpy(), activations=True)
    assert torch.allclose(scores, predict_scores(flipped.model, images, test_flip=True), atol=1e-5)
    assert torch.allclose(plain_scores, predict_scores(flipped.model, images), atol=1e-5)
    assert not torch.allclose(scores.softmax(1), plain_scores.softmax(1), atol=1e-3)
    assert maps.keys() == plain_maps.keys() and all(torch.equal(maps[k], plain_maps[k]) for k in maps)
    top = flipped.predict([flipped.prepare(Image.fromarray(images[0].numpy()), preprocess_image=False)])[0]
    assert top.probabilities == pytest.approx(scores[0].softmax(0).tolist(), abs=1e-6)
    from lenet.use.export import onnx_metadata
    from lenet.use.serve import App
    from lenet.training.runs import read_config

    assert App(flipped).info()["test_flip"] is True and App(plain).info()["test_flip"] is False
    assert onnx_metadata(read_config(run))["test_flip"] == "true"
    pytest.importorskip("onnx")
    proc = run_cli("export", str(run), "--out", str(tmp_path / "model.onnx"))
    assert proc.returncode == 0 and "the run was evaluated with test-time flips" in proc.stdout
