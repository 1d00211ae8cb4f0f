"""A change to the batch-last kernels against a git revision, side by side in one process.

Builds `src/lenet/kernels/csrc/blconv.cpp` as it is in the working tree and as it was at `--base`
(default HEAD) with the same compiler and flags as lenet itself, loads both, and alternates them
(order reversed every round, so neither always runs first on a drifting machine):

1. single conv blocks, batch 256: forward and backward of `classic`'s conv1 and conv2 (sigmoid,
   average pooling) and of `record-mnist`'s (ReLU, max-pooling), conv2 keeping its activation;
2. the whole training step of each `--models` preset (its own optimizer and batch size, random
   uint8 batches), blocks of 10 steps.

It prints the median time of each and the ratio working tree / base (below 1: the change is
faster). Used for docs/speed-notes.md section 13:

    flock /tmp/lenet-cpu.lock python benchmarks/kernels_ab.py --base 3481db2 --rounds 10
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lenet.kernels import ops
from lenet.models import create_model
from lenet.options import TrainConfig
from lenet.training.engine import EngineOptions, TrainStep, configure_threads
from lenet.training.loop import model_criterion
from lenet.training.optim import make_optimizer, make_schedule

REPO = Path(__file__).resolve().parents[1]
BATCH = 256


def build_base(rev: str, folder: Path) -> ctypes.CDLL:
    """The kernels' source at git revision `rev`, built like lenet builds them, with the working
    tree's argument types (the entry points must not have changed their signatures)."""
    source = subprocess.run(["git", "show", f"{rev}:src/lenet/kernels/csrc/blconv.cpp"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    src, target = folder / "blconv.cpp", folder / "blconv-base.so"
    src.write_text(source)
    old_source = ops.SOURCE
    ops.SOURCE = src
    try:
        ops._build(ops._compiler(), target)
    finally:
        ops.SOURCE = old_source
    lib, new = ctypes.CDLL(str(target)), ops.library()
    for name in dir(new):
        if name.startswith("lenet_bl_"):
            getattr(lib, name).argtypes = getattr(new, name).argtypes
    return lib


def alternate(libs: dict[str, ctypes.CDLL], rounds: int, run, repeat: int) -> dict[str, float]:
    """Median seconds of `run()` per call with each library installed, alternated round by round."""
    times: dict[str, list[float]] = {k: [] for k in libs}
    for r in range(rounds):
        for key in (list(libs) if r % 2 == 0 else list(libs)[::-1]):
            ops._lib = libs[key]
            run()
            t0 = time.perf_counter()
            for _ in range(repeat):
                run()
            times[key].append((time.perf_counter() - t0) / repeat)
    return {k: statistics.median(v) for k, v in times.items()}


def block_cases():
    """(name, a forward and a backward closure) for the four blocks."""
    c = ops.constants()
    sig, relu = c.activations[torch.nn.Sigmoid], c.activations[torch.nn.ReLU]
    for name, cin, cout, hw, pad, act, pool in [
            ("conv1 1->6, sigmoid, avg", 1, 6, 28, 2, sig, c.pool_avg),
            ("conv1 1->6, relu, max", 1, 6, 28, 2, relu, c.pool_max),
            ("conv2 6->16, sigmoid, avg", 6, 16, 14, 0, sig, c.pool_avg),
            ("conv2 6->16, relu, max", 6, 16, 14, 0, relu, c.pool_max)]:
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

        yield name, no_grad_forward, forward_backward


def step_of(name: str):
    torch.manual_seed(0)
    model = create_model(name)
    cfg = TrainConfig.for_model(name, lr=0.001, schedule="constant")
    optimizer = make_optimizer(cfg, model.parameters())
    step = TrainStep(model, model_criterion(model), optimizer, make_schedule(cfg, optimizer, 100),
                     torch.device("cpu"), EngineOptions(), log=lambda *a: None)
    x = torch.randint(0, 255, (cfg.batch_size, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (cfg.batch_size,))
    for _ in range(5):  # warm-up
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
        base = build_base(args.base, Path(folder))
        libs = {"base": base, "tree": ops.library()}
        print(f"base {args.base} vs working tree, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
        for name, fwd, fwd_bwd in block_cases():
            for what, run in (("forward", fwd), ("forward + backward", fwd_bwd)):
                t = alternate(libs, args.rounds * 2, run, 10)
                print(f"  {name:28s} {what:18s} base {t['base'] * 1e3:6.3f} ms  tree {t['tree'] * 1e3:6.3f} ms"
                      f"  tree/base {t['tree'] / t['base']:.3f}", flush=True)
        for name in args.models.split(","):
            batch, run = step_of(name)
            t = alternate(libs, args.rounds, run, 3 if name == "modern" else 10)
            print(f"  {name + ' step (batch ' + str(batch) + ')':47s} base {t['base'] * 1e3:6.2f} ms  "
                  f"tree {t['tree'] * 1e3:6.2f} ms  tree/base {t['tree'] / t['base']:.3f}", flush=True)
        ops._lib = libs["tree"]


if __name__ == "__main__":
    main()
