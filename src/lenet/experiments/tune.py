"""The search behind ``lenet tune SPEC.toml --trials N``: Optuna's TPE over a declared space.

A tune spec is a ``lenet compare`` spec's ``[defaults]`` (the fixed part of every trial, with
compare's keys and checks) plus a ``[tune]`` table (how to search) and a ``[space]`` table (what
varies: a list is a choice, a table ``{ low, high, log, step }`` a range; ``[space.set]`` holds
model settings, as ``set`` does in compare)::

    [defaults]
    model = "classic"
    epochs = 10

    [tune]
    trials = 20                 # --trials wins
    validation_fraction = 0.1   # of each class of the training set, seeded
    seed = 0                    # the split, the sampler, and every trial's training seed

    [space]
    lr = { low = 0.01, high = 3.0, log = true }
    optimizer = ["sgd", "momentum", "adam"]

    [space.set]
    pool = ["avg", "max"]

A trial is a compare variant (a :class:`~lenet.options.TrainConfig` plus model settings) built from
the defaults and the sampled values, so a value the space may produce is checked by the same rules
as everywhere else. Trials are scored on a validation split carved from the training set; the test
set is read once, after the search, by retraining the best configuration on the whole training set
(``RESULTS/final/``). The study lives in ``RESULTS/study.db`` (Optuna's SQLite storage): a repeated
command continues it, trials left running by an interrupted command continue from their last
checkpoint, and worker processes or Ray tasks report each epoch's score to it, where the median
rule prunes unpromising trials.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, Interrupted, LenetError, TrainingDiverged
from ..options import problem
from .compare import (KEYS, Variant, _check_table, _DataCache, _make_variant,
                      model_size, tomllib)
from .workers import FolderLock, InlineExecutor, make_executor, set_threads

STUDY_NAME = "lenet-tune"
TRIAL_MARKER = "trial.json"
FINAL_MARKER = "final.json"
TUNABLE = ("model", "epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "schedule", "shift", "flip",
           "label_smoothing", "test_flip")
TUNE_KEYS: dict[str, tuple[Any, Any]] = {  # key -> (rule, default)
    "trials": ("count", None),
    "validation_fraction": ("fraction", 0.1),
    "seed": ("seed", 0),
    "prune": ("bool", True),
    "prune_from_epoch": ("count", 3),
    "startup_trials": ("count", 10),
    "max_parameters": ("count", None),
    "top": ("count", 10),
}
MAX_REJECTED = 200  # samples in a row that are not valid networks, or too large, before giving up


# --------------------------------------------------------------------------------------------
# The spec


@dataclass
class Dimension:
    """One searched key: ``lr`` or ``set.pool``; a list of choices or a range."""

    key: str
    choices: list[Any] | None = None
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None

    @property
    def integer(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)

    def _encoded(self) -> list[Any]:
        """Optuna's choices are scalars: a list choice (e.g. channels) is stored as its JSON text."""
        return [c if isinstance(c, (str, int, float, bool)) else json.dumps(c) for c in self.choices]

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return self.decode(trial.suggest_categorical(self.key, self._encoded()))
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def decode(self, value: Any) -> Any:
        if self.choices is not None and isinstance(value, str) and value not in self.choices:
            return json.loads(value)
        return value

    def describe(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass
class TuneSpec:
    path: Path
    title: str
    defaults: dict[str, Any]  # the checked [defaults] table
    space: list[Dimension]
    trials: int | None = None
    validation_fraction: float = 0.1
    seed: int = 0
    prune: bool = True
    prune_from_epoch: int = 3
    startup_trials: int = 10
    max_parameters: int | None = None
    top: int = 10
    base: Variant = field(default=None)  # type: ignore[assignment]  # the defaults as a variant

    def variant(self, params: dict[str, Any], name: str = "trial", where: str | None = None) -> Variant:
        """The variant of sampled ``params`` ({"lr": 0.3, "set.pool": "max"}); ConfigError if it cannot work."""
        own: dict[str, Any] = {}
        sets = {k[4:]: v for k, v in params.items() if k.startswith("set.")}
        for k, v in params.items():
            if not k.startswith("set."):
                own[k] = v
        if sets:
            own["set"] = sets
        return _make_variant(self.path, name, self.defaults, own, where=where or f"{self.path}: {name}")

    def fingerprint(self) -> str:
        """What makes two searches the same search (not the number of trials or the table's length)."""
        what = {"defaults": self.defaults, "space": {d.key: d.describe() for d in self.space},
                "validation_fraction": self.validation_fraction, "seed": self.seed, "prune": self.prune,
                "prune_from_epoch": self.prune_from_epoch, "startup_trials": self.startup_trials,
                "max_parameters": self.max_parameters}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_tune_spec(text: str, path: str | Path = "<spec>") -> TuneSpec:
    """Parse and validate a tune spec; every problem is one :class:`ConfigError` line naming the key."""
    path = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = [k for k in doc if k not in ("title", "defaults", "tune", "space")]
    if unknown:
        hint = " (a tune spec has no variants: the space is searched)" if unknown[0] == "variants" else ""
        raise ConfigError(f"{path}: unknown top-level entry {unknown[0]!r}{hint}; a tune spec has title, "
                          "[defaults], [tune] and [space] tables")
    title = doc.get("title", "")
    if not isinstance(title, str):
        raise ConfigError(f"{path}: title = {title!r}: expected a string")
    defaults = _check_table(f"{path}: [defaults]", doc.get("defaults", {}))
    if "seeds" in defaults:
        raise ConfigError(f"{path}: [defaults]: seeds: a search trains each trial once; set the seed in [tune] "
                          "(seed = 0)")
    spec = TuneSpec(path=path, title=title, defaults=defaults, space=[])
    tune = doc.get("tune", {})
    if not isinstance(tune, dict):
        raise ConfigError(f"{path}: tune = {tune!r}: expected a [tune] table")
    for key, value in tune.items():
        if key not in TUNE_KEYS:
            raise ConfigError(f"{path}: [tune]: unknown key {key!r}; known keys are {', '.join(TUNE_KEYS)}")
        rule = TUNE_KEYS[key][0]
        why = ("must be true or false" if not isinstance(value, bool) else None) if rule == "bool" else problem(rule, value)
        if why:
            raise ConfigError(f"{path}: [tune]: {key} = {value!r}: {why}")
        setattr(spec, key, value)
    spec.base = _make_variant(path, "defaults", defaults, {}, where=f"{path}: [defaults]")
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: no [space]: add the keys to search, e.g. lr = {{ low = 0.01, high = 1.0, "
                          "log = true }} or optimizer = [\"sgd\", \"adam\"]")
    for key, value in space.items():
        if key == "set":
            if not isinstance(value, dict) or not value:
                raise ConfigError(f"{path}: [space] set = {value!r}: expected a table of model settings, "
                                  "e.g. [space.set] with pool = [\"avg\", \"max\"]")
            for sub, sub_value in value.items():
                spec.space.append(_dimension(spec, f"set.{sub}", sub_value))
        elif key in TUNABLE:
            spec.space.append(_dimension(spec, key, value))
        else:
            known = ", ".join((*TUNABLE, "set"))
            extra = " (fixed for the whole search: put it in [defaults])" if key in KEYS else ""
            raise ConfigError(f"{path}: [space]: {key!r} cannot be searched{extra}; searchable keys are {known}")
    return spec


def _dimension(spec: TuneSpec, key: str, value: Any) -> Dimension:
    where = f"{spec.path}: [space] {key}"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where} = []: expected at least one choice")
        if any(value[i] == value[j] for i in range(len(value)) for j in range(i)):
            raise ConfigError(f"{where} = {value!r}: the choices must differ")
        for choice in value:
            _check_point(spec, key, choice)
        return Dimension(key, choices=list(value))
    if not isinstance(value, dict):
        raise ConfigError(f"{where} = {value!r}: expected a list of choices, e.g. [0.1, 0.5], or a range, "
                          "e.g. { low = 0.01, high = 1.0, log = true }")
    unknown = [k for k in value if k not in ("low", "high", "log", "step")]
    if unknown or "low" not in value or "high" not in value:
        raise ConfigError(f"{where} = {value!r}: a range is {{ low = ..., high = ... }}, with log = true or "
                          "step = ... if wanted" + (f" (unknown {unknown[0]!r})" if unknown else ""))
    low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
    for name, x in (("low", low), ("high", high)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ConfigError(f"{where}: {name} = {x!r}: expected a number")
    integer_key = key in ("epochs", "batch_size")
    if integer_key and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where} = {value!r}: low and high must be integers")
    if not low < high:
        raise ConfigError(f"{where} = {value!r}: low must be below high")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log = {log!r}: must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where} = {value!r}: a log range needs low > 0")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise ConfigError(f"{where}: step = {step!r}: must be a number > 0")
        if log:
            raise ConfigError(f"{where} = {value!r}: give log or step, not both")
        if isinstance(low, int) and isinstance(high, int) and not isinstance(step, int):
            raise ConfigError(f"{where}: step = {step!r}: an integer range needs an integer step")
    for x in (low, high):
        _check_point(spec, key, x)
    return Dimension(key, low=low, high=high, log=log, step=step)


def _check_point(spec: TuneSpec, key: str, value: Any) -> None:
    """A value the space may produce must make a valid variant with the defaults (one line if not)."""
    where = f"{spec.path}: [space] {key}"
    params = {key: value}
    if not key.startswith("set."):
        _check_table(f"{spec.path}: [space]", params)
    elif isinstance(value, dict) or (isinstance(value, list) and any(
            isinstance(x, bool) or not isinstance(x, int) for x in value)):
        raise ConfigError(f"{where}: {value!r}: expected a number, string, or list of integers")
    spec.variant(params, where=f"{where} = {value!r}" if key.startswith("set.") else f"{spec.path}: [space]")


def load_tune_spec(path: str | Path) -> TuneSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"spec {path} not found: pass a TOML file such as experiments/tune-classic.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"spec {path} is a folder: pass a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"spec {path}: cannot read it ({exc})") from None
    return parse_tune_spec(text, path)


# --------------------------------------------------------------------------------------------
# Data: trials see the training set only


def validation_split(full, fraction: float, seed: int):
    """A Dataset whose ``train`` is the training set less a stratified, seeded ``fraction`` of each
    class, and whose ``test`` is that fraction: the validation split. ``full.test`` is not read."""
    import torch

    from ..data import Dataset, Split, stratified_split

    source = full.train
    labels = source.labels
    train_idx, val_idx = stratified_split(labels.numpy(), fraction, seed)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    images = source.images
    return Dataset(name=full.name, classes=full.classes, train=Split(images[train_idx], labels[train_idx]),
                   test=Split(images[val_idx], labels[val_idx]), folder=full.folder, source=full.source,
                   split=f"validation: {fraction:g} of each class of the training set (seed {seed})")


_WORKER_DATA: dict[Any, Any] = {}  # a worker process's datasets and validation splits, kept between trials


def _full_data(v: Variant, data_root: str | None, shared):
    """The dataset of ``v`` (cut to train_limit / test_limit), loaded once per process; ``shared``
    (a dataset handed to the Python API) as it is."""
    if shared is not None:
        return shared
    key = ("full", v.dataset, v.test_fraction, data_root)
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = _DataCache(data_root, lambda s: None).get(v)
    return _WORKER_DATA[key]


def _search_data(full, fraction: float, seed: int):
    key = ("split", id(full), fraction, seed)
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = validation_split(full, fraction, seed)
    return _WORKER_DATA[key]


# --------------------------------------------------------------------------------------------
# Optuna


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LenetError("lenet tune needs Optuna, which is not installed: pip install 'lenet[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_url(out: Path, storage: str | None = None) -> str:
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


_STORAGES: dict[str, Any] = {}


def _storage(url: str):
    optuna = _optuna()
    if url not in _STORAGES:
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": 120}}} if url.startswith("sqlite") else {}
        try:
            _STORAGES[url] = optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors for a bad URL or an unreadable file
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LenetError(f"cannot open the study storage {url}: {text}") from None
    return _STORAGES[url]


def _pruner(prune: bool, from_epoch: int):
    optuna = _optuna()
    if not prune:
        return optuna.pruners.NopPruner()
    # a trial is stopped after an epoch >= from_epoch whose validation accuracy is below the median
    # of the earlier trials' at that epoch, once 5 trials have finished
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=from_epoch)


def _sampler(spec: TuneSpec, number: int):
    """TPE, seeded by the spec's seed and the trial's number: a search run one trial at a time
    samples the same trials whether or not it was interrupted and continued."""
    optuna = _optuna()
    return optuna.samplers.TPESampler(seed=spec.seed * 1_000_003 + number, n_startup_trials=spec.startup_trials,
                                      multivariate=True, constant_liar=True)


def open_study(spec: TuneSpec, url: str):
    optuna = _optuna()
    study = optuna.create_study(storage=_storage(url), study_name=STUDY_NAME, direction="maximize",
                                load_if_exists=True, pruner=_pruner(spec.prune, spec.prune_from_epoch))
    mark = study.user_attrs.get("lenet_spec")
    if mark is None:
        study.set_user_attr("lenet_spec", spec.fingerprint())
        study.set_user_attr("space", [d.key for d in spec.space])
    elif mark != spec.fingerprint():
        raise ConfigError(f"{url}: holds a search of another spec (its [defaults], [tune] or [space] differ "
                          f"from {spec.path}'s); choose another --out, or delete the study to start again")
    return study


# --------------------------------------------------------------------------------------------
# One trial (in this process, a worker process or a Ray task)


@dataclass
class TrialJob:
    number: int
    trial_id: int
    variant: Variant
    run_dir: Path
    storage: str
    prune: bool
    prune_from_epoch: int
    validation_fraction: float
    seed: int
    data_root: str | None
    device: str


class _Pruned(Exception):
    def __init__(self, epoch: int, score: float):
        super().__init__(epoch, score)
        self.epoch, self.score = epoch, score


def _trial_settings(job: TrialJob) -> dict[str, Any]:
    return {**job.variant.settings(job.seed), "validation_fraction": job.validation_fraction}


def _worker_info() -> dict[str, Any]:
    import socket

    import torch

    return {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _trial_job(shared, job: TrialJob) -> dict[str, Any]:
    """Train one trial on the validation split, reporting each epoch's score to the study (which
    may prune it); continue from its checkpoint if a previous attempt was cut short."""
    from ..training import runs

    optuna = _optuna()
    settings = _trial_settings(job)
    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(job.storage),
                              pruner=_pruner(job.prune, job.prune_from_epoch))
    trial = optuna.trial.Trial(study, job.trial_id)  # the trial the command asked for, by its storage id
    marker = _read_json(job.run_dir / TRIAL_MARKER)
    if marker.get("settings") == settings and marker.get("status") in ("complete", "pruned", "diverged"):
        _record(trial, marker["result"])  # it ended, but the command that ran it did not record it
        return marker["result"]
    full = _full_data(job.variant, job.data_root, shared)
    data = _search_data(full, job.validation_fraction, job.seed)
    reported = set(_frozen(study, job.number).intermediate_values)
    resume = marker.get("settings") == settings and marker.get("status") == "running"

    def report(epoch: int, score: float, check: bool) -> None:
        if epoch not in reported:
            trial.report(score, epoch)
            reported.add(epoch)
        if check and job.prune and trial.should_prune():
            raise _Pruned(epoch, score)

    cfg = job.variant.train_config(job.seed, job.data_root, job.device)
    message, resumed = "", [0]
    try:
        result = fit_run(cfg, data, job.run_dir, resume=resume, after_epoch=report, resumed=resumed,
                         marker=(TRIAL_MARKER, {"trial": job.number, "status": "running", "settings": settings,
                                                "worker": _worker_info()}))
        state, value = "complete", result.history[-1].test_acc
    except _Pruned as exc:
        state, value = "pruned", exc.score
    except TrainingDiverged as exc:
        state, value, message = "diverged", None, str(exc)
    history = runs.read_csv(job.run_dir / runs.METRICS) if (job.run_dir / runs.METRICS).is_file() else []
    out = {"state": state, "value": value, "epochs": len(history), "message": message,
           "train_time_s": sum(r["epoch_time_s"] or 0.0 for r in history), "resumed": resumed[0]}
    _record(trial, out)
    runs.write_json(job.run_dir / TRIAL_MARKER, {"trial": job.number, "status": state, "settings": settings,
                                                 "result": out, "worker": _worker_info()})
    (job.run_dir / runs.CHECKPOINT).unlink(missing_ok=True)  # only needed to continue it
    return out


def _record(trial, result: dict[str, Any]) -> None:
    """What the table shows of a trial, kept in the study with it."""
    for name in ("epochs", "train_time_s", "message"):
        trial.set_user_attr(name, result[name])
    if result["state"] == "diverged":
        trial.set_user_attr("diverged", True)


def _frozen(study, number: int):
    """The stored trial ``number`` (trials are numbered 0, 1, ... in a study)."""
    return study.get_trials(deepcopy=False)[number]


def fit_run(cfg, data, run_dir: Path, *, resume: bool, after_epoch: Callable[[int, float, bool], None] | None = None,
            evaluate_each_epoch: bool = True, marker: tuple[str, dict] | None = None, resumed: list | None = None):
    """Train ``cfg`` on ``data`` into ``run_dir`` with the training loop's own steps, calling
    ``after_epoch(epoch, score, check)`` after each epoch (it may raise to stop the run); continue
    from the folder's checkpoint when ``resume`` (``resumed[0]`` is set to the epoch it continued
    after). Without ``evaluate_each_epoch`` the test split is evaluated once, after the last epoch.
    ``marker``: (file name, content) written into the folder before training starts."""
    from ..training import loop, runs

    cfg.validate()
    checkpoint = runs.load_checkpoint(run_dir / runs.CHECKPOINT) if resume else None
    if resumed is not None:
        resumed[0] = int(checkpoint["epoch"]) if checkpoint else 0
    if checkpoint is None:
        runs.prepare_run_dir(run_dir, overwrite=True)
    for tmp in run_dir.glob(".*.tmp"):  # what a killed process left half-written
        tmp.unlink(missing_ok=True)
    if marker is not None:
        runs.write_json(run_dir / marker[0], marker[1])
    run = loop.prepare(cfg, data=data, run_dir=run_dir, log=None, model=None)
    try:
        loop.begin(run, checkpoint)
        if after_epoch is not None:
            for m in run.state.history:  # epochs done before: reported again where the study lacks them
                after_epoch(m.epoch, m.test_acc, m.epoch == run.state.epoch < cfg.epochs)
        bar = loop.Progress(False, run.log)
        try:
            for epoch in range(run.state.epoch + 1, cfg.epochs + 1):
                loss, acc, count, seconds = loop.train_epoch(run, epoch, bar)
                score = loop.evaluate_test(run) if evaluate_each_epoch or epoch == cfg.epochs else None
                loop.log_epoch(run, epoch, loss, acc, count, seconds, score)
                loop.save_checkpoint(run)
                if after_epoch is not None:  # a trial that trained all its epochs is complete, not pruned
                    after_epoch(epoch, score, epoch < cfg.epochs)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {run.state.epoch} epoch(s) of {run_dir} are saved") from None
    finally:
        engine = run.close()
    return loop.finish(run, engine)


# --------------------------------------------------------------------------------------------
# The search


@dataclass
class SearchResult:
    trials: list[Any]  # Optuna's FrozenTrials, by number
    best: Any | None  # the best complete trial
    test_acc: float | None  # the best configuration retrained on the whole training set, on the test set
    final_dir: Path | None


def run_search(spec: TuneSpec, out: str | Path, *, trials: int | None = None, data_root: str | None = None,
               device: str = "auto", log: Callable[[str], None] | None = None, data=None, jobs: int = 1,
               ray: str | bool | None = None, threads: int | None = None, storage: str | None = None,
               retries: int = 2) -> SearchResult:
    """Run the search until ``trials`` trials (default: the spec's) have ended, then retrain the best
    on the whole training set and evaluate it on the test set; write the results into ``out``.

    ``data`` (a Dataset) replaces loading the dataset (tests). ``jobs``, ``ray``, ``threads``: where
    trials train, as in :func:`lenet.experiments.compare.run_spec`.
    """
    optuna = _optuna()
    log = log or (lambda s: None)
    total = trials or spec.trials
    if total is None:
        raise ConfigError(f"{spec.path}: how many trials? pass --trials N or set trials in [tune]")
    out = Path(out)
    try:
        (out / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LenetError(f"cannot create results folder {out}: {exc.strerror or exc}; choose another --out") from None
    url = storage_url(out, storage)
    with FolderLock(out, "lenet tune"):
        study = open_study(spec, url)
        full = None
        with make_executor(jobs, ray, threads, shared=data) as executor:
            inline = isinstance(executor, InlineExecutor)
            if inline:
                full = data if data is not None else _full_data(spec.base, data_root, None)
            else:
                log(f"training trials on {executor.where}, {executor.threads} thread(s) each")
            try:
                _search(spec, study, executor, total, out, url, full if inline else None, data_root, device, log,
                        retries)
            except (KeyboardInterrupt, Interrupted, LenetError) as exc:
                executor.stop()
                _write_results(spec, study, out, None, total)
                if isinstance(exc, (KeyboardInterrupt, Interrupted)):
                    raise Interrupted(f"interrupted; the study and the trials' saved epochs are kept in {out}: "
                                      "repeat the command to continue") from None
                raise
        states = optuna.trial.TrialState
        complete = [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))]
        if not complete:
            _write_results(spec, study, out, None, total)
            raise LenetError(f"no trial completed (all were pruned, diverged or failed): see {out / 'results.md'}")
        best = max(complete, key=lambda t: (t.value, -t.number))
        if full is None:
            full = data if data is not None else _full_data(spec.base, data_root, None)
        with _threads(threads):
            final = _final(spec, best, full, out, data_root, device, log)
        _write_results(spec, study, out, final, total)
    return SearchResult(study.get_trials(deepcopy=False), best, final["test_acc"], out / "final")


class _threads:
    """Torch threads for a block run in this process (None: leave them)."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self):
        if self.threads is not None:
            import torch

            self.saved = (os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
            set_threads(self.threads)

    def __exit__(self, *exc):
        if self.threads is not None:
            import torch

            env, n = self.saved
            torch.set_num_threads(n)
            if env is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env


def _counted(t) -> bool:
    """Whether a finished trial counts towards --trials (a sample never trained does not)."""
    return "rejected" not in t.user_attrs


def _leftover_jobs(spec: TuneSpec, study, dims: dict, out: Path, url: str, data_root: str | None, device: str,
                   log: Callable[[str], None]) -> list[TrialJob]:
    """Trials an interrupted command left running: continued first, from their checkpoints."""
    leftovers = study.get_trials(deepcopy=False, states=(_optuna().trial.TrialState.RUNNING,))
    queue = []
    for t in leftovers:
        params = {k: dims[k].decode(v) for k, v in t.params.items() if k in dims}
        queue.append(_job(spec, t.number, t._trial_id, spec.variant(params, f"trial {t.number}"), out, url,
                          data_root, device))
    if leftovers:
        log(f"continuing {len(leftovers)} trial(s) an interrupted command left: "
            f"{', '.join(str(t.number) for t in leftovers)}")
    return queue


def _tell(study, number: int, result: dict, states):
    """Record a finished trial in the study (unless already recorded); its frozen trial."""
    trial_state = {"complete": states.COMPLETE, "pruned": states.PRUNED, "diverged": states.PRUNED}[result["state"]]
    frozen = _frozen(study, number)
    if frozen.state == states.RUNNING:
        study.tell(number, result["value"] if trial_state == states.COMPLETE else None, state=trial_state)
    return frozen


def _search(spec: TuneSpec, study, executor, total: int, out: Path, url: str, full, data_root: str | None,
            device: str, log: Callable[[str], None], retries: int) -> None:
    optuna = _optuna()
    states = optuna.trial.TrialState
    dims = {d.key: d for d in spec.space}
    width = len(str(total))

    def ended() -> list:
        return [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL))
                if _counted(t)]

    jobs: dict[str, TrialJob] = {}
    attempts: dict[str, int] = {}
    queue = _leftover_jobs(spec, study, dims, out, url, data_root, device, log)
    done_before = len(ended())
    if done_before:
        log(f"{out / 'study.db'}: {done_before} trial(s) already ended")

    def ask() -> TrialJob:
        for _ in range(MAX_REJECTED):
            study.sampler = _sampler(spec, len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            params = {d.key: d.suggest(trial) for d in spec.space}
            try:
                variant = spec.variant(params, f"trial {trial.number}")
            except ConfigError as exc:
                reason = str(exc).split(": ", 2)[-1]
            else:
                size = model_size(variant)[0]
                trial.set_user_attr("parameters", size)
                if spec.max_parameters is None or size <= spec.max_parameters:
                    return _job(spec, trial.number, trial._trial_id, variant, out, url, data_root, device)
                reason = f"{size:,} parameters > max_parameters {spec.max_parameters:,}"
            trial.set_user_attr("rejected", reason)
            study.tell(trial, state=states.PRUNED)
            log(f"trial {trial.number}: not trained: {reason} ({_params_text(params)})")
        raise LenetError(f"{spec.path}: {MAX_REJECTED} samples in a row were not valid networks or were over "
                         "max_parameters; narrow the [space]")

    def status() -> str:
        running = executor.running()
        return f"{running} running, {max(0, total - len(ended()) - running)} queued"

    while True:
        while executor.running() < executor.slots and len(ended()) + executor.running() < total:
            job = queue.pop(0) if queue else ask()
            key = f"trial-{job.number}"
            jobs[key] = job
            attempts[key] = attempts.get(key, 0) + 1
            executor.submit(key, _inline_trial if full is not None else _trial_job,
                            (job, full) if full is not None else (job,))
        if not executor.running():
            break
        event = executor.wait()
        job = jobs[event.key]
        if event.kind == "died":
            if attempts[event.key] <= retries:
                queue.insert(0, job)
                log(f"trial {job.number}: {event.value}; training it again from its last checkpoint ({status()})")
            else:
                study.tell(job.number, state=states.FAIL)
                log(f"trial {job.number}: {event.value} again; given up after {attempts[event.key]} attempts")
            continue
        if event.kind == "error":
            raise LenetError(event.value)
        if event.kind == "interrupted":
            raise KeyboardInterrupt
        result = event.value
        frozen = _tell(study, job.number, result, states)
        n = len(ended())
        how = f" (resumed after epoch {result['resumed']})" if result.get("resumed") else ""
        params = _params_text({k: dims[k].decode(v) for k, v in frozen.params.items() if k in dims})
        log(f"[{n:>{width}}/{total}] trial {job.number}: {_result_text(result)}{how} ({params}); "
            f"{_best_text(study)}" + (f" [{status()}]" if executor.running() or n < total else ""))
        _write_results(spec, study, out, None, total, plots=False)


def _job(spec: TuneSpec, number: int, trial_id: int, variant: Variant, out: Path, url: str,
         data_root: str | None, device: str) -> TrialJob:
    return TrialJob(number, trial_id, variant, out / "trials" / f"trial-{number:04d}", url, spec.prune,
                    spec.prune_from_epoch, spec.validation_fraction, spec.seed, data_root, device)


def _inline_trial(shared, job: TrialJob, full) -> dict[str, Any]:
    return _trial_job(full, job)


def _result_text(r: dict[str, Any]) -> str:
    if r["state"] == "complete":
        return f"val acc {r['value']:.4f} after {r['epochs']} epochs, {r['train_time_s']:.1f} s"
    if r["state"] == "pruned":
        return f"pruned after epoch {r['epochs']} (val acc {r['value']:.4f})"
    return f"diverged ({r['message'].split(':')[0]})"


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "-".join(str(x) for x in v) if v else "none"
    return str(v)


def _best_text(study) -> str:
    optuna = _optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return "no complete trial yet"
    best = max(complete, key=lambda t: (t.value, -t.number))
    return f"best {best.value:.4f} (trial {best.number})"


# --------------------------------------------------------------------------------------------
# The best configuration, retrained on the whole training set


def _final(spec: TuneSpec, best, full, out: Path, data_root: str | None, device: str,
           log: Callable[[str], None]) -> dict[str, Any]:
    """Retrain the best trial's variant on the whole training set; the test set is read once."""
    from ..training import runs

    dims = {d.key: d for d in spec.space}
    params = {k: dims[k].decode(v) for k, v in best.params.items() if k in dims}
    variant = spec.variant(params, f"trial {best.number}")
    final_dir = out / "final"
    settings = {**variant.settings(spec.seed), "trial": best.number}
    marker = _read_json(final_dir / FINAL_MARKER)
    if marker.get("settings") == settings and marker.get("status") == "done":
        log(f"final: the best trial ({best.number}) was already retrained: test acc {marker['test_acc']:.4f}")
        return marker
    resume = (marker.get("settings") == settings and marker.get("status") == "running"
              and (final_dir / runs.CHECKPOINT).is_file())
    log(f"final: retraining trial {best.number} (val acc {best.value:.4f}) on the whole training set "
        f"({len(full.train):,} images), then evaluating it once on the test set")
    running = {"trial": best.number, "status": "running", "settings": settings, "val_acc": best.value}
    result = fit_run(variant.train_config(spec.seed, data_root, device), full, final_dir, resume=resume,
                     evaluate_each_epoch=False, marker=(FINAL_MARKER, running))
    done = {**running, "status": "done", "test_acc": result.history[-1].test_acc,
            "train_images": len(full.train), "test_images": len(full.test), "train_time_s": result.train_time_s,
            "parameters": model_size(variant)[0], "params": params}
    runs.write_json(final_dir / FINAL_MARKER, done)
    (final_dir / runs.CHECKPOINT).unlink(missing_ok=True)
    log(f"final: test acc {done['test_acc']:.4f} (trial {best.number}, {done['train_time_s']:.1f} s of training)")
    return done


# --------------------------------------------------------------------------------------------
# Results: table, plots


CSV_FIXED = ["trial", "state", "val_acc", "epochs_run", "parameters", "train_time_s", "note"]


def _trial_rows(spec: TuneSpec, study) -> list[dict[str, Any]]:
    dims = {d.key: d for d in spec.space}
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        note = t.user_attrs.get("rejected") or t.user_attrs.get("message") or ""
        if state == "pruned" and "rejected" in t.user_attrs:
            state = "not trained"
        elif t.user_attrs.get("diverged"):
            state = "diverged"
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        row = {"trial": t.number, "state": state, "val_acc": value,
               "epochs_run": t.user_attrs.get("epochs", len(t.intermediate_values)),
               "parameters": t.user_attrs.get("parameters"), "train_time_s": t.user_attrs.get("train_time_s"),
               "note": note.split(":")[0] if state == "diverged" else note}
        for k, d in dims.items():
            v = d.decode(t.params[k]) if k in t.params else None
            row[k] = json.dumps(v) if isinstance(v, list) else v
        rows.append(row)
    return rows


def _write_results(spec: TuneSpec, study, out: Path, final: dict[str, Any] | None, total: int,
                   plots: bool = True) -> None:
    """The table (after every trial) and the plots (when the command ends)."""
    from ..training import runs

    rows = _trial_rows(spec, study)
    keys = [d.key for d in spec.space]
    runs.write_csv(out / "results.csv", CSV_FIXED[:4] + keys + CSV_FIXED[4:], rows)
    runs.atomic_write_bytes(out / "results.md", format_markdown(spec, rows, final, total).encode())
    if plots:
        _plot_history(rows, out / "history.png", spec.title)
        _plot_importance(study, out / "importance.png", spec.title)


def format_markdown(spec: TuneSpec, rows: list[dict[str, Any]], final: dict[str, Any] | None, total: int) -> str:
    keys = [d.key for d in spec.space]
    count = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "diverged", "fail", "running",
                                                             "not trained")}
    ended = count["complete"] + count["pruned"] + count["diverged"] + count["fail"]
    lines = [f"# {spec.title or 'Search'}", "",
             f"Spec: `{spec.path}`. {ended} of {total} trials ended: {count['complete']} complete, "
             f"{count['pruned']} pruned, {count['diverged']} diverged, {count['fail']} failed"
             + (f"; {count['not trained']} sampled configuration(s) not trained (not valid, or over "
                f"max_parameters)" if count["not trained"] else "") + ". "
             f"Sampler: Optuna's TPE (seed {spec.seed}, the first {spec.startup_trials} trials random); "
             + (f"pruning: the median rule from epoch {spec.prune_from_epoch} once 5 trials have ended. "
                if spec.prune else "no pruning. ")
             + f"Trials are scored on a validation split ({spec.validation_fraction:g} of each class of the "
             "training set, seeded), never on the test set: validation accuracy after the trial's last epoch.", ""]
    lines += ["## Result", ""]
    if final is not None:
        lines += [f"Best trial: **#{final['trial']}**, validation accuracy {final['val_acc']:.4f}. Retrained with "
                  f"its settings on the whole training set ({final['train_images']:,} images) and evaluated once "
                  f"on the test set ({final['test_images']:,} images): **test accuracy {final['test_acc']:.4f}** "
                  f"({final['parameters']:,} parameters, {final['train_time_s']:.1f} s of training; run folder "
                  "`final/`).", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in final["params"].items()]
    else:
        lines.append("**Incomplete**: the search has not finished; repeat the command to continue.")
    lines += ["", f"## Best trials (top {spec.top} by validation accuracy)", "",
              "| rank | trial | val acc | state | epochs | " + " | ".join(keys) + " | params | train time (s) |",
              "|--:|--:|--:|---|--:|" + "---|" * len(keys) + "--:|--:|"]
    scored = sorted((r for r in rows if r["val_acc"] is not None and r["state"] in ("complete", "pruned")),
                    key=lambda r: (r["state"] != "complete", -r["val_acc"], r["trial"]))
    for i, r in enumerate(scored[:spec.top], start=1):
        values = " | ".join(_fmt(json.loads(r[k]) if isinstance(r[k], str) and r[k].startswith("[") else r[k])
                            for k in keys)
        params = f"{r['parameters']:,}" if isinstance(r["parameters"], int) else "—"
        time_s = f"{r['train_time_s']:.1f}" if isinstance(r["train_time_s"], (int, float)) else "—"
        lines.append(f"| {i} | {r['trial']} | {r['val_acc']:.4f} | {r['state']} | {r['epochs_run']} | {values} "
                     f"| {params} | {time_s} |")
    lines += ["", "Pruned trials are ranked after the complete ones, by their last validation accuracy. Every "
              "trial is in `results.csv`; `history.png` shows the search over time and `importance.png` "
              "how much each setting mattered (Optuna's PED-ANOVA importances)."]
    return "\n".join(lines) + "\n"


def _plot_history(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from ..inspect.plots import new_figure

    fig = new_figure(figsize=(6.4, 3.6), dpi=120)
    ax = fig.subplots()
    done = [r for r in rows if r["state"] == "complete" and r["val_acc"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["val_acc"] is not None]
    ax.plot([r["trial"] for r in done], [r["val_acc"] for r in done], "o", color="tab:blue", label="complete")
    ax.plot([r["trial"] for r in pruned], [r["val_acc"] for r in pruned], "x", color="tab:gray",
            label="pruned (last score)")
    best, xs, ys = -1.0, [], []
    for r in sorted(done, key=lambda r: r["trial"]):
        best = max(best, r["val_acc"])
        xs.append(r["trial"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{title}\nsearch history" if title else "search history", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _plot_importance(study, path: Path, title: str) -> None:
    from ..inspect.plots import new_figure

    optuna = _optuna()
    fig = new_figure(figsize=(6.4, 3.2), dpi=120)
    ax = fig.subplots()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        importances, reason = {}, str(exc).split(".")[0]
    else:
        reason = "too few complete trials, or nothing varied"
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
    else:
        ax.text(0.5, 0.5, f"no importances yet: {reason}", ha="center", va="center", fontsize=8,
                transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{title}\nsetting importance" if title else "setting importance", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
