"""lenet: train, inspect and use LeNet-family networks on 28x28 image datasets.

A notebook user trains the textbook LeNet in three lines:

    >>> from lenet import TrainConfig, train
    >>> result = train(TrainConfig(epochs=10), out="runs/book", progress=True)
    >>> print(result.book_lines())

Names are imported lazily (PEP 562) so that ``lenet --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_dataset": "data", "LenetError": "errors", "evaluate": "evaluation",
    "LeNetConfig": "models", "create_model": "models", "load_run": "runs", "trace": "summary",
    "TrainConfig": "training", "TrainResult": "training", "train": "training", "resume": "training",
    "Predictor": "predict", "export_onnx": "export",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lenet' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
