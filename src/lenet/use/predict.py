"""Use a trained model on real images: loading, dataset-like preprocessing, and prediction.

The datasets are 28x28 grey images with light content on a black background. A photo or a
drawing is made to look like that before the network sees it (:func:`preprocess`):

1. grey-scale (transparent pixels count as white paper; EXIF rotation is applied);
2. invert when the image is dark-on-light (judged by the median of its border pixels);
3. subtract the background level and stretch the ink to full brightness (noise and uneven
   paper fall to zero);
4. crop to the content (the pixels at least 30% as bright as the ink);
5. ``"digits"`` (MNIST): scale so the longest side fits a 20x20 box, then place it in 28x28 so its
   centre of mass is at the centre (the recipe used to build MNIST);
   ``"fit"`` (Fashion-MNIST and others): scale so the longest side is 28 and centre it.

``"none"`` (``--no-preprocess``) feeds the image as it is, only grey-scaled and resized to 28x28.

    >>> from lenet.predict import Predictor, load_image
    >>> p = Predictor.from_run("runs/mnist")
    >>> p.predict([p.prepare(load_image("seven.png"))], top_k=3)[0].top
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ImageError
from ..images import (MAX_PIXELS, CorruptImageError, ImageTooLargeError, NotAnImageError,  # noqa: F401
                      decode_image, load_image, resize, to_grey, to_uint8)

SIZE = 28
DIGIT_BOX = 20
MODES = ("digits", "fit", "none")
DIGIT_DATASETS = ("mnist", "emnist", "kmnist", "qmnist")


# --------------------------------------------------------------------------------------------
# Preprocessing


def mode_for_dataset(dataset: str) -> str:
    """The preprocessing that makes an image look like ``dataset``: digits (MNIST recipe) or fit."""
    return "digits" if dataset.lower() in DIGIT_DATASETS else "fit"


@dataclass
class Prepared:
    """What the network sees for one image, and how it was made."""

    pixels: np.ndarray  # uint8 (28, 28), light on dark
    mode: str
    inverted: bool = False
    blank: bool = False  # no content found: the network sees an empty image


def preprocess(img, mode: str = "digits") -> Prepared:
    """Make a PIL image look like a dataset image: uint8 (28, 28), light content on black."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}: choose one of {', '.join(MODES)}")
    grey = to_grey(img)
    if mode == "none":
        return Prepared(to_uint8(resize(grey, SIZE, SIZE)), mode)

    border = np.concatenate([grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]])
    inverted = bool(np.median(border) > 0.5)
    if inverted:
        grey = 1.0 - grey
        border = 1.0 - border
    if min(grey.shape) >= 64:  # a 3x3 median removes speckle noise; small images keep thin strokes
        from PIL import Image, ImageFilter

        grey = np.asarray(Image.fromarray(to_uint8(grey)).filter(ImageFilter.MedianFilter(3)),
                          dtype=np.float32) / 255.0
        border = np.concatenate([grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]])
    background = float(np.percentile(border, 95))
    ink = float(np.percentile(grey, 99.5)) if grey.size >= 400 else float(grey.max())
    ink = max(ink, float(grey.max()) * 0.8)
    if ink - background < 0.1:  # nothing stands out from the background
        return Prepared(np.zeros((SIZE, SIZE), np.uint8), mode, inverted, blank=True)
    level = np.clip((grey - background) / (ink - background), 0.0, 1.0)
    level[level < 0.05] = 0.0  # what is left of the paper's noise
    rows = np.flatnonzero((level >= 0.3).any(axis=1))
    cols = np.flatnonzero((level >= 0.3).any(axis=0))
    level = level[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = level.shape
    box = DIGIT_BOX if mode == "digits" else SIZE
    scale = box / max(h, w)
    nh, nw = max(1, min(box, round(h * scale))), max(1, min(box, round(w * scale)))
    patch = resize(level, nw, nh)
    out = np.zeros((SIZE, SIZE), np.float32)
    if mode == "digits":
        total = float(patch.sum())
        if total > 0:
            ys, xs = np.indices(patch.shape)
            cy, cx = float((ys * patch).sum()) / total, float((xs * patch).sum()) / total
        else:
            cy, cx = (nh - 1) / 2, (nw - 1) / 2
        top = int(np.clip(round((SIZE - 1) / 2 - cy), 0, SIZE - nh))
        left = int(np.clip(round((SIZE - 1) / 2 - cx), 0, SIZE - nw))
    else:
        top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
    out[top:top + nh, left:left + nw] = patch
    return Prepared(to_uint8(out), mode, inverted)


# --------------------------------------------------------------------------------------------
# Prediction


@dataclass
class Prediction:
    """Top-k classes of one image. ``top`` is a list of (class name, class index, probability)."""

    top: list[tuple[str, int, float]]
    probabilities: list[float]
    source: str = ""
    prepared: Prepared | None = None
    activations: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.top[0][0]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.source} if self.source else {}
        d["top"] = [{"class": c, "index": i, "probability": round(p, 6)} for c, i, p in self.top]
        if self.prepared is not None:
            d["preprocess"] = self.prepared.mode
            d["inverted"] = self.prepared.inverted
            d["blank"] = self.prepared.blank
        return d


def feature_layers(model: nn.Module, count: int = 2, size: int = 28) -> list[str]:
    """Names of the layers whose outputs are the first ``count`` conv stages' activation maps (the
    same layers ``lenet activations`` shows: after the squashing function, for any preset)."""
    from ..inspect.visualize import VisualizeError, conv_stage_outputs

    try:
        with torch.no_grad():
            return [s.name for s in conv_stage_outputs(model, torch.zeros(1, 1, size, size), count)]
    except VisualizeError:
        return []


class Predictor:
    """A trained model ready for inference from several threads (one forward pass at a time)."""

    def __init__(self, model: nn.Module, classes: Sequence[str], *, dataset: str = "", model_name: str = "",
                 device: torch.device | str = "cpu", mode: str | None = None):
        self.model = model.to(device).eval()
        self.classes = tuple(classes)
        self.dataset = dataset
        self.model_name = model_name
        self.device = torch.device(device)
        self.mode = mode or mode_for_dataset(dataset)
        self.layers = feature_layers(self.model)
        self._lock = threading.Lock()
        self._capture: dict[str, torch.Tensor] | None = None
        modules = dict(self.model.named_modules())
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: torch.device | str = "cpu",
                 mode: str | None = None) -> "Predictor":
        from ..training.runs import load_run

        run = load_run(run_dir, device)
        return cls(run.model, run.classes, dataset=run.dataset, model_name=run.config["model"],
                   device=device, mode=mode)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._capture is not None:
                self._capture[name] = output.detach().float().cpu()
        return hook

    def prepare(self, img, preprocess_image: bool = True) -> Prepared:
        return preprocess(img, self.mode if preprocess_image else "none")

    @torch.inference_mode()
    def forward(self, pixels: np.ndarray | torch.Tensor, activations: bool = False
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Class scores (N, classes) for uint8 images (N, 28, 28), and optionally the activation maps."""
        x = torch.as_tensor(np.asarray(pixels), dtype=torch.uint8)
        if x.ndim == 2:
            x = x.unsqueeze(0)
        x = x.unsqueeze(1).to(self.device, torch.float32).div_(255.0)
        with self._lock:
            self._capture = {} if activations else None
            try:
                scores = self.model(x).float().cpu()
                captured = self._capture or {}
            finally:
                self._capture = None
        return scores, captured

    def predict(self, prepared: Sequence[Prepared], top_k: int = 3, *, sources: Sequence[str] | None = None,
                activations: bool = False) -> list[Prediction]:
        if not prepared:
            return []
        scores, acts = self.forward(np.stack([p.pixels for p in prepared]), activations=activations)
        probs = torch.softmax(scores, dim=1)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        out = []
        for n, p in enumerate(prepared):
            top = [(self._name(i), i, float(v)) for v, i in zip(values[n].tolist(), indices[n].tolist())]
            out.append(Prediction(top, probs[n].tolist(), sources[n] if sources else "", p,
                                  {name: a[n].numpy() for name, a in acts.items()}))
        return out

    def _name(self, index: int) -> str:
        return self.classes[index] if index < len(self.classes) else f"class{index}"


def load_all(paths: Sequence[str | os.PathLike]) -> list:
    """Read every image first, so that one bad file stops the command before anything is predicted."""
    return [load_image(p) for p in paths]


def save_preprocessed(prepared: Sequence[Prepared], path: str | os.PathLike) -> Path:
    """Save exactly what the network saw: one 28x28 tile per image, side by side, as a grey PNG."""
    from PIL import Image

    from ..training.runs import atomic_write_bytes

    path = Path(path)
    strip = np.concatenate([p.pixels for p in prepared], axis=1)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    if path.parent and not path.parent.is_dir():
        raise ImageError(f"--show-preprocessed {path}: folder {path.parent} does not exist")
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise ImageError(f"--show-preprocessed {path}: cannot write ({exc.strerror or exc})") from None
    return path
