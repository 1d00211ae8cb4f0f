"""`lenet compare`: spec parsing and its errors, a tiny real comparison, skipping and redoing runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from .conftest import REPO, assert_user_error, run_cli
from lenet.experiments.compare import MARKER, load_spec, parse_spec, run_spec
from lenet.errors import ConfigError

TINY = """
title = "tiny"

[defaults]
epochs = 1
seeds = [0, 1]
train_limit = 512
test_limit = 256

[variants.baseline]
description = "textbook"

[variants.max-relu]
description = "max pooling + ReLU"
set = { pool = "max", activation = "relu" }
lr = 0.1
"""


def test_defaults_are_merged_in_file_order():
    spec = parse_spec("""
[defaults]
lr = 0.5
seeds = [3, 4]
set = { pool = "max", dense = [100] }
[variants.b]
[variants.a]
set = { activation = "relu" }
epochs = 2
dataset = "mnist"
""", "x.toml")
    assert [v.name for v in spec.variants] == ["b", "a"]
    b, a = spec.variants
    assert (b.lr, b.seeds, b.epochs, b.dataset, b.model) == (0.5, [3, 4], 10, "fashion-mnist", "classic")
    assert b.overrides == {"pool": "max", "dense": [100]}
    assert a.overrides == {"pool": "max", "dense": [100], "activation": "relu"}
    assert (a.epochs, a.dataset) == (2, "mnist")
    assert a.train_config(4, None).seed == 4


def test_exercises_spec_is_valid_and_covers_the_chapter():
    spec = load_spec(REPO / "experiments" / "exercises.toml")
    names = {v.name for v in spec.variants}
    assert {"baseline", "pool-max", "relu", "kernel3", "kernel7", "conv-1", "conv-3", "dense-1",
            "dense-2", "epochs20", "init-default", "mnist-baseline"} <= names
    assert all(len(v.seeds) == 2 for v in spec.variants)
    assert {v.dataset for v in spec.variants} == {"fashion-mnist", "mnist"}
    assert all(v.train_limit is None and v.test_limit is None for v in spec.variants)


@pytest.mark.parametrize("text, fragments", [
    ("[variants.a]\nepochs = 'ten'", ["variant 'a'", "epochs = 'ten'", "integer"]),
    ("[variants.a]\nepochs = 0", ["epochs = 0", ">= 1"]),
    ("[variants.a]\nlr = -1", ["lr = -1", "positive"]),
    ("[variants.a]\nlearning_rate = 0.1", ["variant 'a'", "unknown key 'learning_rate'", "known keys"]),
    ("[variants.a]\nmodel = 'resnet'", ["variant 'a'", "model = 'resnet'", "classic"]),
    ("[defaults]\ndataset = 'cifar'\n[variants.a]", ["variant 'a'", "dataset = 'cifar' (from [defaults])",
                                                    "fashion-mnist"]),
    ("[variants.a]\noptimizer = 'lbfgs'", ["optimizer = 'lbfgs'", "momentum"]),
    ("[variants.a]\nseeds = [1, 1]", ["seeds = [1, 1]", "distinct"]),
    ("[variants.a]\nseeds = []", ["seeds = []", "non-empty"]),
    ("[variants.a]\nset = { pol = 'max' }", ["variant 'a'", "unknown model setting 'pol'"]),
    ("[variants.a]\nset = { pool = 'median' }", ["variant 'a'", "pool 'median'"]),
    ("[variants.a]\nset = { channels = [6, 16, 32, 64], padding = [0] }", ["variant 'a'", "does not fit"]),
    ("[variants.a]\nset = 'pool=max'", ["set = 'pool=max'", "table"]),
    ("[defaults]\nepochs = 1", ["no variants"]),
    ("[variants.a]\nepochs = 1\n[variantz.b]", ["unknown top-level entry 'variantz'"]),
    ("[variants.lr0.3]\nlr = 0.3", ["variant 'lr0'", "must be quoted"]),
    ('[variants."a b"]', ["variant name 'a b'"]),
    ("[variants.a\nlr = 1", ["not valid TOML"]),
])
def test_spec_errors_name_file_variant_and_value(text, fragments):
    with pytest.raises(ConfigError) as info:
        parse_spec(text, "bad.toml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("bad.toml")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_cli_spec_errors_are_one_line(tmp_path):
    assert_user_error(run_cli("compare", str(tmp_path / "nope.toml")), "nope.toml not found", code=2)
    bad = tmp_path / "bad.toml"
    bad.write_text("[variants.a]\nepochs = 'ten'\n")
    assert_user_error(run_cli("compare", str(bad), "--out", str(tmp_path / "r")), "bad.toml", "epochs", code=2)
    assert not (tmp_path / "r").exists()
    good = tmp_path / "good.toml"
    good.write_text(TINY)
    (tmp_path / "file").write_text("x")
    assert_user_error(run_cli("compare", str(good), "--out", str(tmp_path / "file")),
                      "cannot create results folder", code=2)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_compare_runs_writes_table_and_skips_finished(tmp_path, fashion):
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY)
    out = tmp_path / "results"
    proc = run_cli("compare", str(spec_path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and all("test acc" in line for line in progress), proc.stdout
    for name in ("baseline-seed0", "baseline-seed1", "max-relu-seed0", "max-relu-seed1"):
        assert (out / "runs" / name / "model.safetensors").is_file()
        assert (out / "runs" / name / MARKER).is_file()
    rows = _rows(out / "results.csv")
    assert [r["variant"] for r in rows] == ["baseline", "max-relu"]
    assert rows[0]["parameters"] == "61706" and rows[0]["macs_per_image"] == "416520"
    for r in rows:
        assert r["seeds"] == "2" and r["diverged"] == "0"
        assert 0.0 <= float(r["test_acc_min"]) <= float(r["test_acc_mean"]) <= float(r["test_acc_max"]) <= 1.0
        assert float(r["train_time_s"]) > 0 and float(r["examples_per_sec"]) > 0
        assert float(r["final_train_loss"]) > 0
    md = (out / "results.md").read_text()
    assert "| baseline | textbook | fashion-mnist | 1 | 0.9 | 61,706 | 416,520 |" in md
    assert "Incomplete" not in md
    png = (out / "test_acc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the same command again: nothing is retrained, the table is the same
    weights = (out / "runs" / "baseline-seed0" / "model.safetensors").stat().st_mtime_ns
    again = run_cli("compare", str(spec_path), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already finished, skipped") == 4, again.stdout
    assert (out / "runs" / "baseline-seed0" / "model.safetensors").stat().st_mtime_ns == weights
    assert _rows(out / "results.csv") == rows

    # an interrupted run (no marker, no weights) and a variant whose settings changed are redone
    (out / "runs" / "baseline-seed1" / MARKER).unlink()
    (out / "runs" / "baseline-seed1" / "model.safetensors").unlink()
    spec_path.write_text(TINY.replace("lr = 0.1", "lr = 0.05"))
    third = run_cli("compare", str(spec_path), "--out", str(out))
    assert third.returncode == 0, third.stderr
    lines = [line for line in third.stdout.splitlines() if line.startswith("[")]
    assert "skipped" in lines[0] and all("skipped" not in line for line in lines[1:]), third.stdout
    assert (out / "runs" / "baseline-seed1" / "model.safetensors").is_file()
    marker = json.loads((out / "runs" / "max-relu-seed0" / MARKER).read_text())
    assert marker["settings"]["lr"] == 0.05 and marker["status"] == "done"


def test_diverged_variant_is_reported_not_fatal(tmp_path, monkeypatch):
    import lenet.training
    from lenet.data import synthetic_dataset
    from lenet.errors import TrainingDiverged

    real_train = lenet.training.train

    def train(cfg, **kwargs):  # divergence detection is training's job; here: what compare does with it
        if cfg.lr > 100:
            Path(kwargs["out"]).mkdir(parents=True, exist_ok=True)
            raise TrainingDiverged("loss became nan at epoch 1, step 3: training diverged; try a lower lr")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(lenet.training, "train", train)

    spec = parse_spec("""
[defaults]
epochs = 1
[variants.ok]
lr = 0.1
[variants.boom]
lr = 1000
""", "d.toml")
    logs: list[str] = []
    rows = run_spec(spec, tmp_path, data=synthetic_dataset(256, 64), log=logs.append)
    ok, boom = rows
    assert ok.diverged == 0 and ok.acc_mean is not None
    assert boom.diverged == 1 and boom.acc_mean is None
    assert "diverged" in logs[1]
    assert "diverged (1/1 seeds)" in (tmp_path / "results.md").read_text()
    # a diverged run is finished: repeating does not retrain it
    logs.clear()
    run_spec(spec, tmp_path, data=synthetic_dataset(256, 64), log=logs.append)
    assert all("skipped" in line for line in logs), logs


def test_interrupted_run_is_continued_from_its_checkpoint(tmp_path, monkeypatch):
    import lenet.training.runs
    from lenet.data import synthetic_dataset
    from lenet.errors import Interrupted

    text = "[defaults]\nepochs = 2\nlr = 0.5\n[variants.a]\n[variants.b]\nlr = 0.2\n"
    data = synthetic_dataset(256, 64)
    reference = run_spec(parse_spec(text, "r.toml"), tmp_path / "reference", data=data)

    real_save = lenet.training.runs.save_checkpoint

    def save_then_ctrl_c(path, state):  # Ctrl-C right after the first epoch of b is saved
        real_save(path, state)
        if "b-seed0" in str(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(lenet.training.runs, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(Interrupted, match="interrupted during b-seed0.*repeat the command"):
        run_spec(parse_spec(text, "r.toml"), tmp_path / "out", data=data)
    monkeypatch.setattr(lenet.training.runs, "save_checkpoint", real_save)
    assert json.loads((tmp_path / "out" / "runs" / "b-seed0" / MARKER).read_text())["status"] == "running"

    logs: list[str] = []
    rows = run_spec(parse_spec(text, "r.toml"), tmp_path / "out", data=data, log=logs.append)
    assert "skipped" in logs[0] and "resumed after epoch 1" in logs[1], logs
    assert [r.acc_mean for r in rows] == [r.acc_mean for r in reference]
    assert [r.train_loss for r in rows] == [r.train_loss for r in reference]


# --------------------------------------------------------------------------------------------
# --jobs and --ray: the same runs, the same numbers, and a killed worker loses nothing

SMALL = """
title = "small"
[defaults]
epochs = 2
seeds = [0, 1]
train_limit = 1024
test_limit = 256
[variants.baseline]
[variants.relu]
set = { activation = "relu", pool = "max" }
lr = 0.1
optimizer = "momentum"
"""

NUMBERS = ("epoch", "train_loss", "train_acc", "test_acc")  # metrics.csv less the timings


def _numbers(out: Path) -> dict[str, list]:
    """Every run's per-epoch metrics (timings left out), and the table's accuracy and loss columns."""
    found = {d.name: [[row[k] for k in NUMBERS] for row in _rows(d / "metrics.csv")]
             for d in sorted((out / "runs").iterdir())}
    found["table"] = [[r[k] for k in ("variant", "parameters", "seeds", "diverged", "test_acc_mean", "test_acc_std",
                                      "test_acc_min", "test_acc_max", "final_train_loss")]
                      for r in _rows(out / "results.csv")]
    return found


def _assert_complete(out: Path, epochs: int) -> None:
    """Every run finished whole: marker done, every epoch's metrics, weights, no half-written file."""
    for run in (out / "runs").iterdir():
        assert json.loads((run / MARKER).read_text())["status"] == "done", run
        assert len(_rows(run / "metrics.csv")) == epochs, run
        assert (run / "model.safetensors").is_file(), run
        assert not list(run.glob(".*.tmp")), list(run.glob(".*.tmp"))
    assert "Incomplete" not in (out / "results.md").read_text()


def test_parallel_flags_are_checked(tmp_path, monkeypatch):
    import sys

    spec = tmp_path / "s.toml"
    spec.write_text(SMALL)
    proc = run_cli("compare", str(spec), "--jobs", "0")
    assert proc.returncode == 2 and "--jobs" in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert_user_error(run_cli("compare", str(spec), "--out", str(tmp_path / "r"), "--ray"),
                      "--ray needs Ray", "pip install 'lenet[ray]'")


def test_results_folder_is_locked_while_a_command_writes_it(tmp_path):
    from lenet.experiments.workers import FolderLock

    spec = tmp_path / "s.toml"
    spec.write_text(SMALL)
    out = tmp_path / "r"
    out.mkdir()
    with FolderLock(out, "lenet compare"):
        assert_user_error(run_cli("compare", str(spec), "--out", str(out)), "in use by another lenet compare",
                          "choose another --out")
    assert not (out / "runs" / "baseline-seed0" / MARKER).exists()


@pytest.mark.slow
def test_jobs_and_ray_give_the_sequential_results(tmp_path, fashion):
    """--jobs 2 and --ray (a local Ray instance) train the same runs to the same numbers, with the
    same thread count per run (a run's float sums depend on it, see docs/experiments.md)."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'lenet[ray]' (CI installs it)")
    spec = tmp_path / "small.toml"
    spec.write_text(SMALL)
    results = {}
    for name, flags in [("seq", []), ("jobs", ["--jobs", "2"]), ("ray", ["--ray"])]:
        proc = run_cli("compare", str(spec), "--out", str(tmp_path / name), "--threads", "1", *flags)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
        assert len(lines) == 4 and all("test acc" in line for line in lines), proc.stdout
        if flags:
            assert "running" in lines[0] and "queued" in lines[0], lines[0]
            assert "1 thread(s) each" in proc.stdout
        _assert_complete(tmp_path / name, 2)
        results[name] = _numbers(tmp_path / name)
        assert "Torch threads: 1 per run." in (tmp_path / name / "results.md").read_text()
    assert results["jobs"] == results["seq"]
    assert results["ray"] == results["seq"]


def _kill_during(run_dir: Path, killed: list, marker_name: str = MARKER):
    """A thread that SIGKILLs the process training ``run_dir`` once its first epoch is saved."""
    import os
    import signal
    import threading
    import time

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                marker = json.loads((run_dir / marker_name).read_text())
            except (OSError, ValueError):
                marker = {}
            if (run_dir / "checkpoint.pt").is_file() and marker.get("status") == "running":
                saved = len(_rows(run_dir / "metrics.csv"))
                os.kill(marker["worker"]["pid"], signal.SIGKILL)
                killed.append((marker["worker"]["pid"], saved))
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


KILL_SPEC = """
[defaults]
epochs = 8
lr = 0.5
[variants.a]
[variants.b]
lr = 0.2
[variants.c]
set = { pool = "max" }
"""


@pytest.mark.slow
def test_killed_worker_process_loses_nothing(tmp_path):
    """SIGKILL a worker process mid-run: the others finish; repeating the command continues the
    killed run from its last checkpoint, and every run ends with the numbers of a sequential run."""
    from lenet.data import synthetic_dataset
    from lenet.errors import LenetError

    data = synthetic_dataset(4096, 256)
    spec = parse_spec(KILL_SPEC, "k.toml")
    run_spec(spec, tmp_path / "reference", data=data, threads=1)

    out = tmp_path / "out"
    killed: list = []
    watcher = _kill_during(out / "runs" / "b-seed0", killed)
    logs: list[str] = []
    with pytest.raises(LenetError, match=r"1 run\(s\) could not finish: b-seed0 .*killed by SIGKILL.*repeat the command"):
        run_spec(spec, out, data=data, jobs=2, threads=1, retries=0, log=logs.append)
    watcher.join()
    pid, saved = killed[0]
    assert 1 <= saved < 8, killed  # killed mid-run, after at least one saved epoch
    assert any(f"b seed 0: its worker process (pid {pid}) killed by SIGKILL" in line for line in logs), logs
    assert "1 run(s) still to train" in (out / "results.md").read_text()
    for name in ("a-seed0", "c-seed0"):  # the other runs were not disturbed
        assert json.loads((out / "runs" / name / MARKER).read_text())["status"] == "done"

    logs.clear()
    run_spec(spec, out, data=data, jobs=2, threads=1, log=logs.append)
    assert sum("skipped" in line for line in logs) == 2, logs
    assert any("b seed 0:" in line and "(resumed after epoch" in line for line in logs), logs
    _assert_complete(out, 8)
    assert _numbers(out) == _numbers(tmp_path / "reference")


@pytest.mark.slow
def test_killed_ray_worker_is_retried_from_its_checkpoint(tmp_path):
    """SIGKILL the Ray worker running a task: the task is run again from the run's last
    checkpoint within the same command, and nothing differs from a sequential run."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'lenet[ray]' (CI installs it)")
    from lenet.data import synthetic_dataset

    data = synthetic_dataset(4096, 256)
    spec = parse_spec(KILL_SPEC, "k.toml")
    run_spec(spec, tmp_path / "reference", data=data, threads=1)

    out = tmp_path / "out"
    killed: list = []
    watcher = _kill_during(out / "runs" / "b-seed0", killed)
    logs: list[str] = []
    run_spec(spec, out, data=data, ray=True, threads=1, log=logs.append)
    watcher.join()
    assert killed and 1 <= killed[0][1] < 8, killed
    assert any(line.startswith("b seed 0: its Ray worker died") and "checkpoint after epoch" in line
               for line in logs), logs
    assert any("b seed 0:" in line and "(resumed after epoch" in line for line in logs), logs
    _assert_complete(out, 8)
    assert _numbers(out) == _numbers(tmp_path / "reference")
