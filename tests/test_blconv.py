"""The batch-last CPU conv kernels: exact against PyTorch, used where they apply, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lenet import blconv, engine
from lenet.models import create_model
from lenet.training import TrainConfig, train

needs_kernels = pytest.mark.skipif(blconv.library() is None, reason=f"kernels unavailable: {blconv.problem()}")


def _to_bl(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 3, 0).contiguous()


def _from_bl(x: torch.Tensor) -> torch.Tensor:
    return x.permute(3, 0, 1, 2)


@needs_kernels
@pytest.mark.parametrize("cin,cout,size,k,pad,batch", [
    (1, 6, 28, 5, 2, 32),     # LeNet's conv1
    (6, 16, 14, 5, 0, 16),    # LeNet's conv2
    (3, 8, 14, 3, 1, 16),     # the 3x3 exercise
    (6, 16, 14, 7, 3, 16),    # the 7x7 exercise
    (2, 11, 9, 3, 2, 16),     # a prime channel count (blocks of 1), padding > k // 2
    (4, 5, 6, 1, 0, 48),      # 1x1
    (5, 3, 7, 5, 4, 16),      # padding k - 1: the shape of an input gradient
])
def test_forward_and_gradients_equal_pytorch(cin, cout, size, k, pad, batch):
    g = torch.Generator().manual_seed(cin * 100 + k)
    x = torch.randn(batch, cin, size, size, generator=g, requires_grad=True)
    w = torch.randn(cout, cin, k, k, generator=g, requires_grad=True)
    b = torch.randn(cout, generator=g, requires_grad=True)
    want = F.conv2d(x, w, b, padding=pad)
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    want_grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None

    xb = _to_bl(x.detach()).requires_grad_()
    got = blconv.conv(blconv.pad_cols(xb, pad), w, b, pad)
    got.backward(_to_bl(grad))
    torch.testing.assert_close(_from_bl(got.detach()), want.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_from_bl(xb.grad), want_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, want_grads[1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad, want_grads[2], rtol=1e-4, atol=1e-3)


@needs_kernels
def test_unsupported_shapes_are_refused_not_miscomputed():
    x = torch.randn(1, 8, 8, 16)
    with pytest.raises(RuntimeError, match="unsupported"):
        blconv.conv(x, torch.randn(2, 1, 2, 2), None, 0)  # 2x2: not compiled in
    with pytest.raises(RuntimeError, match="unsupported"):
        blconv.conv(torch.randn(1, 8, 8, 10), torch.randn(2, 1, 3, 3), None, 0)  # batch not a multiple of 16


@needs_kernels
@pytest.mark.parametrize("overrides", [
    {},                                                   # the textbook LeNet
    {"pool": "max", "activation": "relu"},
    {"kernel_size": (3,), "padding": (1, 0)},
    {"channels": (6, 16, 32), "padding": (2, 2, 2)},      # 3 stages, a 7x7 map pooled to 3x3 (floor)
    {"activation": "scaled_tanh", "dense": ()},
])
@pytest.mark.parametrize("batch", [7, 96])  # not multiples of 16: padded inside, dropped after
def test_batch_last_model_equals_the_model(overrides, batch):
    torch.manual_seed(0)
    model = create_model("classic", **overrides)
    runner, why = blconv.batch_last(model)
    assert runner is not None, why
    x = torch.rand(batch, 1, 28, 28)
    want = model(x)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = runner(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)
    assert list(runner.parameters()) == []  # the model owns the parameters; nothing is copied


@needs_kernels
def test_models_the_kernels_do_not_cover_are_left_alone():
    for name, overrides in [("modern", {}), ("lenet5", {}), ("classic", {"pool": "conv"}),
                            ("classic", {"norm": "batch"})]:
        runner, why = blconv.batch_last(create_model(name, **overrides))
        assert runner is None and why, name
    notes = []
    step_model = create_model("modern")
    runner, conv = engine.conv_runner(step_model, torch.device("cpu"), engine.EngineOptions(fast_conv=True),
                                      True, notes.append)
    assert runner is step_model and conv == engine.PYTORCH_CONV
    assert notes and "--fast-conv not used" in notes[0]


def test_fast_conv_only_where_it_pays():
    model = create_model("classic")
    cpu = torch.device("cpu")
    off = engine.conv_runner(model, cpu, engine.EngineOptions(fast_conv=False), True, print)
    assert off == (model, engine.PYTORCH_CONV)
    eager = engine.conv_runner(model, cpu, engine.EngineOptions(), False, print)  # auto: compiled steps only
    assert eager == (model, engine.PYTORCH_CONV)
    if blconv.library() is not None:
        runner, conv = engine.conv_runner(model, cpu, engine.EngineOptions(), True, print)
        assert isinstance(runner, blconv.BatchLast) and conv == engine.BATCH_LAST_CONV


def test_no_compiler_or_switched_off_means_pytorch_convs(monkeypatch):
    monkeypatch.setattr(blconv, "_loaded", False)
    monkeypatch.setattr(blconv, "_lib", None)
    monkeypatch.setenv("LENET_NO_FAST_CONV", "1")
    assert blconv.library() is None and "LENET_NO_FAST_CONV" in blconv.problem()
    monkeypatch.delenv("LENET_NO_FAST_CONV")
    monkeypatch.setattr(blconv, "_loaded", False)
    monkeypatch.setattr(blconv.shutil, "which", lambda name: None)
    assert blconv.library() is None and "no C++ compiler" in blconv.problem()
    runner, why = blconv.batch_last(create_model("classic"))
    assert runner is None and "C++ compiler" in why
    monkeypatch.setattr(blconv, "_loaded", False)  # the next user builds/loads again


def test_a_failing_build_is_reported_and_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(blconv, "_loaded", False)
    monkeypatch.setattr(blconv, "_lib", None)
    monkeypatch.setenv("LENET_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(blconv, "SOURCE", bad)
    assert blconv.library() is None
    assert "building the batch-last kernels failed" in blconv.problem()
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left behind
    monkeypatch.setattr(blconv, "_loaded", False)


@needs_kernels
def test_compiled_training_with_kernels_learns_like_pytorch_convs(fashion):
    """Same recipe, same seed, 1 epoch on 6,000 real images: the kernels change speed, not learning."""
    if engine.compiler_problem(torch.device("cpu")):
        pytest.skip("no C++ compiler for inductor here")
    from lenet.data import Dataset, Split

    data = Dataset(fashion.name, fashion.classes, Split(fashion.train.images[:6000], fashion.train.labels[:6000]),
                   Split(fashion.test.images[:1000], fashion.test.labels[:1000]))
    notes = []
    fast = train(TrainConfig(epochs=2, compile=True, seed=0), data=data, log=notes.append)
    assert fast.engine == "compiled, " + engine.BATCH_LAST_CONV, notes
    ref = train(TrainConfig(epochs=2, compile=False, seed=0), data=data)
    assert ref.engine == "eager, " + engine.PYTORCH_CONV
    for a, b in zip(fast.history, ref.history):
        assert a.train_loss == pytest.approx(b.train_loss, abs=2e-3)
        assert a.test_acc == pytest.approx(b.test_acc, abs=0.01)
    for (name, p), q in zip(fast.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-3, msg=name)


def test_self_test_passes_on_this_machine():
    if blconv.library() is None:
        pytest.skip(blconv.problem())
    assert blconv._self_test() is None
