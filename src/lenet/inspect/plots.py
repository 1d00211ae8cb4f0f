"""Figures: training curves, confusion matrix, comparisons, sample grids.

Figures are made with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot: no
global state and no backend switch, so drawing here leaves a notebook's own plots alone.
Matplotlib is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def new_figure(**kwargs):
    """A matplotlib Figure that belongs to no pyplot state (saved with the Agg renderer)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def curves_figure(curve: Sequence[dict], title: str = "", epochs: float | None = None):
    """The book's animator figure: train loss, train acc (5 points an epoch) and test acc per
    epoch; the x axis runs to ``epochs`` (the whole run, while it is still training)."""
    fig = new_figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.subplots()
    pts = [r for r in curve if r.get("train_loss") is not None]
    tests = [r for r in curve if r.get("test_acc") is not None]
    ax.plot([r["epoch"] for r in pts], [r["train_loss"] for r in pts], "-", label="train loss")
    ax.plot([r["epoch"] for r in pts], [r["train_acc"] for r in pts], "m--", label="train acc")
    ax.plot([r["epoch"] for r in tests], [r["test_acc"] for r in tests], "g-.", marker=".", label="test acc")
    ax.set_xlim(0, epochs or max([r["epoch"] for r in curve] + [1]))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(curve: Sequence[dict], path: Path, title: str = "") -> Path:
    """Save :func:`curves_figure` of a finished run."""
    curves_figure(curve, title).savefig(path)
    return path


def plot_confusion(confusion, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Confusion matrix heat map with counts (rows: true class, columns: predicted)."""
    cm = confusion.numpy() if hasattr(confusion, "numpy") else confusion
    n = len(classes)
    fig = new_figure(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n), dpi=120)
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6,
                    color="white" if cm[i, j] > top / 2 else "black")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_comparison(curves: dict, path: Path, datasets: dict | None = None, title: str = "") -> Path:
    """Test accuracy against epoch, one line per variant (``curves``: name -> (epochs, accs)).

    Variants on different datasets get their own panel (accuracies on MNIST and Fashion-MNIST
    are not on the same scale)."""
    datasets = datasets or {}
    groups: dict[str, list[str]] = {}
    for name in curves:
        groups.setdefault(datasets.get(name, ""), []).append(name)
    if not groups:
        groups[""] = []
    styles = ["-", "--", "-.", ":"]
    tallest = max(len(names) for names in groups.values())
    import matplotlib

    fig = new_figure(figsize=(6.4 * len(groups), max(3.6, 1.2 + 0.24 * tallest)), dpi=120)
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, (dataset, names) in zip(axes[0], groups.items()):
        cmap = matplotlib.colormaps.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for i, name in enumerate(names):
            xs, ys = curves[name]
            ax.plot(xs, ys, styles[i % 2] if len(names) > 10 else "-",  # tab20: dark solid, light dashed
                    color=cmap(i % cmap.N), marker="." if len(xs) < 25 else None, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        if dataset:
            ax.set_title(dataset, fontsize=9)
        if names:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return path
