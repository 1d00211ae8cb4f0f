"""The model registry: names -> (config dataclass, builder, recipe). It holds no models itself;
each family registers its presets when :mod:`lenet.models` imports it (the timm pattern).

    >>> from lenet.models import create_model
    >>> net = create_model("classic", pool="max")   # preset + config overrides
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError


def _coerce(value: str, default: Any, key: str) -> Any:
    """Turn the text of ``--set key=value`` into the type of the field's default."""
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            text = value.strip().strip("()[]")
            if text.lower() in ("", "none"):
                return ()
            return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
        return value
    except ValueError:
        kind = type(default).__name__ if not isinstance(default, tuple) else "comma-separated integers"
        raise ConfigError(f"--set {key}={value}: expected {kind}") from None


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the dataclass ``config`` with ``overrides`` (values may be strings from the CLI)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"unknown model setting {key!r} for {type(config).__name__}: "
                              f"known settings are {', '.join(fields)}")
        default = getattr(config, key)
        if isinstance(value, str) and not isinstance(default, str):
            value = _coerce(value, default, key)
        elif isinstance(default, tuple) and isinstance(value, (list, int)):
            value = tuple(value) if isinstance(value, list) else (value,)
        changes[key] = value
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    config: Any  # a dataclass instance: the preset's defaults
    build: Callable[[Any], nn.Module]
    tags: tuple[str, ...] = field(default_factory=tuple)
    # The preset's recommended training recipe: TrainConfig fields (lr, optimizer, schedule, ...)
    # used when the user does not give them (see TrainConfig.for_model). Empty: the book's recipe.
    recipe: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelEntry] = {}


def register(name: str, description: str, config: Any, build: Callable[[Any], nn.Module],
             recipe: dict[str, Any] | None = None) -> None:
    MODELS[name] = ModelEntry(name, description, config, build, recipe=dict(recipe or {}))


def get_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}") from None


def resolve_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config of preset ``name`` with ``overrides`` applied (and validated)."""
    cfg = apply_overrides(get_entry(name).config, overrides or {})
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def create_model(name: str = "classic", **overrides: Any) -> nn.Module:
    """Build preset ``name`` with config overrides, timm-style: ``create_model("classic", pool="max")``."""
    entry = get_entry(name)
    return entry.build(resolve_config(name, overrides))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def build_from_dict(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from a saved (name, config dict) pair, as written in a run's config.json."""
    return create_model(name, **config)


def param_count(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
