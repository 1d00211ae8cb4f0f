"""lenet export --format onnx: the file runs in onnxruntime and matches PyTorch on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import assert_user_error, run_cli
from .trained import mnist_run

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install 'lenet[export]')")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist):
    return mnist_run(tmp_path_factory.mktemp("runs"), mnist)


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_test_images(run_dir, mnist, tmp_path):
    from lenet.data import to_float
    from lenet.inspect.evaluation import predict_scores
    from lenet.use.export import read_metadata
    from lenet.training.runs import load_run

    out = tmp_path / "lenet.onnx"
    proc = run_cli("export", str(run_dir), "--format", "onnx", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "test-time flips" not in proc.stdout

    meta = read_metadata(out)
    assert json.loads(meta["classes"]) == [str(d) for d in range(10)]
    assert meta["dataset"] == "mnist" and meta["model"] == "classic"
    assert json.loads(meta["model_config"])["activation"] == "relu" and json.loads(meta["test_flip"]) is False

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("image", "scores")
    assert not isinstance(inp.shape[0], int)  # dynamic batch
    images = mnist.test.images[:300]
    expected = predict_scores(load_run(run_dir).model, images).numpy()
    x = to_float(images).numpy()
    worst = 0.0
    for start, stop in ((0, 1), (1, 8), (8, 300)):  # batch sizes 1, 7 and 292
        got = session.run(None, {"image": x[start:stop]})[0]
        assert got.shape == (stop - start, 10)
        worst = max(worst, float(np.abs(got - expected[start:stop]).max()))
    print(f"ONNX vs PyTorch logits on 300 MNIST test images: max abs diff {worst:.2e}")
    assert worst < 1e-4


def test_export_user_errors(run_dir, tmp_path):
    assert_user_error(run_cli("export", str(tmp_path / "none")), "not found", code=2)
    assert_user_error(run_cli("export", str(run_dir), "--out", str(tmp_path / "no" / "m.onnx")),
                      "does not exist", code=2)
    assert_user_error(run_cli("export", str(run_dir), "--format", "tflite"), "invalid choice", code=2)
