"""Augmentation in the training step: what each transformation does to a batch, and where it is refused."""

from __future__ import annotations

import pytest
import torch

from lenet.errors import ConfigError
from lenet.training import TrainConfig, train
from lenet.training.augment import augment


def _moved(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image (..., H, W) moved down by dy and right by dx, zeros coming in."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@pytest.mark.parametrize("shape", [(64, 9, 7), (64, 3, 9, 7)])  # grey (N, H, W) and colour (N, C, H, W)
def test_each_image_is_itself_moved_by_at_most_shift_and_maybe_mirrored(shape):
    torch.manual_seed(0)
    x = torch.randint(1, 256, shape, dtype=torch.uint8)  # no zeros: every move shows
    out = augment(x, shift=2, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    seen_moves, mirrored = set(), 0
    for image, got in zip(x, out):
        matches = [(dy, dx, m) for m in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(got, _moved(image.flip(-1) if m else image, dy, dx))]
        assert len(matches) == 1, "each output is exactly one move of its own input"
        seen_moves.add(matches[0][:2])
        mirrored += matches[0][2]
    assert len(seen_moves) > 15 and 16 < mirrored < 48  # 25 moves, half mirrored: drawn per example


def test_nothing_asked_nothing_done():
    x = torch.randint(0, 256, (8, 5, 5), dtype=torch.uint8)
    assert augment(x) is x
    torch.manual_seed(1)
    flipped = augment(x, flip=True)
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x))


@pytest.mark.parametrize("shape", [(37, 28, 28), (37, 3, 9, 7)])
def test_mirror_images_alone_equal_the_gather_and_leave_the_same_random_stream(shape):
    """The flip-only path (no index built) gives the gather's batch and leaves torch's RNG where
    the gather leaves it, so recorded runs (record-fashion) keep their trajectories."""
    from lenet.training.augment import _gather, _mirror
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    torch.manual_seed(5)
    want, want_next = _gather(x, 0, True), torch.rand(4)
    torch.manual_seed(5)
    got, got_next = _mirror(x), torch.rand(4)
    assert torch.equal(got, want) and torch.equal(got_next, want_next)
    assert not torch.equal(got, x)  # (some examples were mirrored)


def test_augmentation_follows_the_seed():
    x = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    torch.manual_seed(3)
    a = augment(x, 1, True)
    torch.manual_seed(3)
    assert torch.equal(augment(x, 1, True), a)


def test_a_model_with_its_own_loss_refuses_label_smoothing():
    from lenet.data import synthetic_dataset

    with pytest.raises(ConfigError, match=r"--label-smoothing 0.1: this model trains with its own loss \(LeNet5"):
        train(TrainConfig.for_model("lenet5", epochs=1, label_smoothing=0.1), data=synthetic_dataset(64, 16))


@pytest.mark.slow
def test_augmented_training_learns_and_records_its_recipe(fashion, tmp_path):
    import json

    result = train(TrainConfig(epochs=1, lr=0.003, optimizer="adam", shift=2, flip=True, label_smoothing=0.1,
                               overrides={"activation": "relu", "pool": "max"}),
                   data=fashion.head(3000, 500), out=tmp_path / "run")
    assert result.test_acc > 0.5  # chance is 0.1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    train_cfg = saved.get("train", saved)
    assert (train_cfg["shift"], train_cfg["flip"], train_cfg["label_smoothing"]) == (2, True, 0.1)


def test_test_time_flips_average_the_probabilities_of_the_two_views():
    from lenet.inspect.evaluation import mirror_averaged

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 4))
    x = torch.rand(6, 4, 5)
    want = ((net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2).log()
    torch.testing.assert_close(mirror_averaged(net, x), want)
    symmetric = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 4))
    with torch.no_grad():  # a model that cannot tell an image from its mirror: nothing changes
        w = symmetric[1].weight.view(4, 4, 5)
        w.copy_((w + w.flip(-1)) / 2)
    torch.testing.assert_close(mirror_averaged(symmetric, x), symmetric(x).log_softmax(1))


@pytest.mark.slow
def test_a_run_with_test_flips_is_evaluated_the_same_way_afterwards(fashion, data_root, tmp_path):
    """The training loop's evaluator and `lenet evaluate` (which reads the run's recipe) agree."""
    from .conftest import run_cli

    result = train(TrainConfig(epochs=1, lr=0.003, optimizer="adam", flip=True, test_flip=True,
                               overrides={"activation": "relu", "pool": "max"}),
                   data=fashion.head(2000, 10000), out=tmp_path / "run")  # the test set `lenet evaluate` reads
    plain = train(TrainConfig(epochs=1, lr=0.003, optimizer="adam", flip=True,
                              overrides={"activation": "relu", "pool": "max"}), data=fashion.head(2000, 10000))
    assert result.test_acc != plain.test_acc  # the same weights, evaluated two ways
    proc = run_cli("evaluate", str(tmp_path / "run"), "--data-root", str(data_root), "--out",
                   str(tmp_path / "cm.png"))
    assert proc.returncode == 0, proc.stderr
    assert f"test accuracy {result.test_acc:.4f}" in proc.stdout

