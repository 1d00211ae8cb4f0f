"""Use a trained model on real images: loading, dataset-like preprocessing, and prediction.

The datasets are 28x28 grey images with light content on a black background; a photo, a scan or
a drawing is made to look like that first (:func:`~lenet.use.preprocess.preprocess`: the MNIST
recipe for digit models, "fit" for the others; ``"none"`` feeds the image as is, only grey-scaled
and resized to 28x28). An image in which no content is found is reported blank and not classified.

    >>> from lenet.use.predict import Predictor, load_image
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
from ..inspect.evaluation import average_views
from ..images import (MAX_PIXELS, CorruptImageError, ImageTooLargeError, NotAnImageError,  # noqa: F401
                      decode_image, load_image, resize, to_grey, to_uint8)
from .preprocess import (DIGIT_BOX, DIGIT_DATASETS, MODES, SIZE, Prepared, mode_for_dataset,  # noqa: F401
                         preprocess)


# --------------------------------------------------------------------------------------------
# Prediction


@dataclass
class Prediction:
    """Top-k classes of one image. ``top`` is a list of (class name, class index, probability);
    empty (and ``probabilities`` too) for a blank image, which is not classified."""

    top: list[tuple[str, int, float]]
    probabilities: list[float]
    source: str = ""
    prepared: Prepared | None = None
    activations: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.top[0][0] if self.top else ""

    @property
    def blank(self) -> bool:
        return self.prepared is not None and self.prepared.blank

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.source} if self.source else {}
        d["top"] = [{"class": c, "index": i, "probability": round(p, 6)} for c, i, p in self.top]
        if self.prepared is not None:
            d["preprocess"] = self.prepared.mode
            d["inverted"] = self.prepared.inverted
            d["blank"] = self.prepared.blank
            if self.prepared.decisions:
                d["decisions"] = self.prepared.decisions
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
                 device: torch.device | str = "cpu", mode: str | None = None, test_flip: bool = False):
        self.model = model.to(device).eval()
        self.test_flip = test_flip  # score each image and its mirror image, as the run was evaluated
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
                   device=device, mode=mode, test_flip=run.test_flip)

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
        """Class scores (N, classes) for uint8 images (N, 28, 28), and optionally the activation maps
        (of the images themselves; with ``test_flip`` the scores are :func:`mirror_averaged`'s)."""
        x = torch.as_tensor(np.asarray(pixels), dtype=torch.uint8)
        if x.ndim == 2:
            x = x.unsqueeze(0)
        x = x.unsqueeze(1).to(self.device, torch.float32).div_(255.0)
        with self._lock:
            self._capture = {} if activations else None
            try:
                scores = self.model(x).float()
                captured = self._capture or {}
                self._capture = None
                if self.test_flip:
                    scores = average_views(scores, self.model(x.flip(-1)))
            finally:
                self._capture = None
        return scores.cpu(), captured

    def predict(self, prepared: Sequence[Prepared], top_k: int = 3, *, sources: Sequence[str] | None = None,
                activations: bool = False) -> list[Prediction]:
        """Classify prepared images in one forward pass (blank ones get no classes)."""
        if not prepared:
            return []
        scores, acts = self.forward(np.stack([p.pixels for p in prepared]), activations=activations)
        probs = torch.softmax(scores, dim=1)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        out = []
        for n, p in enumerate(prepared):
            if p.blank:  # nothing to classify: no classes, no probabilities
                top, row = [], []
            else:
                top = [(self._name(i), i, float(v)) for v, i in zip(values[n].tolist(), indices[n].tolist())]
                row = probs[n].tolist()
            out.append(Prediction(top, row, sources[n] if sources else "", p,
                                  {name: a[n].numpy() for name, a in acts.items()}))
        return out

    def describe(self, prepared: Prepared, scores: torch.Tensor, top_k: int = 3) -> dict[str, Any]:
        """The JSON answer for one image from its row of class scores (the server's per-image result)."""
        if prepared.blank:
            top: list[tuple[str, int, float]] = []
            row: list[float] = []
        else:
            logits = np.asarray(scores, dtype=np.float64)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")[:max(1, min(top_k, probs.shape[0]))]
            top = [(self._name(int(i)), int(i), float(probs[i])) for i in order]
            row = probs.tolist()
        out = Prediction(top, row, "", prepared).to_dict()
        out["probabilities"] = [round(v, 6) for v in row]
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
