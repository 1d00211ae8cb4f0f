"""Datasets of your own: image folders, CSV and IDX, built here from real MNIST images.

Each kind must train exactly as the same images do through the built-in loader (same seed, same
split: identical metrics and weights), and every kind of bad data ends in one clear line.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lenet.data import Dataset, folders, load_dataset, stratified_split
from lenet.errors import DataError
from lenet.training import TrainConfig, resume, train
from lenet.training.runs import load_run

from .conftest import assert_user_error, needs_data, run_cli

N_TRAIN, N_TEST = 1200, 300


@pytest.fixture(scope="module")
def digits(mnist) -> Dataset:
    """The first MNIST test images, reordered as a folder of class folders lists them (by class,
    then file name): training images from the first 1,200, test images from the next 300."""
    images, labels = mnist.test.images.numpy(), mnist.test.labels.numpy()
    train = np.argsort(labels[:N_TRAIN], kind="stable")
    test = N_TRAIN + np.argsort(labels[N_TRAIN:N_TRAIN + N_TEST], kind="stable")
    return Dataset("digits", mnist.classes, *(_split(images[i], labels[i]) for i in (train, test)))


def _split(images, labels):
    from lenet.data import Split

    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def write_tree(root: Path, data: Dataset, with_test: bool = True) -> Path:
    splits = {"train": data.train, "test": data.test} if with_test else {"": data.train}
    for split, part in splits.items():
        for i, (x, y) in enumerate(zip(part.images.numpy(), part.labels.numpy())):
            f = root / split / data.classes[y] / f"{i:05d}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(f)
    return root


def write_csv(path: Path, part, header: bool = True) -> Path:
    rows = (["label," + ",".join(f"pixel{i + 1}" for i in range(784))] if header else [])
    rows += [f"{y}," + ",".join(map(str, x.ravel())) for x, y in zip(part.images.numpy(), part.labels.numpy())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(root: Path, data: Dataset, classes: tuple[str, ...]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", data.train), ("t10k", data.test)):
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(part.images.numpy())))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(part.labels.numpy().astype(np.uint8)))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def held_out(data: Dataset, fraction: float = 0.1) -> Dataset:
    """``data``'s training images split as a dataset without a test split is."""
    tr, te = stratified_split(data.train.labels.numpy(), fraction)
    images, labels = data.train.images.numpy(), data.train.labels.numpy()
    return Dataset(data.name, data.classes, _split(images[tr], labels[tr]), _split(images[te], labels[te]))


RECIPE = dict(epochs=2, lr=0.003, optimizer="adam", batch_size=64, device="cpu", seed=3,
              overrides={"activation": "relu", "pool": "max"})


def assert_same_training(path: Path, expected: Dataset, **fields):
    mine = train(TrainConfig(dataset=str(path), **RECIPE, **fields))
    ref = train(TrainConfig(**RECIPE), data=expected)
    assert [dataclass_metrics(h) for h in mine.history] == [dataclass_metrics(h) for h in ref.history]
    for (name, p), q in zip(mine.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert mine.test_acc > 0.6  # it learned: real digits, not noise


def dataclass_metrics(h):
    return (h.train_loss, h.train_acc, h.test_acc)


# ------------------------------------------------------------------ each kind trains like the built-in loader


@needs_data
def test_image_folders_with_a_test_split_train_like_the_builtin_loader(digits, tmp_path):
    root = write_tree(tmp_path / "tree", digits)
    data = load_dataset(str(root))
    assert data.classes == digits.classes and data.split == "given"
    assert torch.equal(data.train.images, digits.train.images) and torch.equal(data.test.labels, digits.test.labels)
    assert_same_training(root, digits)


@needs_data
def test_image_folders_without_test_split_hold_out_a_stratified_share(digits, tmp_path):
    root = write_tree(tmp_path / "flat", digits, with_test=False)
    data = load_dataset(str(root), test_fraction=0.2)
    assert data.split == "held-out 0.2" and len(data.test) == pytest.approx(0.2 * N_TRAIN, abs=10)
    counts = np.bincount(data.test.labels.numpy(), minlength=10) / np.bincount(digits.train.labels.numpy(), minlength=10)
    assert np.allclose(counts, 0.2, atol=0.06)  # every class gives its share
    again = load_dataset(str(root), test_fraction=0.2)
    assert torch.equal(again.test.images, data.test.images)  # seeded: the same split every time
    assert_same_training(root, held_out(digits, 0.2), test_fraction=0.2)


@needs_data
def test_kaggle_csv_train_and_test_files_train_like_the_builtin_loader(digits, tmp_path):
    write_csv(tmp_path / "csv" / "mnist_train.csv", digits.train)
    write_csv(tmp_path / "csv" / "mnist_test.csv", digits.test, header=False)
    data = load_dataset(str(tmp_path / "csv"))
    assert data.split == "given" and data.classes == tuple("0123456789")
    assert_same_training(tmp_path / "csv", digits)


@needs_data
def test_one_csv_file_holds_out_a_test_split(digits, tmp_path):
    path = write_csv(tmp_path / "all.csv", digits.train)
    assert_same_training(path, held_out(digits))


@needs_data
def test_idx_folder_with_classes_txt_trains_like_the_builtin_loader(digits, tmp_path):
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    root = write_idx(tmp_path / "idx", digits, names)
    data = load_dataset(str(root))
    assert data.classes == names and data.split == "given"
    assert_same_training(root, digits)


@pytest.mark.slow
@needs_data
def test_cli_train_evaluate_resume_and_inspect_a_folder(digits, tmp_path):
    root = write_tree(tmp_path / "tree", digits, with_test=False)
    (root / "3" / "notes.txt").write_text("scanned on tuesday")
    run = tmp_path / "run"
    proc = run_cli("train", "--dataset", str(root), "--epochs", "3", "--lr", "0.003", "--optimizer", "adam", "--set", "activation=relu", "--set", "pool=max",
                   "--test-fraction", "0.25", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "note: skipped 1 non-image file(s)" in proc.stdout and "held out 25% of each class" in proc.stdout
    cfg = load_run(run).config
    assert cfg["data"]["source"] == str(root.resolve()) and cfg["data"]["split"] == "held-out 0.25"
    final = float(proc.stdout.split("test acc ")[-1].split()[0].rstrip(","))
    assert final > 0.6
    evaluated = run_cli("evaluate", str(run))  # the same held-out images, found again from the run
    assert evaluated.returncode == 0, evaluated.stderr
    assert float(evaluated.stdout.split("test accuracy ")[1].split()[0]) == pytest.approx(final, abs=5e-4)
    again = resume(run)  # already finished: the same split comes back, nothing to do
    assert again.history[-1].test_acc == pytest.approx(final, abs=5e-4)
    out = tmp_path / "grid.png"
    inspected = run_cli("data", "inspect", str(root), "--test-fraction", "0.25", "--out", str(out))
    assert inspected.returncode == 0, inspected.stderr
    assert "10 classes" in inspected.stdout and "28x28" in inspected.stdout and "mean" in inspected.stdout
    assert out.is_file() and Image.open(out).size[0] > 300


@pytest.mark.slow
@needs_data
def test_data_inspect_on_a_builtin_name(tmp_path, data_root):
    out = tmp_path / "f.png"
    proc = run_cli("data", "inspect", "fashion-mnist", "--data-root", str(data_root), "--out", str(out), "--per-class", "4")
    assert proc.returncode == 0, proc.stderr
    assert "60,000 training and 10,000 test" in proc.stdout and "Ankle boot" in proc.stdout
    assert re.search(r"Ankle boot +6,000 +1,000", proc.stdout)  # per-class counts
    assert Image.open(out).size[1] > 400


# ------------------------------------------------------------------ images of any size and mode


def test_images_are_made_square_grey_and_keep_their_background():
    wide = Image.new("RGB", (120, 60), (255, 255, 255))
    wide.paste((200, 0, 0), (50, 10, 70, 50))  # a red block on white paper
    arr = folders.square_grey(wide, 28)
    assert arr.shape == (28, 28) and arr.dtype == np.uint8
    assert arr[0, 0] == 255 and arr[27, 27] == 255  # padding takes the border's colour (white)
    assert arr[14, 14] < 120  # the red block, grey
    dark = folders.square_grey(Image.new("L", (40, 80), 0), 28)
    assert dark.max() == 0
    exact = np.arange(784, dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(folders.square_grey(Image.fromarray(exact), 28), exact)  # used as stored


def test_second_start_uses_the_cache_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    root = tmp_path / "tiny"
    for c in ("a", "b"):
        for i in range(3):
            f = root / "train" / c / f"{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((28, 28), 40 * i + (100 if c == "b" else 0), np.uint8)).save(f)
    first = load_dataset(str(root))
    calls = []
    real = folders.decode
    monkeypatch.setattr(folders, "decode", lambda *a: calls.append(1) or real(*a))
    load_dataset(str(root))
    assert calls == []
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(root / "train" / "a" / "0.png")
    changed = load_dataset(str(root))
    assert calls and not torch.equal(torch.cat([changed.train.images, changed.test.images]).sort(0)[0],
                                     torch.cat([first.train.images, first.test.images]).sort(0)[0])


# ------------------------------------------------------------------ bad data: one line each


def _tree(root: Path, classes=("a", "b"), per=3, split="train") -> Path:
    for c in classes:
        for i in range(per):
            f = root / split / c / f"{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((28, 28), 30 * i, np.uint8)).save(f)
    return root


def _bad_datasets(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    cases = {}
    root = _tree(tmp_path / "truncated")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(root / "train" / "a" / "1.png")
    png = (root / "train" / "a" / "1.png").read_bytes()
    (root / "train" / "a" / "1.png").write_bytes(png[:len(png) * 2 // 3])
    cases["truncated image"] = (root, ["1.png", "corrupt or truncated", "remove or replace"])
    root = _tree(tmp_path / "notimage")
    (root / "train" / "b" / "2.png").write_text("this is text, not a picture")
    cases["not an image"] = (root, ["2.png", "not an image file"])
    root = _tree(tmp_path / "emptyclass")
    (root / "train" / "c").mkdir()
    cases["class folder with no images"] = (root, [str(root / "train" / "c"), "no images"])
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = (tmp_path / "empty", ["no dataset found"])
    root = _tree(_tree(tmp_path / "classes"), classes=("a", "z"), split="test")
    cases["different classes"] = (root, ["different classes", "only in train: b", "only in test: z"])
    root = _tree(tmp_path / "bomb")
    Image.new("1", (8000, 6000)).save(root / "train" / "a" / "huge.png")
    cases["too large"] = (root, ["huge.png", "8000x6000", "more than the 40,000,000"])
    good = ",".join(["0"] * 784)
    rows = "label," + ",".join(f"p{i}" for i in range(784)) + "\n"
    (tmp_path / "short.csv").write_text(rows + f"1,{good}\n2,{good}\n3,{good[:-2]}\n")
    cases["csv row too short"] = (tmp_path / "short.csv", ["short.csv, line 4", "784 values, expected 785"])
    (tmp_path / "pixel.csv").write_text(rows + f"1,{good}\n2,{good[:-1]}300\n")
    cases["csv pixel out of range"] = (tmp_path / "pixel.csv", ["pixel.csv, line 3, column 785", "pixel 300 outside 0-255"])
    (tmp_path / "word.csv").write_text(rows + f"1,{good}\nseven,{good}\n")
    cases["csv label not a number"] = (tmp_path / "word.csv", ["word.csv, line 3, column 1", "'seven' is not an integer"])
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "train.csv").write_text(rows + f"0,{good}\n3,{good}\n")
    (tmp_path / "cls" / "classes.txt").write_text("cat\ndog\nbird\n")
    cases["label outside classes.txt"] = (tmp_path / "cls", ["label 3 is outside the 3 classes", "classes.txt"])
    (tmp_path / "nolabels.csv").write_text(",".join(f"pixel{i}" for i in range(784)) + f"\n{good}\n")
    cases["csv without labels"] = (tmp_path / "nolabels.csv", ["no label column"])
    cases["no such path"] = (tmp_path / "nowhere", ["'" + str(tmp_path / "nowhere") + "'", "no such file or folder"])
    return cases


def test_every_kind_of_bad_data_is_one_line(tmp_path):
    for what, (path, fragments) in _bad_datasets(tmp_path).items():
        proc = run_cli("train", "--dataset", str(path), "--epochs", "1", "--out", str(tmp_path / "runs" / what))
        try:
            assert_user_error(proc, *fragments, code=2)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
        assert not (tmp_path / "runs" / what / "model.safetensors").exists()


def test_unlabelled_test_csv_is_left_out_with_a_note(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["label," + ",".join(f"pixel{i}" for i in range(784))]
    rows += [f"{i % 2}," + ",".join(map(str, rng.integers(0, 256, 784))) for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text(",".join(f"pixel{i}" for i in range(784)) + "\n" + ",".join(["0"] * 784) + "\n")
    data = load_dataset(str(tmp_path))
    assert data.split == "held-out 0.1" and len(data.train) + len(data.test) == 40
    assert any("test.csv has no label column" in n for n in data.notes)


def test_python_api_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="two IDX files for the train images"):
        root = tmp_path / "twice"
        root.mkdir()
        for name in ("train-images-idx3-ubyte", "emnist-train-images-idx3-ubyte"):
            (root / name).write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
        load_dataset(str(root))
    with pytest.raises(DataError, match="test-fraction 1.5"):
        load_dataset(str(tmp_path), test_fraction=1.5)


# ------------------------------------------------------------------ resume and compare on every kind


def _half(data: Dataset) -> Dataset:
    """Every other image: half the data, every class still in it (the images are sorted by class)."""
    return Dataset(data.name, data.classes, *(_split(s.images.numpy()[::2], s.labels.numpy()[::2])
                                              for s in (data.train, data.test)))


def _write_kind(kind: str, root: Path, data: Dataset) -> Path:
    if kind == "images":
        return write_tree(root, data)
    if kind == "csv":
        write_csv(root / "train.csv", data.train)
        write_csv(root / "test.csv", data.test)
        return root
    return write_idx(root, data, data.classes)


@needs_data
@pytest.mark.parametrize("kind", ["images", "csv", "idx"])
def test_interrupted_run_on_a_path_resumes_to_the_straight_result(kind, digits, tmp_path, monkeypatch):
    import lenet.training.runs as runs

    path = _write_kind(kind, tmp_path / kind, _half(digits))
    cfg = TrainConfig(dataset=str(path), **{**RECIPE, "epochs": 3})
    straight = train(cfg, out=tmp_path / "straight")
    real_save = runs.save_checkpoint

    def save_then_stop(p, state):
        real_save(p, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_checkpoint", save_then_stop)
    with pytest.raises(Exception, match="1 of 3 epochs are saved"):
        train(cfg, out=tmp_path / "cut")
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    resumed = resume(tmp_path / "cut")
    assert [h.test_acc for h in resumed.history] == [h.test_acc for h in straight.history]
    for (name, p), q in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.slow
@needs_data
def test_compare_runs_variants_on_paths_relative_to_the_spec(digits, tmp_path):
    from lenet.experiments.compare import load_spec, run_spec

    small = _half(digits)
    for kind in ("images", "csv", "idx"):
        _write_kind(kind, tmp_path / "data" / kind, small)
    spec = tmp_path / "spec.toml"
    spec.write_text('[defaults]\nepochs = 3\nlr = 0.003\noptimizer = "adam"\nset = { activation = "relu", pool = "max" }\n'
                    + "".join(f'[variants.{k}]\ndataset = "data/{k}"\n' for k in ("images", "csv", "idx")))
    rows = run_spec(load_spec(spec), tmp_path / "results")
    accs = [r.acc_mean for r in rows]
    assert accs[0] == accs[1] == accs[2] and accs[0] > 0.3  # the same images: the same result
    bad = tmp_path / "bad.toml"
    bad.write_text('[variants.a]\ndataset = "data/nothing"\n')
    proc = run_cli("compare", str(bad), "--out", str(tmp_path / "r2"))
    assert_user_error(proc, "dataset = 'data/nothing'", "not a built-in dataset", "spec's folder", code=2)


def test_summary_sizes_the_model_for_a_dataset(tmp_path):
    root = _tree(tmp_path / "three", classes=("cat", "dog", "owl"))
    proc = run_cli("summary", "--dataset", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "(1, 3)" in proc.stdout.splitlines()[-4]  # the output layer: one unit per class
    proc = run_cli("summary", "--dataset", str(root), "--set", "num_classes=5")
    assert "(1, 5)" in proc.stdout
