"""LeNet-5's training step with each of its three plan changes undone, side by side in one process.

The batch-last runner plans `lenet5` as C1 (with LeCunInput's padding and scaling folded into its
weight and bias, and S2's subsampling and squashing in its calls), C3 (S4 likewise), C5 and F6,
and the RBF output takes its input gradient as two matrix products. This script builds the step
(the preset's recipe at a constant learning rate, random uint8 batches) in five variants:

* `before`: the input layer as its own pass over the image, S2/S4 as separate AffineBlock calls
  after each conv block, the RBF's gradient by autograd through the (N, 10, 84) differences (the
  plan before docs/speed-notes.md section 15);
* `no fold`, `no fused sub`, `autograd rbf`: the current step with one of the three undone;
* `now`: the current step;

alternates blocks of 10 steps between them (order reversed every round) and prints each
variant's median step time and its ratio to `before`.

    flock /tmp/lenet-cpu.lock python benchmarks/lenet5_plan_ab.py --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from kernels_ab import alternate, step_of  # this folder's side-by-side harness

from lenet.kernels import ops
from lenet.models import lenet5
from lenet.training.engine import configure_threads

VARIANTS = {"before": ("fold", "sub", "rbf"), "no fold": ("fold",), "no fused sub": ("sub",),
            "autograd rbf": ("rbf",), "now": ()}


def separate_subsampling(runner: ops.BatchLast) -> None:
    """S2/S4 as their own AffineBlock stage after each conv block, as the runner planned them before."""
    none, stages = ops.constants().pool_none, []
    for st in runner.stages:
        if isinstance(st, ops._Conv) and st.sub:
            (sub, after), st.sub = st.sub, None
            scale = float(sub.size * sub.size)
            stages += [st, lambda h, n, sub=sub, after=after: ops.AffineBlock.apply(
                h, sub.weight * scale, sub.bias, after, none, 1)]
        else:
            stages.append(st)
    runner.stages = stages


def autograd_rbf(self, x: torch.Tensor) -> torch.Tensor:
    return lenet5.squared_distances(x, self.prototypes)


def build(undone: tuple[str, ...]):
    """One training step of `lenet5` with the plan changes in `undone` undone (the RBF's is
    installed around each call, see main)."""
    fold, made = ops._input_affine, ops.batch_last
    if "fold" in undone:
        ops._input_affine = lambda layers, i: None
    if "sub" in undone:  # the runner is made with the step: split its stages once it is
        ops.batch_last = lambda model, *a: _split(made(model, *a))
    try:
        return step_of("lenet5")[1]
    finally:
        ops._input_affine, ops.batch_last = fold, made


def _split(made: tuple[ops.BatchLast | None, str]) -> tuple[ops.BatchLast | None, str]:
    if made[0] is not None:
        separate_subsampling(made[0])
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    configure_threads()
    if ops.library() is None:  # (built and checked before any variant patches the planner)
        sys.exit(f"lenet5_plan_ab: the batch-last kernels are not available ({ops.problem()})")
    rbf = lenet5.EuclideanRBF.forward
    runs = {name: build(undone) for name, undone in VARIANTS.items()}
    current = [runs["now"]]

    def installer(name: str):
        def install() -> None:
            lenet5.EuclideanRBF.forward = autograd_rbf if "rbf" in VARIANTS[name] else rbf
            current[0] = runs[name]
        return install

    times = alternate({name: installer(name) for name in VARIANTS}, args.rounds, lambda: current[0](), 10)
    lenet5.EuclideanRBF.forward = rbf
    base = statistics.median(times["before"])
    for name in VARIANTS:
        ms = statistics.median(times[name]) * 1e3
        print(f"lenet5 step, {name:13s} median {ms:.3f} ms  ({statistics.median(times[name]) / base:.3f} of before; "
              f"{args.rounds} rounds of 10 steps, batch 256)")


if __name__ == "__main__":
    main()
