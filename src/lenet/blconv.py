"""Batch-last convolution kernels for the CPU: LeNet's small convolutions near the hardware's limit.

oneDNN (PyTorch's CPU convolution) is tuned for layers with many channels. LeNet's have 1, 6 and
16, so its kernels spend their time on layout and padding work: conv1's forward runs at ~80
GFLOP/s on this project's 2-core machine, a fifth of the cores' peak. ``csrc/blconv.cpp`` instead
stores activations as ``[channels, rows, cols, batch]`` and vectorises over the batch: every
multiply-add works on 16 examples at once, whatever the layer's shape (measured in
docs/speed-notes.md: 2-3x oneDNN on conv1, 1.4-2x on conv2's backward).

This module:

* builds the C++ file once per machine with the system C++ compiler (``-O3 -march=native
  -fopenmp``, a few seconds) into lenet's cache folder, keyed by the source, compiler and CPU;
* registers two PyTorch custom ops, ``lenet::blconv`` (forward, with autograd) and
  ``lenet::blconv_wgrad``, that ``torch.compile`` treats as opaque calls and fuses around;
* :class:`BatchLast` runs an ``nn.Sequential`` LeNet with its conv stages in that layout and the
  same parameters: the model, its state dict and what it learns are unchanged.

Where no compiler is found, the build fails, or a model has a layer the kernels do not cover,
:func:`batch_last` returns None and training uses PyTorch's own convolutions.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

SOURCE = Path(__file__).with_name("csrc") / "blconv.cpp"
LANES = 16  # the kernels work on the batch in groups of 16 examples
KERNEL_SIZES = (1, 3, 5, 7)

_lib: ctypes.CDLL | None = None
_problem: str | None = None
_loaded = False


# --------------------------------------------------------------------------------------------
# Building and loading the shared library


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n".join(keep)


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
           "-o", tmp, str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise RuntimeError(f"{Path(cxx).name} failed: {first[:200]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None if they cannot be had here."""
    global _lib, _problem, _loaded
    if _loaded:
        return _lib
    _loaded = True
    if os.environ.get("LENET_NO_FAST_CONV"):
        _problem = "LENET_NO_FAST_CONV is set"
        return None
    cxx = _compiler()
    if cxx is None:
        _problem = "no C++ compiler (g++/clang++) was found"
        return None
    from .data import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + cxx.encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"blconv-{key}.so"
    try:
        if not target.exists():
            _build(cxx, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _problem = f"building the batch-last kernels failed ({exc})"
        return None
    args = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7
    lib.lenet_blconv_forward.argtypes = args
    lib.lenet_blconv_weight_grad.argtypes = args[:1] + args[1:3] + args[4:]
    _lib = lib
    bad = _self_test()
    if bad:
        _lib, _problem = None, f"the batch-last kernels built in {target} give wrong results ({bad})"
    return _lib


def _self_test() -> str | None:
    """Check the freshly loaded kernels against PyTorch on a small layer; a message if they differ."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, LANES, generator=g)
    w = torch.randn(3, 2, 3, 3, generator=g)
    b = torch.randn(3, generator=g)
    grad = torch.randn(3, 5, 6, LANES, generator=g)
    ref_x = x.permute(3, 0, 1, 2)
    want = F.conv2d(ref_x, w, b, padding=1).permute(1, 2, 3, 0)
    got = conv(pad_cols(x, 1), w, b, 1)
    want_w = torch.ops.aten.convolution_backward(
        grad.permute(3, 0, 1, 2), ref_x, w, [3], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [False, True, False])[1]
    got_w = weight_grad(pad_cols(x, 1), grad, 3, 1)
    for name, a, e in (("forward", got, want), ("weight gradient", got_w, want_w)):
        if not torch.allclose(a, e, rtol=1e-4, atol=1e-4):
            return f"{name} differs by {(a - e).abs().max().item():.3g}"
    return None


def problem() -> str | None:
    """Why :func:`library` returned None (None if it did not)."""
    library()
    return _problem


# --------------------------------------------------------------------------------------------
# Custom ops (tensors in [C, H, W, B] layout, B a multiple of 16)


def _need_lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the batch-last kernels are not available: {_problem}")
    return lib


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def pad_cols(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad the columns of a [C, H, W, B] tensor (the kernels pad rows themselves).

    Done outside the ops so that ``torch.compile`` fuses it into the kernel producing ``x``."""
    return F.pad(x, (0, 0, pad, pad)) if pad else x


@torch.library.custom_op("lenet::blconv", mutates_args=())
def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Stride-1 convolution, ``pad`` zero rows above and below; columns already padded in ``x``.

    x: [Cin, H, W, B] -> [Cout, H + 2 pad - K + 1, W - K + 1, B]; B a multiple of 16."""
    cin, h, w, b = x.shape
    cout, _, k, _ = weight.shape
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty((cout, h + 2 * pad - k + 1, w - k + 1, b), dtype=x.dtype)
    rc = _need_lib().lenet_blconv_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(out),
                                          cin, h, w, pad, cout, k, b)
    if rc != 0:
        raise RuntimeError(f"lenet::blconv: unsupported shape {tuple(x.shape)} x {tuple(weight.shape)}")
    return out


@conv.register_fake
def _(x, weight, bias, pad):
    cin, h, w, b = x.shape
    k = weight.shape[2]
    return x.new_empty((weight.shape[0], h + 2 * pad - k + 1, w - k + 1, b))


@torch.library.custom_op("lenet::blconv_wgrad", mutates_args=())
def weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """Gradient of :func:`conv`'s weight, given its input ``x`` and output gradient ``grad``."""
    cin, h, w, b = x.shape
    cout = grad.shape[0]
    x, grad = x.contiguous(), grad.contiguous()
    out = torch.empty((cout, cin, k, k), dtype=x.dtype)
    rc = _need_lib().lenet_blconv_weight_grad(_ptr(x), _ptr(grad), _ptr(out), cin, h, w, pad, cout, k, b)
    if rc != 0:
        raise RuntimeError(f"lenet::blconv_wgrad: unsupported shape {tuple(x.shape)}, k={k}")
    return out


@weight_grad.register_fake
def _(x, grad, k, pad):
    return x.new_empty((grad.shape[0], x.shape[0], k, k))


def _setup(ctx, inputs, output):
    x, weight, bias, pad = inputs
    ctx.save_for_backward(x, weight)
    ctx.pad, ctx.has_bias = pad, bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    k = weight.shape[2]
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        # d/dx of a convolution is a convolution of the output gradient with the flipped kernel,
        # input and output channels swapped: k - 1 - pad zero rows, k - 1 zero columns (x's
        # columns already include the forward's padding).
        grad_x = conv(pad_cols(grad, k - 1), weight.flip(2, 3).transpose(0, 1), None, k - 1 - ctx.pad)
    if ctx.needs_input_grad[1]:
        grad_w = weight_grad(x, grad, k, ctx.pad)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum(dim=(1, 2, 3))
    return grad_x, grad_w, grad_b, None


conv.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# Running a model in the batch-last layout

_ELEMENTWISE = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.GELU, nn.Identity)


def _conv_ok(m: nn.Conv2d) -> bool:
    k = m.kernel_size
    return (k[0] == k[1] and k[0] in KERNEL_SIZES and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and m.padding[0] == m.padding[1] and m.weight.dtype == torch.float32)


def _pool_ok(m: nn.Module) -> bool:
    if not isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
        return False
    k, s, p = m.kernel_size, m.stride, m.padding
    same = (k == s) and p in (0, (0, 0)) and not m.ceil_mode
    if isinstance(m, nn.MaxPool2d):
        same = same and m.dilation in (1, (1, 1)) and not m.return_indices
    return same and (isinstance(k, int) or k[0] == k[1])


class BatchLast(nn.Module):
    """Runs ``model`` (an ``nn.Sequential``) with its leading conv stages in the batch-last layout.

    The stages before the first layer the kernels do not cover (the flatten, in a LeNet) run as
    [C, H, W, B] tensors: convolutions through ``lenet::blconv``, activations as they are, 2x2
    pools as a reshape and a mean/max. The rest of the model runs as usual on a transposed view.
    Same parameters, same function: outputs equal the model's up to float rounding.
    """

    def __init__(self, model: nn.Sequential, stages: int):
        super().__init__()
        self.layers = list(model)  # not registered: the wrapped model owns the parameters
        self.stages = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: float (N, C, H, W)
        n = x.shape[0]
        pad = -n % LANES
        h = x.permute(1, 2, 3, 0)
        if pad:  # padded examples are zeros; they are dropped before anything sees their scores
            h = F.pad(h, (0, pad))
        for layer in self.layers[:self.stages]:
            if isinstance(layer, nn.Conv2d):
                p = layer.padding[0]
                h = conv(pad_cols(h, p), layer.weight, layer.bias, p)
            elif isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d)):
                k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
                c, hh, ww, b = h.shape
                h = h[:, :hh // k * k, :ww // k * k]
                h = h.reshape(c, hh // k, k, ww // k, k, b)
                h = h.mean(dim=(2, 4)) if isinstance(layer, nn.AvgPool2d) else h.amax(dim=(2, 4))
            else:
                h = layer(h)
        h = h.permute(3, 0, 1, 2)[:n]
        for layer in self.layers[self.stages:]:
            h = layer(h)
        return h


def batch_last(model: nn.Module) -> tuple[BatchLast | None, str]:
    """A :class:`BatchLast` runner for ``model``, or (None, why not)."""
    if not isinstance(model, nn.Sequential):
        return None, "the model is not an nn.Sequential"
    stages, convs = 0, 0
    from .models import ScaledTanh

    for layer in model:
        if isinstance(layer, nn.Conv2d) and _conv_ok(layer):
            convs += 1
        elif not (isinstance(layer, _ELEMENTWISE + (ScaledTanh,)) or _pool_ok(layer)):
            break
        stages += 1
    if convs == 0 or any(isinstance(m, nn.Conv2d) for m in list(model)[stages:]):
        # Mixing layouts (e.g. conv -> BatchNorm -> conv) would cost more copies than it saves.
        return None, ("its layers (e.g. BatchNorm or a strided conv between the convolutions) are "
                      "not all covered by the batch-last kernels")
    if next(model.parameters()).device.type != "cpu":
        return None, "the model is not on the CPU"
    if library() is None:
        return None, _problem or "the kernels are not available"
    return BatchLast(model, stages), ""


__all__ = ["BatchLast", "batch_last", "conv", "weight_grad", "library", "problem"]
