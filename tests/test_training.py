"""The training engine and the CLI end to end, on real data where it matters."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from lenet.data import synthetic_dataset
from lenet.errors import ConfigError, TrainingDiverged
from lenet.training.runs import load_run
from lenet.training import TrainConfig, train

from .conftest import needs_data, run_cli


def test_same_seed_gives_identical_metrics_and_weights():
    ds = synthetic_dataset(1024, 256)
    a = train(TrainConfig(epochs=2, batch_size=64, lr=0.5), data=ds)
    b = train(TrainConfig(epochs=2, batch_size=64, lr=0.5), data=ds)
    assert [(h.train_loss, h.train_acc, h.test_acc) for h in a.history] == \
           [(h.train_loss, h.train_acc, h.test_acc) for h in b.history]
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), k
    c = train(TrainConfig(epochs=2, batch_size=64, lr=0.5, seed=1), data=ds)
    assert c.history[-1].train_loss != a.history[-1].train_loss


def test_curve_has_five_points_per_epoch_plus_test_acc():
    r = train(TrainConfig(epochs=2, batch_size=64, lr=0.5), data=synthetic_dataset(640, 64))
    train_pts = [p for p in r.curve if p["train_loss"] is not None]
    test_pts = [p for p in r.curve if p["test_acc"] is not None]
    assert len(train_pts) == 10 and [p["epoch"] for p in test_pts] == [1.0, 2.0]
    assert train_pts[4]["epoch"] == pytest.approx(1.0) and train_pts[0]["epoch"] == pytest.approx(0.2)


def test_divergence_stops_with_step_and_advice(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step \d+: .*--lr 5"):
        train(TrainConfig(epochs=2, lr=50, overrides={"activation": "relu"}), data=synthetic_dataset(2048, 64))


def test_bad_train_config_values(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    for kwargs, msg in [({"epochs": 0}, "--epochs 0"), ({"batch_size": 0}, "--batch-size 0"),
                        ({"lr": -1.0}, "--lr -1.0"), ({"optimizer": "rmsprop"}, "--optimizer 'rmsprop'"),
                        ({"device": "cuda"}, "no CUDA GPU"), ({"model": "alexnet"}, "unknown model 'alexnet'")]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            train(TrainConfig(**kwargs), data=synthetic_dataset(64, 16))


@pytest.mark.slow
@needs_data
def test_real_short_run_beats_chance(fashion):
    """Two epochs of the book's recipe on the full Fashion-MNIST: far above the 10% of chance."""
    r = train(TrainConfig(epochs=2))
    assert r.history[-1].test_acc > 0.5
    assert r.history[-1].train_loss < r.history[0].train_loss < 2.5


@pytest.mark.slow
@needs_data
def test_cli_train_then_evaluate(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--epochs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^loss \d\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}$", proc.stdout, re.M)
    assert re.search(r"^\d+\.\d examples/sec on cpu$", proc.stdout, re.M)
    assert re.search(r"^\d+\.\d s of training \(eager, (batch-last conv kernels|PyTorch convolutions)\)$",
                     proc.stdout, re.M)
    assert re.search(r"^epoch 2/2: loss ", proc.stdout, re.M)
    for name in ("config.json", "metrics.csv", "curve.csv", "curves.png", "model.safetensors", "checkpoint.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "classic" and config["train"]["lr"] == 0.9 and config["train"]["batch_size"] == 256
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert len(list(csv.DictReader(open(out / "curve.csv")))) == 12
    test_acc = float(rows[-1]["test_acc"])
    assert test_acc > 0.5

    ev = run_cli("evaluate", str(out))
    assert ev.returncode == 0, ev.stderr
    assert f"test accuracy {test_acc:.4f}" in ev.stdout
    assert "Ankle boot" in ev.stdout and "confusion matrix" in ev.stdout
    assert (out / "confusion.png").is_file()
    run = load_run(out)
    assert run.classes[0] == "T-shirt/top"


def test_data_cli_where_and_verify(data_root):
    where = run_cli("data", "where")
    assert where.returncode == 0 and f"fashion-mnist: found in {data_root / 'fashion-mnist'}" in where.stdout
    verify = run_cli("data", "verify", "--dataset", "mnist")
    assert verify.returncode == 0, verify.stderr
    assert "mnist: all 4 files match their checksums" in verify.stdout
