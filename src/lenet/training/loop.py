"""The training loop behind ``lenet train``, in the shape of the book's ``train_ch6``.

    >>> from lenet import TrainConfig, train
    >>> result = train(TrainConfig(epochs=10))          # the book's recipe on Fashion-MNIST
    >>> result.test_acc

:func:`fit` reads top to bottom: prepare (device, data, model, optimizer, engine), then for each
epoch train, evaluate, log and checkpoint, then finish (weights and the figure). Each step is a
function of its own below it. The whole dataset stays in memory as uint8 and each batch is made
by indexing it with a seeded permutation (no DataLoader, no per-sample Python); metrics are
accumulated as tensors and read back a few times per epoch, not after every step. Like the book,
an epoch visits every example once (the last batch is smaller), the train loss/accuracy reported
for an epoch is the average over that epoch's batches as the weights changed, and the test
accuracy is measured after the epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__
from .._util import to_float
from ..data import Dataset, is_builtin, load_dataset
from ..errors import CheckpointError, ConfigError, Interrupted, TrainingDiverged
from ..models import config_to_dict, get_entry, param_count, resolve_config
from ..options import TrainConfig, resolve_device
from . import distributed, runs
from .augment import augment
from ..inspect.live import live_plot
from .engine import EngineOptions, Evaluator, TrainStep, configure_threads, keep_freed_memory
from .optim import make_optimizer, make_schedule
from .state import EpochMetrics, TrainState

Log = Callable[[str], None]


def model_criterion(model: nn.Module, label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss to train ``model`` with: its own ``criterion`` if it has one, else cross-entropy
    (with ``label_smoothing``, which a model's own loss does not take)."""
    own = getattr(model, "criterion", None)
    if own is not None:
        if label_smoothing:
            raise ConfigError(f"--label-smoothing {label_smoothing}: this model trains with its own loss "
                              f"({type(model).__name__}.criterion), which has no label smoothing; drop the flag")
        return own
    if label_smoothing:
        return functools.partial(nn.functional.cross_entropy, label_smoothing=label_smoothing)
    return nn.functional.cross_entropy


@dataclass
class TrainResult:
    config: TrainConfig
    model: nn.Module
    history: list[EpochMetrics]
    curve: list[dict[str, float | None]]
    train_time_s: float
    examples_seen: int
    device: torch.device
    run_dir: Path | None = None
    engine: str = ""  # how the step ran, e.g. "compiled, batch-last conv kernels"

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]

    @property
    def test_acc(self) -> float:
        return self.final.test_acc

    @property
    def examples_per_sec(self) -> float:
        return self.examples_seen / max(self.train_time_s, 1e-9)

    def book_lines(self) -> str:
        """The two lines the book prints at the end of training, in its format."""
        f = self.final
        return (f"loss {f.train_loss:.3f}, train acc {f.train_acc:.3f}, test acc {f.test_acc:.3f}\n"
                f"{self.examples_per_sec:.1f} examples/sec on {self.device}")


# --------------------------------------------------------------------------------------------
# The Python API: train and resume


def train(cfg: TrainConfig | None = None, *, data: Dataset | None = None, out: str | Path | None = None,
          overwrite: bool = False, progress: bool = False, log: Log | None = None,
          model: nn.Module | None = None, plot: bool = False,
          stop: Callable[[EpochMetrics], bool] | None = None) -> TrainResult:
    """Train a model as ``cfg`` says; if ``out`` is given, write a run folder there.

    ``data`` skips dataset discovery (e.g. a synthetic dataset); ``model`` trains a ready-made
    module instead of building ``cfg.model``. With a run folder, a checkpoint is written atomically
    at the end of every epoch, so :func:`resume` can continue after a crash or Ctrl-C. ``plot``:
    in a Jupyter notebook, draw the book's training curves live (nothing changes elsewhere).
    ``stop``: called with each epoch's metrics; training ends after the first epoch it is true for
    (e.g. a test accuracy reached: ``lenet bench --to-accuracy``).
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    resolve_config(cfg.model, cfg.overrides)  # refuse a bad model config before touching the disk
    if not is_builtin(cfg.dataset) and Path(cfg.dataset).expanduser().exists():  # a run can find it from anywhere
        cfg = dataclasses.replace(cfg, dataset=str(Path(cfg.dataset).expanduser().resolve()))
    if not distributed.world().is_main:  # under torchrun, rank 0 alone writes the run folder
        out = None
    run_dir = runs.prepare_run_dir(out, overwrite=overwrite) if out is not None else None
    return fit(cfg, data=data, run_dir=run_dir, progress=progress, log=log, model=model, plot=plot, stop=stop)


def resume(run_dir: str | Path, *, data_root: str | None = None, device: str | None = None,
           data: Dataset | None = None, progress: bool = False, log: Log | None = None,
           plot: bool = False) -> TrainResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved configuration.

    On CPU the resumed run ends with exactly the metrics and weights of an uninterrupted run.
    ``data_root`` and ``device`` may differ from the original run's (another machine).
    """
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_dict(runs.read_config(run_dir).get("train", {}))
    cfg.data_root = data_root if data_root is not None else cfg.data_root
    cfg.device = device if device is not None else cfg.device
    cfg.validate()
    checkpoint = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (the run stopped before its first epoch "
                              f"ended); start it again with --out {run_dir} --overwrite")
    return fit(cfg, data=data, run_dir=run_dir, progress=progress, log=log, checkpoint=checkpoint, plot=plot)


# --------------------------------------------------------------------------------------------
# The loop


def fit(cfg: TrainConfig, *, data: Dataset | None, run_dir: Path | None, progress: bool,
        log: Log | None, model: nn.Module | None = None,
        checkpoint: dict[str, Any] | None = None, plot: bool = False,
        stop: Callable[[EpochMetrics], bool] | None = None) -> TrainResult:
    """Prepare, then for each epoch: train, evaluate, log, checkpoint; then finish."""
    run = prepare(cfg, data=data, run_dir=run_dir, log=log, model=model)
    try:
        begin(run, checkpoint)
        bar = Progress(progress, run.log, live_plot(plot and run.world.is_main, cfg.epochs,
                                                    f"{cfg.model} on {run.data.name}"))
        try:
            for epoch in range(run.state.epoch + 1, cfg.epochs + 1):
                bar.start_epoch(epoch, cfg.epochs, run.steps)
                loss, acc, count, seconds = train_epoch(run, epoch, bar)
                test_acc = evaluate_test(run)
                metrics = log_epoch(run, epoch, loss, acc, count, seconds, test_acc)
                bar.end_epoch(metrics, cfg.epochs, run.state.curve)
                save_checkpoint(run)
                if stop is not None and stop(metrics):
                    break
        except KeyboardInterrupt:
            bar.close()
            _interrupted(run)
        finally:
            bar.close()
    finally:
        engine = run.close()
    return finish(run, engine)


@dataclass
class Run:
    """Everything one training run works with, made once by :func:`prepare`."""

    cfg: TrainConfig
    log: Log
    world: distributed.World
    device: torch.device
    joined: bool  # this process joined a torchrun process group
    data: Dataset
    model_cfg: Any
    state: TrainState
    step: TrainStep | None
    evaluator: Evaluator
    steps: int  # optimizer steps per epoch
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor  # under torchrun: this process's share of the test set
    test_y: torch.Tensor
    run_dir: Path | None  # None on ranks other than 0: they write nothing
    checkpoint_path: Path | None  # every rank resumes from it

    def close(self) -> str:
        """Leave the process group (if joined); return how the step ran."""
        engine = f"{'compiled' if self.step.compiling else 'eager'}, {self.step.conv}"
        if self.joined:
            # DistributedDataParallel (inside the step) must go before its process group: freed
            # after destroy_process_group, its reducer aborted the process now and then at exit.
            self.step = None
            gc.collect()
            distributed.teardown()
        return engine


def prepare(cfg: TrainConfig, *, data: Dataset | None, run_dir: Path | None, log: Log | None,
            model: nn.Module | None) -> Run:
    """Device and process group, data, model, optimizer and schedule, the step and the evaluator."""
    world = distributed.world()
    log = log if (log and world.is_main) else (lambda s: None)
    device, joined = _join(cfg, world)
    configure_threads(world.local_size)
    if device.type == "cpu":
        keep_freed_memory()
    model_cfg = resolve_config(cfg.model, cfg.overrides)
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_root, test_fraction=cfg.test_fraction,
                            image_size=getattr(model_cfg, "in_size", 28), log=log)
        for note in data.notes:
            log(f"note: {note}")
    model_cfg = _fit_classes(cfg, model_cfg, data)
    _check_fits(model_cfg, data)

    torch.manual_seed(cfg.seed)
    model = (model if model is not None else get_entry(cfg.model).build(model_cfg)).to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    steps = _steps_per_epoch(cfg, len(data.train), world, log)
    state = TrainState(model, optimizer, make_schedule(cfg, optimizer, steps),
                       torch.Generator().manual_seed(cfg.seed))
    test_x, test_y = data.test.images.to(device), data.test.labels.to(device)
    if world.active:  # each rank evaluates its share of the test set; the counts are summed
        test_x, test_y = test_x[world.rank::world.size], test_y[world.rank::world.size]
    step, evaluator = _engine(cfg, state, world, device, log)
    return Run(cfg, log, world, device, joined, data, model_cfg, state, step, evaluator, steps,
               data.train.images.to(device), data.train.labels.to(device), test_x, test_y,
               run_dir if world.is_main else None,
               run_dir / runs.CHECKPOINT if run_dir is not None else None)


def begin(run: Run, checkpoint: dict[str, Any] | None) -> None:
    """A new run writes its config.json; a resumed one restores its checkpointed state."""
    if checkpoint is None:
        if run.run_dir is not None:
            runs.write_json(run.run_dir / runs.CONFIG, _config_json(run))
        return
    run.state.load_state_dict(checkpoint, run.checkpoint_path)
    if run.state.epoch >= run.cfg.epochs:
        run.log(f"{run.run_dir} already finished all {run.cfg.epochs} epochs; nothing to resume")
    else:
        run.log(f"resuming {run.run_dir} at epoch {run.state.epoch + 1}/{run.cfg.epochs}")


def train_epoch(run: Run, epoch: int, bar: "Progress") -> tuple[float, float, int, float]:
    """One pass over the shuffled training set: (mean loss, accuracy, examples, seconds)."""
    cfg, state, device = run.cfg, run.state, run.device
    state.model.train()
    perm = torch.randperm(len(run.train_x), generator=state.shuffle).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count, last_mark, marks = 0, 0, _curve_marks(run.steps, cfg.curve_points)
    check_every = 1 if device.type == "cpu" else 20  # host syncs: free on CPU, costly on GPU
    t_epoch = time.perf_counter()
    prepare_epoch = getattr(state.optimizer, "prepare_epoch", None)
    if prepare_epoch is not None:  # e.g. SDLM: re-estimate the curvature on 500 patterns per pass
        prepare_epoch(state.model, to_float(run.train_x[perm[:500]]))
    for i in range(run.steps):
        idx = distributed.shard(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size], run.world)
        # index_select, not train_x[idx]: the same batch, gathered 5x faster on the CPU (speed-notes 17)
        x, y = run.train_x.index_select(0, idx), run.train_y.index_select(0, idx)
        loss, batch_correct = run.step(augment(x, cfg.shift, cfg.flip), y)
        loss_sum += loss * y.shape[0]
        correct += batch_correct
        count += y.shape[0]
        if (i + 1) % check_every == 0 and not torch.isfinite(loss).item():
            raise _diverged(run, loss.item(), f"at epoch {epoch}, step {i + 1}")
        if (i + 1) in marks:
            elapsed = state.train_time + time.perf_counter() - t_epoch
            tl, ta, n = _totals(run, loss_sum, correct, count)
            if not math.isfinite(tl):
                raise _diverged(run, tl, f"in epoch {epoch} before step {i + 1}")
            state.curve.append({"epoch": epoch - 1 + (i + 1) / run.steps, "train_loss": tl, "train_acc": ta,
                                "test_acc": None})
            shown = time.perf_counter()
            bar.update(i + 1 - last_mark, tl, ta, (state.seen + n) / max(elapsed, 1e-9), state.curve)
            t_epoch += time.perf_counter() - shown  # drawing progress is not training time
            last_mark = i + 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t_epoch
    loss_mean, acc, count = _totals(run, loss_sum, correct, count)
    return loss_mean, acc, count, seconds


def evaluate_test(run: Run) -> float:
    """Test accuracy of the model as it is now (summed over every process's share)."""
    correct = distributed.all_sum(run.evaluator.correct(run.test_x, run.test_y), run.world).item()
    return correct / len(run.data.test)


def log_epoch(run: Run, epoch: int, loss: float, acc: float, count: int, seconds: float,
              test_acc: float) -> EpochMetrics:
    """Add the epoch to the history and the curve; the state now counts it as finished."""
    state = run.state
    state.train_time += seconds
    state.seen += count
    state.epoch = epoch
    metrics = EpochMetrics(epoch, loss, acc, test_acc, seconds, count / seconds)
    state.history.append(metrics)
    state.curve.append({"epoch": float(epoch), "train_loss": None, "train_acc": None, "test_acc": test_acc})
    return metrics


def save_checkpoint(run: Run) -> None:
    """metrics.csv, curve.csv and the checkpoint, written atomically and never half-way by Ctrl-C."""
    if run.run_dir is None:
        return
    with _DeferInterrupt():
        runs.write_csv(run.run_dir / runs.METRICS, runs.METRIC_FIELDS,
                       [dataclasses.asdict(h) for h in run.state.history])
        runs.write_csv(run.run_dir / runs.CURVE, runs.CURVE_FIELDS, run.state.curve)
        runs.save_checkpoint(run.run_dir / runs.CHECKPOINT, run.state.state_dict())


def finish(run: Run, engine: str) -> TrainResult:
    """The result; with a run folder, the final weights and the book's figure."""
    s = run.state
    result = TrainResult(run.cfg, s.model, s.history, s.curve, s.train_time, s.seen, run.device,
                         run.run_dir, engine)
    if run.run_dir is not None:
        from ..inspect.plots import plot_curves

        runs.save_weights(s.model, run.run_dir / runs.WEIGHTS,
                          {"model": run.cfg.model, "model_config": json.dumps(config_to_dict(run.model_cfg)),
                           "dataset": run.data.name})
        plot_curves(s.curve, run.run_dir / runs.CURVES_PNG, title=f"{run.cfg.model} on {run.data.name}")
    return result


# --------------------------------------------------------------------------------------------
# The steps' helpers


def _join(cfg: TrainConfig, world: distributed.World) -> tuple[torch.device, bool]:
    """The device, after joining torchrun's process group where there is one."""
    device = resolve_device(cfg.device)
    if not world.active:
        return device, False
    if cfg.batch_size < world.size:  # checked before joining: every rank stops here
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {world.size} processes: each "
                          f"process needs at least one example per step; use --batch-size {world.size} or more")
    return distributed.setup(world, device)


def _fit_classes(cfg: TrainConfig, model_cfg: Any, data: Dataset) -> Any:
    """Output units follow the dataset's classes unless --num-classes / --set num_classes chose."""
    if "num_classes" in cfg.overrides or getattr(model_cfg, "num_classes", None) in (None, data.num_classes):
        return model_cfg
    return resolve_config(cfg.model, {**cfg.overrides, "num_classes": data.num_classes})


def _check_fits(model_cfg: Any, data: Dataset) -> None:
    """The model's input size and output units must fit the dataset."""
    if hasattr(model_cfg, "num_classes") and model_cfg.num_classes < data.num_classes:
        raise ConfigError(f"num_classes {model_cfg.num_classes} is smaller than the {data.num_classes} "
                          f"classes of {data.name}")
    side = data.train.images.shape[-1]
    if getattr(model_cfg, "in_size", side) != side or getattr(model_cfg, "in_channels", 1) != 1:
        raise ConfigError(f"in_size {model_cfg.in_size} and in_channels {model_cfg.in_channels} do not match "
                          f"the 1x{side}x{side} images of {data.name}; leave them at 28 and 1")


def _steps_per_epoch(cfg: TrainConfig, n: int, world: distributed.World, log: Log) -> int:
    steps = math.ceil(n / cfg.batch_size)
    tail = n % cfg.batch_size
    if world.active and 0 < tail < world.size:
        # A last batch too small to give every process an example would leave some with nothing
        # to train on; it is left out (the shuffle differs each epoch, so no example is lost for good).
        steps -= 1
        if steps == 0:
            raise ConfigError(f"the training set ({n} examples) is smaller than the {world.size} processes")
        log(f"note: each epoch leaves out its last {tail} shuffled example(s): too few for {world.size} processes")
    return steps


def _engine(cfg: TrainConfig, state: TrainState, world: distributed.World, device: torch.device,
            log: Log) -> tuple[TrainStep, Evaluator]:
    fast_conv = cfg.fast_conv
    if world.active and fast_conv is not False:
        # DistributedDataParallel needs the model itself (its hooks average the gradients), so the
        # step cannot use the kernels' runner; evaluation does not either, so no rank builds or
        # loads them while the others wait in a collective.
        if fast_conv:
            log("note: --fast-conv is not used under torchrun: DistributedDataParallel trains the model itself")
        fast_conv = False
    options = EngineOptions(cfg.compile, cfg.compile_mode, cfg.amp, fast_conv)
    step = TrainStep(distributed.wrap(state.model, device, world), model_criterion(state.model, cfg.label_smoothing),
                     state.optimizer, state.scheduler, device, options, log=log)
    return step, Evaluator(state.model, device, options, batch_size=cfg.eval_batch_size, log=log,
                           test_flip=cfg.test_flip)


def _config_json(run: Run) -> dict[str, Any]:
    cfg, data = run.cfg, run.data
    out = {"model": cfg.model, "model_config": config_to_dict(run.model_cfg), "dataset": data.name,
           "classes": list(data.classes), "train": dataclasses.asdict(cfg),
           "data": {"source": data.source or cfg.dataset, "split": data.split, "test_fraction": cfg.test_fraction,
                    "image_size": int(data.train.images.shape[-1]), "train": len(data.train), "test": len(data.test)},
           "parameters": param_count(run.state.model), "device": str(run.device), "lenet_version": __version__,
           "torch_version": torch.__version__, "python": platform.python_version()}
    if run.world.active:
        out["world_size"] = run.world.size
    return out


def _curve_marks(steps: int, points: int) -> set[int]:
    """The steps after which a point of the training curve is recorded."""
    return {min(steps, max(1, round(steps * k / points))) for k in range(1, points + 1)}


def _totals(run: Run, loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> tuple[float, float, int]:
    """(mean loss, accuracy, examples) so far, over all processes: one host sync."""
    if not run.world.active:
        return loss_sum.item() / count, correct.item() / count, count
    t = distributed.all_sum(torch.stack([loss_sum.double(), correct.double(),
                                         torch.tensor(float(count), device=run.device, dtype=torch.float64)]),
                            run.world).tolist()
    return t[0] / t[2], t[1] / t[2], int(t[2])


def _diverged(run: Run, value: float, where: str) -> TrainingDiverged:
    history = run.state.history
    kept = (f"; the last good checkpoint (epoch {history[-1].epoch}) is kept in {run.run_dir}"
            if run.run_dir is not None and history else "")
    return TrainingDiverged(f"loss became {value} {where}: training diverged; try a lower learning "
                            f"rate (e.g. --lr {run.cfg.lr / 10:g}){kept}")


def _interrupted(run: Run) -> None:
    if run.run_dir is None:
        raise KeyboardInterrupt
    raise Interrupted(f"interrupted; {run.state.epoch} of {run.cfg.epochs} epochs are saved in {run.run_dir}: "
                      f"continue with `lenet train --resume {run.run_dir}`") from None


class _DeferInterrupt:
    """Hold Ctrl-C while a checkpoint is written, then raise it: a checkpoint is never half-done."""

    def __enter__(self):
        self.pending = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.pending = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.pending:
            raise KeyboardInterrupt
        return False


class Progress:
    """Live progress: a tqdm bar per epoch (when enabled), one line per epoch, and the curves
    redrawn at every point in a notebook (when there is a :class:`~lenet.inspect.live.LivePlot`)."""

    def __init__(self, enabled: bool, log: Log, plot=None):
        self.enabled = enabled
        self.log = log
        self.plot = plot
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, steps: int, loss: float, acc: float, rate: float, curve: list[dict]) -> None:
        if self.plot is not None:
            self.plot.update(curve)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, acc {acc:.3f}, {rate:,.0f} ex/s", refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def end_epoch(self, m: EpochMetrics, epochs: int, curve: list[dict]) -> None:
        self.close()
        if self.plot is not None:
            self.plot.update(curve)
        self.log(f"epoch {m.epoch:>{len(str(epochs))}}/{epochs}: loss {m.train_loss:.3f}, "
                 f"train acc {m.train_acc:.3f}, test acc {m.test_acc:.3f}, "
                 f"{m.examples_per_sec:,.0f} examples/sec, {m.epoch_time_s:.1f} s")
