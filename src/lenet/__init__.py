"""lenet: train, inspect and use LeNet-family networks on 28x28 image datasets.

A notebook user trains the textbook LeNet in three lines:

    >>> from lenet import TrainConfig, train
    >>> result = train(TrainConfig(epochs=10), out="runs/book", progress=True)
    >>> print(result.book_lines())

Names are imported lazily (PEP 562) so that ``lenet --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_API = {
    "load_dataset": "data", "LenetError": "errors", "evaluate": "inspect.evaluation",
    "LeNetConfig": "models", "create_model": "models", "load_run": "training.runs", "trace": "models.summary",
    "TrainConfig": "options", "TrainResult": "training", "train": "training", "resume": "training",
    "Predictor": "use.predict", "export_onnx": "use.export",
}

# Modules that moved into sub-packages: the earlier names import the same module objects.
_MOVED = {
    "blconv": "kernels.ops", "lenet5": "models.lenet5", "summary": "models.summary",
    "engine": "training.engine", "runs": "training.runs", "distributed": "training.distributed",
    "sdlm": "training.sdlm", "evaluation": "inspect.evaluation", "visualize": "inspect.visualize",
    "plots": "inspect.plots", "predict": "use.predict", "serve": "use.serve", "export": "use.export",
    "loadtest": "use.loadtest", "compare": "experiments.compare", "bench": "experiments.bench",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import lenet.blconv`` gives ``lenet.kernels.ops`` itself (same object, so patches apply)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.partition(f"{__name__}.")[2]
        return importlib.util.spec_from_loader(fullname, self) if old in _MOVED else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        sys.modules[name] = importlib.import_module(f"{__name__}.{_MOVED[name.rpartition('.')[2]]}")


sys.meta_path.append(_MovedModules())

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lenet' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
