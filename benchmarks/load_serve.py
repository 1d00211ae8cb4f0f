"""Load-test `lenet serve`: start it on a free port of 127.0.0.1 (or use --url), send a bounded
number of concurrent requests, print requests/sec and latency percentiles, stop.

    flock /tmp/lenet-cpu.lock python benchmarks/load_serve.py RUN_DIR IMAGE [--threads 8] [--requests 50]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lenet.loadtest import run_load  # noqa: E402


def start_server(run_dir: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lenet", "serve", run_dir, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise SystemExit(f"lenet serve did not start: {line.strip()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("image", help="image file to post (PNG or JPEG)")
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per thread")
    ap.add_argument("--no-activations", action="store_true", help="ask for top-k only")
    args = ap.parse_args()
    body = Path(args.image).read_bytes()
    ctype = "image/jpeg" if args.image.lower().endswith((".jpg", ".jpeg")) else "image/png"
    path = "/api/predict" + ("?activations=0" if args.no_activations else "")
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.run_dir)
    try:
        run_load(url, body, threads=2, requests_per_thread=5, path=path, content_type=ctype)  # warm-up
        report = run_load(url, body, threads=args.threads, requests_per_thread=args.requests, path=path,
                          content_type=ctype)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"{url}api/predict{'?activations=0' if args.no_activations else ''} with {args.image} "
          f"({len(body):,} bytes)")
    print(report.format())
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
