"""The fast path of training and evaluation: one optimisation step and one evaluation pass.

:func:`lenet.training.loop.train` owns the epochs (shuffling, metrics, checkpoints); this module owns
what happens to one batch, which is where the time goes:

* batches are uint8 slices of the resident dataset; the uint8 -> float scaling happens inside the
  (compiled) step, so no float copy of the dataset or of a batch is made ahead of time;
* loss and correct-prediction counts stay on the device (the caller sums them; no host sync);
* ``torch.compile`` (inductor) fuses the elementwise work around the convolutions (scaling,
  sigmoid, average pooling, cross-entropy, argmax) in the forward and backward passes. Only the
  full batch shape is compiled; the odd last batch of an epoch runs eagerly, so an epoch costs one
  compilation, not two. Compiled kernels are cached under lenet's cache folder. Without a C++
  compiler (CPU) or when compilation fails, the step falls back to eager mode with one log line;
* on a GPU: optional autocast (bf16/fp16, fp16 with a gradient scaler) and CUDA graphs via
  ``torch.compile(mode="reduce-overhead")`` or ``"max-autotune"``;
* on the CPU, LeNet-style models run their conv blocks (conv, activation, pooling) and dense
  layers through the batch-last kernels of :mod:`lenet.kernels.ops` (the whole step ~2.3x faster
  than with PyTorch's compiled convolutions), built once per machine with the system C++
  compiler. That step runs eagerly: what is left to compile is not worth the
  compilation's start-up. Where the kernels cannot be built or do not cover a model, PyTorch's
  convolutions are used and the step is compiled;
* :func:`configure_threads` uses one thread per physical core (per process, under torchrun);
  :func:`keep_freed_memory` keeps each step's freed memory for the next (no page faults).

Every model works: any ``nn.Module`` taking float (N, 1, H, W) images, trained with its own
``criterion(scores, labels)`` if it has one, else cross-entropy.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
from typing import Any, Callable

import torch
from torch import nn

from .._util import eval_mode, to_float
from ..errors import ConfigError
from ..inspect.evaluation import mirror_averaged
from ..options import COMPILE_MODES, flag, problem
from ..options import PRECISIONS as AMP_DTYPES


def _scores(model: nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> torch.Tensor:
    """float32 class scores for uint8 images, under autocast when ``amp`` asks for it."""
    ctx = _autocast(device, amp)
    if ctx is None:
        return model(x) if getattr(model, "takes_uint8", False) else model(to_float(x))
    with ctx:
        return model(to_float(x)).float()


# --------------------------------------------------------------------------------------------
# Threads and compiler


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def configure_threads(local_world_size: int = 1) -> int:
    """One intra-op thread per physical core, shared out between the processes of this machine.

    An explicit ``OMP_NUM_THREADS`` wins. Returns the thread count in use.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, physical_cores() // max(1, local_world_size))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_UP_TO = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed value)
NEVER_TRIM = 1 << 30
_kept_memory: bool | None = None


def keep_freed_memory() -> bool:
    """Keep the memory a training step frees for the next step instead of handing it back to the
    kernel, which gives it back as fresh zeroed pages, one page fault at a time.

    glibc's malloc returns large freed blocks (munmap, or trimming the top of a heap). A CPU training
    step frees and allocates the same few-MB tensors and scratch buffers every time, and each
    comes back page-faulting (hundreds of faults a step: docs/speed-notes.md, section 16). Serving
    blocks up to 32 MB from the heap and never trimming it removes them. This is process-wide, so
    it is done once, by training on the CPU; not where the C library is not glibc, nor where the
    user set malloc's own tunables. Returns whether it is in effect.
    """
    global _kept_memory
    if _kept_memory is None:
        _kept_memory = False
        tuned = "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") for k in os.environ)
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not tuned:
            libc = ctypes.CDLL(None)
            _kept_memory = bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    return _kept_memory


def compiler_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot work here (None if it should)."""
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile"
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        if not any(shutil.which(c) for c in (cxx, "g++", "c++", "clang++")):
            return "no C++ compiler (g++/clang++) was found for inductor's CPU code"
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    else:
        return f"compiling for {device.type} is not supported"
    return None


def use_compile_cache() -> None:
    """Keep inductor's compiled kernels in lenet's cache folder (unless the user chose one)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        from .._util import cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def default_compile(device: torch.device) -> bool:
    """Compile by default where it pays: CPU (with a compiler) and CUDA (with triton)."""
    if os.environ.get("LENET_NO_COMPILE"):
        return False
    return compiler_problem(device) is None


# --------------------------------------------------------------------------------------------
# Options


class EngineOptions:
    """How the step runs. ``compile``: None = automatic (see :func:`default_compile`).
    ``fast_conv``: None = the batch-last CPU kernels wherever they apply, False = never."""

    def __init__(self, compile: bool | None = None, compile_mode: str = "default", amp: str = "off",
                 fast_conv: bool | None = None):
        for name, rule, value in (("compile_mode", COMPILE_MODES, compile_mode), ("amp", AMP_DTYPES, amp)):
            why = problem(rule, value)
            if why:
                raise ConfigError(f"{flag(name)} {value!r}: {why}")
        self.compile = compile
        self.compile_mode = compile_mode
        self.amp = amp
        self.fast_conv = fast_conv


PYTORCH_CONV = "PyTorch convolutions"
BATCH_LAST_CONV = "batch-last conv kernels"


def conv_runner(model: nn.Module, device: torch.device, options: EngineOptions,
                log: Callable[[str], None]) -> tuple[nn.Module, str]:
    """(what to call instead of ``model``, which convolutions it uses).

    On the CPU, a LeNet-family ``nn.Sequential`` (conv [-> BatchNorm] -> activation -> avg/max pool
    or subsampling blocks, a flatten or global average pool, linear layers, then anything) runs
    through :class:`lenet.kernels.ops.BatchLast`: same parameters, same function, its conv blocks,
    dense layers and RBF output computed by the batch-last kernels. Anything else runs as is, with one line
    saying why.
    """
    if options.fast_conv is False or device.type != "cpu":  # (--amp applies to CUDA only)
        if options.fast_conv and device.type != "cpu":
            log(f"note: --fast-conv is for the CPU; {device.type} uses PyTorch's convolutions")
        return model, PYTORCH_CONV
    from ..kernels import ops as blconv

    runner, why = blconv.batch_last(model)
    if runner is None:  # one line saying why (said as an answer to --fast-conv when that was asked for)
        log(f"note: --fast-conv not used: {why}" if options.fast_conv else
            f"note: PyTorch's convolutions, not lenet's CPU kernels: {why}")
        return model, PYTORCH_CONV
    return runner, BATCH_LAST_CONV


def amp_dtype(amp: str) -> torch.dtype:
    """The dtype ``--amp`` computes in (float32 when off)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)


def cuda_training_settings() -> None:
    """What training on CUDA sets, process-wide: cuDNN's autotuner (the fastest kernels for these
    fixed shapes) and TF32 tensor cores for float32 matrix products (the dense layers)."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return None
    return torch.autocast(device.type, dtype=amp_dtype(amp))


class _Compiled:
    """A function compiled for one input shape, eager for other shapes, eager for good on failure."""

    def __init__(self, fn: Callable, enabled: bool, mode: str, what: str, log: Callable[[str], None]):
        self.fn = fn
        self.what = what
        self.log = log
        self.shape: tuple[int, ...] | None = None
        self.compiled: Callable | None = None
        self.mode = mode
        self.enabled = enabled
        self.failed = False

    def pick(self, x: torch.Tensor) -> tuple[Callable, bool]:
        """(function to call for ``x``, whether it is the compiled one)."""
        if not self.enabled or self.failed:
            return self.fn, False
        if self.compiled is None:
            use_compile_cache()
            kwargs: dict[str, Any] = {"dynamic": False}
            if self.mode != "default":
                kwargs["mode"] = self.mode
            try:
                self.compiled = torch.compile(self.fn, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                self.fail(exc)
                return self.fn, False
            self.shape = tuple(x.shape)
        if tuple(x.shape) != self.shape:
            return self.fn, False
        return self.compiled, True

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        self.log(f"note: torch.compile of the {self.what} failed ({type(exc).__name__}: {first}); "
                 f"continuing without compiling (--no-compile skips the attempt)")


# --------------------------------------------------------------------------------------------
# Training step


class TrainStep:
    """``step(x_uint8, y) -> (loss, correct)``: forward, loss, backward, optimizer and LR-schedule step.

    ``loss`` (mean over the batch, detached) and ``correct`` (int64 count) are device tensors; nothing
    is read back to the host. ``model`` may be wrapped (e.g. DistributedDataParallel); ``criterion``
    is the loss function.
    """

    def __init__(self, model: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer,
                 scheduler: Any, device: torch.device, options: EngineOptions | None = None,
                 log: Callable[[str], None] | None = None):
        options = options or EngineOptions()
        self.model, self.criterion = model, criterion
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device = device
        log = log or (lambda s: None)
        self.net, self.conv = conv_runner(model, device, options, log)
        enabled = options.compile if options.compile is not None else default_compile(device)
        if self.net is not model:  # the kernels' step runs eagerly; compiling the rest is not worth its start-up
            from ..kernels import ops as blconv

            self.criterion = blconv.fast_loss(criterion)  # (LeNet-5's loss in one call)
            if options.compile:
                log("note: with lenet's CPU kernels the step runs eagerly; --no-fast-conv compiles "
                    "PyTorch's convolutions instead")
            enabled = False
        if enabled:
            problem = compiler_problem(device)
            if problem is not None:
                if options.compile:  # asked for explicitly: say why it is not happening
                    log(f"note: cannot compile ({problem}); training without torch.compile")
                enabled = False
        self.compiling = enabled
        if device.type == "cuda":
            cuda_training_settings()
        self.amp = options.amp if device.type == "cuda" else "off"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self._forward = _Compiled(self._forward_loss, enabled, options.compile_mode, "training step", log)
        self._first = True

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = _scores(self.net, x, self.device, self.amp)
        loss = self.criterion(scores, y)
        correct = (scores.detach().argmax(dim=1) == y).sum()
        return loss, correct

    def _run(self, fn: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, correct = fn(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), correct

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn, compiled = self._forward.pick(x)
        if not (compiled and self._first):
            return self._run(fn, x, y)
        # The first compiled step compiles forward and backward; if that fails, nothing has been
        # updated yet (the optimizer steps after both), so the step is simply done again eagerly.
        try:
            loss, correct = fn(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        except Exception as exc:  # noqa: BLE001
            self.optimizer.zero_grad(set_to_none=True)
            self._forward.fail(exc)
            self.compiling = False
            return self._run(self._forward_loss, x, y)
        self._first = False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), correct


# --------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Counts correct top-1 predictions on uint8 images, in eval mode, in fixed-size batches."""

    def __init__(self, model: nn.Module, device: torch.device, options: EngineOptions | None = None,
                 batch_size: int = 1024, log: Callable[[str], None] | None = None, test_flip: bool = False):
        options = options or EngineOptions()
        self.model, self.device, self.batch_size, self.test_flip = model, device, batch_size, test_flip
        self.net, self.conv = conv_runner(model, device, options, lambda s: None)
        enabled = options.compile if options.compile is not None else default_compile(device)
        if self.net is not model or (enabled and compiler_problem(device) is not None):
            enabled = False
        self.amp = options.amp if device.type == "cuda" else "off"
        mode = "default" if options.compile_mode == "reduce-overhead" else options.compile_mode
        self._count = _Compiled(self._count_correct, enabled, mode, "evaluation", log or (lambda s: None))

    def _count_correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def scores_of(images: torch.Tensor) -> torch.Tensor:
            return _scores(self.net, images, self.device, self.amp)

        scores = mirror_averaged(scores_of, x) if self.test_flip else scores_of(x)
        return (scores.argmax(dim=1) == y).sum()

    def correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Number of correct predictions (an int64 device tensor; no host sync)."""
        total = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.no_grad(), eval_mode(self.model):
            for start in range(0, images.shape[0], self.batch_size):
                x = images[start:start + self.batch_size].to(self.device, non_blocking=True)
                y = labels[start:start + self.batch_size].to(self.device, non_blocking=True)
                fn, compiled = self._count.pick(x)
                try:
                    total += fn(x, y)
                except Exception as exc:  # noqa: BLE001
                    if not compiled:
                        raise
                    self._count.fail(exc)
                    total += self._count_correct(x, y)
        return total

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return self.correct(images, labels).item() / max(1, images.shape[0])
