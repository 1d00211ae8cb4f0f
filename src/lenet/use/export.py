"""Export a trained run to ONNX, with the class names in the model's metadata.

The file has one input, ``image``: float32 (N, 1, 28, 28) with pixels in [0, 1], light content
on black (as :func:`lenet.predict.preprocess` makes it), and one output, ``scores``: (N, classes),
higher is more likely (apply softmax for probabilities). N, the batch size, is dynamic.
``metadata_props`` holds ``classes`` (a JSON list), ``dataset``, ``model``, ``model_config``
(JSON), ``test_flip`` (JSON ``true`` when the run was evaluated with test-time flips, which the
graph does not do), ``input`` (the description above) and ``lenet_version``.

It uses PyTorch's default exporter (``torch.onnx.export(..., dynamo=True)``, based on
``torch.export``), which needs the ``onnxscript`` package: ``pip install 'lenet[export]'``.
The older TorchScript exporter (``dynamo=False``) still works in torch 2.13 but warns that it is
deprecated and will be removed, so lenet does not use it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import LenetError

INPUT_NAME = "image"
OUTPUT_NAME = "scores"
INPUT_DESCRIPTION = "float32 (N, 1, 28, 28), pixels in [0, 1], light content on a black background"


def _require_exporter() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise LenetError(f"ONNX export needs {' and '.join(missing)}: pip install 'lenet[export]' "
                         f"(or pip install {' '.join(missing)})")


def onnx_metadata(run_config: dict[str, Any]) -> dict[str, str]:
    from ..training.runs import scored_with_flips

    return {
        "classes": json.dumps(list(run_config["classes"])),
        "dataset": str(run_config["dataset"]),
        "model": str(run_config["model"]),
        "model_config": json.dumps(run_config["model_config"]),
        # "true": the run's accuracy was measured averaging each image's and its mirror image's probabilities
        "test_flip": json.dumps(scored_with_flips(run_config)),
        "input": INPUT_DESCRIPTION,
        "lenet_version": __version__,
    }


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, *, opset: int | None = None) -> dict[str, Any]:
    """Write the run's model as ONNX to ``out``; return a summary (bytes, opset, classes, test_flip)."""
    _require_exporter()
    import onnx

    from ..training.runs import atomic_write_bytes, load_run

    out = Path(out)
    run = load_run(run_dir, "cpu")
    if not out.parent.is_dir():
        raise LenetError(f"--out {out}: folder {out.parent} does not exist")
    model = run.model.eval()
    example = torch.rand(2, 1, 28, 28)  # batch 2 so the exporter does not specialise N to 1
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs a warning per optional torchvision op it skips
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                        opset_version=opset, verbose=False, optimize=True)
    except Exception as exc:  # the exporter's errors are many and undocumented
        raise LenetError(f"ONNX export of {run_dir} failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    for key, value in onnx_metadata(run.config).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"lenet {run.config['model']} trained on {run.config['dataset']}"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise LenetError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return {"path": out, "bytes": len(data), "opset": opsets[0] if opsets else None,
            "classes": tuple(run.config["classes"]), "test_flip": run.test_flip}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
