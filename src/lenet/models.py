"""The LeNet family: a config dataclass, a builder, and a registry of named presets.

Every model is a plain ``nn.Sequential`` with named layers (``conv1``, ``act1``, ``pool1``, ...,
``fc1``, ..., ``out``) so that a layer-by-layer trace, activation hooks and export work the same
for all of them. Models take images as float tensors of shape (N, 1, 28, 28) with pixels in
[0, 1] and return one score per class (higher is more likely).

    >>> from lenet.models import create_model
    >>> net = create_model("classic")                # the textbook LeNet
    >>> net = create_model("classic", pool="max")   # an exercise variant
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import ConfigError

ACTIVATIONS = ("sigmoid", "tanh", "scaled_tanh", "relu", "gelu")
POOLS = ("avg", "max", "sub", "conv", "none")
NORMS = ("none", "batch", "layer")
INITS = ("xavier", "he", "lecun", "default")
HEADS = ("flatten", "gap")


# --------------------------------------------------------------------------------------------
# Building blocks that PyTorch does not ship


class ScaledTanh(nn.Module):
    """LeCun's squashing function f(a) = 1.7159 * tanh(2a / 3) (1998, appendix A)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


class Subsampling(nn.Module):
    """LeNet-5's trainable subsampling: sum of each 2x2 block times a per-map coefficient plus a
    per-map bias (2 parameters per feature map). The squashing function follows as its own layer."""

    def __init__(self, channels: int, size: int = 2):
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.avg_pool2d(x, self.size, self.size) * float(self.size * self.size)
        return s * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, size={self.size}"


class ChannelLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) of each example, with a per-channel affine (like GroupNorm(1, C))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def make_activation(name: str) -> nn.Module:
    return {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "scaled_tanh": ScaledTanh,
            "relu": nn.ReLU, "gelu": nn.GELU}[name]()


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class LeNetConfig:
    """Everything that defines a LeNet-style network. Defaults are the textbook LeNet.

    ``channels`` has one entry per conv stage; ``kernel_size`` and ``padding`` are one value for
    all stages or one per stage; ``dense`` lists the hidden dense widths before the output layer
    (empty: the output layer reads the features directly). ``head="gap"`` replaces flattening with
    global average pooling.
    """

    channels: tuple[int, ...] = (6, 16)
    kernel_size: tuple[int, ...] = (5,)
    padding: tuple[int, ...] = (2, 0)
    activation: str = "sigmoid"
    pool: str = "avg"
    dense: tuple[int, ...] = (120, 84)
    head: str = "flatten"
    norm: str = "none"
    init: str = "xavier"
    dropout: float = 0.0
    num_classes: int = 10
    in_channels: int = 1
    in_size: int = 28

    def per_stage(self, values: tuple[int, ...], what: str) -> tuple[int, ...]:
        n = len(self.channels)
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise ConfigError(f"{what} has {len(values)} values for {n} conv stages: give one, or one per stage")
        return values

    def validate(self) -> int:
        """Raise :class:`ConfigError` if this network cannot be built; return the final map size."""

        def choose(name, value, options):
            if value not in options:
                raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(options)}")

        choose("activation", self.activation, ACTIVATIONS)
        choose("pool", self.pool, POOLS)
        choose("norm", self.norm, NORMS)
        choose("init", self.init, INITS)
        choose("head", self.head, HEADS)
        if not self.channels:
            raise ConfigError("channels is empty: a LeNet needs at least one conv stage")
        if any(c < 1 for c in self.channels) or any(d < 1 for d in self.dense):
            raise ConfigError(f"channels {self.channels} and dense {self.dense} must all be >= 1")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes {self.num_classes} must be at least 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")
        if self.in_size < 1 or self.in_channels < 1:
            raise ConfigError(f"in_size {self.in_size} and in_channels {self.in_channels} must be >= 1")
        kernels = self.per_stage(self.kernel_size, "kernel_size")
        pads = self.per_stage(self.padding, "padding")
        size, where = self.in_size, "the input"
        for i, (k, p) in enumerate(zip(kernels, pads), start=1):
            if k < 1 or p < 0:
                raise ConfigError(f"conv{i}: kernel {k} must be >= 1 and padding {p} >= 0")
            if k > size + 2 * p:
                raise ConfigError(
                    f"conv{i}: a {k}x{k} kernel does not fit the {size}x{size} map from {where}"
                    f" (padding {p}); use a smaller kernel, more padding, or fewer stages")
            size = size + 2 * p - k + 1
            where = f"conv{i}"
            if self.pool != "none":
                if size < 2:
                    raise ConfigError(f"pool{i}: a 2x2 pool does not fit the {size}x{size} map from conv{i}")
                size //= 2
                where = f"pool{i}"
        return size


def _coerce(value: str, default: Any, key: str) -> Any:
    """Turn the text of ``--set key=value`` into the type of the field's default."""
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            text = value.strip().strip("()[]")
            if text.lower() in ("", "none"):
                return ()
            return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
        return value
    except ValueError:
        kind = type(default).__name__ if not isinstance(default, tuple) else "comma-separated integers"
        raise ConfigError(f"--set {key}={value}: expected {kind}") from None


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the dataclass ``config`` with ``overrides`` (values may be strings from the CLI)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"unknown model setting {key!r} for {type(config).__name__}: "
                              f"known settings are {', '.join(fields)}")
        default = getattr(config, key)
        if isinstance(value, str) and not isinstance(default, str):
            value = _coerce(value, default, key)
        elif isinstance(default, tuple) and isinstance(value, (list, int)):
            value = tuple(value) if isinstance(value, list) else (value,)
        changes[key] = value
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------------------------
# Builder


def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise conv and linear weights: xavier (the book: weights only), he, lecun, default."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif scheme == "lecun":  # LeCun 1998: uniform in +-2.4 / fan-in
                fan_in = m.weight[0].numel()
                nn.init.uniform_(m.weight, -2.4 / fan_in, 2.4 / fan_in)
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -2.4 / fan_in, 2.4 / fan_in)


def build_lenet(cfg: LeNetConfig) -> nn.Sequential:
    """Build the network described by ``cfg`` (validated first)."""
    size = cfg.validate()
    kernels = cfg.per_stage(cfg.kernel_size, "kernel_size")
    pads = cfg.per_stage(cfg.padding, "padding")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = cfg.in_channels
    for i, (c, k, p) in enumerate(zip(cfg.channels, kernels, pads), start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c, kernel_size=k, padding=p, bias=cfg.norm != "batch")
        if cfg.norm == "batch":
            layers[f"norm{i}"] = nn.BatchNorm2d(c)
        elif cfg.norm == "layer":
            layers[f"norm{i}"] = ChannelLayerNorm(c)
        if cfg.pool == "sub":  # LeNet-5 order: conv -> squash -> subsample -> squash
            layers[f"act{i}"] = make_activation(cfg.activation)
            layers[f"pool{i}"] = Subsampling(c)
            layers[f"act{i}b"] = make_activation(cfg.activation)
        else:
            layers[f"act{i}"] = make_activation(cfg.activation)
            if cfg.pool == "avg":
                layers[f"pool{i}"] = nn.AvgPool2d(2, stride=2)
            elif cfg.pool == "max":
                layers[f"pool{i}"] = nn.MaxPool2d(2, stride=2)
            elif cfg.pool == "conv":
                layers[f"pool{i}"] = nn.Conv2d(c, c, kernel_size=2, stride=2)
        c_in = c
    if cfg.head == "gap":
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        features = c_in
    else:
        layers["flatten"] = nn.Flatten()
        features = c_in * size * size
    n_act = len(cfg.channels)
    for j, width in enumerate(cfg.dense, start=1):
        layers[f"fc{j}"] = nn.Linear(features, width)
        layers[f"act{n_act + j}"] = make_activation(cfg.activation)
        if cfg.dropout > 0:
            layers[f"drop{j}"] = nn.Dropout(cfg.dropout)
        features = width
    if cfg.dropout > 0 and not cfg.dense:
        layers["drop"] = nn.Dropout(cfg.dropout)
    layers["out"] = nn.Linear(features, cfg.num_classes)
    model = nn.Sequential(layers)
    init_weights(model, cfg.init)
    return model


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    config: Any  # a dataclass instance: the preset's defaults
    build: Callable[[Any], nn.Module]
    tags: tuple[str, ...] = field(default_factory=tuple)
    # The preset's recommended training recipe: TrainConfig fields (lr, optimizer, schedule, ...)
    # used when the user does not give them (see TrainConfig.for_model). Empty: the book's recipe.
    recipe: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelEntry] = {}


def register(name: str, description: str, config: Any, build: Callable[[Any], nn.Module],
             recipe: dict[str, Any] | None = None) -> None:
    MODELS[name] = ModelEntry(name, description, config, build, recipe=dict(recipe or {}))


def get_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}") from None


def resolve_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config of preset ``name`` with ``overrides`` applied (and validated)."""
    cfg = apply_overrides(get_entry(name).config, overrides or {})
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def create_model(name: str = "classic", **overrides: Any) -> nn.Module:
    """Build preset ``name`` with config overrides, timm-style: ``create_model("classic", pool="max")``."""
    entry = get_entry(name)
    return entry.build(resolve_config(name, overrides))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def build_from_dict(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from a saved (name, config dict) pair, as written in a run's config.json."""
    return create_model(name, **config)


register("classic", "the textbook LeNet (d2l 7.6): sigmoid, avg-pool, 6-16 conv, 120-84 dense, Xavier",
         LeNetConfig(), build_lenet)
register("modern", "the same skeleton, modernised: ReLU, max-pool, BatchNorm, He init, global-average-pool head",
         LeNetConfig(channels=(32, 64), kernel_size=(5,), padding=(2, 0), activation="relu", pool="max",
                     dense=(64,), head="gap", norm="batch", init="he"),
         build_lenet, recipe={"lr": 0.1, "optimizer": "momentum", "schedule": "onecycle", "weight_decay": 5e-4})


def param_count(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["LeNetConfig", "ScaledTanh", "Subsampling", "build_lenet", "create_model", "MODELS",
           "register", "resolve_config", "apply_overrides", "param_count", "config_to_dict",
           "build_from_dict", "init_weights"]

from . import lenet5 as _lenet5  # noqa: E402,F401  (registers the "lenet5" preset; needs the blocks above)
