"""Seeing inside a trained network: feature maps, first-layer kernels, confident mistakes.

    >>> from lenet.runs import load_run
    >>> from lenet.data import load_dataset
    >>> from lenet import visualize
    >>> run = load_run("runs/book")
    >>> data = load_dataset(run.dataset)
    >>> idx = visualize.pick_images(data, classes=["Pullover", "Coat"])
    >>> visualize.plot_activations(run.model, data, idx, "act.png")

Feature maps are taken with forward hooks on the model's top-level layers, so any preset works
whatever its layer names: a "conv stage" is a top-level layer that is or contains an
``nn.Conv2d``; its feature maps are the output of the last layer after it that keeps its shape
(normalisation, activation), i.e. the maps after the activation and before pooling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .._util import eval_mode, to_float
from ..data import Dataset
from ..errors import LenetError
from .plots import new_figure


class VisualizeError(LenetError):
    """A bad image choice or a model that has nothing to show."""


# --------------------------------------------------------------------------------------------
# Choosing test images


def resolve_class(name: str, classes: Sequence[str]) -> int:
    """The index of class ``name`` (case-insensitive, or its number); one clear error otherwise."""
    for i, c in enumerate(classes):
        if c.lower() == name.strip().lower():
            return i
    raise VisualizeError(f"unknown class {name!r}: choose from {', '.join(repr(c) for c in classes)}")


def pick_images(data: Dataset, indices: Sequence[int] = (), classes: Sequence[str] = (),
                per_class: int = 1) -> list[int]:
    """Test-set indices: the given ``indices``, then the first ``per_class`` test images of each class."""
    n = len(data.test)
    chosen: list[int] = []
    for i in indices:
        if not 0 <= i < n:
            raise VisualizeError(f"--index {i} is out of range: the {data.name} test set has images 0..{n - 1}")
        chosen.append(int(i))
    labels = data.test.labels
    for name in classes:
        c = resolve_class(name, data.classes)
        found = torch.nonzero(labels == c).flatten()[:per_class].tolist()
        if not found:
            raise VisualizeError(f"class {name!r} has no image in the {data.name} test set")
        chosen.extend(found)
    return chosen


def class_name(classes: Sequence[str], index: int) -> str:
    """The name of output unit ``index``; units beyond the dataset's classes (``--num-classes``)
    are called ``class<i>``."""
    return classes[index] if 0 <= index < len(classes) else f"class{index}"


# --------------------------------------------------------------------------------------------
# Capturing feature maps


def _has_conv(module: nn.Module) -> bool:
    """A convolution: nn.Conv2d, or a layer that says it is one (LeNet-5's partially connected C3)."""
    return any(isinstance(m, nn.Conv2d) or getattr(m, "is_conv", False) for m in module.modules())


@dataclass
class StageMaps:
    name: str            # the layer whose output is shown, e.g. "act1"
    conv: str            # the conv layer of the stage, e.g. "conv1"
    maps: torch.Tensor   # (N, C, H, W)


@torch.no_grad()
def conv_stage_outputs(model: nn.Module, images: torch.Tensor, stages: int = 2) -> list[StageMaps]:
    """Feature maps of the first ``stages`` conv stages for float ``images`` (N, 1, H, W)."""
    children = list(model.named_children())
    outputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name, layer in children]
    try:
        with eval_mode(model):
            model(images)
    finally:
        for h in hooks:
            h.remove()
    result: list[StageMaps] = []
    i = 0
    while i < len(children) and len(result) < stages:
        name, layer = children[i]
        out = outputs.get(name)
        if _has_conv(layer) and isinstance(out, torch.Tensor) and out.dim() == 4:
            shown, j = name, i + 1
            while j < len(children):  # follow norm / activation layers that keep the shape
                nxt, nlayer = children[j]
                o = outputs.get(nxt)
                if _has_conv(nlayer) or not isinstance(o, torch.Tensor) or o.shape != out.shape:
                    break
                shown, j = nxt, j + 1
            result.append(StageMaps(shown, name, outputs[shown].detach().cpu()))
            i = j
        else:
            i += 1
    if not result:
        raise VisualizeError("this model has no convolution layer whose feature maps could be shown")
    return result


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise VisualizeError("this model has no convolution layer, so it has no kernels to show")


# --------------------------------------------------------------------------------------------
# Figures


def _softmax_predictions(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), eval_mode(model):
        probs = torch.softmax(model(images).float(), dim=1)
    conf, pred = probs.max(dim=1)
    return pred, conf


def plot_activations(model: nn.Module, data: Dataset, indices: Sequence[int], path: str | Path,
                     title: str = "", cols: int = 8) -> Path:
    """For each test image: the input (with true and predicted class) and the maps of 2 conv stages."""
    from matplotlib.gridspec import GridSpec

    images = to_float(data.test.images[list(indices)])
    stages = conv_stage_outputs(model, images)
    pred, conf = _softmax_predictions(model, images)
    cols = max(cols, max(min(s.maps.shape[1], 16) for s in stages) if stages else cols)
    cols = min(cols, 16)
    stage_rows = [math.ceil(s.maps.shape[1] / cols) for s in stages]
    block = sum(stage_rows)
    nrows = block * len(indices)
    cell = 0.75
    fig = new_figure(figsize=(1.6 + cell * (cols + 1.6), 0.6 + cell * nrows + 0.25 * len(indices)), dpi=110)
    gs = GridSpec(nrows, cols + 2, figure=fig, width_ratios=[1.6, 1.0] + [1] * cols,
                  hspace=0.35, wspace=0.08)
    # one colour scale per feature map, shared by all chosen images: map c of a sweater and of a
    # coat are drawn on the same scale
    scales = [(s.maps.amin(dim=(0, 2, 3)), s.maps.amax(dim=(0, 2, 3))) for s in stages]
    for k, idx in enumerate(indices):
        top = k * block
        ax = fig.add_subplot(gs[top:top + block, 0])
        ax.imshow(data.test.images[idx].numpy(), cmap="gray", vmin=0, vmax=255)
        true = data.classes[int(data.test.labels[idx])]
        guess = class_name(data.classes, int(pred[k]))
        mark = "" if guess == true else "  ✗"
        ax.set_title(f"#{idx}: {true}\npredicted {guess} ({conf[k]:.2f}){mark}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        row = top
        for s, rows, (lo, hi) in zip(stages, stage_rows, scales):
            maps = s.maps[k]
            label = fig.add_subplot(gs[row:row + rows, 1])
            label.axis("off")
            label.text(0.95, 0.5, f"{s.name}\n{maps.shape[0]}@{maps.shape[1]}x{maps.shape[2]}",
                       fontsize=7, ha="right", va="center", transform=label.transAxes)
            for c in range(maps.shape[0]):
                a = fig.add_subplot(gs[row + c // cols, 2 + c % cols])
                a.imshow(maps[c].numpy(), cmap="viridis", vmin=float(lo[c]), vmax=float(hi[c]))
                a.set_xticks([])
                a.set_yticks([])
            row += rows
    fig.suptitle(title or "input and feature maps after the activation of the first conv stages "
                          "(each map on its own colour scale, shared by the images)", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    return Path(path)


def plot_filters(model: nn.Module, path: str | Path, title: str = "", cols: int = 8) -> Path:
    """The first conv layer's kernels as a grid (red positive, blue negative, one shared scale)."""
    name, conv = first_conv(model)
    w = conv.weight.detach().cpu().float()  # (out, in, k, k)
    kernels = [(o, i, w[o, i]) for o in range(w.shape[0]) for i in range(w.shape[1])]
    cols = min(cols, len(kernels))
    rows = math.ceil(len(kernels) / cols)
    lim = float(w.abs().max()) or 1.0
    fig = new_figure(figsize=(1.0 + 1.1 * cols, 0.9 + 1.15 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax in axes.flat:
        ax.axis("off")
    for ax, (o, i, k) in zip(axes.flat, kernels):
        im = ax.imshow(k.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{o}" if w.shape[1] == 1 else f"{o}<-{i}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title or f"{name}: {w.shape[0]} kernels of {w.shape[2]}x{w.shape[3]}", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    return Path(path)


@dataclass
class Mistake:
    index: int
    true: int
    pred: int
    confidence: float


def confident_mistakes(model: nn.Module, data: Dataset, count: int = 16, *,
                       device: torch.device | str = "cpu") -> tuple[list[Mistake], int]:
    """The ``count`` misclassified test images with the highest softmax confidence; and how many
    test images are misclassified in all."""
    from ..inspect.evaluation import predict_scores

    scores = predict_scores(model, data.test.images, device=device).cpu()
    probs = torch.softmax(scores, dim=1)
    conf, pred = probs.max(dim=1)
    wrong = torch.nonzero(pred != data.test.labels).flatten()
    order = wrong[torch.argsort(conf[wrong], descending=True, stable=True)][:count]
    return ([Mistake(int(i), int(data.test.labels[i]), int(pred[i]), float(conf[i])) for i in order],
            int(wrong.numel()))


def plot_mistakes(mistakes: list[Mistake], data: Dataset, path: str | Path, title: str = "",
                  cols: int = 6) -> Path:
    cols = max(1, min(cols, len(mistakes)))
    rows = max(1, math.ceil(len(mistakes) / cols))
    fig = new_figure(figsize=(0.4 + 1.75 * cols, 0.7 + 2.3 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes):
        ax.imshow(data.test.images[m.index].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{m.index}\ntrue: {data.classes[m.true]}\npred: {class_name(data.classes, m.pred)} "
                     f"({m.confidence:.2f})", fontsize=7.5)
    if not mistakes:
        axes[0, 0].text(0.5, 0.5, "no misclassified test image", ha="center", va="center")
    fig.suptitle(title or "most confidently misclassified test images (confidence = softmax)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return Path(path)
