"""Every option of a training run, its allowed values and its checks, defined once.

:class:`TrainConfig` is a run's recipe. The vocabularies below (optimizers, schedules, compile
modes, precisions) and the per-field rules in :data:`RULES` are what ``lenet train``'s flags,
``lenet compare``'s spec keys, ``lenet bench`` and ``--resume`` read; a value is checked by
:func:`problem` wherever it comes from, so the CLI, a spec file and the Python API refuse the same
values with the same words. This module imports no torch: ``lenet --help`` stays instant.

To add an optimizer: name it in :data:`OPTIMIZERS` and build it in
:mod:`lenet.training.optim` (a test checks that the two agree).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# name -> what it is (shown by --help)
OPTIMIZERS = {
    "sgd": "plain SGD, the book's",
    "momentum": "SGD with momentum (--momentum)",
    "adam": "Adam",
    "adamw": "AdamW (decoupled weight decay)",
    "sdlm": "stochastic diagonal Levenberg-Marquardt, LeNet-5's",
}
SCHEDULES = {
    "constant": "the same learning rate throughout, the book's",
    "cosine": "cosine decay to 0 over the run",
    "onecycle": "one cycle: warm up to --lr, then anneal (momentum cycled where there is one)",
    "lecun": "the 1998 paper's step sizes per pass",
}
COMPILE_MODES = {
    "default": "torch.compile's default",
    "reduce-overhead": "CUDA graphs on a GPU",
    "max-autotune": "CUDA graphs and autotuned kernels on a GPU",
}
PRECISIONS = {"off": "float32", "bf16": "bfloat16 autocast (CUDA)", "fp16": "float16 autocast and a gradient scaler (CUDA)"}
MAX_PIXELS = 40_000_000  # larger images are refused from their header, before they are decoded
SERVE_MAX_UPLOAD = 4 * 1024 * 1024  # lenet serve: largest request body in bytes
SERVE_MAX_IMAGES = 64  # lenet serve: most images in one request
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"

# field -> rule. Rules: "count" (an integer >= 1), "seed" (an integer >= 0), "positive" (a finite
# number > 0), "nonneg" (a finite number >= 0), "unit" (a number in [0, 1)), "fraction" (a number
# strictly between 0 and 1), "switch" (True or False), or a vocabulary.
RULES: dict[str, Any] = {
    "epochs": "count", "batch_size": "count", "eval_batch_size": "count", "curve_points": "count",
    "lr": "positive", "momentum": "unit", "weight_decay": "nonneg", "seed": "seed", "test_fraction": "fraction",
    "shift": "seed", "flip": "switch", "label_smoothing": "unit", "test_flip": "switch",
    "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "compile_mode": COMPILE_MODES, "amp": PRECISIONS,
}


def problem(rule: Any, value: Any) -> str | None:
    """What is wrong with ``value`` under ``rule`` (a sentence fragment), or None if it is fine."""
    if isinstance(rule, dict):
        return None if value in rule else f"choose one of {', '.join(rule)}"
    if rule == "switch":
        return None if isinstance(value, bool) else "must be true or false"
    if rule in ("count", "seed"):
        low = 1 if rule == "count" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be an integer >= {low}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "must be a number"
    if rule == "positive":
        return None if value > 0 else "must be a positive number"
    if rule == "nonneg":
        return None if value >= 0 else "must be a number >= 0"
    if rule == "unit":
        return None if 0 <= value < 1 else "must be in [0, 1)"
    if rule == "fraction":
        return None if 0 < value < 1 else "must be between 0 and 1"
    raise AssertionError(rule)


def flag(name: str) -> str:
    """The CLI flag of a TrainConfig field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """A training run. Defaults are the book's recipe (d2l 7.6): SGD, lr 0.9, batch 256, 10 epochs."""

    model: str = "classic"
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields (--set key=value)
    dataset: str = "fashion-mnist"  # a built-in name, or the path of your own (lenet.data.load_dataset)
    data_root: str | None = None
    test_fraction: float = 0.1  # held out of each class when a dataset of your own has no test split
    epochs: int = 10
    lr: float = 0.9
    batch_size: int = 256
    optimizer: str = "sgd"
    momentum: float = 0.9  # used by "momentum" only
    weight_decay: float = 0.0
    schedule: str = "constant"
    shift: int = 0  # augmentation: random translations by up to this many pixels (lenet.training.augment)
    flip: bool = False  # augmentation: random left-right mirror images
    label_smoothing: float = 0.0  # cross-entropy's target smoothing (models with their own loss refuse it)
    test_flip: bool = False  # test-time flips: average the probabilities of each test image and its mirror
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
        from .models import get_entry

        return cls(model=model, **{**get_entry(model).recipe, **fields})

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainConfig":
        """A config from its saved form (a run's config.json), ignoring fields this version lacks."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field whose value cannot work."""
        for name, rule in RULES.items():
            value = getattr(self, name)
            why = problem(rule, value)
            if why:
                raise ConfigError(f"{flag(name)} {value!r}: {why}")
        resolve_device(self.device)


def resolve_device(name: str = "auto"):
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device name (use {DEVICE_HELP})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    if device.type == "mps" and not has_mps:
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device
