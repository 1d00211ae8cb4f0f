"""Seeing inside: feature-map capture, and the activations / filters / mistakes commands."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from PIL import Image
from torch import nn

from .conftest import assert_user_error, run_cli
from lenet.inspect import visualize
from lenet.data import synthetic_dataset
from lenet.models import create_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion):
    """A run trained for one epoch on 1,024 Fashion-MNIST images (a few seconds)."""
    from lenet.training import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "run"
    small = fashion.head(1024, 2000)
    train(TrainConfig(epochs=1, lr=0.1, overrides={"activation": "relu", "pool": "max"}), data=small, out=out)
    return out


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_stage_outputs_of_classic_are_the_activations():
    model = create_model("classic")
    x = torch.rand(3, 1, 28, 28)
    stages = visualize.conv_stage_outputs(model, x)
    assert [(s.conv, s.name) for s in stages] == [("conv1", "act1"), ("conv2", "act2")]
    assert stages[0].maps.shape == (3, 6, 28, 28) and stages[1].maps.shape == (3, 16, 10, 10)
    assert torch.allclose(stages[0].maps, torch.sigmoid(model.conv1(x)))
    assert model.training  # the mode is restored


@pytest.mark.parametrize("overrides, names", [
    ({"norm": "batch", "activation": "relu"}, ["act1", "act2"]),
    ({"pool": "none", "channels": [4, 8], "dense": [32]}, ["act1", "act2"]),
    ({"channels": [6], "padding": [2]}, ["act1"]),
    ({"channels": [4, 6, 8], "padding": [2, 2, 2]}, ["act1", "act2"]),
])
def test_stage_outputs_follow_the_architecture(overrides, names):
    stages = visualize.conv_stage_outputs(create_model("classic", **overrides), torch.rand(2, 1, 28, 28))
    assert [s.name for s in stages] == names


def test_stage_outputs_do_not_depend_on_layer_names():
    model = nn.Sequential(OrderedDict([
        ("c1", nn.Conv2d(1, 3, 5, padding=2)), ("squash", nn.Tanh()), ("s2", nn.AvgPool2d(2)),
        ("block", nn.Sequential(nn.Conv2d(3, 5, 5), nn.ReLU())), ("s4", nn.MaxPool2d(2)),
        ("flat", nn.Flatten()), ("head", nn.Linear(125, 10))]))
    stages = visualize.conv_stage_outputs(model, torch.rand(1, 1, 28, 28))
    assert [(s.conv, s.name, tuple(s.maps.shape)) for s in stages] == [
        ("c1", "squash", (1, 3, 28, 28)), ("block", "block", (1, 5, 10, 10))]
    with pytest.raises(visualize.VisualizeError, match="no convolution"):
        visualize.conv_stage_outputs(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), torch.rand(1, 1, 28, 28))


def test_pick_images_by_index_and_class():
    data = synthetic_dataset(64, 50)
    labels = data.test.labels.tolist()
    picked = visualize.pick_images(data, [3], ["CLASS2", "class7"], per_class=2)
    assert picked[0] == 3
    assert [labels[i] for i in picked[1:]] == [2, 2, 7, 7]
    assert picked[1:3] == [i for i, c in enumerate(labels) if c == 2][:2]
    with pytest.raises(visualize.VisualizeError, match=r"--index 50 is out of range.*0\.\.49"):
        visualize.pick_images(data, [50])
    with pytest.raises(visualize.VisualizeError, match="unknown class 'Sweater': choose from 'class0'"):
        visualize.pick_images(data, [], ["Sweater"])


def test_confident_mistakes_are_wrong_and_sorted():
    data = synthetic_dataset(64, 200)
    torch.manual_seed(0)
    mistakes, wrong = visualize.confident_mistakes(create_model("classic"), data, count=7)
    assert len(mistakes) == min(7, wrong) and wrong > 0
    assert all(m.true != m.pred for m in mistakes)
    assert [m.confidence for m in mistakes] == sorted((m.confidence for m in mistakes), reverse=True)


@pytest.mark.slow
def test_activations_filters_mistakes_commands(run_dir, tmp_path):
    out = tmp_path / "act.png"
    proc = run_cli("activations", str(run_dir), "--class", "Pullover", "--class", "coat", "--index", "5",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "test images 5, 1, 6" in proc.stdout  # the index first, then the first Pullover, the first Coat
    w, h = _png_size(out)
    assert w > 600 and h > 400

    proc = run_cli("activations", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "test images 0, 1 saved to" in proc.stdout  # by default the first two test images
    w2, h2 = _png_size(run_dir / "activations.png")
    assert w2 == w and 300 < h2 < h  # the same columns, two rows of images instead of three

    out = tmp_path / "sub" / "filters.png"
    proc = run_cli("filters", str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out)[0] > 300

    out = tmp_path / "mistakes.png"
    proc = run_cli("mistakes", str(run_dir), "--count", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    listed = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    assert len(listed) == 5 and all("confidence" in line for line in listed)
    assert "test images misclassified" in proc.stdout
    w, h = _png_size(out)
    assert w > 800 and 200 < h < 400 and w > 3 * h  # one row of five images


def test_bad_choices_are_one_line_errors(run_dir, tmp_path):
    assert_user_error(run_cli("activations", str(run_dir), "--class", "Sweater"),
                      "unknown class 'Sweater'", "'Pullover'", "'Coat'", code=2)
    assert_user_error(run_cli("activations", str(run_dir), "--index", "10000"),
                      "--index 10000 is out of range", "0..9999", code=2)
    assert_user_error(run_cli("activations", str(run_dir), "--index", "-1"), "--index -1", code=2)
    assert_user_error(run_cli("activations", str(run_dir), "--out", str(tmp_path / "a.jpg")), ".png", code=2)
    for command in ("activations", "filters", "mistakes"):
        assert_user_error(run_cli(command, str(tmp_path / "missing")), "run folder", "not found", code=2)
    assert_user_error(run_cli("mistakes", str(run_dir), "--count", "0"), "--count", code=2)


def test_lenet5_stages_are_c1_and_c3():
    """LeNet-5's C3 is a partially connected conv (not nn.Conv2d): it is still the second stage."""
    import torch

    from lenet.models import create_model
    from lenet.inspect.visualize import conv_stage_outputs

    stages = conv_stage_outputs(create_model("lenet5"), torch.rand(2, 1, 28, 28))
    assert [(s.conv, tuple(s.maps.shape[1:])) for s in stages] == [("c1", (6, 28, 28)), ("c3", (16, 10, 10))]
