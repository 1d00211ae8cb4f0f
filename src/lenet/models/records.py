"""Record presets: LeNet-family models and recipes tuned for time to accuracy on 2 CPU cores.

Both are built by :func:`lenet.models.lenet.build_lenet` from layers the batch-last CPU kernels run
whole (conv [-> BatchNorm] -> ReLU -> max-pool blocks, dense layers), and measured with
``lenet bench --to-accuracy ACC --budget SECONDS`` (docs/speed.md).
"""

from __future__ import annotations

from .lenet import LeNetConfig, build_lenet
from .registry import register

# MNIST: the textbook skeleton with ReLU and max-pooling, and a short one-cycle Adam recipe.
register("record-mnist", "MNIST 99% in seconds: the textbook skeleton with ReLU and max-pool, one-cycle Adam",
         LeNetConfig(activation="relu", pool="max"), build_lenet,
         recipe={"epochs": 5, "lr": 4e-3, "optimizer": "adam", "schedule": "onecycle", "batch_size": 256})
# Fashion-MNIST: 12-32 conv blocks with BatchNorm, one dense layer, under 100,000 parameters;
# one-cycle SGD with momentum at batch 128 for 8 epochs, mirror images in training and test-time
# flips (docs/speed.md; the batch and epochs: speed-notes.md section 14).
register("record-fashion", "Fashion-MNIST 92% in a minute: 12-32 conv with BatchNorm, ReLU, max-pool, one 64-unit "
                           "dense layer; flips in training and at test time",
         LeNetConfig(channels=(12, 32), activation="relu", pool="max", dense=(64,), norm="batch"), build_lenet,
         recipe={"epochs": 8, "lr": 0.1, "optimizer": "momentum", "schedule": "onecycle", "weight_decay": 5e-4,
                 "batch_size": 128, "flip": True, "test_flip": True})
