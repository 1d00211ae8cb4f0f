"""The experiment runner behind ``lenet compare SPEC.toml``: train named variants, compare them.

A spec is a TOML file. ``[defaults]`` holds what all variants share; each ``[variants.NAME]``
states only what differs from it::

    [defaults]
    model = "classic"            # a preset from `lenet models`
    dataset = "fashion-mnist"
    epochs = 10
    lr = 0.9
    seeds = [0, 1]

    [variants.baseline]
    description = "the textbook LeNet"

    [variants.max-pool]
    description = "max instead of average pooling"
    set = { pool = "max" }       # model config overrides, as `lenet train --set pool=max`

Each variant is trained once per seed into ``RESULTS/runs/<variant>-seed<k>/`` (an ordinary run
folder); the table (``results.md``, ``results.csv``) and the plot (``test_acc.png``) are computed
from those folders, so a repeated command skips the runs that finished (a ``compare.json`` in the
run folder records the settings it was trained with), continues an interrupted run from its last
epoch checkpoint, and redoes a run whose settings changed.

Runs train one after another in this process by default; ``jobs=N`` trains N at once in worker
processes on this machine and ``ray=`` as Ray tasks (:mod:`.workers`). Whatever trains them, a run
gives the numbers it gives alone with the same torch thread count (its ``compare.json`` records
the count), and a run whose worker dies is continued from its last checkpoint.

    >>> from lenet.experiments.compare import load_spec, run_spec
    >>> spec = load_spec("experiments/exercises.toml")
    >>> rows = run_spec(spec, "results/exercises")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, Interrupted, LenetError, TrainingDiverged
from ..data.builtin import DATASETS
from ..options import OPTIMIZERS, RULES, SCHEDULES, TrainConfig, problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

MARKER = "compare.json"

# The keys of a spec: a variant's recipe is a TrainConfig (these fields of it, with the same
# checks as `lenet train`'s flags), plus its model settings (`set`) and what only a spec has.
TRAIN_KEYS = ("model", "dataset", "epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "schedule",
              "test_fraction", "shift", "flip", "label_smoothing", "test_flip")
AUGMENT_KEYS = ("shift", "flip", "label_smoothing", "test_flip")  # recorded in a run's settings when not off
SPEC_KEYS: dict[str, tuple[str, Any]] = {  # key -> (kind, default)
    "description": ("text", ""),
    "set": ("table", {}),
    "seeds": ("seeds", [0]),
    "train_limit": ("limit", None),  # train on the first N training images (for quick tests)
    "test_limit": ("limit", None),   # evaluate on the first N test images
}
KEYS = (*TRAIN_KEYS[:2], "set", *TRAIN_KEYS[2:], *(k for k in SPEC_KEYS if k != "set"))
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Variant:
    """One row of the comparison: a recipe with its model settings, trained once per seed.

    ``v.lr``, ``v.model``, ``v.overrides``, ...: the fields of ``v.config``.
    """

    name: str
    description: str
    config: TrainConfig  # the recipe; config.overrides holds the model settings (`set`)
    seeds: list[int]
    train_limit: int | None = None
    test_limit: int | None = None

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key == "config":
            raise AttributeError(key)
        return getattr(self.config, key)

    def settings(self, seed: int) -> dict[str, Any]:
        """What a run of this variant is trained with (stored in its compare.json)."""
        c = self.config
        return {"model": c.model, "set": c.overrides, "dataset": c.dataset, "epochs": c.epochs, "lr": c.lr,
                "batch_size": c.batch_size, "optimizer": c.optimizer, "momentum": c.momentum,
                "weight_decay": c.weight_decay, "schedule": c.schedule, "seed": seed,
                **({"test_fraction": c.test_fraction} if not _builtin(c.dataset) else {}),
                **{key: getattr(c, key) for key in AUGMENT_KEYS if getattr(c, key)},
                "train_limit": self.train_limit, "test_limit": self.test_limit}

    def train_config(self, seed: int, data_root: str | None, device: str = "auto") -> TrainConfig:
        return dataclasses.replace(self.config, overrides=dict(self.config.overrides), seed=seed,
                                   data_root=data_root, device=device)

    def run_name(self, seed: int) -> str:
        return f"{self.name}-seed{seed}"


@dataclass
class Spec:
    path: Path
    variants: list[Variant] = field(default_factory=list)
    title: str = ""


# --------------------------------------------------------------------------------------------
# Parsing and validation

_DEFAULTS = TrainConfig()


def _check_train_value(key: str, value: Any) -> tuple[Any, str | None]:
    """(the value as TrainConfig holds it, what is wrong with it or None)."""
    default = getattr(_DEFAULTS, key)
    if isinstance(default, str):
        return value, None if isinstance(value, str) and value else "expected a string"
    if isinstance(default, bool):
        return value, problem(RULES[key], value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, "expected an integer" if isinstance(default, int) else "expected a number"
    if isinstance(default, float):
        value = float(value)
    return value, problem(RULES[key], value) if key in RULES else None


def _check_value(where: str, key: str, value: Any, kind: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: expected {expected}")

    if kind == "text":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "limit":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("an integer >= 1")
        return value
    if kind == "seeds":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if (not isinstance(value, list) or not value
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value)):
            raise bad("a non-empty list of integers >= 0, e.g. [0, 1]")
        if len(set(value)) != len(value):
            raise bad("distinct seeds")
        return list(value)
    if not isinstance(value, dict):  # kind == "table"
        raise bad('a table of model settings, e.g. { pool = "max" }')
    for k, v in value.items():
        if isinstance(v, dict) or (isinstance(v, list) and any(not isinstance(x, int) or isinstance(x, bool)
                                                               for x in v)):
            raise ConfigError(f"{where}: set.{k} = {v!r}: expected a number, string, or list of integers")
    return dict(value)


def _check_table(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {table!r}")
    out = {}
    for key, value in table.items():
        if key in TRAIN_KEYS:
            value, why = _check_train_value(key, value)
            if why and not why.startswith("choose"):  # vocabularies are checked once merged
                raise ConfigError(f"{where}: {key} = {table[key]!r}: {why}")
            out[key] = value
        elif key in SPEC_KEYS:
            out[key] = _check_value(where, key, value, SPEC_KEYS[key][0])
        else:
            hint = (" (a variant name with a dot must be quoted: [variants.\"lr0.3\"])"
                    if isinstance(value, dict) else "")
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; known keys are {', '.join(KEYS)}")
    return out


def _builtin(name: str) -> bool:
    return name in DATASETS


def _dataset(spec_path: Path, where: str, dataset: str, own: bool) -> str:
    """A built-in name as it is; a path of your own, relative to the spec's folder, made absolute."""
    if _builtin(dataset):
        return dataset
    found = (spec_path.parent / Path(dataset).expanduser()).resolve()
    if not found.exists():
        src = "" if own else " (from [defaults])"
        raise ConfigError(f"{where}: dataset = {dataset!r}{src}: not a built-in dataset ({', '.join(DATASETS)}) "
                          f"and no such file or folder as {found} (a relative path is read from the spec's folder)")
    return str(found)


def _make_variant(path: Path, name: str, defaults: dict[str, Any], own: dict[str, Any],
                  where: str | None = None) -> Variant:
    from ..models import MODELS, resolve_config

    where = where or f"{path}: variant {name!r}"
    merged = {key: default for key, (_, default) in SPEC_KEYS.items()}
    merged.update({key: getattr(_DEFAULTS, key) for key in TRAIN_KEYS})
    merged.update(defaults)
    merged.update(own)
    merged["set"] = {**defaults.get("set", {}), **own.get("set", {})}

    def choose(key: str, options) -> None:
        if merged[key] not in options:
            src = "" if key in own else " (from [defaults])"
            raise ConfigError(f"{where}: {key} = {merged[key]!r}{src}: choose one of {', '.join(options)}")

    choose("model", list(MODELS))
    merged["dataset"] = _dataset(path, where, merged["dataset"], "dataset" in own)
    choose("optimizer", OPTIMIZERS)
    choose("schedule", SCHEDULES)
    try:  # a network that cannot be built is refused now, not after an hour of other variants
        resolve_config(merged["model"], dict(merged["set"]))
    except ConfigError as exc:
        raise ConfigError(f"{where}: set = {merged['set']!r}: {exc}") from None
    config = TrainConfig(overrides=dict(merged["set"]), **{key: merged[key] for key in TRAIN_KEYS})
    try:
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Variant(name=name, description=merged["description"], config=config, seeds=merged["seeds"],
                   train_limit=merged["train_limit"], test_limit=merged["test_limit"])


def parse_spec(text: str, path: str | Path = "<spec>") -> Spec:
    """Parse and validate the text of a spec; every problem is one :class:`ConfigError` line."""
    path = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = [k for k in doc if k not in ("title", "defaults", "variants")]
    if unknown:
        raise ConfigError(f"{path}: unknown top-level entry {unknown[0]!r}; a spec has title, "
                          "[defaults] and [variants.NAME] tables")
    title = doc.get("title", "")
    if not isinstance(title, str):
        raise ConfigError(f"{path}: title = {title!r}: expected a string")
    defaults = _check_table(f"{path}: [defaults]", doc.get("defaults", {}))
    variants_doc = doc.get("variants")
    if not isinstance(variants_doc, dict) or not variants_doc:
        raise ConfigError(f"{path}: no variants; add at least one [variants.NAME] table")
    variants = []
    for name, table in variants_doc.items():
        if not NAME_RE.match(name):
            raise ConfigError(f"{path}: variant name {name!r}: use letters, digits, '-', '_', '.', '+' "
                              "(it names the run folders)")
        own = _check_table(f"{path}: variant {name!r}", table)
        variants.append(_make_variant(path, name, defaults, own))
    return Spec(path=path, variants=variants, title=title)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"spec {path} not found: pass a TOML file such as experiments/exercises.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"spec {path} is a folder: pass a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"spec {path}: cannot read it ({exc})") from None
    return parse_spec(text, path)


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class RunOutcome:
    """One (variant, seed) run, read back from its folder."""

    variant: str
    seed: int
    status: str  # "done" or "diverged"
    epochs: list[dict[str, float | None]]  # rows of metrics.csv
    message: str = ""
    threads: int | None = None  # torch threads it trained with (as its compare.json records)

    @property
    def test_acc(self) -> float | None:
        return self.epochs[-1]["test_acc"] if self.epochs and self.status == "done" else None

    @property
    def train_loss(self) -> float | None:
        return self.epochs[-1]["train_loss"] if self.epochs and self.status == "done" else None

    @property
    def train_time_s(self) -> float:
        return sum(r["epoch_time_s"] or 0.0 for r in self.epochs)

    @property
    def examples_per_sec(self) -> float | None:
        # examples_per_sec * epoch_time_s is the number of examples of each epoch
        seen = sum((r["examples_per_sec"] or 0.0) * (r["epoch_time_s"] or 0.0) for r in self.epochs)
        return seen / self.train_time_s if self.train_time_s > 0 else None


def finished_run(run_dir: Path, settings: dict[str, Any]) -> RunOutcome | None:
    """The outcome of a finished run in ``run_dir`` trained with ``settings``, else None."""
    from ..training import runs

    try:
        marker = json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("settings") != settings:
        return None
    status = marker.get("status")
    try:
        epochs = runs.read_csv(run_dir / runs.METRICS) if (run_dir / runs.METRICS).is_file() else []
    except (OSError, ValueError, KeyError):
        return None
    if status == "done":
        if not (run_dir / runs.WEIGHTS).is_file() or len(epochs) != settings["epochs"]:
            return None
    elif status != "diverged":
        return None
    worker = marker.get("worker") if isinstance(marker.get("worker"), dict) else {}
    threads = worker.get("threads") if isinstance(worker.get("threads"), int) else None
    return RunOutcome(marker.get("variant", ""), settings["seed"], status, epochs, marker.get("message", ""), threads)


def _checkpoint_epoch(run_dir: Path, settings: dict[str, Any]) -> int:
    """The last saved epoch of an interrupted run of these ``settings`` in ``run_dir``, else 0."""
    from ..training import runs

    try:
        marker = json.loads((run_dir / MARKER).read_text())
        if marker.get("status") != "running" or marker.get("settings") != settings:
            return 0
        state = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
    except (OSError, ValueError, LenetError):
        return 0
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return epoch if isinstance(epoch, int) and 0 < epoch <= settings["epochs"] else 0


class _DataCache:
    """Datasets loaded once per process (and cut to train_limit/test_limit when a variant asks)."""

    def __init__(self, data_root: str | None, log: Callable[[str], None]):
        self.data_root, self.log, self.full = data_root, log, {}

    def get(self, v: Variant):
        from ..data import load_dataset

        key = (v.dataset, v.test_fraction)
        if key not in self.full:
            self.full[key] = load_dataset(v.dataset, self.data_root, test_fraction=v.test_fraction, log=self.log)
        return self.full[key].head(v.train_limit, v.test_limit)


_WORKER_DATA: dict[str | None, _DataCache] = {}  # a worker process's datasets, kept between its runs


def _run_job(shared, v: Variant, seed: int, run_dir: Path, out: Path, data_root: str | None, device: str) -> int:
    """One (variant, seed) run in a worker (process or Ray task): the epoch it resumed after, or 0."""
    if shared is not None:
        dataset = shared
    else:
        dataset = _WORKER_DATA.setdefault(data_root, _DataCache(data_root, lambda s: None)).get(v)
    return _train_one(v, seed, run_dir, dataset, out, data_root, device)[1]


def run_spec(spec: Spec, out: str | Path, *, data_root: str | None = None, device: str = "auto",
             log: Callable[[str], None] | None = None, data=None, jobs: int = 1, ray: str | bool | None = None,
             threads: int | None = None, retries: int = 2) -> list["VariantRow"]:
    """Train every (variant, seed) of ``spec`` not already finished in ``out``; write the results.

    Returns the table rows. ``data`` (a Dataset) replaces loading the variants' datasets (tests).
    ``jobs`` > 1 trains that many runs at once in worker processes; ``ray`` (True for a local
    instance, or an address) runs them as Ray tasks; ``threads``: torch threads per run (default:
    this process's setting in it, physical cores // jobs in worker processes, 1 per Ray task).
    A run whose worker dies is continued from its last checkpoint, up to ``retries`` times.
    """
    from .workers import FolderLock, InlineExecutor, make_executor

    log = log or (lambda s: None)
    out = Path(out)
    runs_dir = out / "runs"
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LenetError(f"cannot create results folder {out}: {exc.strerror or exc}; choose another --out") from None
    with FolderLock(out, "lenet compare"):
        tasks = [(v, seed) for v in spec.variants for seed in v.seeds]
        total, width = len(tasks), len(str(len(tasks)))
        outcomes: dict[tuple[str, int], RunOutcome] = {}
        todo = []
        for v, seed in tasks:
            done = finished_run(runs_dir / v.run_name(seed), v.settings(seed))
            if done is None:
                todo.append((v, seed))
                continue
            outcomes[(v.name, seed)] = done
            log(f"[{len(outcomes):>{width}}/{total}] {v.name} seed {seed}: already finished, skipped "
                f"({_outcome_text(done)})")
        if todo:
            cache = _DataCache(data_root, log)
            with make_executor(jobs, ray, threads, shared=data) as executor:
                inline = isinstance(executor, InlineExecutor)
                if not inline:
                    log(f"training {len(todo)} run(s) on {executor.where}, {executor.threads} thread(s) each")
                _schedule(spec, todo, executor, outcomes, out, total, width, log, retries,
                          (lambda v: data if data is not None else cache.get(v)) if inline else None,
                          data_root, device)
        rows = _rows(spec, outcomes)
        write_results(spec, rows, _by_variant(spec, outcomes), out)
    return rows


def _by_variant(spec: Spec, outcomes: dict[tuple[str, int], RunOutcome]) -> dict[str, list[RunOutcome]]:
    """Each variant's finished runs, in the spec's seed order (so means are summed in one order)."""
    return {v.name: [outcomes[(v.name, s)] for s in v.seeds if (v.name, s) in outcomes] for v in spec.variants
            if any((v.name, s) in outcomes for s in v.seeds)}


def _rows(spec: Spec, outcomes: dict[tuple[str, int], RunOutcome]) -> list["VariantRow"]:
    grouped = _by_variant(spec, outcomes)
    return [summarize(v, grouped[v.name]) for v in spec.variants if v.name in grouped]


def _schedule(spec: Spec, todo: list[tuple[Variant, int]], executor, outcomes: dict[tuple[str, int], RunOutcome],
              out: Path, total: int, width: int, log: Callable[[str], None], retries: int,
              inline_data: Callable | None, data_root: str | None, device: str) -> None:
    """Keep ``executor`` busy with the runs of ``todo``; log each finished one; retry dead workers."""
    runs_dir = out / "runs"
    queue = list(todo)
    by_key = {v.run_name(seed): (v, seed) for v, seed in todo}
    attempts: dict[str, int] = {}
    failed: list[str] = []

    def submit(v: Variant, seed: int) -> None:
        key = v.run_name(seed)
        attempts[key] = attempts.get(key, 0) + 1
        if inline_data is not None:
            executor.submit(key, _inline_job, (v, seed, runs_dir / key, inline_data(v), out, data_root, device))
        else:
            executor.submit(key, _run_job, (v, seed, runs_dir / key, out, data_root, device))

    def status() -> str:
        return f"{executor.running()} running, {len(queue)} queued"

    try:
        while queue or executor.running():
            while queue and executor.running() < executor.slots:
                submit(*queue.pop(0))
            event = executor.wait()
            v, seed = by_key[event.key]
            run_dir = runs_dir / event.key
            prefix = f"{v.name} seed {seed}:"
            if event.kind == "died":
                resumed = _checkpoint_epoch(run_dir, v.settings(seed))
                if attempts[event.key] <= retries:
                    queue.insert(0, (v, seed))
                    log(f"{prefix} {event.value}; training it again from "
                        f"{f'its checkpoint after epoch {resumed}' if resumed else 'the start'} ({status()})")
                else:
                    failed.append(f"{event.key} ({event.value}, {attempts[event.key]} times)")
                    log(f"{prefix} {event.value} again; given up after {attempts[event.key]} attempts ({status()})")
                continue
            if event.kind == "error":
                raise LenetError(event.value)
            if event.kind == "interrupted":
                raise KeyboardInterrupt
            done = finished_run(run_dir, v.settings(seed))
            if done is None:
                raise LenetError(f"{event.key} finished on {executor.where}, but {run_dir} does not show it: "
                                 "with Ray on several machines, --out must be a folder every node sees at the same path")
            outcomes[(v.name, seed)] = done
            how = f" (resumed after epoch {event.value})" if event.value else ""
            log(f"[{len(outcomes):>{width}}/{total}] {prefix} {_outcome_text(done)}{how}"
                + (f" [{status()}]" if queue or executor.running() else ""))
            if len(outcomes) < total:  # the table so far, so an interrupted comparison still shows its results
                write_results(spec, _rows(spec, outcomes), _by_variant(spec, outcomes), out,
                              pending=total - len(outcomes))
    except (KeyboardInterrupt, Interrupted, LenetError) as exc:
        executor.stop()
        write_results(spec, _rows(spec, outcomes), _by_variant(spec, outcomes), out, pending=total - len(outcomes))
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted; finished runs and saved epochs are kept in {out}: "
                              "repeat the command to continue") from None
        raise
    if failed:
        write_results(spec, _rows(spec, outcomes), _by_variant(spec, outcomes), out, pending=total - len(outcomes))
        raise LenetError(f"{len(failed)} run(s) could not finish: {'; '.join(failed)}; the other runs are in "
                         f"{out}: repeat the command to continue them from their last checkpoint")


def _inline_job(shared, v: Variant, seed: int, run_dir: Path, dataset, out: Path, data_root: str | None,
                device: str) -> int:
    return _train_one(v, seed, run_dir, dataset, out, data_root, device)[1]


def _marker(v: Variant, status: str, settings: dict[str, Any], message: str = "") -> dict[str, Any]:
    import socket

    import torch

    marker = {"variant": v.name, "status": status, "settings": settings,
              "worker": {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads()}}
    if message:
        marker["message"] = message
    return marker


def _train_one(v: Variant, seed: int, run_dir: Path, dataset, out: Path, data_root: str | None,
               device: str) -> tuple[RunOutcome, int]:
    """Train (or continue) one run of ``v``; (its outcome, the epoch it resumed after or 0)."""
    from ..training import resume, runs, train

    settings = v.settings(seed)
    resumed = _checkpoint_epoch(run_dir, settings)
    try:
        if resumed:  # interrupted after some epochs: continue from the last checkpoint
            _remove_temporary_files(run_dir)
            runs.write_json(run_dir / MARKER, _marker(v, "running", settings))
            resume(run_dir, data=dataset, device=device, data_root=data_root)
        else:
            runs.prepare_run_dir(run_dir, overwrite=True)
            _remove_temporary_files(run_dir)
            runs.write_json(run_dir / MARKER, _marker(v, "running", settings))
            train(v.train_config(seed, data_root, device), data=dataset, out=run_dir, overwrite=True)
        status, message = "done", ""
    except TrainingDiverged as exc:
        status, message = "diverged", str(exc)
    except Interrupted:
        raise Interrupted(f"interrupted during {v.run_name(seed)}; finished runs and saved epochs "
                          f"are kept in {out}: repeat the command to continue") from None
    runs.write_json(run_dir / MARKER, _marker(v, status, settings, message))
    done = finished_run(run_dir, settings)
    assert done is not None, run_dir
    return done, resumed


def _remove_temporary_files(run_dir: Path) -> None:
    """Files a killed process left half-written (atomic writes go through ``.NAME.*.tmp``)."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _outcome_text(o: RunOutcome) -> str:
    if o.status == "diverged":
        return f"diverged ({o.message.split(':')[0]})"
    return (f"test acc {o.test_acc:.3f}, train loss {o.train_loss:.3f}, {o.train_time_s:.1f} s, "
            f"{o.examples_per_sec:,.0f} examples/sec")


# --------------------------------------------------------------------------------------------
# The table


@dataclass
class VariantRow:
    name: str
    description: str
    model: str
    dataset: str
    epochs: int
    lr: float
    parameters: int
    macs: int
    seeds: int
    diverged: int
    acc_mean: float | None
    acc_std: float | None
    acc_min: float | None
    acc_max: float | None
    train_loss: float | None
    train_time_s: float
    examples_per_sec: float | None


def model_size(v: Variant) -> tuple[int, int]:
    """(trainable parameters, multiply-accumulates per image) of a variant's network."""
    return _model_size(v.model, json.dumps(v.overrides, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _model_size(model_name: str, overrides_json: str) -> tuple[int, int]:
    import torch

    from ..models import create_model, param_count
    from ..models.summary import trace

    torch.manual_seed(0)
    model = create_model(model_name, **json.loads(overrides_json))
    return param_count(model), sum(r.macs for r in trace(model))


def summarize(v: Variant, outcomes: list[RunOutcome]) -> VariantRow:
    params, macs = model_size(v)
    ok = [o for o in outcomes if o.status == "done"]
    accs = [o.test_acc for o in ok]
    mean = statistics.fmean(accs) if accs else None
    std = statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None)
    rates = [o.examples_per_sec for o in ok if o.examples_per_sec]
    return VariantRow(
        name=v.name, description=v.description, model=v.model, dataset=v.dataset, epochs=v.epochs,
        lr=v.lr, parameters=params, macs=macs, seeds=len(outcomes), diverged=len(outcomes) - len(ok),
        acc_mean=mean, acc_std=std, acc_min=min(accs) if accs else None, acc_max=max(accs) if accs else None,
        train_loss=statistics.fmean(o.train_loss for o in ok) if ok else None,
        train_time_s=statistics.fmean(o.train_time_s for o in ok) if ok else 0.0,
        examples_per_sec=statistics.fmean(rates) if rates else None)


CSV_FIELDS = ["variant", "description", "model", "dataset", "epochs", "lr", "parameters", "macs_per_image",
              "seeds", "diverged", "test_acc_mean", "test_acc_std", "test_acc_min", "test_acc_max",
              "final_train_loss", "train_time_s", "examples_per_sec"]


def _csv_row(r: VariantRow) -> dict[str, Any]:
    return {"variant": r.name, "description": r.description, "model": r.model, "dataset": r.dataset,
            "epochs": r.epochs, "lr": r.lr, "parameters": r.parameters, "macs_per_image": r.macs,
            "seeds": r.seeds, "diverged": r.diverged, "test_acc_mean": r.acc_mean, "test_acc_std": r.acc_std,
            "test_acc_min": r.acc_min, "test_acc_max": r.acc_max, "final_train_loss": r.train_loss,
            "train_time_s": r.train_time_s, "examples_per_sec": r.examples_per_sec}


def threads_note(outcomes: dict[str, list[RunOutcome]]) -> str:
    """How many torch threads the runs trained with, e.g. "1 CPU thread per run" (a run's metrics
    depend on it: floating-point sums are split between threads)."""
    counts: dict[int, int] = {}
    for runs_ in outcomes.values():
        for o in runs_:
            if o.threads is not None:
                counts[o.threads] = counts.get(o.threads, 0) + 1
    if not counts:
        return ""
    if len(counts) == 1:
        n = next(iter(counts))
        return f"Torch threads: {n} per run."
    return "Torch threads: " + ", ".join(f"{n} in {k} run(s)" for n, k in sorted(counts.items())) + "."


def format_markdown(spec: Spec, rows: list[VariantRow], pending: int = 0, note: str = "") -> str:
    def f(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lines = [f"# {spec.title or 'Comparison'}", "",
             f"Spec: `{spec.path}`. Test accuracy after the last epoch: mean ± standard deviation over "
             "seeds, and its range (min–max); train loss: the last epoch's average, mean over seeds; "
             "train time: seconds of training per run (evaluation excluded), mean over seeds."
             + (f" {note}" if note else ""), "",
             "| variant | what changes | data | epochs | lr | params | MACs/image | test acc | spread (min–max) "
             "| train loss | train time (s) | examples/s |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r.acc_mean is None:
            acc, spread = f"diverged ({r.diverged}/{r.seeds} seeds)", "—"
        else:
            ok = r.seeds - r.diverged
            acc = f"{r.acc_mean:.3f} ± {r.acc_std:.3f}" if ok > 1 else f"{r.acc_mean:.3f} (1 seed)"
            spread = f"{r.acc_min:.3f}–{r.acc_max:.3f}" if ok > 1 else "—"
            if r.diverged:
                acc += f" ({r.diverged}/{r.seeds} seeds diverged)"
        lines.append(f"| {r.name} | {r.description.replace('|', '/')} | {r.dataset} | {r.epochs} | {r.lr:g} | {r.parameters:,} "
                     f"| {r.macs:,} | {acc} | {spread} | {f(r.train_loss, '.3f')} | {r.train_time_s:.1f} "
                     f"| {f(r.examples_per_sec, ',.0f')} |")
    if pending:
        lines += ["", f"**Incomplete: {pending} run(s) still to train**; repeat the command to finish."]
    return "\n".join(lines) + "\n"


def mean_curves(spec: Spec, outcomes: dict[str, list[RunOutcome]]) -> dict[str, tuple[list[int], list[float]]]:
    """Per variant: epochs and the test accuracy at each, averaged over the seeds that finished."""
    curves = {}
    for v in spec.variants:
        ok = [o for o in outcomes.get(v.name, []) if o.status == "done"]
        if not ok:
            continue
        n = min(len(o.epochs) for o in ok)
        xs = [int(ok[0].epochs[i]["epoch"]) for i in range(n)]
        ys = [statistics.fmean(o.epochs[i]["test_acc"] for o in ok) for i in range(n)]
        curves[v.name] = (xs, ys)
    return curves


def write_results(spec: Spec, rows: list[VariantRow], outcomes: dict[str, list[RunOutcome]], out: Path,
                  pending: int = 0) -> None:
    from ..training import runs
    from ..inspect.plots import plot_comparison

    runs.write_csv(out / "results.csv", CSV_FIELDS, [_csv_row(r) for r in rows])
    runs.atomic_write_bytes(out / "results.md", format_markdown(spec, rows, pending, threads_note(outcomes)).encode())
    datasets = {v.name: v.dataset for v in spec.variants}
    plot_comparison(mean_curves(spec, outcomes), out / "test_acc.png", datasets=datasets,
                    title=spec.title or f"{spec.path.name}: test accuracy (mean over seeds)")
