"""Evaluation: scores, accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .._util import eval_mode, to_float


def mirror_averaged(scores_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Test-time flips: the log of the class probabilities averaged over each image of the batch x
    (..., H, W) and its mirror image (left-right), for a model trained on mirrored images too
    (``--flip``). Its argmax is the class the two views agree on best."""
    return average_views(scores_of(x), scores_of(x.flip(-1)))


def average_views(scores: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """The log of the two views' class probabilities averaged (:func:`mirror_averaged`)."""
    return ((scores.float().softmax(dim=1) + mirrored.float().softmax(dim=1)) / 2).log()


@torch.inference_mode()
def predict_scores(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512,
                   device: torch.device | str = "cpu", test_flip: bool = False) -> torch.Tensor:
    """Class scores (N, classes) for uint8 images (N, H, W), computed in eval mode in batches
    (with ``test_flip``: :func:`mirror_averaged`)."""
    def scores_of(x: torch.Tensor) -> torch.Tensor:
        return model(to_float(x)).float()

    with eval_mode(model):
        outs = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            outs.append(mirror_averaged(scores_of, x) if test_flip else scores_of(x))
    return torch.cat(outs) if outs else torch.empty(0, 0)


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 512, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy on uint8 images; one host sync at the end."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start:start + batch_size].to(device, non_blocking=True))
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            correct += (model(x).argmax(dim=1) == y).sum()
    return correct.item() / max(1, images.shape[0])


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (true class, predicted class) as an int64 (classes, classes) matrix."""
    index = labels.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class EvalReport:
    accuracy: float
    per_class: list[float]
    confusion: torch.Tensor
    classes: tuple[str, ...]
    scores: torch.Tensor
    # images predicted as an output unit beyond the dataset's classes (models with --num-classes N)
    extra_predictions: int = 0

    def format(self) -> str:
        lines = [f"test accuracy {self.accuracy:.4f} on {int(self.confusion.sum()) + self.extra_predictions} images"]
        if self.extra_predictions:
            lines.append(f"{self.extra_predictions} images were predicted as an output unit beyond the "
                         f"{len(self.classes)} classes (left out of the matrix below)")
        lines += ["",
                 f"{'class':<14} {'accuracy':>8} {'images':>7}"]
        for name, acc, n in zip(self.classes, self.per_class, self.confusion.sum(dim=1).tolist()):
            lines.append(f"{name:<14} {acc:>8.3f} {n:>7}")
        lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
        width = max(5, len(str(int(self.confusion.max()))) + 1)
        lines.append(" " * 14 + "".join(f"{i:>{width}}" for i in range(len(self.classes))))
        for i, (name, row) in enumerate(zip(self.classes, self.confusion.tolist())):
            lines.append(f"{i:>2} {name[:11]:<11}" + "".join(f"{v:>{width}}" for v in row))
        return "\n".join(lines)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
             *, batch_size: int = 512, device: torch.device | str = "cpu", test_flip: bool = False) -> EvalReport:
    scores = predict_scores(model, images, batch_size=batch_size, device=device, test_flip=test_flip).cpu()
    preds = scores.argmax(dim=1)
    k = len(classes)
    full = confusion_matrix(preds, labels, max(k, scores.shape[1] if scores.ndim == 2 else k))
    cm = full[:k, :k]  # a model may have more output units than classes: those are never right
    totals = full[:k].sum(dim=1).clamp(min=1)
    per_class = (cm.diagonal() / totals).tolist()
    acc = (preds == labels).float().mean().item() if len(labels) else 0.0
    return EvalReport(acc, per_class, cm, tuple(classes), scores, int(full[:k, k:].sum()))
