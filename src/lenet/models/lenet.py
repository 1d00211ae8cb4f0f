"""The LeNet family as one configurable network: the textbook ``classic`` and its ``modern``
sibling, and every ``--set`` variant in between.

Every model is a plain ``nn.Sequential`` with named layers (``conv1``, ``act1``, ``pool1``, ...,
``fc1``, ..., ``out``) so that a layer-by-layer trace, activation hooks and export work the same
for all of them. Models take images as float tensors of shape (N, 1, 28, 28) with pixels in
[0, 1] and return one score per class (higher is more likely).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .layers import ACTIVATIONS, ChannelLayerNorm, Subsampling, lecun_uniform_, make_activation
from .registry import register

POOLS = ("avg", "max", "sub", "conv", "none")
NORMS = ("none", "batch", "layer")
INITS = ("xavier", "he", "lecun", "default")
HEADS = ("flatten", "gap")


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
            elif scheme == "lecun":
                lecun_uniform_(m, m.weight[0].numel())


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


register("classic", "the textbook LeNet (d2l 7.6): sigmoid, avg-pool, 6-16 conv, 120-84 dense, Xavier",
         LeNetConfig(), build_lenet)
register("modern", "the same skeleton, modernised: ReLU, max-pool, BatchNorm, He init, global-average-pool head",
         LeNetConfig(channels=(32, 64), kernel_size=(5,), padding=(2, 0), activation="relu", pool="max",
                     dense=(64,), head="gap", norm="batch", init="he"),
         build_lenet, recipe={"lr": 0.1, "optimizer": "momentum", "schedule": "onecycle", "weight_decay": 5e-4})
