"""Training: the loop (:mod:`.loop`), its checkpointed state (:mod:`.state`), one step and one
evaluation pass (:mod:`.engine`), optimizers and schedules (:mod:`.optim`), run folders
(:mod:`.runs`) and torchrun (:mod:`.distributed`).

    >>> from lenet.training import TrainConfig, train
    >>> result = train(TrainConfig(epochs=10), out="runs/book")
"""

from __future__ import annotations

from ..options import OPTIMIZERS, SCHEDULES, TrainConfig, resolve_device
from .loop import Progress, TrainResult, fit, model_criterion, resume, train
from .optim import LECUN_AFTER, LECUN_PASSES, make_optimizer, make_schedule
from .state import EpochMetrics, TrainState

__all__ = ["EpochMetrics", "LECUN_AFTER", "LECUN_PASSES", "OPTIMIZERS", "Progress", "SCHEDULES", "TrainConfig",
           "TrainResult", "TrainState", "fit", "make_optimizer", "make_schedule", "model_criterion",
           "resolve_device", "resume", "train"]
