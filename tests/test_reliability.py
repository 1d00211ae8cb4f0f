"""Nothing lost, nothing trusted blindly: resume after SIGKILL, Ctrl-C, safe loading, bad input."""

from __future__ import annotations

import csv
import errno
import gzip
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lenet.training import runs
from lenet.errors import CheckpointError, LenetError
from lenet.models import create_model
from lenet.training import TrainConfig, resume, train

from .conftest import REPO, assert_user_error, needs_data, run_cli


def metrics(run_dir: Path) -> list[tuple[str, str, str, str]]:
    with open(run_dir / "metrics.csv") as fh:
        return [(r["epoch"], r["train_loss"], r["train_acc"], r["test_acc"]) for r in csv.DictReader(fh)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return runs.load_weights_file(run_dir / "model.safetensors")[0]


def start_training(out: Path, epochs: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "lenet", "train", "--epochs", str(epochs), "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.csv").is_file() and len(metrics(out)) >= n and (out / "checkpoint.pt").is_file():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the epoch in time")


@needs_data
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    epochs = 3
    straight = tmp_path / "straight"
    proc = run_cli("train", "--epochs", str(epochs), "--out", str(straight), "--no-progress")
    assert proc.returncode == 0, proc.stderr

    killed = tmp_path / "killed"
    p = start_training(killed, epochs)
    wait_for_epochs(killed, 1, p)
    time.sleep(1.0)  # well inside epoch 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(metrics(killed)) < epochs and not (killed / "model.safetensors").exists()

    resumed = run_cli("train", "--resume", str(killed), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert metrics(killed) == metrics(straight)
    a, b = weights(killed), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_data
def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    p = start_training(out, 4)
    wait_for_epochs(out, 1, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert "Traceback" not in err
    assert f"continue with `lenet train --resume {out}`" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    state = runs.load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == len(metrics(out)) >= 1


def test_resume_in_process_equals_straight_run(tmp_path):
    from lenet.data import synthetic_dataset

    ds = synthetic_dataset(512, 128)
    straight = train(TrainConfig(epochs=3, batch_size=64, lr=0.5), data=ds, out=tmp_path / "a")
    train(TrainConfig(epochs=3, batch_size=64, lr=0.5), data=ds, out=tmp_path / "b")
    # roll run b back to its epoch-1 checkpoint, as if it had died in epoch 2
    state = runs.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    first = train(TrainConfig(epochs=1, batch_size=64, lr=0.5), data=ds, out=tmp_path / "c")
    shutil.copy(tmp_path / "c" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    assert state["epoch"] == 3 and first.history[0].epoch == 1
    again = resume(tmp_path / "b", data=ds)
    assert [(h.train_loss, h.test_acc) for h in again.history] == [(h.train_loss, h.test_acc) for h in straight.history]


def test_resume_without_checkpoint_or_run(tmp_path):
    with pytest.raises(CheckpointError, match="run folder .* not found"):
        resume(tmp_path / "nothing")
    (tmp_path / "r").mkdir()
    runs.write_json(tmp_path / "r" / "config.json", {"model": "classic", "model_config": {}, "dataset": "mnist",
                                                     "classes": list("0123456789"), "train": {}})
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        resume(tmp_path / "r")


# ---------------------------------------------------------------- safe loading


@pytest.fixture()
def tiny_run(tmp_path):
    from lenet.data import synthetic_dataset

    out = tmp_path / "tiny"
    train(TrainConfig(epochs=1, batch_size=64), data=synthetic_dataset(256, 64), out=out)
    return out


def test_truncated_and_tampered_weights(tiny_run):
    w = tiny_run / "model.safetensors"
    blob = w.read_bytes()
    w.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        runs.load_run(tiny_run)
    w.write_bytes(b"\xff" * 8 + blob[8:])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        runs.load_run(tiny_run)
    w.unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        runs.load_run(tiny_run)


def test_weights_of_another_model_are_refused(tiny_run):
    other = create_model("classic", channels=(8, 16))
    runs.save_weights(other, tiny_run / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"conv1.weight has shape \(8, 1, 5, 5\), the model expects \(6, 1, 5, 5\)"):
        runs.load_run(tiny_run)
    runs.save_weights(create_model("classic", dense=(120,)), tiny_run / "model.safetensors")
    with pytest.raises(CheckpointError, match="belongs to another model"):
        runs.load_run(tiny_run)


def test_checkpoint_never_runs_code(tiny_run, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tiny_run / "checkpoint.pt").write_bytes(pickle.dumps({"epoch": 1, "model": Exploit()}))
    with pytest.raises(CheckpointError, match="checkpoint.pt: unreadable checkpoint"):
        resume(tiny_run)
    assert not marker.exists()
    (tiny_run / "checkpoint.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        resume(tiny_run)


def test_checkpoint_for_other_model_is_refused(tiny_run):
    state = runs.load_checkpoint(tiny_run / "checkpoint.pt")
    state["model"] = create_model("classic", channels=(8, 16)).state_dict()
    runs.save_checkpoint(tiny_run / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="conv1.weight has shape"):
        resume(tiny_run)


def test_existing_run_folder_is_not_overwritten(tiny_run):
    before = (tiny_run / "model.safetensors").read_bytes()
    with pytest.raises(LenetError, match="already exists: pass --overwrite"):
        runs.prepare_run_dir(tiny_run)
    assert (tiny_run / "model.safetensors").read_bytes() == before
    runs.prepare_run_dir(tiny_run, overwrite=True)
    assert not (tiny_run / "model.safetensors").exists()


def test_full_disk_is_detected_before_training(tmp_path, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if str(path).endswith(".write-test"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(LenetError, match="cannot write to run folder .*No space left on device"):
        runs.prepare_run_dir(tmp_path / "out")


# ---------------------------------------------------------------- the CLI on bad input


@pytest.mark.parametrize("args, fragments", [
    (["train", "--epochs", "-1"], ["argument --epochs: -1 must be an integer >= 1"]),
    (["train", "--epochs", "ten"], ["argument --epochs: 'ten' is not an integer"]),
    (["train", "--batch-size", "0"], ["argument --batch-size: 0 must be an integer >= 1"]),
    (["train", "--lr", "-0.1"], ["argument --lr: -0.1 must be a positive number"]),
    (["train", "--model", "alexnet"], ["unknown model 'alexnet'", "classic"]),
    (["train", "--dataset", "cifar10"], ["argument --dataset: invalid choice: 'cifar10'"]),
    (["train", "--set", "colour=blue"], ["unknown model setting 'colour'"]),
    (["train", "--set", "channels=six"], ["--set channels=six: expected comma-separated integers"]),
    (["train", "--set", "pool"], ["'pool' is not key=value"]),
    (["train", "--set", "kernel_size=13", "--set", "padding=0"], ["conv2: a 13x13 kernel does not fit the 8x8 map from pool1"]),
    (["train", "--device", "cuda"], ["no CUDA GPU is available"]),
    (["evaluate", "/nonexistent/run"], ["run folder /nonexistent/run not found"]),
    (["bogus"], ["invalid choice: 'bogus'"]),
])
def test_cli_bad_flags(args, fragments, tmp_path):
    proc = run_cli(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else run_cli(*args)
    assert_user_error(proc, *fragments, code=2)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_missing_data_folder(tmp_path):
    proc = run_cli("train", "--data-root", str(tmp_path / "absent"), "--out", str(tmp_path / "o"))
    assert_user_error(proc, f"data root {tmp_path / 'absent'} (from --data-root) is not a folder", code=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("train", "--dataset", "mnist", "--data-root", str(empty), "--out", str(tmp_path / "o"),
                   env={"LENET_CACHE_DIR": str(tmp_path / "cache")})
    assert_user_error(proc, "mnist data not found", "lenet data fetch", code=2)


def _data_copy(tmp_path: Path, data_root: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(data_root / "mnist", root / "mnist")
    return root


def _write_idx_gz(path: Path, header: bytes, body: bytes) -> None:
    path.write_bytes(gzip.compress(header + body))


@needs_data
@pytest.mark.parametrize("case, fragments", [
    ("truncated_gzip", ["t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip"]),
    ("empty", ["t10k-labels-idx1-ubyte.gz: file is empty"]),
    ("wrong_magic", ["t10k-labels-idx1-ubyte.gz: bad IDX magic"]),
    ("size_mismatch", ["t10k-labels-idx1-ubyte.gz: truncated: header declares 10000 = 10000 bytes of data, file has 9000"]),
    ("count_mismatch", ["t10k-labels-idx1-ubyte.gz: 9000 labels for 10000 images"]),
    ("label_range", ["t10k-labels-idx1-ubyte.gz: label 12 outside the class range 0..9"]),
    ("checksum", ["t10k-labels-idx1-ubyte.gz: checksum mismatch"]),
])
def test_cli_corrupt_data(case, fragments, tmp_path, data_root):
    """Each kind of damaged file, read without checksum verification so the reader's own checks speak."""
    root = _data_copy(tmp_path, data_root)
    target = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels = gzip.decompress(target.read_bytes())
    header, body = labels[:8], labels[8:]
    if case == "truncated_gzip":
        target.write_bytes(target.read_bytes()[:-100])
    elif case == "empty":
        target.write_bytes(b"")
    elif case == "wrong_magic":
        _write_idx_gz(target, b"\x01\x02" + header[2:], body)
    elif case == "size_mismatch":
        _write_idx_gz(target, header, body[:9000])
    elif case == "count_mismatch":
        _write_idx_gz(target, header[:4] + (9000).to_bytes(4, "big"), body[:9000])
    elif case == "label_range":
        _write_idx_gz(target, header, bytes([12]) + body[1:])
    elif case == "checksum":
        _write_idx_gz(target, header, bytes([(body[0] + 1) % 10]) + body[1:])
    cache = tmp_path / "cache"
    if case == "checksum":
        proc = run_cli("data", "verify", "--dataset", "mnist", "--data-root", str(root), env={"LENET_CACHE_DIR": str(cache)})
    else:
        from lenet.data import load_dataset

        with pytest.raises(LenetError) as exc:
            load_dataset("mnist", root, download=False, verify_checksums=False)
        for fragment in fragments:
            assert fragment in str(exc.value)
        proc = run_cli("train", "--dataset", "mnist", "--data-root", str(root), "--out", str(tmp_path / "o"),
                       env={"LENET_CACHE_DIR": str(cache)})
        fragments = ["t10k-labels-idx1-ubyte.gz: "]  # with verification on, the checksum or gzip check fires first
    assert_user_error(proc, *fragments, code=2)


def test_cli_refuses_existing_run_and_unwritable_out(tiny_run, tmp_path):
    proc = run_cli("train", "--out", str(tiny_run))
    assert_user_error(proc, f"run folder {tiny_run} already exists: pass --overwrite", code=2)
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_cli("train", "--out", str(afile / "run"))
    assert_user_error(proc, "cannot write to run folder", code=2)


def test_cli_divergence_exit_code(tmp_path):
    script = ("import sys; from lenet.cli import main; from lenet import data;"
              "data.load_dataset = lambda *a, **k: data.synthetic_dataset(2048, 64);"
              "import lenet.training as t; t.load_dataset = data.load_dataset;"
              f"sys.exit(main(['train', '--set', 'activation=relu', '--lr', '50', '--out', r'{tmp_path / 'd'}', '--no-progress']))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert_user_error(proc, "training diverged; try a lower learning rate (e.g. --lr 5)", code=3)


def test_cli_bad_checkpoint_on_resume(tiny_run):
    (tiny_run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = run_cli("train", "--resume", str(tiny_run))
    assert_user_error(proc, "checkpoint.pt: unreadable checkpoint", code=2)
    (tiny_run / "model.safetensors").write_bytes(b"\x00" * 20)
    proc = run_cli("evaluate", str(tiny_run))
    assert_user_error(proc, "model.safetensors: not a valid safetensors file", code=2)


@pytest.mark.parametrize("args, fragments", [
    (["--resume", "RUN", "--epochs", "5", "--model", "modern"], ["drop --model, --epochs"]),
    (["--optimizer", "momentum", "--momentum", "-1"], ["argument --momentum: -1 must be in [0, 1)"]),
])
def test_cli_resume_flags_and_momentum(args, fragments, tiny_run):
    args = [str(tiny_run) if a == "RUN" else a for a in args]
    proc = run_cli("train", *args, *([] if "--resume" in args else ["--out", str(tiny_run.parent / "m")]))
    assert_user_error(proc, *fragments, code=2)


def test_onecycle_keeps_plain_sgd_and_sdlm_without_momentum():
    from lenet.data import synthetic_dataset

    for optimizer in ("sgd", "sdlm"):
        r = train(TrainConfig(epochs=1, batch_size=64, lr=0.05, optimizer=optimizer, schedule="onecycle"),
                  data=synthetic_dataset(256, 64))
        assert r.history[-1].train_loss == r.history[-1].train_loss  # ran, no NaN


def test_evaluate_bad_out_is_one_line(tiny_run, tmp_path):
    runs.write_json(tiny_run / "config.json", {**runs.read_config(tiny_run), "dataset": "mnist"})
    proc = run_cli("evaluate", str(tiny_run), "--out", str(tmp_path / "c.txt"))
    assert_user_error(proc, "give a .png file name", code=2)
