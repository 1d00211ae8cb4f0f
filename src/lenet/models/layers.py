"""Layers PyTorch does not ship, and the initialisations the LeNet papers use."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("sigmoid", "tanh", "scaled_tanh", "relu", "gelu")


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


def lecun_uniform_(module: nn.Module, fan_in: int) -> None:
    """LeCun et al. 1998, appendix A: the weight and the bias (a weight on a constant 1) of
    ``module`` uniform in +-2.4 / fan-in."""
    bound = 2.4 / fan_in
    nn.init.uniform_(module.weight, -bound, bound)
    if module.bias is not None:
        nn.init.uniform_(module.bias, -bound, bound)
