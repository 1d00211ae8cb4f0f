"""Record presets: LeNet-family models and recipes tuned for time to accuracy on 2 CPU cores.

Both are built by :func:`lenet.models.lenet.build_lenet` from layers the batch-last CPU kernels run
whole (conv -> ReLU -> max-pool blocks, dense layers), and measured with
``lenet bench --to-accuracy ACC --budget SECONDS`` (docs/speed.md).
"""

from __future__ import annotations

from .lenet import LeNetConfig, build_lenet
from .registry import register

# MNIST: the textbook skeleton with ReLU and max-pooling, and a short one-cycle Adam recipe.
register("record-mnist", "MNIST 99% in seconds: the textbook skeleton with ReLU and max-pool, one-cycle Adam",
         LeNetConfig(activation="relu", pool="max"), build_lenet,
         recipe={"epochs": 5, "lr": 4e-3, "optimizer": "adam", "schedule": "onecycle", "batch_size": 256})
# Fashion-MNIST: wider conv blocks, one dense layer, under 100,000 parameters.
register("record-fashion", "Fashion-MNIST toward 92% in a minute: 16-32 conv, ReLU, max-pool, one 64-unit dense layer",
         LeNetConfig(channels=(16, 32), activation="relu", pool="max", dense=(64,)), build_lenet,
         recipe={"epochs": 10, "lr": 3e-3, "optimizer": "adam", "schedule": "onecycle", "batch_size": 256})
