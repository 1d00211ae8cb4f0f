"""The LeNet family: a registry of named presets and the networks behind them.

    >>> from lenet.models import create_model
    >>> net = create_model("classic")                # the textbook LeNet
    >>> net = create_model("classic", pool="max")   # an exercise variant

:mod:`.registry` holds no models; importing this package imports each family (:mod:`.lenet`:
``classic`` and ``modern``; :mod:`.lenet5`: the 1998 paper's network; :mod:`.records`: the
time-to-accuracy presets), which registers its presets.
"""

from __future__ import annotations

from .layers import ACTIVATIONS, ChannelLayerNorm, ScaledTanh, Subsampling, make_activation
from .registry import (MODELS, ModelEntry, apply_overrides, build_from_dict, config_to_dict, create_model,
                       get_entry, param_count, register, resolve_config)
from .lenet import HEADS, INITS, NORMS, POOLS, LeNetConfig, build_lenet, init_weights  # registers classic, modern
from .lenet5 import LeNet5, LeNet5Config  # registers lenet5
from . import records  # noqa: F401,E402  (registers record-mnist, record-fashion)

__all__ = ["ACTIVATIONS", "HEADS", "INITS", "MODELS", "NORMS", "POOLS", "ChannelLayerNorm", "LeNet5",
           "LeNet5Config", "LeNetConfig", "ModelEntry", "ScaledTanh", "Subsampling", "apply_overrides",
           "build_from_dict", "build_lenet", "config_to_dict", "create_model", "get_entry", "init_weights",
           "make_activation", "param_count", "register", "resolve_config"]
