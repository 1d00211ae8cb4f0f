"""Training-step time with conv activations kept or recomputed, side by side in one process.

`lenet.kernels.ops.RECOMPUTE_FAN_IN` decides which conv blocks recompute their activation in the
backward pass (fan-in at most this) and which keep it from the forward pass. This script trains
one preset on a random batch (its batch size, the engine's step, a constant learning rate) and
alternates blocks of 10 steps between the given limits (order reversed every round), then
prints the median step time of each (docs/speed-notes.md, sections 12 and 13).

    flock /tmp/lenet-cpu.lock python benchmarks/step_recompute_ab.py classic --limits 100000,25,0 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics

from kernels_ab import alternate, step_of  # this folder's side-by-side harness

from lenet.kernels import ops
from lenet.training.engine import configure_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="classic")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--limits", default="100000,25", help="RECOMPUTE_FAN_IN values to alternate")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    configure_threads()
    _, run = step_of(args.model, lr=0.01, optimizer=args.optimizer)
    limits = [int(v) for v in args.limits.split(",")]
    installs = {v: (lambda v=v: setattr(ops, "RECOMPUTE_FAN_IN", v)) for v in limits}
    times = alternate(installs, args.rounds, run, 10)
    for v in limits:
        ms = [t * 1e3 for t in times[v]]
        print(f"{args.model}: fan-in <= {v} recomputed: median {statistics.median(ms):.2f} ms/step, "
              f"min {min(ms):.2f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
