"""Run folders: what a training run writes, and how a trained model is loaded back safely.

A run folder holds:

    config.json        the resolved configuration (model name + model config, training recipe, dataset)
    metrics.csv        one row per epoch
    curve.csv          5 points per epoch (train loss / train acc) plus test acc at each epoch end
    curves.png         the book's figure: train loss, train acc, test acc against epoch
    model.safetensors  the trained weights (safetensors: loading never runs code)
    checkpoint.pt      model + optimizer + scheduler + RNG state after the last finished epoch,
                       for ``lenet train --resume`` (read with ``torch.load(weights_only=True)``)

Weights are only ever read with safetensors, so a tampered file cannot execute anything.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .._util import atomic_write_bytes
from ..errors import CheckpointError, LenetError

CONFIG = "config.json"
METRICS = "metrics.csv"
CURVE = "curve.csv"
CURVES_PNG = "curves.png"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "test_acc", "epoch_time_s", "examples_per_sec"]
CURVE_FIELDS = ["epoch", "train_loss", "train_acc", "test_acc"]


def default_run_dir(model: str, dataset: str, base: str | os.PathLike = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{stamp}-{model}-{dataset}"
    n = 2
    while path.exists():
        path = Path(base) / f"{stamp}-{model}-{dataset}-{n}"
        n += 1
    return path


def prepare_run_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create (or check) a run folder before any training starts, so a bad --out fails fast."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LenetError(f"--out {path} exists and is not a folder: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise LenetError(f"run folder {path} already exists: pass --overwrite to replace it, "
                         f"--resume {path} to continue it, or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for name in (CONFIG, METRICS, CURVE, CURVES_PNG, WEIGHTS, CHECKPOINT):
                (path / name).unlink(missing_ok=True)
        probe = path / ".write-test"
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)  # a full disk fails here, not after an hour of training
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise LenetError(f"cannot write to run folder {path}: {exc.strerror or exc}; "
                         "choose a writable --out") from None
    return path


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_csv(path: Path, fields: list[str], rows: Iterable[dict[str, Any]]) -> None:
    """Rewrite a whole CSV atomically (the files are small: one row per epoch or fifth of one)."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in fields})
    atomic_write_bytes(path, buf.getvalue().encode())


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: Path) -> list[dict[str, float | None]]:
    with open(path, newline="") as fh:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(fh)]


# --------------------------------------------------------------------------------------------
# Weights


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata or {}))


def load_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors, metadata). Never executes code from the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file not found; is this a finished run folder?") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len])
        meta = header.get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc}); it may be truncated "
                              "or tampered with: retrain or restore it") from None
    return tensors, meta


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` strictly, turning any mismatch into one clear error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source}: weights do not match the model ({'; '.join(parts)}); "
                              "the file belongs to another model")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, the model "
                                  f"expects {tuple(v.shape)}; the file belongs to another configuration")
    model.load_state_dict(state, strict=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (temporary file, fsync, rename)."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """Read a checkpoint with ``weights_only=True`` (no code runs); None if there is none."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a damaged file
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason}); it may be truncated or "
                              "tampered with: start the run again with --overwrite") from None
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a lenet checkpoint; start the run again with --overwrite")
    return state


# --------------------------------------------------------------------------------------------
# Loading a finished run


@dataclass
class LoadedRun:
    path: Path
    config: dict[str, Any]
    model: nn.Module
    classes: tuple[str, ...]

    @property
    def dataset(self) -> str:
        """The dataset's name (a built-in name, or the folder or file name of your own)."""
        return self.config["dataset"]

    @property
    def test_flip(self) -> bool:
        """Whether the run was evaluated with test-time flips (:func:`scored_with_flips`)."""
        return scored_with_flips(self.config)

    def load_data(self, data_root: str | None = None, log=print):
        """The dataset this run was trained on, loaded as it was (the same path and test split)."""
        from ..data import load_dataset

        data = self.config.get("data", {})
        return load_dataset(data.get("source", self.dataset), data_root,
                            test_fraction=data.get("test_fraction", 0.1),
                            image_size=data.get("image_size", 28), log=log)


def scored_with_flips(config: dict[str, Any]) -> bool:
    """Whether a run (its config.json) was evaluated with test-time flips: then `evaluate`,
    `predict` and `serve` score each image with its mirror image too, as the run was measured."""
    return bool(config.get("train", {}).get("test_flip", False))


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} not found: pass a folder written by `lenet train`")
    path = run_dir / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: {run_dir} is not a lenet run folder") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable run config ({exc})") from None
    for key in ("model", "model_config", "dataset", "classes"):
        if key not in config:
            raise CheckpointError(f"{path}: run config has no {key!r}; the file is damaged")
    return config


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a trained model from its run folder (config.json + model.safetensors)."""
    from ..models import build_from_dict

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    try:
        model = build_from_dict(config["model"], config["model_config"])
    except LenetError as exc:
        raise CheckpointError(f"{run_dir / CONFIG}: cannot rebuild the model ({exc})") from None
    state, _ = load_weights_file(run_dir / WEIGHTS)
    load_state_into(model, state, run_dir / WEIGHTS)
    model.to(device).eval()
    return LoadedRun(run_dir, config, model, tuple(config["classes"]))
