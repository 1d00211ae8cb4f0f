"""A change to the batch-last kernels against a git revision, side by side in one process.

Builds `src/lenet/kernels/csrc/blconv.cpp` as it is in the working tree and as it was at `--base`
(default HEAD) with the same compiler and flags as lenet itself, loads both, and alternates them
(order reversed every round, so neither always runs first on a drifting machine):

1. single conv blocks, batch 256: forward and backward of `classic`'s conv1 and conv2 (sigmoid,
   average pooling) and of `record-mnist`'s (ReLU, max-pooling), conv2 keeping its activation, and
   `record-fashion`'s conv2 as BatchNorm's blocks run it (the conv alone, its output stored);
2. the whole training step of each `--models` preset (its own optimizer and batch size, random
   uint8 batches), blocks of 10 steps (3 for `modern`).

Both builds must give the same outputs: the script checks each block's forward output and stops
if they differ beyond rounding.

It prints the median time of each and the ratio working tree / base (below 1: the change is
faster). Used for docs/speed-notes.md sections 13 and 14:

    flock /tmp/lenet-cpu.lock python benchmarks/kernels_ab.py --base 3481db2 --rounds 8
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from lenet.kernels import ops
from lenet.models import create_model
from lenet.options import TrainConfig
from lenet.training.engine import EngineOptions, TrainStep, configure_threads, keep_freed_memory
from lenet.training.loop import model_criterion
from lenet.training.optim import make_optimizer, make_schedule

REPO = Path(__file__).resolve().parents[1]
BATCH = 256


def build_base(rev: str, folder: Path) -> ctypes.CDLL:
    """The kernels' source at git revision `rev`, built like lenet builds them, with the working
    tree's argument types (the entry points must not have changed their signatures)."""
    new, cxx = ops.library(), ops._compiler()
    if new is None or cxx is None:
        sys.exit(f"kernels_ab: the working tree's kernels are not available ({ops.problem() or 'no C++ compiler'})")
    source = subprocess.run(["git", "show", f"{rev}:src/lenet/kernels/csrc/blconv.cpp"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    src, target = folder / "blconv.cpp", folder / "blconv-base.so"
    src.write_text(source)
    old_source = ops.SOURCE
    ops.SOURCE = src
    try:
        ops._build(cxx, target)
    finally:
        ops.SOURCE = old_source
    lib = ctypes.CDLL(str(target))
    for name in dir(new):  # every entry point: ops.library() has set the argument types of all of them
        if name.startswith("lenet_bl_") and hasattr(lib, name):  # (a revision before it was written lacks it)
            getattr(lib, name).argtypes = getattr(new, name).argtypes
    n = 64
    mine, theirs = (ctypes.c_int * n)(), (ctypes.c_int * n)()
    if new.lenet_bl_constants(mine, n) != lib.lenet_bl_constants(theirs, n) or list(mine) != list(theirs):
        sys.exit(f"kernels_ab: {rev}'s kernels report other constants (lanes, codes) than the working tree's")
    return lib


def alternate(variants: dict[str, Callable[[], None]], rounds: int, run, repeat: int) -> dict[str, list[float]]:
    """Seconds per call of `run()` with each variant installed (`variants[name]()` installs it),
    `repeat` calls a round, the variants alternated and their order reversed every round."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for key in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            variants[key]()
            run()
            t0 = time.perf_counter()
            for _ in range(repeat):
                run()
            times[key].append((time.perf_counter() - t0) / repeat)
    return times


def medians(libs: dict[str, ctypes.CDLL], rounds: int, run, repeat: int) -> dict[str, float]:
    """Median seconds of `run()` per call with each library installed (see :func:`alternate`)."""
    installs = {k: (lambda lib=lib: setattr(ops, "_lib", lib)) for k, lib in libs.items()}
    return {k: statistics.median(v) for k, v in alternate(installs, rounds, run, repeat).items()}


def same_outputs(libs: dict[str, ctypes.CDLL], forward) -> None:
    outs = []
    for lib in libs.values():
        ops._lib = lib
        with torch.no_grad():
            outs.append(forward())
    if not torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6):
        sys.exit(f"kernels_ab: the two builds disagree (max difference {(outs[0] - outs[1]).abs().max():.3g})")


def block_cases():
    """(name, a forward and a backward closure) for the five blocks."""
    c = ops.constants()
    sig, relu = c.activations[torch.nn.Sigmoid], c.activations[torch.nn.ReLU]
    for name, cin, cout, hw, pad, act, pool in [
            ("conv1 1->6, sigmoid, avg", 1, 6, 28, 2, sig, c.pool_avg),
            ("conv1 1->6, relu, max", 1, 6, 28, 2, relu, c.pool_max),
            ("conv2 6->16, sigmoid, avg", 6, 16, 14, 0, sig, c.pool_avg),
            ("conv2 6->16, relu, max", 6, 16, 14, 0, relu, c.pool_max),
            ("conv2 12->32, BatchNorm's conv", 12, 32, 14, 0, c.act_none, c.pool_none)]:
        x = ops.pad_cols(torch.randn(cin, hw, hw, BATCH), pad).requires_grad_(cin > 1)
        w = (torch.randn(cout, cin, 5, 5) * 0.2).requires_grad_()
        b = torch.zeros(cout, requires_grad=True)
        keep = ops.keeps_activation(w)

        def forward(x=x, w=w, b=b, pad=pad, act=act, pool=pool, keep=keep):
            return ops.ConvBlock.apply(x, w, b, pad, act, pool, 2, keep)

        grad = torch.randn_like(forward())

        def no_grad_forward(forward=forward):
            with torch.no_grad():
                forward()

        def forward_backward(forward=forward, grad=grad):
            forward().backward(grad)

        yield name, forward, no_grad_forward, forward_backward


def step_of(name: str, lr: float = 0.001, optimizer: str | None = None, keep_memory: bool = True):
    """(batch size, one training step of preset `name` on a fixed random uint8 batch): its own
    recipe (optimizer, batch size) at a constant learning rate, warmed up. `keep_memory`: freed
    memory kept for the next step, as training on the CPU does (keep_freed_memory)."""
    if keep_memory:
        keep_freed_memory()
    torch.manual_seed(0)
    model = create_model(name)
    extra = {"optimizer": optimizer} if optimizer else {}
    cfg = TrainConfig.for_model(name, lr=lr, schedule="constant", **extra)
    optimizer_ = make_optimizer(cfg, model.parameters())
    step = TrainStep(model, model_criterion(model), optimizer_, make_schedule(cfg, optimizer_, 100),
                     torch.device("cpu"), EngineOptions(), log=lambda *a: None)
    x = torch.randint(0, 255, (cfg.batch_size, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (cfg.batch_size,))
    for _ in range(10):  # warm-up (and, the first time, the kernels' build)
        step(x, y)
    return cfg.batch_size, lambda: step(x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    ap.add_argument("--models", default="classic,record-mnist,lenet5,record-fashion,modern")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    configure_threads()
    with tempfile.TemporaryDirectory() as folder:
        tree = ops.library()
        libs = {"base": build_base(args.base, Path(folder)), "tree": tree}
        try:
            compare(libs, args)
        finally:
            ops._lib = tree


def compare(libs: dict[str, ctypes.CDLL], args) -> None:
    print(f"base {args.base} vs working tree, {torch.get_num_threads()} threads; "
          f"median of {args.rounds * 2} rounds (blocks), {args.rounds} (steps)")
    for name, forward, fwd, fwd_bwd in block_cases():
        same_outputs(libs, forward)
        for what, run in (("forward", fwd), ("forward + backward", fwd_bwd)):
            t = medians(libs, args.rounds * 2, run, 10)
            print(f"  {name:28s} {what:18s} base {t['base'] * 1e3:6.3f} ms  tree {t['tree'] * 1e3:6.3f} ms"
                  f"  tree/base {t['tree'] / t['base']:.3f}", flush=True)
    for name in args.models.split(","):
        ops._lib = libs["tree"]  # (the warm-up, and the first build of the step, on the working tree's)
        batch, run = step_of(name)
        try:
            t = medians(libs, args.rounds, run, 3 if name == "modern" else 10)
        except AttributeError as exc:  # the base revision's kernels lack an entry point this step calls
            print(f"  {name} step: not compared ({exc})", flush=True)
            continue
        print(f"  {name + ' step (batch ' + str(batch) + ')':47s} base {t['base'] * 1e3:6.2f} ms  "
              f"tree {t['tree'] * 1e3:6.2f} ms  tree/base {t['tree'] / t['base']:.3f}", flush=True)


if __name__ == "__main__":
    main()
