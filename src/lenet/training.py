"""Training: the textbook recipe as a small engine, and the Python API behind ``lenet train``.

    >>> from lenet import TrainConfig, train
    >>> result = train(TrainConfig(epochs=10))          # the book's recipe on Fashion-MNIST
    >>> result.test_acc

The engine keeps the whole dataset in memory as uint8 and makes each batch by indexing it with a
seeded permutation (no DataLoader, no per-sample Python). Metrics are accumulated as tensors and
read back a few times per epoch, not after every step. Like the book, an epoch visits every
example once (the last batch is smaller) and the train loss/accuracy reported for an epoch is the
average over that epoch's batches as the weights changed; test accuracy is measured after the epoch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__, distributed
from .data import Dataset, load_dataset, to_float
from .errors import CheckpointError, ConfigError, Interrupted, TrainingDiverged
from .models import config_to_dict, get_entry, param_count, resolve_config

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "sdlm")
SCHEDULES = ("constant", "cosine", "onecycle", "lecun")
# LeCun et al. 1998's step sizes per pass (0.0005 for 2 passes, 0.0002 for 3, 0.0001 for 3,
# 0.00005 for 4, then 0.00001), as multiples of the first: the "lecun" schedule.
LECUN_PASSES = (1.0, 1.0, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1)
LECUN_AFTER = 0.02


@dataclass
class TrainConfig:
    """A training run. Defaults are the book's recipe (d2l 7.6): SGD, lr 0.9, batch 256, 10 epochs."""

    model: str = "classic"
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields (--set key=value)
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    epochs: int = 10
    lr: float = 0.9
    batch_size: int = 256
    optimizer: str = "sgd"
    momentum: float = 0.9  # used by "momentum" only
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 512  # small batches stay in the CPU caches: ~3x faster than 2048 here
    curve_points: int = 5  # points per epoch in the training curves, as the book's animator draws
    compile: bool | None = None  # torch.compile the step: None = where a compiler is available
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    amp: str = "off"  # mixed precision on CUDA: off | bf16 | fp16
    fast_conv: bool | None = None  # batch-last CPU conv kernels: None = wherever they apply

    @classmethod
    def for_model(cls, model: str = "classic", **fields: Any) -> "TrainConfig":
        """A config for ``model`` starting from its preset's recommended recipe (``lenet models``
        lists them): a field given here wins over the recipe, and the recipe over the defaults above.

            >>> TrainConfig.for_model("modern").optimizer
            'momentum'
        """
        return cls(model=model, **{**get_entry(model).recipe, **fields})

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr {self.lr}: must be a positive number")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"--weight-decay {self.weight_decay}: must be a number >= 0")
        if not (0 <= self.momentum < 1):
            raise ConfigError(f"--momentum {self.momentum}: must be in [0, 1)")
        if self.eval_batch_size < 1 or self.curve_points < 1:
            raise ConfigError("eval_batch_size and curve_points must be at least 1")
        from .engine import EngineOptions

        EngineOptions(self.compile, self.compile_mode, self.amp)  # checks the names
        resolve_device(self.device)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device name (use auto, cpu, cuda, cuda:0, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sdlm":
        from .sdlm import SDLM

        return SDLM(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "lecun":
        def per_pass(step: int) -> float:
            epoch = step // steps_per_epoch
            return LECUN_PASSES[epoch] if epoch < len(LECUN_PASSES) else LECUN_AFTER

        return torch.optim.lr_scheduler.LambdaLR(optimizer, per_pass)
    # One-cycle also cycles momentum (0.95 -> 0.85 -> 0.95, Smith's recipe) where the optimizer has
    # one (momentum, adam, adamw); plain SGD and SDLM keep none.
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                               cycle_momentum=cfg.optimizer in ("momentum", "adam", "adamw"))


def model_criterion(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss to train ``model`` with: its own ``criterion`` if it has one, else cross-entropy."""
    return getattr(model, "criterion", None) or nn.functional.cross_entropy


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    epoch_time_s: float
    examples_per_sec: float


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


class Progress:
    """Live progress: a tqdm bar per epoch (when enabled) and one line per epoch."""

    def __init__(self, enabled: bool, log: Callable[[str], None]):
        self.enabled = enabled
        self.log = log
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, steps: int, loss: float, acc: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, acc {acc:.3f}, {rate:,.0f} ex/s", refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def end_epoch(self, m: EpochMetrics, epochs: int) -> None:
        self.close()
        self.log(f"epoch {m.epoch:>{len(str(epochs))}}/{epochs}: loss {m.train_loss:.3f}, "
                 f"train acc {m.train_acc:.3f}, test acc {m.test_acc:.3f}, "
                 f"{m.examples_per_sec:,.0f} examples/sec, {m.epoch_time_s:.1f} s")


def train(cfg: TrainConfig | None = None, *, data: Dataset | None = None, out: str | Path | None = None,
          overwrite: bool = False, progress: bool = False, log: Callable[[str], None] | None = None,
          model: nn.Module | None = None) -> TrainResult:
    """Train a model as ``cfg`` says; if ``out`` is given, write a run folder there.

    ``data`` skips dataset discovery (e.g. a synthetic dataset); ``model`` trains a ready-made
    module instead of building ``cfg.model``. With a run folder, a checkpoint is written atomically
    at the end of every epoch, so :func:`resume` can continue after a crash or Ctrl-C.
    """
    from . import runs

    cfg = cfg or TrainConfig()
    cfg.validate()
    resolve_config(cfg.model, cfg.overrides)  # refuse a bad model config before touching the disk
    if not distributed.world().is_main:  # under torchrun, rank 0 alone writes the run folder
        out = None
    run_dir = runs.prepare_run_dir(out, overwrite=overwrite) if out is not None else None
    return _fit(cfg, data=data, run_dir=run_dir, progress=progress, log=log, model=model)


def resume(run_dir: str | Path, *, data_root: str | None = None, device: str | None = None,
           data: Dataset | None = None, progress: bool = False,
           log: Callable[[str], None] | None = None) -> TrainResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved configuration.

    On CPU the resumed run ends with exactly the metrics and weights of an uninterrupted run.
    ``data_root`` and ``device`` may differ from the original run's (another machine).
    """
    from . import runs

    run_dir = Path(run_dir)
    saved = runs.read_config(run_dir)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.get("train", {}).items() if k in known})
    if data_root is not None:
        cfg.data_root = data_root
    if device is not None:
        cfg.device = device
    cfg.validate()
    state = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
    if state is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (the run stopped before its first epoch "
                              f"ended); start it again with --out {run_dir} --overwrite")
    return _fit(cfg, data=data, run_dir=run_dir, progress=progress, log=log, state=state)


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


def _fit(cfg: TrainConfig, *, data: Dataset | None, run_dir: Path | None, progress: bool,
         log: Callable[[str], None] | None, model: nn.Module | None = None,
         state: dict[str, Any] | None = None) -> TrainResult:
    from . import runs

    from .engine import EngineOptions, Evaluator, TrainStep, configure_threads

    world = distributed.world()
    log = log if (log and world.is_main) else (lambda s: None)
    checkpoint_path = run_dir / runs.CHECKPOINT if run_dir is not None else None  # every rank resumes from it
    if not world.is_main:
        run_dir = None  # rank 0 alone writes
    device = resolve_device(cfg.device)
    if world.active and cfg.batch_size < world.size:  # checked before joining: every rank stops here
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {world.size} processes: each "
                          f"process needs at least one example per step; use --batch-size {world.size} or more")
    joined = False
    if world.active:
        device, joined = distributed.setup(world, device)
    configure_threads(world.local_size)
    entry = get_entry(cfg.model)
    model_cfg = resolve_config(cfg.model, cfg.overrides)
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_root, log=log)
    if hasattr(model_cfg, "num_classes") and model_cfg.num_classes < data.num_classes:
        raise ConfigError(f"num_classes {model_cfg.num_classes} is smaller than the {data.num_classes} "
                          f"classes of {data.name}")
    side = data.train.images.shape[-1]
    if getattr(model_cfg, "in_size", side) != side or getattr(model_cfg, "in_channels", 1) != 1:
        raise ConfigError(f"in_size {model_cfg.in_size} and in_channels {model_cfg.in_channels} do not match "
                          f"the 1x{side}x{side} images of {data.name}; leave them at 28 and 1")

    torch.manual_seed(cfg.seed)
    if model is None:
        model = entry.build(model_cfg)
    model.to(device)
    criterion = model_criterion(model)
    optimizer = make_optimizer(cfg, model.parameters())
    n = len(data.train)
    steps = math.ceil(n / cfg.batch_size)
    tail = n % cfg.batch_size
    if world.active and 0 < tail < world.size:
        # A last batch too small to give every process an example would leave some with nothing
        # to train on; it is left out (the shuffle differs each epoch, so no example is lost for good).
        steps -= 1
        if steps == 0:
            raise ConfigError(f"the training set ({n} examples) is smaller than the {world.size} processes")
        log(f"note: each epoch leaves out its last {tail} shuffled example(s): too few for {world.size} processes")
    scheduler = make_schedule(cfg, optimizer, steps)
    shuffle = torch.Generator().manual_seed(cfg.seed)

    history: list[EpochMetrics] = []
    curve: list[dict[str, float | None]] = []
    train_time, seen, start_epoch = 0.0, 0, 1
    if state is not None:
        try:
            runs.load_state_into(model, state["model"], checkpoint_path)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            shuffle.set_state(state["shuffle_rng"])
            torch.set_rng_state(state["torch_rng"])
            history = [EpochMetrics(**h) for h in state["history"]]
            curve = list(state["curve"])
            train_time, seen = float(state["train_time"]), int(state["seen"])
            start_epoch = int(state["epoch"]) + 1
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{checkpoint_path}: does not match this run's model or "
                                  f"optimizer ({exc}); start the run again with --overwrite") from None
        if start_epoch > cfg.epochs:
            log(f"{run_dir} already finished all {cfg.epochs} epochs; nothing to resume")
        else:
            log(f"resuming {run_dir} at epoch {start_epoch}/{cfg.epochs}")

    train_x, train_y = data.train.images.to(device), data.train.labels.to(device)
    test_x, test_y = data.test.images.to(device), data.test.labels.to(device)
    if world.active:  # each rank evaluates its share of the test set; the counts are summed
        test_x, test_y = test_x[world.rank::world.size], test_y[world.rank::world.size]
    fast_conv = cfg.fast_conv
    if world.active and fast_conv is not False:
        # DistributedDataParallel needs the model itself (its hooks average the gradients), so the
        # step cannot use the kernels' runner; evaluation does not either, so no rank builds or
        # loads them while the others wait in a collective.
        if fast_conv:
            log("note: --fast-conv is not used under torchrun: DistributedDataParallel trains the model itself")
        fast_conv = False
    options = EngineOptions(cfg.compile, cfg.compile_mode, cfg.amp, fast_conv)
    step = TrainStep(distributed.wrap(model, device, world), criterion, optimizer, scheduler, device,
                     options, log=log)
    evaluator = Evaluator(model, device, options, batch_size=cfg.eval_batch_size, log=log)

    def totals(loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> tuple[float, int, int]:
        """(summed loss, correct, examples) over all ranks: one host sync."""
        if not world.active:
            return loss_sum.item(), correct.item(), count
        t = distributed.all_sum(torch.stack([loss_sum.double(), correct.double(),
                                             torch.tensor(float(count), device=device, dtype=torch.float64)]),
                                world).tolist()
        return t[0], int(t[1]), int(t[2])
    marks = sorted({min(steps, max(1, round(steps * k / cfg.curve_points))) for k in range(1, cfg.curve_points + 1)})
    check_every = 1 if device.type == "cpu" else 20  # host syncs: free on CPU, costly on GPU

    if run_dir is not None and state is None:
        config_json = {
            "model": cfg.model, "model_config": config_to_dict(model_cfg), "dataset": data.name,
            "classes": list(data.classes), "train": dataclasses.asdict(cfg),
            "parameters": param_count(model), "device": str(device), "lenet_version": __version__,
            "torch_version": torch.__version__, "python": platform.python_version(),
        }
        if world.active:
            config_json["world_size"] = world.size
        runs.write_json(run_dir / runs.CONFIG, config_json)

    def diverged(value: float, where: str) -> TrainingDiverged:
        kept = (f"; the last good checkpoint (epoch {history[-1].epoch}) is kept in {run_dir}"
                if run_dir is not None and history else "")
        return TrainingDiverged(f"loss became {value} {where}: training diverged; try a lower learning "
                                f"rate (e.g. --lr {cfg.lr / 10:g}){kept}")

    bar = Progress(progress, log)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=shuffle).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            count, last_mark = 0, 0
            bar.start_epoch(epoch, cfg.epochs, steps)
            t_epoch = time.perf_counter()
            prepare = getattr(optimizer, "prepare_epoch", None)
            if prepare is not None:  # e.g. SDLM: re-estimate the curvature on 500 patterns per pass
                prepare(model, to_float(train_x[perm[:500]]))
            for i in range(steps):
                idx = distributed.shard(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size], world)
                y = train_y[idx]
                loss, batch_correct = step(train_x[idx], y)
                loss_sum += loss * y.shape[0]
                correct += batch_correct
                count += y.shape[0]
                if (i + 1) % check_every == 0 and not torch.isfinite(loss).item():
                    raise diverged(loss.item(), f"at epoch {epoch}, step {i + 1}")
                if (i + 1) in marks:
                    elapsed = train_time + time.perf_counter() - t_epoch
                    s_loss, s_correct, s_count = totals(loss_sum, correct, count)
                    tl, ta = s_loss / s_count, s_correct / s_count
                    all_seen = seen + s_count
                    if not math.isfinite(tl):
                        raise diverged(tl, f"in epoch {epoch} before step {i + 1}")
                    curve.append({"epoch": epoch - 1 + (i + 1) / steps, "train_loss": tl, "train_acc": ta,
                                  "test_acc": None})
                    bar.update(i + 1 - last_mark, tl, ta, all_seen / max(elapsed, 1e-9))
                    last_mark = i + 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - t_epoch
            s_loss, s_correct, count = totals(loss_sum, correct, count)
            train_time += epoch_time
            seen += count
            test_correct = distributed.all_sum(evaluator.correct(test_x, test_y), world).item()
            test_acc = test_correct / len(data.test)
            m = EpochMetrics(epoch, s_loss / count, s_correct / count, test_acc,
                             epoch_time, count / epoch_time)
            history.append(m)
            curve.append({"epoch": float(epoch), "train_loss": None, "train_acc": None, "test_acc": test_acc})
            bar.end_epoch(m, cfg.epochs)
            if run_dir is not None:
                with _DeferInterrupt():
                    runs.write_csv(run_dir / runs.METRICS, runs.METRIC_FIELDS,
                                   [dataclasses.asdict(h) for h in history])
                    runs.write_csv(run_dir / runs.CURVE, runs.CURVE_FIELDS, curve)
                    runs.save_checkpoint(run_dir / runs.CHECKPOINT, {
                        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "shuffle_rng": shuffle.get_state(),
                        "torch_rng": torch.get_rng_state(), "history": [dataclasses.asdict(h) for h in history],
                        "curve": curve, "train_time": train_time, "seen": seen,
                    })
    except KeyboardInterrupt:
        bar.close()
        if run_dir is None:
            raise
        done = history[-1].epoch if history else 0
        raise Interrupted(f"interrupted; {done} of {cfg.epochs} epochs are saved in {run_dir}: "
                          f"continue with `lenet train --resume {run_dir}`") from None
    finally:
        bar.close()
        engine = f"{'compiled' if step.compiling else 'eager'}, {step.conv}"  # how the step ran
        if joined:
            # DistributedDataParallel (inside the step) must go before its process group: freed
            # after destroy_process_group, its reducer aborted the process now and then at exit.
            step = None
            gc.collect()
            distributed.teardown()

    result = TrainResult(cfg, model, history, curve, train_time, seen, device, run_dir, engine)
    if run_dir is not None:
        from .plots import plot_curves

        runs.save_weights(model, run_dir / runs.WEIGHTS,
                          {"model": cfg.model, "model_config": json.dumps(config_to_dict(model_cfg)),
                           "dataset": data.name})
        plot_curves(curve, run_dir / runs.CURVES_PNG, title=f"{cfg.model} on {data.name}")
    return result
