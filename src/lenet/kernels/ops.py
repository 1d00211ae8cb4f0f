"""Batch-last conv kernels for the CPU: LeNet's small conv blocks near the hardware's limit.

oneDNN (PyTorch's CPU convolution) is tuned for layers with many channels. LeNet's have 1, 6 and
16, so its kernels spend their time on layout and padding work: conv1's forward runs at ~80
GFLOP/s on this project's 2-core machine, a fifth of the cores' peak. ``csrc/blconv.cpp`` instead
stores activations as ``[channels, rows, cols, batch]`` and vectorises over the batch: every
multiply-add works on 16 examples at once, whatever the layer's shape, and the activation
(sigmoid, tanh, ReLU) and pooling (average, max) are fused into the same passes (measurements in
docs/speed-notes.md).

This module:

* builds the C++ file once per machine with the system C++ compiler (``-O3 -march=native
  -fopenmp``, a few seconds) into lenet's cache folder, keyed by the source, compiler and CPU,
  and checks the result against PyTorch before using it. The library links ``libgomp.so.1``;
  loaded into a process that has imported torch, it shares torch's OpenMP runtime (same
  soname), so ``torch.set_num_threads`` applies to it too;
* :class:`ConvBlock`: pool(act(conv(x) + b)) and its backward pass as one autograd Function;
* :class:`BatchLast` runs an ``nn.Sequential`` LeNet with its conv blocks in that layout and the
  same parameters: the model, its state dict and what it learns are unchanged.

Where no compiler is found, the build or its check fails, or a model has a layer the kernels do
not cover, :func:`batch_last` returns None (with the reason) and PyTorch's convolutions are used.
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
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..models.layers import ScaledTanh, Subsampling
from ..models.lenet5 import EuclideanRBF, LeNet5, Negate, PartialConv2d

SOURCE = Path(__file__).with_name("csrc") / "blconv.cpp"


class Constants(NamedTuple):
    """What the C++ side defines and reports (``lenet_bl_constants``): written there only."""

    lanes: int  # examples per vector: the kernels work on the batch in groups of this many
    kernel_sizes: tuple[int, ...]  # the square kernel sizes compiled in
    act_none: int  # no activation
    activations: dict[type, int]  # activation module type -> code
    pool_none: int
    pool_avg: int
    pool_max: int


_lib: ctypes.CDLL | None = None
_constants: Constants | None = None
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
    first = text.split("\n\n")[0]  # the first processor's block: model and feature flags (x86 or Arm)
    keep = [line for line in first.splitlines()
            if line.startswith(("model name", "flags", "Features", "CPU implementer", "CPU part", "CPU variant"))]
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
    from .._util import cache_dir

    cpu = hashlib.sha256(_cpu_signature().encode()).hexdigest()[:8]
    key = hashlib.sha256(SOURCE.read_bytes() + cxx.encode()).hexdigest()[:12]
    target = cache_dir() / "kernels" / f"blconv-{cpu}-{key}.so"
    try:
        if not target.exists():
            _build(cxx, target)
            for old in target.parent.glob(f"blconv-{cpu}-*.so"):  # this CPU's builds of earlier sources
                if old != target:
                    old.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(target))
        lib.lenet_bl_constants  # noqa: B018 - a library without the entry points is a failed build
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        _problem = f"building the batch-last kernels failed ({exc})"
        return None
    ptrs, ints = [ctypes.c_void_p], [ctypes.c_int]
    lib.lenet_bl_block_forward.argtypes = ptrs * 5 + ints * 10 + ptrs
    lib.lenet_bl_block_backward.argtypes = ptrs * 8 + ints * 10 + ptrs
    lib.lenet_bl_block_affine_forward.argtypes = ptrs * 4 + [ctypes.c_float] + ptrs * 3 + ints * 11 + ptrs
    lib.lenet_bl_block_affine_backward.argtypes = ptrs * 4 + [ctypes.c_float] + ptrs * 8 + ints * 11 + ptrs
    lib.lenet_bl_images.argtypes = ptrs * 2 + ints * 5
    lib.lenet_bl_dense_forward.argtypes = ptrs * 4 + ints * 4
    lib.lenet_bl_dense_backward.argtypes = ptrs * 6 + ints * 4
    lib.lenet_bl_rbf_forward.argtypes = ptrs * 3 + ints * 3 + [ctypes.c_float]
    lib.lenet_bl_rbf_backward.argtypes = ptrs * 4 + ints * 3 + [ctypes.c_float]
    lib.lenet_bl_paper_loss.argtypes = ptrs * 4 + ints * 2 + [ctypes.c_float]
    lib.lenet_bl_fold.argtypes = ptrs * 3 + ints * 4 + [ctypes.c_float] * 2 + ptrs * 2
    lib.lenet_bl_unfold.argtypes = ptrs * 3 + ints * 4 + [ctypes.c_float] * 2 + ptrs * 2
    lib.lenet_bl_fold.restype = lib.lenet_bl_unfold.restype = None
    lib.lenet_bl_affine_forward.argtypes = ptrs * 4 + ints * 7
    lib.lenet_bl_affine_backward.argtypes = ptrs * 7 + ints * 7
    lib.lenet_bl_channel_stats.argtypes = ptrs + ints * 5 + ptrs * 2
    lib.lenet_bl_bn_backward.argtypes = ptrs * 9 + ints * 8
    lib.lenet_bl_conv_stats.argtypes = ptrs * 3 + ints * 8 + ptrs * 2
    lib.lenet_bl_conv_bn_backward.argtypes = ptrs * 13 + ints * 11
    lib.lenet_bl_conv_affine_forward.argtypes = ptrs * 6 + ints * 10
    _lib = lib
    try:
        _read_constants(lib)
        with torch.random.fork_rng(devices=[]):  # the test model's default init must not move the global RNG
            bad = _self_test()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use these kernels
        bad = f"{type(exc).__name__}: {exc}"
    if bad:
        _lib, _problem = None, f"the batch-last kernels built in {target} give wrong results ({bad})"
    return _lib


def _read_constants(lib: ctypes.CDLL) -> None:
    global _constants
    buf = (ctypes.c_int * 64)()
    lib.lenet_bl_constants.argtypes = [ctypes.c_void_p, ctypes.c_int]
    v = list(buf[:lib.lenet_bl_constants(buf, len(buf))])
    lanes, count = v[0], v[1]
    act_none, sigmoid, tanh, relu, scaled_tanh, none, avg, mx = v[2 + count:10 + count]
    _constants = Constants(lanes, tuple(v[2:2 + count]), act_none,
                           {nn.Sigmoid: sigmoid, nn.Tanh: tanh, nn.ReLU: relu, ScaledTanh: scaled_tanh}, none, avg, mx)


def constants() -> Constants:
    """The kernels' lanes, kernel sizes and codes, as the loaded library reports them."""
    _need_lib()
    return _constants


def problem() -> str | None:
    """Why :func:`library` returned None (None if it did not)."""
    library()
    return _problem


def _self_test() -> str | None:
    """Check the freshly loaded kernels against PyTorch: three small models that use every kind of
    stage (conv blocks with both poolings and padding, BatchNorm blocks recomputed and stored,
    LeNet-5's scaled tanh, partial connections and subsampling, dense layers, RBF outputs with
    and without the negation), forward and every gradient, on a batch that is not a multiple of
    16, and the layout of uint8 images. A message if anything differs."""
    g = torch.Generator().manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
                            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                            nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 5), EuclideanRBF(torch.randn(3, 5, generator=g))),
              nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                            PartialConv2d(3, ((0,), (0, 1), (1, 2), (0, 1, 2)), 3), ScaledTanh(), Subsampling(4),
                            ScaledTanh(), nn.Flatten(),
                            nn.Linear(16, 7), ScaledTanh(), nn.Linear(7, 5), EuclideanRBF(torch.randn(6, 5, generator=g)),
                            Negate()),
              nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.AvgPool2d(2),  # recomputed
                            nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Sigmoid(), nn.MaxPool2d(2),  # stored
                            nn.Flatten(), nn.Linear(16, 5))]
    for index, model in enumerate(models):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        bad = _compare_with_pytorch(model, torch.rand(21, 1, 12, 12, generator=g))
        if bad:
            return f"test model {index + 1}: {bad}"
    u8 = torch.randint(0, 256, (21, 12, 12), dtype=torch.uint8, generator=g)
    want = F.pad(u8.permute(1, 2, 0)[None].float() / 255.0, (0, -u8.shape[0] % constants().lanes, 1, 1))
    if not torch.equal(images(u8, 1), want):
        return "the images' layout differs from x.float() / 255"
    return None


def _compare_with_pytorch(model: nn.Sequential, x: torch.Tensor) -> str | None:
    runner, why = batch_last(model, check_library=False)
    if runner is None:
        return f"not covered ({why})"
    results = []
    for net in (model, runner):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        out = net(xx)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append([out.detach(), xx.grad] + [p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    for i, (want, got) in enumerate(zip(*results)):  # to 1e-4 of each tensor's scale (BatchNorm's
        if (got - want).abs().max() > 1e-5 + 1e-4 * want.abs().max():  # gradients cancel: float32 rounding)
            what = "forward" if i == 0 else "input gradient" if i == 1 else f"gradient of parameter {i - 2}"
            return f"{what} differs by {(got - want).abs().max().item():.3g}"
    return None


# --------------------------------------------------------------------------------------------
# The kernels as tensor functions (tensors in [C, H, W, B] layout, B a multiple of 16)

def _need_lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the batch-last kernels are not available: {_problem}")
    return lib


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    """The address of ``t``'s data. The caller keeps ``t`` alive (and contiguous) for the call."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check_shapes(ok: bool, what: str, *shapes) -> None:
    if not ok:
        raise RuntimeError(f"lenet batch-last {what}: shapes do not fit: {', '.join(str(tuple(s)) for s in shapes)}")


def _check(rc: int, what: str, *shapes) -> None:
    if rc != 0:
        raise RuntimeError(f"lenet batch-last {what}: unsupported shape {', '.join(str(tuple(s)) for s in shapes)}")


def pad_cols(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad the columns of a [C, H, W, B] tensor (the kernels pad rows themselves)."""
    return F.pad(x, (0, 0, pad, pad)) if pad else x


def images(x: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 images (N, H, W) as the kernels' input: [1, H, W + 2 pad, B] floats x / 255 (as
    ``x.float() / 255``, bit for bit), the columns zero-padded, B = N rounded up to whole lanes
    (zeros). One pass in the kernels instead of a uint8 copy in the layout and a float pass."""
    _check_shapes(x.dtype == torch.uint8 and x.dim() == 3 and x.device.type == "cpu" and pad >= 0, "images",
                  x.shape)
    n, h, w = x.shape
    x = x.contiguous()
    out = torch.empty((1, h, w + 2 * pad, n + -n % constants().lanes), dtype=torch.float32)
    _check(_need_lib().lenet_bl_images(_ptr(x), _ptr(out), n, h, w, pad, out.shape[-1]), "images", x.shape)
    return out


def _conv_output(x: torch.Tensor, w: torch.Tensor, pad: int, pool: int, k: int, what: str) -> torch.Tensor:
    """The (empty) output of pool(conv(x)) for x: [Cin, H, W, B] with padded columns and ``pad``
    zero rows, after checking that x and the weight w fit each other and the pool."""
    cin, h, wd, n = x.shape
    cout, _, ks, _ = w.shape
    ho, wo = h + 2 * pad - ks + 1, wd - ks + 1
    _check_shapes(w.shape[1] == cin and ho >= 1 and wo >= 1 and (not pool or (ho >= k and wo >= k))
                  and x.dtype == w.dtype == torch.float32, what, x.shape, w.shape)
    return torch.empty((cout, ho // k, wo // k, n) if pool else (cout, ho, wo, n))


class Fold(NamedTuple):
    """How a conv layer's own parameters become the dense weight and bias the kernels run
    (:class:`FoldedWeight`). ``pairs``: [Cout, Cin] int32, the index in the layer's weight of the
    kernel between output o and input i, -1 where they are not connected (LeNet-5's C3 stores only
    its 60 connected kernels); None for a full weight. ``affine``: (scale, shift) of an input layer
    folded in (LeNet-5's LeCunInput; see :class:`_Conv`), or None."""

    cout: int
    cin: int
    pairs: torch.Tensor | None
    affine: tuple[float, float] | None
    kernels: int  # K x K kernels in the layer's weight

    def args(self, kk: int) -> tuple:
        scale, shift = self.affine or (1.0, 0.0)
        return _ptr(self.pairs), self.cout, self.cin, kk, int(self.affine is not None), scale, shift


class FoldedWeight(torch.autograd.Function):
    """The dense [Cout, Cin, K, K] weight and [Cout] bias of a :class:`Fold`, from the layer's own
    weight and bias (or None), in one call (``lenet_bl_fold``), and their gradients back in another
    (``lenet_bl_unfold``): instead of a few PyTorch operations with an autograd node each."""

    @staticmethod
    def forward(ctx, w, b, fold: Fold):
        w, b = w.contiguous(), None if b is None else b.contiguous()
        k = w.shape[-1]
        _check_shapes(w.dtype == torch.float32 and w.numel() == fold.kernels * k * k
                      and (b is None or b.shape == (fold.cout,)), "folded conv weight", w.shape)
        wd, bd = torch.empty(fold.cout, fold.cin, k, k), torch.empty(fold.cout)
        _need_lib().lenet_bl_fold(_ptr(w), _ptr(b), *fold.args(k * k), _ptr(wd), _ptr(bd))
        ctx.fold, ctx.shape, ctx.bias = fold, w.shape, b is not None
        return wd, bd

    @staticmethod
    def backward(ctx, gwd, gbd):
        gwd, gbd, fold = gwd.contiguous(), gbd.contiguous(), ctx.fold
        gw, gb = torch.empty(ctx.shape), torch.empty(fold.cout) if ctx.bias else None
        _need_lib().lenet_bl_unfold(_ptr(gwd), _ptr(gbd), *fold.args(ctx.shape[-1] ** 2), _ptr(gw), _ptr(gb))
        return gw, gb, None


class ConvBlock(torch.autograd.Function):
    """pool(act(conv(x) + bias)) and its backward pass, each one call into the kernels.

    x: [Cin, H, W, B] with its columns padded (see :func:`pad_cols`), ``pad`` zero rows; act and
    pool are codes of :func:`constants`; k the pool window (= stride). ``keep``: store the
    activation before the pool for the backward pass (see :func:`keeps_activation`); otherwise
    the kernels recompute it there, 16 examples at a time in the core's cache. With ``scale`` and
    ``shift`` (pooled blocks only): act2(scale_by * scale[c] * pool(...) + shift[c]) in the same
    calls, with the gradients of scale and shift (LeNet-5's trainable subsampling, which sums its
    window where the pool averages it: scale_by is the window's area, and the squashing after it).
    ``mask``: a [Cout, Cin] uint8 tensor, nonzero where output channel o reads input channel i
    (LeNet-5's C3); the kernels skip the other pairs, whose weights must be zero, and return zero
    weight gradient for them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pad: int, act: int, pool: int, k: int, keep: bool = False,
                scale=None, shift=None, act2: int = 0, mask=None, scale_by: float = 1.0):
        x = x.contiguous()
        # (inside a Function's forward autograd records nothing: the parameters need no detach())
        w = weight.contiguous()
        b = None if bias is None else bias.contiguous()
        s = None if scale is None else scale.contiguous()
        t = None if shift is None else shift.contiguous()
        cin, h, wd, n = x.shape
        cout, _, ks, _ = w.shape
        out = _conv_output(x, w, pad, pool, k, "conv block")
        c = constants()
        _check_shapes(s is None or (pool != c.pool_none and s.shape == t.shape == (cout,)), "conv block's scale",
                      w.shape, None if s is None else s.shape)
        _check_shapes(mask is None or (mask.dtype == torch.uint8 and mask.shape == (cout, cin) and mask.is_contiguous()),
                      "conv block's mask", w.shape, None if mask is None else mask.shape)
        keep = keep and pool != c.pool_none and (act != c.act_none or pool == c.pool_max or s is not None)
        kept = torch.empty(cout * (h + 2 * pad - ks + 1) * (wd - ks + 1) * n, dtype=torch.float32) if keep else None
        dims = (cin, h, wd, pad, cout, ks, n, act, pool, k)
        lib = _need_lib()
        m = _ptr(mask)
        rc = (lib.lenet_bl_block_forward(_ptr(x), _ptr(w), _ptr(b), _ptr(out), _ptr(kept), *dims, m) if s is None else
              lib.lenet_bl_block_affine_forward(_ptr(x), _ptr(w), _ptr(b), _ptr(s), scale_by, _ptr(t), _ptr(out),
                                                _ptr(kept), *dims, act2, m))
        _check(rc, "conv block", x.shape, w.shape)
        ctx.save_for_backward(x, w, b, kept, s, t, mask)
        ctx.conf = (pad, act, pool, k, act2, scale_by)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, b, kept, s, t, mask = ctx.saved_tensors
        pad, act, pool, k, act2, scale_by = ctx.conf
        cin, h, wd, n = x.shape
        cout, _, ks, _ = w.shape
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None  # (the kernels flip and transpose w for it)
        grad_w = torch.empty_like(w)
        grad_b = torch.empty(cout) if b is not None else None
        dims = (cin, h, wd, pad, cout, ks, n, act, pool, k)
        lib = _need_lib()
        if s is None:
            grad_s = grad_t = None
            rc = lib.lenet_bl_block_backward(_ptr(x), _ptr(w), _ptr(b), _ptr(kept), _ptr(grad),
                                             _ptr(grad_x), _ptr(grad_w), _ptr(grad_b), *dims, _ptr(mask))
        else:
            grad_s, grad_t = torch.empty(cout), torch.empty(cout)
            rc = lib.lenet_bl_block_affine_backward(
                _ptr(x), _ptr(w), _ptr(b), _ptr(s), scale_by, _ptr(t), _ptr(kept), _ptr(grad), _ptr(grad_x),
                _ptr(grad_w), _ptr(grad_b), _ptr(grad_s), _ptr(grad_t), *dims, act2, _ptr(mask))
        _check(rc, "conv block backward", x.shape, grad.shape)
        need_s, need_t = (ctx.needs_input_grad + (False,) * 4)[8:10]  # (False where not passed)
        return (grad_x, grad_w if need_w else None, grad_b if need_b else None, None, None, None, None, None,
                grad_s if need_s else None, grad_t if need_t else None, None, None, None)


def keeps_activation(weight: torch.Tensor) -> bool:
    """Whether a conv block with this weight stores its activation for the backward pass rather
    than recomputing it there: when the conv costs more than RECOMPUTE_FAN_IN multiply-adds per
    output. A first layer (fan-in 25) is cheaper to recompute in the core's cache than to write to
    memory and read back (4.8 MB per batch of 256 for conv1); conv2 (fan-in 150) is not."""
    return weight.shape[1:].numel() > RECOMPUTE_FAN_IN  # (weight[0] would be an operation each step)


class DenseBlock(torch.autograd.Function):
    """act(W x + b) for x: [Fin, B] (features first, batch last), and its backward pass.

    The output (the activation) is kept for the backward pass: it is small ([Fout, B])."""

    @staticmethod
    def forward(ctx, x, weight, bias, act: int):
        x = x.contiguous()
        w = weight.contiguous()
        b = None if bias is None else bias.contiguous()
        fin, n = x.shape
        fout = w.shape[0]
        _check_shapes(w.shape[1] == fin and x.dtype == w.dtype == torch.float32, "dense layer", x.shape, w.shape)
        y = torch.empty((fout, n))
        _check(_need_lib().lenet_bl_dense_forward(_ptr(x), _ptr(w), _ptr(b), _ptr(y), fin, fout, n, act),
               "dense layer", x.shape, w.shape)
        ctx.save_for_backward(x, w, b, y)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, b, y = ctx.saved_tensors
        fin, n = x.shape
        fout = w.shape[0]
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = torch.empty_like(y)
        grad_x = torch.empty_like(x) if need_x else None
        grad_b = torch.empty(fout) if b is not None else None
        _check(_need_lib().lenet_bl_dense_backward(_ptr(w), _ptr(y), _ptr(grad), _ptr(grad_z), _ptr(grad_x),
                                                   _ptr(grad_b), fin, fout, n, ctx.act),
               "dense layer backward", x.shape, grad.shape)
        grad_w = torch.mm(grad_z, x.t()) if need_w else None  # a plain matrix product: BLAS does it well
        return grad_x, grad_w, grad_b if need_b else None, None


class RBFBlock(torch.autograd.Function):
    """sign x sum_d (x_d - p_kd)^2 for x: [D, B] and fixed prototypes p: [K, D] (LeNet-5's RBF
    output; sign -1 with the Negate after it), out: [K, B], and its input gradient, each one call."""

    @staticmethod
    def forward(ctx, x, prototypes, sign: float):
        x, p = x.contiguous(), prototypes.contiguous()
        d, n = x.shape
        _check_shapes(p.dim() == 2 and p.shape[1] == d and x.dtype == p.dtype == torch.float32, "RBF layer",
                      x.shape, p.shape)
        out = torch.empty((p.shape[0], n))
        _check(_need_lib().lenet_bl_rbf_forward(_ptr(x), _ptr(p), _ptr(out), d, p.shape[0], n, sign),
               "RBF layer", x.shape)
        ctx.save_for_backward(x, p)
        ctx.sign = sign
        return out

    @staticmethod
    def backward(ctx, grad):
        x, p = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        _check(_need_lib().lenet_bl_rbf_backward(_ptr(x), _ptr(p), _ptr(grad), _ptr(grad_x), x.shape[0], p.shape[0],
                                                 x.shape[1], ctx.sign), "RBF layer backward", x.shape, grad.shape)
        return grad_x, None, None


class PaperLoss(torch.autograd.Function):
    """LeNet-5's loss (the paper's equation 9, :meth:`LeNet5.criterion`) on (N, C) scores in one call:
    the mean over the batch, and its gradient, kept for the backward pass. PyTorch's version is ten
    operations forward and as many autograd nodes backward (speed-notes.md section 19)."""

    @staticmethod
    def forward(ctx, scores, labels, j: float):
        s, y = scores.contiguous(), labels.contiguous()
        _check_shapes(s.dim() == 2 and y.shape == s.shape[:1] and s.dtype == torch.float32 and y.dtype == torch.int64,
                      "LeNet-5 loss", s.shape, y.shape)
        loss, grad = torch.empty(()), torch.empty_like(s)
        rc = _need_lib().lenet_bl_paper_loss(_ptr(s), _ptr(y), _ptr(loss), _ptr(grad), s.shape[0], s.shape[1], j)
        if rc == -2:
            raise IndexError(f"LeNet-5 loss: a label is not a class of the {s.shape[1]} outputs")
        _check(rc, "LeNet-5 loss", s.shape)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None


def fast_loss(criterion):
    """The kernels' version of a model's own loss where they have one (LeNet-5's, :class:`PaperLoss`,
    for CPU float32 scores), else ``criterion`` itself."""
    model = getattr(criterion, "__self__", None)
    if not (isinstance(model, LeNet5) and getattr(criterion, "__func__", None) is LeNet5.criterion
            and library() is not None):
        return criterion

    def loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if scores.device.type == labels.device.type == "cpu" and scores.dtype == torch.float32 \
                and labels.dtype == torch.int64:
            return PaperLoss.apply(scores, labels, float(model.j))
        return criterion(scores, labels)

    return loss


class AffineBlock(torch.autograd.Function):
    """pool(act(scale[c] * z + shift[c])) for z: [C, H, W, B], and its backward pass (gradients of
    z, scale and shift), each one call into the kernels. BatchNorm is this with scale and shift
    computed from the batch statistics (:func:`batch_norm_affine`); autograd carries the gradient
    on through those statistics. The activation is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, z, scale, shift, act: int, pool: int, k: int):
        z = z.contiguous()
        s, t = scale.detach().contiguous(), shift.detach().contiguous()
        c, h, w, n = z.shape
        _check_shapes(s.shape == t.shape == (c,) and z.dtype == s.dtype == torch.float32
                      and (not pool or (h >= k and w >= k)), "affine block", z.shape, s.shape)
        out = torch.empty((c, h // k, w // k, n) if pool else (c, h, w, n))
        _check(_need_lib().lenet_bl_affine_forward(_ptr(z), _ptr(s), _ptr(t), _ptr(out), c, h, w, n, act, pool, k),
               "affine block", z.shape)
        ctx.save_for_backward(z, s, t)
        ctx.conf = (act, pool, k)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, s, t = ctx.saved_tensors
        c, h, w, n = z.shape
        grad = grad.contiguous()
        grad_z, grad_s, grad_t = torch.empty_like(z), torch.empty(c), torch.empty(c)
        _check(_need_lib().lenet_bl_affine_backward(_ptr(z), _ptr(s), _ptr(t), _ptr(grad), _ptr(grad_z),
                                                    _ptr(grad_s), _ptr(grad_t), c, h, w, n, *ctx.conf),
               "affine block backward", z.shape, grad.shape)
        return grad_z, grad_s, grad_t, None, None, None


def channel_stats(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of z: [C, H, W, B] over its first n lanes, one pass."""
    z = z.contiguous()
    c, h, w, b = z.shape
    mean, var = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    _check(_need_lib().lenet_bl_channel_stats(_ptr(z), c, h, w, b, n, _ptr(mean), _ptr(var)), "channel statistics",
           z.shape)
    return mean.float(), var.float()


class BatchNormBlock(torch.autograd.Function):
    """pool(act(BatchNorm(z))) in training mode, for z: [C, H, W, B] whose first n lanes are the
    batch: the normalisation by the batch's mean and rstd = 1/sqrt(var + eps) (from
    :func:`channel_stats`), BatchNorm's affine weight and bias, the activation and the pooling in
    one kernel call forward, and backward one call that also carries the gradient through the
    batch statistics (two passes over the batch, the activation recomputed in each)."""

    @staticmethod
    def forward(ctx, z, weight, bias, mean, rstd, n: int, act: int, pool: int, k: int):
        gamma = weight.detach() if weight is not None else torch.ones_like(mean)
        beta = bias.detach() if bias is not None else torch.zeros_like(mean)
        scale = (gamma * rstd).contiguous()
        shift = (beta - mean * scale).contiguous()
        out = AffineBlock.forward(ctx, z, scale, shift, act, pool, k)  # saves z, scale, shift and the codes
        ctx.stats, ctx.n = (mean.contiguous(), rstd.contiguous()), n
        return out

    @staticmethod
    def backward(ctx, grad):
        z, s, t = ctx.saved_tensors
        (mean, rstd), (act, pool, k) = ctx.stats, ctx.conf
        c, h, w, b = z.shape
        grad = grad.contiguous()
        grad_z, grad_gamma, grad_beta = torch.empty_like(z), torch.empty(c), torch.empty(c)
        _check(_need_lib().lenet_bl_bn_backward(_ptr(z), _ptr(s), _ptr(t), _ptr(mean), _ptr(rstd), _ptr(grad),
                                                _ptr(grad_z), _ptr(grad_gamma), _ptr(grad_beta), c, h, w, b, ctx.n,
                                                act, pool, k), "batch norm backward", z.shape, grad.shape)
        need = ctx.needs_input_grad
        return (grad_z, grad_gamma if need[1] else None, grad_beta if need[2] else None) + (None,) * 6


def conv_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: int,
               n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of conv(x) over its first n lanes, the convolution computed
    chunk by chunk and never stored (x: [Cin, H, W, B], columns padded)."""
    x, w = x.contiguous(), weight.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    cin, h, wd, lanes = x.shape
    cout, _, ks, _ = w.shape
    mean, var = torch.empty(cout, dtype=torch.float64), torch.empty(cout, dtype=torch.float64)
    _check(_need_lib().lenet_bl_conv_stats(_ptr(x), _ptr(w), _ptr(b), cin, h, wd, pad, cout, ks, lanes, n,
                                           _ptr(mean), _ptr(var)), "conv statistics", x.shape, w.shape)
    return mean.float(), var.float()


class ConvBatchNormBlock(torch.autograd.Function):
    """pool(act(BatchNorm(conv(x)))) in training mode without storing conv(x): forward convolves
    and normalises chunk by chunk in the core's cache; backward recomputes the convolution in each
    of its two passes, rounding scale x z + shift as the forward did (see the C++)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, mean, rstd, n: int, pad: int, act: int, pool: int, k: int):
        g = gamma.detach() if gamma is not None else torch.ones_like(mean)
        b = beta.detach() if beta is not None else torch.zeros_like(mean)
        scale = (g * rstd).contiguous()
        shift = (b - mean * scale).contiguous()
        x, w = x.contiguous(), weight.detach().contiguous()
        bias = None if bias is None else bias.detach().contiguous()
        cin, h, wd, lanes = x.shape
        cout, _, ks, _ = w.shape
        out = _conv_output(x, w, pad, pool, k, "conv + batch norm")
        _check(_need_lib().lenet_bl_conv_affine_forward(_ptr(x), _ptr(w), _ptr(bias), _ptr(scale), _ptr(shift),
                                                        _ptr(out), cin, h, wd, pad, cout, ks, lanes, act, pool, k),
               "conv + batch norm", x.shape, w.shape)
        ctx.save_for_backward(x, w, bias, scale, shift, mean.contiguous(), rstd.contiguous())
        ctx.conf, ctx.n = (pad, act, pool, k), n
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, bias, s, t, mean, rstd = ctx.saved_tensors
        pad, act, pool, k = ctx.conf
        cin, h, wd, lanes = x.shape
        cout, _, ks, _ = w.shape
        grad = grad.contiguous()
        need = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need[0] else None  # (the kernels flip and transpose w for it)
        grad_w, grad_b = torch.empty_like(w), torch.empty(cout) if bias is not None else None
        grad_gamma, grad_beta = torch.empty(cout), torch.empty(cout)
        _check(_need_lib().lenet_bl_conv_bn_backward(
            _ptr(x), _ptr(w), _ptr(bias), _ptr(s), _ptr(t), _ptr(mean), _ptr(rstd), _ptr(grad),
            _ptr(grad_x), _ptr(grad_w), _ptr(grad_b), _ptr(grad_gamma), _ptr(grad_beta),
            cin, h, wd, pad, cout, ks, lanes, ctx.n, act, pool, k), "conv + batch norm backward", x.shape, grad.shape)
        return (grad_x, grad_w if need[1] else None, grad_b if need[2] else None,
                grad_gamma if need[3] else None, grad_beta if need[4] else None) + (None,) * 7


# --------------------------------------------------------------------------------------------
# Running a model in the batch-last layout: a plan of stages
#
# :func:`batch_last` reads an ``nn.Sequential`` from the front and turns what the kernels cover
# into stages, each a function of a batch-last tensor ([C, H, W, B], or [F, B] after a flatten):
#
#   conv [-> act] [-> pool]                            one ConvBlock
#   conv -> act -> Subsampling [-> act]                one ConvBlock (LeNet-5's subsampling in its calls)
#   conv -> BatchNorm2d [-> act] [-> pool]             a ConvBlock, the batch statistics, one AffineBlock
#   input_affine() layer -> conv block                 the block, the layer's pad and scale folded in
#   elementwise activation, forward_batch_last(h)      PyTorch on the batch-last tensor
#   AdaptiveAvgPool2d(1), Flatten                      reductions and reshapes in the layout
#   Linear [-> act]                                    one DenseBlock
#   EuclideanRBF [-> Negate]                           one RBFBlock (LeNet-5's output, its scores)
#
# The layers after the first one no stage covers (dropout, ...) run as usual on
# the (N, ...) tensor. A model with a convolution among those is not run at all (None, why).


class _Conv:
    """pool(act(conv(h) + b)) with the conv's (or PartialConv2d's masked dense) weight.

    ``affine``: (pad, scale, shift) of an input layer folded into this conv (LeNet-5's
    :class:`LeCunInput`, which zero-pads the image and maps every pixel p to scale p + shift): the
    conv of scale h + shift is the conv of h with weight scale w and bias b + shift sum(w), so the
    kernels pad with zeros themselves and no pass over the scaled image is made.

    ``sub``: LeNet-5's trainable subsampling after the pool (sum x coefficient + bias) and the
    activation after it, computed in the block's own calls (:class:`ConvBlock`'s scale and shift)."""

    def __init__(self, conv: nn.Module, act: int, pool: int, k: int,
                 affine: tuple[int, float, float] | None = None, sub: tuple[Subsampling, int] | None = None):
        self.conv, self.act, self.pool, self.k, self.affine = conv, act, pool, k, affine
        self.sub = sub  # (LeNet-5's Subsampling after the average pool, the activation code after it)
        self.pad = conv.padding[0] if isinstance(conv, nn.Conv2d) else 0
        self.pad += affine[0] if affine else 0  # (a conv folded with an input layer has no padding of its own)
        self.padded = False  # True when the input's columns arrive padded (the first stage)
        # C3's connection table: the kernels skip the kernels it leaves out (zeros in the dense weight)
        self.mask = conv.connections() if isinstance(conv, PartialConv2d) else None
        self.fold = None  # how params() makes the weight from the layer's (C3's kernels, the input's affine)
        if self.mask is not None or affine is not None:
            pairs, kernels = None, conv.out_channels * conv.in_channels
            if self.mask is not None:
                kernels = len(conv.out_index)
                pairs = torch.full((conv.out_channels, conv.in_channels), -1, dtype=torch.int32)
                pairs[conv.out_index.cpu(), conv.in_index.cpu()] = torch.arange(kernels, dtype=torch.int32)
            self.fold = Fold(conv.out_channels, conv.in_channels, pairs, affine[1:] if affine else None, kernels)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (weight, bias) the kernels run: the conv's own, or made from them by ``self.fold``
        (C3's kernels scattered into a full 6 -> 16 weight, the input layer's affine folded in)."""
        w, b = self.conv.weight, self.conv.bias
        if self.fold is None:
            return w, b
        wd, bd = FoldedWeight.apply(w, b, self.fold)
        return wd, bd if b is not None or self.fold.affine else None

    def __call__(self, h: torch.Tensor, n: int) -> torch.Tensor:
        w, b = self.params()
        if self.pad == 0 and self.pool == constants().pool_none and h.shape[1:3] == w.shape[2:]:
            # The kernel covers the whole map (LeNet-5's C5): a dense layer over the flattened map
            # (same order), whose weight gradient BLAS computes far better than a 1x1-output conv.
            out = DenseBlock.apply(h.reshape(-1, h.shape[-1]), w.reshape(w.shape[0], -1), b, self.act)
            return out.view(w.shape[0], 1, 1, -1)
        h = h if self.padded else pad_cols(h, self.pad)
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b))
        keep = grads and keeps_activation(w)
        if self.sub is None:
            return ConvBlock.apply(h, w, b, self.pad, self.act, self.pool, self.k, keep, None, None, 0, self.mask)
        sub, after = self.sub
        area = float(sub.size * sub.size)  # the block averages; the layer sums
        return ConvBlock.apply(h, w, b, self.pad, self.act, self.pool, self.k, keep, sub.weight, sub.bias, after,
                               self.mask, area)


class _ConvNorm(_Conv):
    """pool(act(BatchNorm(conv(h)))): the convolution alone, then the normalisation fused with the
    activation and pooling: :class:`BatchNormBlock` with the batch's statistics (training), or
    :class:`AffineBlock` with the running ones (evaluation)."""

    def __init__(self, conv: nn.Module, norm: nn.BatchNorm2d, act: int, pool: int, k: int):
        super().__init__(conv, constants().act_none, constants().pool_none, 1)
        self.norm, self.after = norm, (act, pool, k)

    def __call__(self, h: torch.Tensor, n: int) -> torch.Tensor:
        bn, (w, bias) = self.norm, self.params()
        h = h if self.padded else pad_cols(h, self.pad)
        if not (bn.training or bn.running_mean is None):  # running statistics: fold them into the conv
            scale = torch.rsqrt(bn.running_var + bn.eps)
            scale = scale * bn.weight if bn.weight is not None else scale
            shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
            shift = shift + bias * scale if bias is not None else shift
            return ConvBlock.apply(h, w * scale.view(-1, 1, 1, 1), shift, self.pad, *self.after)
        if not keeps_activation(w):  # recomputing the conv costs less than storing its output
            mean, var = conv_stats(h, w, bias, self.pad, n)
            self._track(mean, var, n * (h.shape[1] + 2 * self.pad - w.shape[2] + 1) * (h.shape[2] - w.shape[3] + 1))
            return ConvBatchNormBlock.apply(h, w, bias, bn.weight, bn.bias, mean, torch.rsqrt(var + bn.eps), n,
                                            self.pad, *self.after)
        z = ConvBlock.apply(h, w, bias, self.pad, self.act, self.pool, self.k)
        mean, var = channel_stats(z, n)
        self._track(mean, var, n * z.shape[1] * z.shape[2])
        return BatchNormBlock.apply(z, bn.weight, bn.bias, mean, torch.rsqrt(var + bn.eps), n, *self.after)

    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if self.norm.training and self.norm.running_mean is not None:
            _update_running_stats(self.norm, mean, var, count)


# A conv whose kernel reads at most this many inputs (in_channels x k x k: a first layer's 5x5 on
# one channel) is recomputed in the backward pass (and in BatchNorm's passes) rather than its
# output stored (measured in speed-notes.md).
RECOMPUTE_FAN_IN = 25


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What BatchNorm2d does in training mode: running averages of the mean and the unbiased variance."""
    bn.num_batches_tracked += 1
    m = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
    bn.running_mean.lerp_(mean, m)
    bn.running_var.lerp_(var * (count / max(count - 1, 1)), m)


class _Layer:
    """A layer that works in any layout (an elementwise activation), or one that says how it runs
    in this one (``forward_batch_last``)."""

    def __init__(self, layer: nn.Module):
        self.fn = getattr(layer, "forward_batch_last", layer)

    def __call__(self, h: torch.Tensor, n: int) -> torch.Tensor:
        return self.fn(h)


def _global_avg(h: torch.Tensor, n: int) -> torch.Tensor:
    return h.mean(dim=(1, 2), keepdim=True)


def _flatten(h: torch.Tensor, n: int) -> torch.Tensor:  # [C, H, W, B] -> [C*H*W, B]: the flatten's order
    return h.reshape(-1, h.shape[-1])


class _Dense:
    def __init__(self, linear: nn.Linear, act: int):
        self.linear, self.act = linear, act

    @property
    def features(self) -> tuple[int, int]:  # (inputs, outputs)
        return self.linear.in_features, self.linear.out_features

    def __call__(self, h: torch.Tensor, n: int) -> torch.Tensor:
        return DenseBlock.apply(h, self.linear.weight, self.linear.bias, self.act)


class _RBF:
    def __init__(self, rbf: EuclideanRBF, negate: bool):
        self.rbf, self.sign = rbf, -1.0 if negate else 1.0

    @property
    def features(self) -> tuple[int, int]:  # (inputs, outputs): the prototypes are [outputs, inputs]
        return self.rbf.prototypes.shape[1], self.rbf.prototypes.shape[0]

    def __call__(self, h: torch.Tensor, n: int) -> torch.Tensor:
        return RBFBlock.apply(h, self.rbf.prototypes, self.sign)


ELEMENTWISE = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.GELU, nn.Identity, ScaledTanh)


class BatchLast(nn.Module):
    """Runs ``model`` (an ``nn.Sequential``) through the batch-last kernels: the stages
    :func:`batch_last` planned for its first layers, then its remaining layers as usual.

    Same parameters, same function: outputs and gradients equal the model's up to float rounding.
    """

    def __init__(self, model: nn.Sequential, stages: list, rest: int):
        super().__init__()
        # Not registered as submodules: the wrapped model owns the parameters.
        self.stages = stages
        self.rest = list(model)[rest:]
        self.first_pad = 0
        if isinstance(stages[0], _Conv):  # the input's columns are padded as it is laid out
            stages[0].padded, self.first_pad = True, stages[0].pad

    takes_uint8 = True  # the engine may pass its uint8 (N, H, W) batches straight in

    @property
    def blocks(self) -> list[_Conv]:
        return [s for s in self.stages if isinstance(s, _Conv)]

    @property
    def dense(self) -> list[tuple[nn.Linear, int]]:
        return [(s.linear, s.act) for s in self.stages if isinstance(s, _Dense)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for x: float (N, C, H, W) images, or uint8 (N, H, W) ones (scaled by 1/255 here)."""
        if x.device.type != "cpu" or x.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"the batch-last kernels take float32 or uint8 CPU tensors, not {x.dtype} on {x.device}")
        n = x.shape[0]
        lanes = -n % constants().lanes  # padded examples are zeros; their scores are dropped at the end
        p = self.first_pad
        if x.dtype == torch.uint8:
            h = images(x, p)
        else:
            h = F.pad(x.permute(1, 2, 3, 0), (0, lanes, p, p))
        for stage in self.stages:
            h = stage(h, n)
        # (N, ...) in memory order: the next layers (dropout's random mask follows that order, as in
        # the model) and the scores' argmax (44 instead of 7 us for batch 256 as a strided view) need it
        h = h.t() if h.dim() == 2 else h.permute(3, 0, 1, 2)
        h = (h[:n] if lanes else h).contiguous()  # (a slice, and its backward's copy, only where lanes were padded)
        for layer in self.rest:
            h = layer(h)
        return h


def _conv_ok(m: nn.Module) -> bool:
    if isinstance(m, PartialConv2d):
        return m.kernel_size in constants().kernel_sizes and m.weight.dtype == torch.float32
    if not isinstance(m, nn.Conv2d):
        return False
    k = m.kernel_size
    return (k[0] == k[1] and k[0] in constants().kernel_sizes and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and m.padding[0] == m.padding[1] and m.weight.dtype == torch.float32)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, PartialConv2d))


def _pool(m: nn.Module) -> tuple[int, int] | None:
    """(pool code, window) for a k x k / stride k pool without padding, else None."""
    if not isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
        return None
    k, s, p = m.kernel_size, m.stride, m.padding
    if isinstance(m, nn.MaxPool2d) and (m.dilation not in (1, (1, 1)) or m.return_indices):
        return None
    if isinstance(m, nn.AvgPool2d) and (not m.count_include_pad or m.divisor_override):
        return None
    k = k if isinstance(k, int) else (k[0] if k[0] == k[1] else None)
    s = s if isinstance(s, int) else (s[0] if s[0] == s[1] else None)
    if k is None or k != s or p not in (0, (0, 0)) or m.ceil_mode:
        return None
    c = constants()
    return (c.pool_max if isinstance(m, nn.MaxPool2d) else c.pool_avg), k


def _input_affine(layers: list[nn.Module], i: int) -> tuple[int, float, float] | None:
    """(pad, scale, shift) when layers[i] zero-pads and scales its input (``input_affine``) and
    layers[i + 1] is a conv without padding (and BatchNorm) into which the kernels can fold it."""
    affine = getattr(layers[i], "input_affine", None)
    if affine is None or i + 1 >= len(layers) or not _conv_ok(layers[i + 1]):
        return None
    conv, after = layers[i + 1], layers[i + 2] if i + 2 < len(layers) else None
    unpadded = isinstance(conv, PartialConv2d) or conv.padding[0] == 0
    return affine() if unpadded and type(after) is not nn.BatchNorm2d else None


def _conv_stages(layers: list[nn.Module], i: int, affine: tuple[int, float, float] | None = None) -> tuple[list, int]:
    """The stages for the conv block starting at layers[i] (with an input layer's ``affine``
    folded in), and the index after it."""
    codes = constants()
    conv, i = layers[i], i + 1
    norm = None
    if i < len(layers) and type(layers[i]) is nn.BatchNorm2d:
        norm, i = layers[i], i + 1
    act, pool, k = codes.act_none, codes.pool_none, 1
    if i < len(layers) and type(layers[i]) in codes.activations:
        act, i = codes.activations[type(layers[i])], i + 1
    sub = i < len(layers) and isinstance(layers[i], Subsampling) and act != codes.act_none and norm is None
    if sub:
        pool, k = codes.pool_avg, layers[i].size
    elif i < len(layers) and _pool(layers[i]) is not None and (norm is None or _pool(layers[i])[1] in (2, 3)):
        pool, k = _pool(layers[i])  # (BatchNorm's backward has windows of 2 and 3 compiled in)
    if pool != codes.pool_none:
        i += 1
    if norm is not None:
        return [_ConvNorm(conv, norm, act, pool, k)], i
    if not sub:
        return [_Conv(conv, act, pool, k, affine)], i
    subsampling, after = layers[i - 1], codes.act_none
    if i < len(layers) and type(layers[i]) in codes.activations:  # LeNet-5: squash, subsample, squash
        after, i = codes.activations[type(layers[i])], i + 1
    return [_Conv(conv, act, pool, k, affine, (subsampling, after))], i


def _plan(layers: list[nn.Module]) -> tuple[list, int]:
    """(stages, index of the first layer they do not cover)."""
    codes, stages, i, flat = constants(), [], 0, False
    while i < len(layers):
        m = layers[i]
        affine = None if flat or stages else _input_affine(layers, i)
        if affine is not None:  # the first layer scales the image: folded into the conv after it
            i += 1
        if not flat and _conv_ok(layers[i]):
            more, i = _conv_stages(layers, i, affine)
            stages += more
            continue
        if isinstance(m, ELEMENTWISE) or (not flat and hasattr(m, "forward_batch_last")):
            stages.append(_Layer(m))
        elif not flat and isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            stages.append(_global_avg)
        elif not flat and isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            stages.append(_flatten)
            flat = True
        elif flat and isinstance(m, nn.Linear) and m.weight.dtype == torch.float32:
            act = codes.act_none
            if i + 1 < len(layers) and type(layers[i + 1]) in codes.activations:
                act, i = codes.activations[type(layers[i + 1])], i + 1
            stages.append(_Dense(m, act))
        elif flat and type(m) is EuclideanRBF and m.prototypes.dtype == torch.float32 and not m.prototypes.requires_grad:
            negate = i + 1 < len(layers) and type(layers[i + 1]) is Negate  # LeNet-5's scores: folded in
            stages.append(_RBF(m, negate))
            i += negate
        else:
            break
        i += 1
    return stages, i


def _chain_problem(stages: list) -> str | None:
    convs = [s.conv for s in stages if isinstance(s, _Conv)]
    if any(b.in_channels != a.out_channels for a, b in zip(convs, convs[1:])):
        return "its convolutions' channel counts do not chain (PyTorch would refuse it too)"
    flat = [s.features for s in stages if isinstance(s, (_Dense, _RBF))]
    if any(b[0] != a[1] for a, b in zip(flat, flat[1:])):
        return "its linear layers' sizes do not chain (PyTorch would refuse it too)"
    return None


def batch_last(model: nn.Module, check_library: bool = True) -> tuple[BatchLast | None, str]:
    """A :class:`BatchLast` runner for ``model``, or (None, why not)."""
    if not isinstance(model, nn.Sequential):
        return None, "the model is not an nn.Sequential"
    if check_library and library() is None:
        return None, _problem or "the kernels are not available"
    layers = list(model)
    stages, i = _plan(layers)
    named = list(model.named_children())
    if not any(isinstance(s, _Conv) for s in stages) or any(_is_conv(m) for m in layers[i:]):
        first = next((f"{name} ({type(m).__name__})" for name, m in named[i:]), "?")
        return None, (f"its layer {first} is not one the batch-last kernels cover (they cover conv "
                      f"[-> BatchNorm] -> activation -> avg/max pool or subsampling blocks)")
    why = _chain_problem(stages)
    if why:
        return None, why
    if next(model.parameters()).device.type != "cpu":
        return None, "the model is not on the CPU"
    return BatchLast(model, stages, i), ""


__all__ = ["AffineBlock", "BatchLast", "BatchNormBlock", "ConvBatchNormBlock", "Constants", "ConvBlock", "DenseBlock",
           "PaperLoss", "RBFBlock", "batch_last", "constants", "fast_loss", "images", "library", "problem"]
