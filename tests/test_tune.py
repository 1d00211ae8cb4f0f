"""`lenet tune`: the spec and its errors, a search scored on validation only, resuming, workers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from .conftest import REPO, assert_user_error, run_cli

optuna = pytest.importorskip("optuna", reason="Optuna is not installed: pip install 'lenet[tune]' (CI installs it)")

from lenet.errors import ConfigError, Interrupted  # noqa: E402
from lenet.experiments.tune import load_tune_spec, parse_tune_spec, run_search  # noqa: E402

SEARCH = """
title = "small search"
[defaults]
epochs = 2
batch_size = 64
set = { activation = "relu", pool = "max" }
[tune]
trials = 4
startup_trials = 2
prune_from_epoch = 1
[space]
lr = { low = 0.01, high = 0.5, log = true }
optimizer = ["sgd", "momentum"]
[space.set]
channels = [[6, 16], [4, 8]]
"""


def _data():
    from lenet.data import synthetic_dataset

    return synthetic_dataset(1200, 300)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_spec_is_compare_defaults_plus_a_space():
    spec = parse_tune_spec(SEARCH, "s.toml")
    assert [d.key for d in spec.space] == ["lr", "optimizer", "set.channels"]
    lr, opt, channels = spec.space
    assert (lr.low, lr.high, lr.log, lr.integer) == (0.01, 0.5, True, False)
    assert opt.choices == ["sgd", "momentum"] and channels.choices == [[6, 16], [4, 8]]
    assert (spec.trials, spec.validation_fraction, spec.seed, spec.prune_from_epoch) == (4, 0.1, 0, 1)
    v = spec.variant({"lr": 0.2, "optimizer": "momentum", "set.channels": [4, 8]})
    assert (v.lr, v.optimizer, v.epochs, v.batch_size) == (0.2, "momentum", 2, 64)
    assert v.overrides == {"activation": "relu", "pool": "max", "channels": [4, 8]}


@pytest.mark.parametrize("name", ["tune-classic.toml", "tune-family.toml"])
def test_shipped_searches_are_valid(name):
    spec = load_tune_spec(REPO / "experiments" / name)
    assert spec.trials and spec.space and spec.base.model == "classic"
    if name == "tune-family.toml":
        assert spec.max_parameters == 100_000 and any(d.key.startswith("set.") for d in spec.space)
    else:
        assert not any(d.key.startswith("set.") for d in spec.space)


@pytest.mark.parametrize("space, fragments", [
    ("lr = { low = 0.1 }", ["[space] lr", "low = ..., high = ..."]),
    ("lr = { low = -1, high = 1 }", ["[space]", "lr = -1", "positive"]),
    ("lr = { low = 0.5, high = 0.1 }", ["[space] lr", "low must be below high"]),
    ("lr = { low = 0.0001, high = 1, log = 'yes' }", ["[space] lr", "log = 'yes'", "true or false"]),
    ("lr = { low = 0.01, high = 1, lo = 2 }", ["[space] lr", "unknown 'lo'"]),
    ("lr = 0.1", ["[space] lr = 0.1", "list of choices"]),
    ("lr = []", ["[space] lr = []", "at least one choice"]),
    ("epochs = { low = 1.5, high = 4 }", ["[space] epochs", "integers"]),
    ("batch_size = [64, 0]", ["[space]", "batch_size = 0", ">= 1"]),
    ("optimizer = ['sgd', 'lbfgs']", ["[space]", "optimizer = 'lbfgs'", "choose one of"]),
    ("optimizer = ['sgd', 'sgd']", ["[space] optimizer", "must differ"]),
    ("learning_rate = [0.1, 0.2]", ["[space]", "'learning_rate' cannot be searched", "lr"]),
    ("dataset = ['mnist']", ["[space]", "'dataset' cannot be searched", "put it in [defaults]"]),
    ("set = { pol = ['avg', 'max'] }", ["[space] set.pol", "unknown model setting 'pol'"]),
    ("set = { pool = ['avg', 'median'] }", ["[space] set.pool", "pool 'median'"]),
    ("set = { channels = [[6, 16, 32, 64, 128]] }", ["[space] set.channels", "padding has 2 values for 5"]),
])
def test_malformed_space_is_one_line_naming_the_key(space, fragments):
    with pytest.raises(ConfigError) as info:
        parse_tune_spec(f"[defaults]\nepochs = 1\n[space]\n{space}\n", "bad.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad.toml")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("text, fragments", [
    ("[defaults]\nseeds = [0, 1]\n[space]\nlr = [0.1]", ["[defaults]", "seeds", "[tune]"]),
    ("[tune]\ntrials = 0\n[space]\nlr = [0.1]", ["[tune]", "trials = 0", ">= 1"]),
    ("[tune]\nvalidation_fraction = 1.5\n[space]\nlr = [0.1]", ["validation_fraction = 1.5", "between 0 and 1"]),
    ("[tune]\ntrails = 3\n[space]\nlr = [0.1]", ["[tune]", "unknown key 'trails'"]),
    ("[defaults]\nepochs = 1", ["no [space]"]),
    ("[variants.a]\n[space]\nlr = [0.1]", ["unknown top-level entry 'variants'", "no variants"]),
])
def test_malformed_spec_is_one_line(text, fragments):
    with pytest.raises(ConfigError) as info:
        parse_tune_spec(text, "bad.toml")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_cli_errors_are_one_line(tmp_path):
    assert_user_error(run_cli("tune", str(tmp_path / "nope.toml")), "nope.toml not found", code=2)
    bad = tmp_path / "bad.toml"
    bad.write_text("[space]\nlr = { low = 0.1 }\n")
    assert_user_error(run_cli("tune", str(bad), "--out", str(tmp_path / "r")), "bad.toml", "[space] lr", code=2)
    assert not (tmp_path / "r").exists()
    no_trials = tmp_path / "n.toml"
    no_trials.write_text("[space]\nlr = [0.1, 0.2]\n")
    assert_user_error(run_cli("tune", str(no_trials), "--out", str(tmp_path / "r")), "--trials N", code=2)


@pytest.mark.slow
def test_search_is_scored_on_validation_and_reads_the_test_set_once_at_the_end(tmp_path, monkeypatch):
    """The test split is not touched while trials run; after the search, the best configuration is
    retrained on the whole training set and the test set is evaluated exactly once."""
    import lenet.training.loop as loop
    from lenet.data import Split

    data = _data()
    phase = ["search"]
    reads: list[tuple[str, str]] = []

    class WatchedSplit(Split):  # records every read of the test images or labels, with the phase
        def __getattribute__(self, name):
            if name in ("images", "labels"):
                reads.append((name, phase[0]))
            return object.__getattribute__(self, name)

    data.test = WatchedSplit(data.test.images, data.test.labels)
    evaluations: list[tuple[int, str]] = []
    real_evaluate = loop.evaluate_test

    def evaluate_test(run):
        evaluations.append((len(run.test_y), phase[0]))
        return real_evaluate(run)

    monkeypatch.setattr(loop, "evaluate_test", evaluate_test)

    def log(line: str) -> None:
        if line.startswith("final:"):
            phase[0] = "final"
        logs.append(line)

    logs: list[str] = []
    out = tmp_path / "search"
    result = run_search(parse_tune_spec(SEARCH, "s.toml"), out, data=data, log=log)

    assert reads and all(p == "final" for _, p in reads), reads
    validation = [n for n, p in evaluations if p == "search"]
    assert validation and set(validation) == {120}  # 10% of each class of the 1,200 training images
    assert [(n, p) for n, p in evaluations if p == "final"] == [(300, "final")]  # the test set, once

    trials = result.trials
    assert len(trials) == 4 and result.best.value == max(t.value for t in trials if t.value is not None)
    progress = [line for line in logs if line.startswith("[")]
    assert len(progress) == 4 and progress[-1].startswith("[4/4] trial 3:"), logs
    final = json.loads((out / "final" / "final.json").read_text())
    assert final["status"] == "done" and final["trial"] == result.best.number
    assert final["test_acc"] == result.test_acc and final["train_images"] == 1200 and final["test_images"] == 300
    metrics = _rows(out / "final" / "metrics.csv")
    assert len(metrics) == 2 and metrics[0]["test_acc"] == "" and float(metrics[1]["test_acc"]) == result.test_acc
    config = json.loads((out / "trials" / "trial-0000" / "config.json").read_text())
    assert config["data"]["train"] == 1080 and config["data"]["test"] == 120
    assert config["data"]["split"].startswith("validation")

    rows = _rows(out / "results.csv")
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert {"lr", "optimizer", "set.channels", "val_acc", "state"} <= set(rows[0])
    md = (out / "results.md").read_text()
    assert f"**test accuracy {result.test_acc:.4f}**" in md and "never on the test set" in md
    for png in ("history.png", "importance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "study.db").is_file()

    # the same command again: nothing is trained
    logs.clear()
    phase[0], reads[:] = "search", []
    again = run_search(parse_tune_spec(SEARCH, "s.toml"), out, data=data, log=log)
    assert again.test_acc == result.test_acc and not any(line.startswith("[") for line in logs), logs
    assert "already retrained" in logs[-1]


@pytest.mark.slow
def test_interrupted_search_continues_where_it_stopped(tmp_path, monkeypatch):
    """Ctrl-C during a trial: repeating the command continues that trial from its checkpoint and
    ends with the trials (settings and scores) and the final result of an uninterrupted search."""
    import lenet.training.runs

    data = _data()
    spec = parse_tune_spec(SEARCH, "s.toml")
    reference = run_search(spec, tmp_path / "reference", data=data)

    real_save = lenet.training.runs.save_checkpoint

    def save_then_ctrl_c(path, state):  # Ctrl-C right after trial 2's first epoch is saved
        real_save(path, state)
        if "trial-0002" in str(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(lenet.training.runs, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(Interrupted, match="repeat the command to continue"):
        run_search(spec, tmp_path / "out", data=data)
    monkeypatch.setattr(lenet.training.runs, "save_checkpoint", real_save)
    study = optuna.load_study(study_name="lenet-tune", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert "Incomplete" in (tmp_path / "out" / "results.md").read_text()

    logs: list[str] = []
    result = run_search(spec, tmp_path / "out", data=data, log=logs.append)
    assert any("continuing 1 trial(s)" in line for line in logs), logs
    assert any(line.startswith("[3/4] trial 2:") and "resumed after epoch 1" in line for line in logs), logs

    def summary(trials):
        return [(t.number, t.state.name, t.params, t.value) for t in trials]

    assert summary(result.trials) == summary(reference.trials)
    assert result.test_acc == reference.test_acc


def test_a_different_spec_does_not_mix_into_a_study(tmp_path):
    data = _data()
    run_search(parse_tune_spec(SEARCH.replace("trials = 4", "trials = 1"), "s.toml"), tmp_path, data=data)
    changed = parse_tune_spec(SEARCH.replace("high = 0.5", "high = 0.9"), "s.toml")
    with pytest.raises(ConfigError, match="holds a search of another spec"):
        run_search(changed, tmp_path, data=data)


def test_max_parameters_rejects_without_training(tmp_path):
    text = SEARCH.replace("[tune]\n", "[tune]\nmax_parameters = 50000\n")  # [6, 16]: 61,706 parameters, [4, 8]: 36,046
    logs: list[str] = []
    result = run_search(parse_tune_spec(text, "s.toml"), tmp_path, data=_data(), log=logs.append)
    trained = [t for t in result.trials if "rejected" not in t.user_attrs]
    rejected = [t for t in result.trials if "rejected" in t.user_attrs]
    assert len(trained) == 4 and all(json.loads(t.params["set.channels"]) == [4, 8] for t in trained)
    assert all("max_parameters 50,000" in t.user_attrs["rejected"] for t in rejected)
    assert all(not (tmp_path / "trials" / f"trial-{t.number:04d}").exists() for t in rejected)
    assert sum("not trained" in line for line in logs) == len(rejected)


@pytest.mark.slow
def test_worker_processes_share_the_study_and_a_killed_one_is_retried(tmp_path):
    """--jobs 2: trials run in two worker processes that report to the same SQLite study; SIGKILL
    one mid-trial and the trial continues from its checkpoint in a new worker."""
    from .test_compare import _kill_during

    spec = parse_tune_spec(SEARCH.replace("epochs = 2", "epochs = 6").replace("prune_from_epoch = 1",
                                                                               "prune_from_epoch = 6"), "s.toml")
    from lenet.data import synthetic_dataset

    out = tmp_path / "jobs"
    killed: list = []
    watcher = _kill_during(out / "trials" / "trial-0001", killed, "trial.json")
    logs: list[str] = []
    result = run_search(spec, out, data=synthetic_dataset(4096, 256), jobs=2, threads=1, log=logs.append)
    watcher.join()
    assert killed and 1 <= killed[0][1] < 6, killed
    assert any(line.startswith("trial 1: its worker process") and "killed by SIGKILL" in line for line in logs), logs
    assert any(line.startswith("[") and "trial 1:" in line and "resumed after epoch" in line for line in logs), logs
    assert len(result.trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in result.trials)
    for t in result.trials:
        marker = json.loads((out / "trials" / f"trial-{t.number:04d}" / "trial.json").read_text())
        assert marker["worker"]["pid"] != __import__("os").getpid()  # trained in a worker process
        assert sorted(t.intermediate_values) == list(range(1, marker["result"]["epochs"] + 1))
    assert result.test_acc is not None and (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_cli_search_on_ray(tmp_path, fashion):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'lenet[ray]' (CI installs it)")
    spec = tmp_path / "s.toml"
    spec.write_text(SEARCH.replace("[tune]", "train_limit = 2000\ntest_limit = 500\n[tune]"))
    out = tmp_path / "ray"
    proc = run_cli("tune", str(spec), "--out", str(out), "--ray", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "training trials on Ray" in proc.stdout
    assert sum(line.startswith("[") for line in proc.stdout.splitlines()) == 4, proc.stdout
    assert "retrained on the whole training set: test acc" in proc.stdout
    final = json.loads((out / "final" / "final.json").read_text())
    assert final["train_images"] == 2000 and final["test_images"] == 500
    assert len(_rows(out / "results.csv")) == 4
