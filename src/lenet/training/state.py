"""The state of a training run between epochs: what a checkpoint holds, in one place.

:meth:`TrainState.state_dict` is written after every epoch and :meth:`TrainState.load_state_dict`
reads it back, so the two halves of the checkpoint format sit side by side. With the model,
optimizer, schedule, the shuffling generator and torch's global RNG restored, a resumed run on the
CPU continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from . import runs


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    epoch_time_s: float
    examples_per_sec: float


@dataclass
class TrainState:
    """Model, optimizer, schedule and RNGs, plus the history so far."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    shuffle: torch.Generator  # draws each epoch's permutation of the training set
    epoch: int = 0  # epochs finished
    history: list[EpochMetrics] = field(default_factory=list)
    curve: list[dict[str, float | None]] = field(default_factory=list)
    train_time: float = 0.0  # seconds spent in training steps so far
    seen: int = 0  # training examples seen so far

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "shuffle_rng": self.shuffle.get_state(),
            "torch_rng": torch.get_rng_state(), "history": [dataclasses.asdict(h) for h in self.history],
            "curve": self.curve, "train_time": self.train_time, "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Restore from a checkpoint read from ``source`` (named in the error if it does not fit)."""
        try:
            runs.load_state_into(self.model, state["model"], source)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.shuffle.set_state(state["shuffle_rng"])
            torch.set_rng_state(state["torch_rng"])
            self.history = [EpochMetrics(**h) for h in state["history"]]
            self.curve = list(state["curve"])
            self.train_time, self.seen = float(state["train_time"]), int(state["seen"])
            self.epoch = int(state["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: does not match this run's model or optimizer ({exc}); "
                                  f"start the run again with --overwrite") from None
