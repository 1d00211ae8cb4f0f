"""Training steps with and without `keep_freed_memory`, side by side in alternating processes.

`lenet.training.engine.keep_freed_memory` (called when training on the CPU) stops glibc from
handing freed memory back to the kernel, so a step's tensors and the kernels' scratch buffers do
not come back as fresh pages, one page fault each. It is process-wide and cannot be undone, so
this script alternates child processes, one setting each, `--rounds` times (order reversed every
round). Each child warms up every preset's step (its recipe at a constant learning rate, random
uint8 batches, as kernels_ab.py), times `--steps` steps, and reports its minor page faults and
system time per step; the parent prints the medians over the rounds (docs/speed-notes.md,
section 16).

    flock /tmp/lenet-cpu.lock python benchmarks/malloc_ab.py --rounds 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def child(models: list[str], keep: bool, steps: int) -> None:
    from kernels_ab import step_of  # this folder's harness

    from lenet.training.engine import configure_threads

    configure_threads()
    out = {}
    for name in models:
        run = step_of(name, optimizer="sgd", keep_memory=keep)[1]
        for _ in range(20):
            run()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            run()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out[name] = {"ms": (t1 - t0) / steps * 1e3, "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
                     "sys_ms": (r1.ru_stime - r0.ru_stime) / steps * 1e3}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="classic,lenet5,record-fashion")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--child", choices=["kept", "default"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    models = args.models.split(",")
    if args.child:
        return child(models, args.child == "kept", args.steps)
    rows: dict[str, list[dict]] = {"default": [], "kept": []}
    for r in range(args.rounds):
        for variant in (["default", "kept"] if r % 2 == 0 else ["kept", "default"]):
            cmd = [sys.executable, __file__, "--child", variant, "--models", args.models, "--steps", str(args.steps)]
            rows[variant].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(f"median of {args.rounds} processes per setting, {args.steps} steps each (SGD, a constant rate)")
    for name in models:
        med = {v: {k: statistics.median(row[name][k] for row in rows[v]) for k in ("ms", "faults", "sys_ms")}
               for v in rows}
        d, k = med["default"], med["kept"]
        print(f"  {name:15s} step {d['ms']:.2f} -> {k['ms']:.2f} ms ({k['ms'] / d['ms']:.3f}); page faults "
              f"{d['faults']:.0f} -> {k['faults']:.0f} a step; system time {d['sys_ms']:.3f} -> {k['sys_ms']:.3f} ms a step")


if __name__ == "__main__":
    main()
