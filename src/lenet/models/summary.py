"""The chapter's debugging tool: walk one input through the network and report every layer.

For each top-level layer: its name and type, output shape, trainable parameters and
multiply-accumulates (MACs) per image (convolutions and dense layers; pooling, activations and
normalisation are counted as zero MACs, as is usual).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._util import eval_mode


@dataclass
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    macs: int


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return out[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    counter = getattr(module, "macs", None)  # custom layers may count themselves
    if callable(counter):
        return int(counter(inp, out))
    return 0


def trace(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> list[LayerRow]:
    """Run one (random) input through ``model``'s top-level layers and record each layer."""
    rows: list[LayerRow] = []
    x = torch.rand(input_shape)
    with torch.no_grad(), eval_mode(model):
        for name, layer in model.named_children():
            y = layer(x)
            params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            rows.append(LayerRow(name, type(layer).__name__, tuple(y.shape), params, _macs(layer, x, y)))
            x = y
    return rows


def format_table(rows: list[LayerRow], title: str = "") -> str:
    """The trace as a text table, followed by totals."""
    head = f"{'layer':<10} {'type':<18} {'output shape':<20} {'params':>9} {'MACs':>11}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        shape = "(" + ", ".join(map(str, r.shape)) + ")"
        lines.append(f"{r.name:<10} {r.kind:<18} {shape:<20} {r.params:>9,} {r.macs:>11,}")
    lines.append("-" * len(head))
    total_p = sum(r.params for r in rows)
    total_m = sum(r.macs for r in rows)
    lines.append(f"total: {total_p:,} trainable parameters, {total_m:,} multiply-accumulates per image "
                 f"({2 * total_m / 1e6:.2f} MFLOP forward)")
    return "\n".join(lines)


def spatial_path(rows: list[LayerRow], input_size: int = 28) -> list[int]:
    """The sizes the chapter checks: 28 -> 28 -> 14 -> 10 -> 5 -> 400 -> 120 -> 84 -> 10 for classic.

    The side of each new spatial size (for 4-D outputs), then the width of each 2-D output, skipping
    layers that keep the previous value.
    """
    path = [input_size]
    for r in rows:
        value = r.shape[-1] if len(r.shape) == 4 else r.shape[1]
        if r.kind in ("Conv2d",) or value != path[-1]:
            path.append(value)
    return path
