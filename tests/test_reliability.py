"""Nothing lost, nothing trusted blindly: resume after SIGKILL, Ctrl-C, safe loading, bad input."""

from __future__ import annotations

import csv
import dataclasses
import errno
import gzip
import json
import math
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lenet.training import engine, runs
from lenet.errors import CheckpointError, Interrupted, LenetError
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


# Recipes whose state outlives an epoch: momentum buffers or Adam's moments, a schedule that moves
# the learning rate (and one-cycle the momentum) every step, dropout drawing from torch's global
# RNG. A resume that dropped any of them would continue differently from the uninterrupted run.
RESUME_RECIPES = [
    pytest.param({"optimizer": "momentum", "schedule": "onecycle", "lr": 0.1, "shift": 2, "flip": True,
                  "label_smoothing": 0.1}, id="momentum-onecycle-augmented"),  # augmentations drawn again alike
    pytest.param({"optimizer": "adam", "schedule": "cosine", "lr": 0.002}, id="adam-cosine"),
]
RESUME_EPOCHS, RESUME_STEPS = 3, 8  # 8 steps per epoch: 2,000 images in batches of 256
DIE_AT_STEP = RESUME_STEPS + RESUME_STEPS // 2  # the middle of epoch 2


def resume_config(recipe: dict) -> TrainConfig:
    return TrainConfig(epochs=RESUME_EPOCHS, **recipe, overrides={"dropout": 0.3})


def assert_same_run(run_dir: Path, straight_dir: Path, result, straight) -> None:
    """The resumed run ended exactly as the uninterrupted one: metrics, and every final weight."""
    assert metrics(run_dir) == metrics(straight_dir)
    assert [(h.epoch, h.train_loss, h.train_acc, h.test_acc) for h in result.history] == \
           [(h.epoch, h.train_loss, h.train_acc, h.test_acc) for h in straight.history]
    a, b = weights(run_dir), weights(straight_dir)
    assert a.keys() == b.keys() == set(straight.model.state_dict())
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the resume"


# Run in a process of its own: trains the recipe on the first 2,000 Fashion-MNIST images into a run
# folder, says so on stdout when it is in the middle of epoch 2 (weights, optimizer, schedule and
# RNGs moved past the epoch-1 checkpoint), then waits there for the test's SIGKILL.
KILLED_RUN = """
import json, sys
from lenet.data import load_dataset
from lenet.training import TrainConfig, engine, train

out, stop_after, saved = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
data = load_dataset("fashion-mnist", download=False, log=lambda s: None).head(2000, 500)
real_step, calls = engine.TrainStep.__call__, [0]

def step(self, x, y):
    result = real_step(self, x, y)
    calls[0] += 1
    if calls[0] == stop_after:
        print(f"in the middle of the run, after step {calls[0]}", flush=True)
        sys.stdin.readline()  # the test kills the process here
        sys.exit("not killed")
    return result

engine.TrainStep.__call__ = step
train(TrainConfig.from_dict(saved), data=data, out=out)
sys.exit("the run ended before the kill")
"""


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("recipe", RESUME_RECIPES)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(recipe, fashion, tmp_path):
    cfg = resume_config(recipe)
    data = fashion.head(2000, 500)
    straight = train(cfg, data=data, out=tmp_path / "straight")
    assert len(straight.history) == RESUME_EPOCHS

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(killed), str(DIE_AT_STEP),
                          json.dumps(dataclasses.asdict(cfg))],
                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 300)
        assert ready, "the run did not reach the middle of epoch 2 in 5 minutes"
        line = p.stdout.readline()
        assert line == f"in the middle of the run, after step {DIE_AT_STEP}\n", (line, p.communicate()[1])
        state = runs.load_checkpoint(killed / "checkpoint.pt")
        assert state["epoch"] == 1 < RESUME_EPOCHS  # the last checkpoint is epoch 1's; epoch 2 is running
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL  # died of the kill, mid-run: no chance to save anything
    assert len(metrics(killed)) == 1 and not (killed / "model.safetensors").exists()

    notes = []
    resumed = resume(killed, data=data, log=notes.append)
    assert f"resuming {killed} at epoch 2/{RESUME_EPOCHS}" in notes
    assert_same_run(killed, tmp_path / "straight", resumed, straight)


@pytest.mark.slow
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


@pytest.mark.parametrize("recipe", RESUME_RECIPES)
def test_resume_in_process_equals_straight_run(recipe, tmp_path, monkeypatch):
    from lenet.data import synthetic_dataset

    ds = synthetic_dataset(512, 128)  # batches of 64: 8 steps per epoch, as above
    cfg = dataclasses.replace(resume_config(recipe), batch_size=64)
    straight = train(cfg, data=ds, out=tmp_path / "a")

    # run b dies in the middle of epoch 2, after its state moved past the epoch-1 checkpoint
    real_step, calls = engine.TrainStep.__call__, []

    def dying_step(self, x, y):
        result = real_step(self, x, y)
        calls.append(1)
        if len(calls) == DIE_AT_STEP:
            raise KeyboardInterrupt
        return result

    with monkeypatch.context() as m:
        m.setattr(engine.TrainStep, "__call__", dying_step)
        with pytest.raises(Interrupted, match="1 of 3 epochs are saved"):
            train(cfg, data=ds, out=tmp_path / "b")
    assert len(calls) == DIE_AT_STEP
    assert runs.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "b" / "model.safetensors").exists()

    again = resume(tmp_path / "b", data=ds)
    assert_same_run(tmp_path / "b", tmp_path / "a", again, straight)
    for (name, p), q in zip(again.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(p, q), name


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
    (["train", "--dataset", "cifar10"], ["dataset 'cifar10': not a built-in one (fashion-mnist, mnist) and no such file or folder"]),
    (["train", "--set", "colour=blue"], ["unknown model setting 'colour'"]),
    (["train", "--set", "channels=six"], ["--set channels=six: expected comma-separated integers"]),
    (["train", "--set", "pool"], ["'pool' is not key=value"]),
    (["train", "--set", "kernel_size=13", "--set", "padding=0"], ["conv2: a 13x13 kernel does not fit the 8x8 map from pool1"]),
    (["train", "--device", "cuda"], ["no CUDA GPU is available"]),
    (["evaluate", "/nonexistent/run"], ["run folder /nonexistent/run not found"]),
    (["bogus"], ["invalid choice: 'bogus'"]),
])
def test_cli_bad_flags(args, fragments, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # "--device cuda" as on a machine without a GPU
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


@pytest.mark.slow
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


@pytest.mark.parametrize("optimizer", ["sgd", "sdlm", "momentum", "adam"])
def test_onecycle_cycles_momentum_only_where_the_optimizer_has_one(optimizer, monkeypatch):
    """Plain SGD and SDLM keep no momentum through the whole schedule; SGD with momentum and Adam
    (its beta1) are cycled 0.95 -> 0.85 -> 0.95 around their configured 0.9."""
    from lenet.data import synthetic_dataset

    real_step, seen = engine.TrainStep.__call__, []

    def recording_step(self, x, y):
        group = self.optimizer.param_groups[0]
        seen.append(group["betas"][0] if "betas" in group else group.get("momentum"))  # for this step
        return real_step(self, x, y)

    monkeypatch.setattr(engine.TrainStep, "__call__", recording_step)
    r = train(TrainConfig(epochs=2, batch_size=64, lr=0.01, optimizer=optimizer, schedule="onecycle"),
              data=synthetic_dataset(256, 64))
    assert all(math.isfinite(h.train_loss) for h in r.history)  # ran, no NaN or infinity
    assert len(seen) == 8  # 2 epochs of 4 steps
    if optimizer == "sgd":
        assert seen == [0] * 8
    elif optimizer == "sdlm":
        assert seen == [None] * 8  # SDLM has no momentum to cycle
    else:
        assert seen[0] == pytest.approx(0.95) and seen[-1] > 0.9  # starts (and ends) high,
        assert min(seen) < 0.87  # dips towards 0.85 mid-run: not the constant 0.9 of the recipe


def test_evaluate_bad_out_is_one_line(tiny_run, tmp_path):
    runs.write_json(tiny_run / "config.json", {**runs.read_config(tiny_run), "dataset": "mnist"})
    proc = run_cli("evaluate", str(tiny_run), "--out", str(tmp_path / "c.txt"))
    assert_user_error(proc, "give a .png file name", code=2)
