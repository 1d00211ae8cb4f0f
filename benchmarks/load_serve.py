"""Load-test `lenet serve` with ApacheBench (ab), a load generator this project did not write.

Starts `lenet serve RUN_DIR --port 0 [--workers N]` on 127.0.0.1, posts one small PNG per request
as a multipart form (curl -F style; --raw: the raw bytes) from --concurrency clients, and prints
requests/sec, latency percentiles and errors; --soak SECONDS then keeps that load up for that long
and reports the server's resident memory before and after. Everything stays on this machine.

    apt-get install -y apache2-utils      # Debian's ab
    flock /tmp/lenet-cpu.lock python benchmarks/load_serve.py RUN_DIR [IMAGE] [--workers 2] [--soak 60]

IMAGE defaults to the first MNIST test image saved as a 28x28 PNG (needs the MNIST files under
$LENET_DATA_ROOT). ``--client python`` uses lenet's own small threaded client instead of ab (for
the tests, where ab may not be installed); the documented figures come from ab.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

BOUNDARY = "lenetbench7d3f2a"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"Model name:\s*(.+)", out)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return "unknown CPU"


def default_image(folder: Path) -> Path:
    from PIL import Image

    from lenet.data import load_dataset

    data = load_dataset("mnist", os.environ.get("LENET_DATA_ROOT"), download=False)
    path = folder / "mnist-test-0.png"
    Image.fromarray(data.test.images[0].numpy()).save(path)
    return path


def form_body(image: Path) -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode()
    return head + image.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def start_server(run_dir: str, workers: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lenet", "serve", run_dir, "--port", "0", "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if match:
            url = match.group(1)
            while time.time() < deadline:  # the workers load the model: wait until they answer
                try:
                    with urllib.request.urlopen(url + "healthz", timeout=5) as resp:
                        if resp.status == 200:
                            return proc, url
                except OSError:
                    time.sleep(0.2)
            break
    proc.kill()
    raise SystemExit(f"lenet serve did not start: {line.strip()}")


def rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants, in KiB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        except (OSError, AttributeError):
            pass
        todo.extend(children.get(p, []))
    return total


def run_ab(url: str, body_file: Path, content_type: str, concurrency: int, requests: int,
           seconds: float | None = None, keep_alive: bool = False) -> dict:
    cmd = ["ab", "-q", "-l", "-c", str(concurrency), "-p", str(body_file), "-T", content_type]
    if seconds:
        cmd += ["-t", str(int(seconds)), "-n", "100000000"]
    else:
        cmd += ["-n", str(requests)]
    if keep_alive:
        cmd.append("-k")
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True).stdout

    def number(pattern: str, default: float = float("nan")) -> float:
        match = re.search(pattern, out, re.M)
        return float(match.group(1)) if match else default

    return {"command": shlex.join(cmd), "complete": int(number(r"^Complete requests:\s+(\d+)", 0)),
            "failed": int(number(r"^Failed requests:\s+(\d+)", 0)),
            "non2xx": int(number(r"^Non-2xx responses:\s+(\d+)", 0)),
            "rps": number(r"^Requests per second:\s+([\d.]+)"),
            "p50": number(r"^\s+50%\s+(\d+)"), "p90": number(r"^\s+90%\s+(\d+)"),
            "p99": number(r"^\s+99%\s+(\d+)"), "max": number(r"^\s+100%\s+(\d+)"), "raw": out}


def run_python(url: str, body: bytes, content_type: str, concurrency: int, requests: int) -> dict:
    from lenet.use.loadtest import run_load

    r = run_load(url, body, threads=concurrency, requests_per_thread=max(1, requests // concurrency),
                 path="/api/predict?activations=0", content_type=content_type)
    return {"command": f"lenet.use.loadtest.run_load({concurrency} threads)", "complete": r.requests,
            "failed": r.errors, "non2xx": 0, "rps": r.requests_per_sec, "p50": r.p50_ms, "p90": float("nan"),
            "p99": r.p99_ms, "max": r.max_ms, "raw": r.format()}


def show(label: str, r: dict) -> str:
    return (f"{label}: {r['complete']} requests, {r['failed'] + r['non2xx']} errors, {r['rps']:.0f} requests/s, "
            f"latency p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, max {r['max']:.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("image", nargs="?", help="PNG to post (default: MNIST test image 0 as a 28x28 PNG)")
    ap.add_argument("--workers", type=int, default=1, help="lenet serve --workers (default 1)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--requests", type=int, default=5000, help="requests in the measured run (default 5000)")
    ap.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="then a soak test this long")
    ap.add_argument("--raw", action="store_true", help="post the raw PNG bytes instead of a multipart form")
    ap.add_argument("--keep-alive", action="store_true", help="ab -k: reuse connections (default: one per request)")
    ap.add_argument("--client", choices=["ab", "python"], default="ab")
    args = ap.parse_args()
    if args.client == "ab" and shutil.which("ab") is None:
        raise SystemExit("ab is not installed: apt-get install -y apache2-utils (or --client python)")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(args.image) if args.image else default_image(Path(tmp))
        body = image.read_bytes() if args.raw else form_body(image)
        ctype = "image/png" if args.raw else f"multipart/form-data; boundary={BOUNDARY}"
        body_file = Path(tmp) / "body.bin"
        body_file.write_bytes(body)
        proc, url = start_server(args.run_dir, args.workers)
        target = url + "api/predict?activations=0"
        ok = True
        try:
            print(f"{cpu_name()}, {os.cpu_count()} cores; lenet serve --workers {args.workers}; "
                  f"{'raw' if args.raw else 'multipart'} upload of {image.name} ({len(image.read_bytes()):,} bytes), "
                  f"{args.concurrency} concurrent clients{', keep-alive' if args.keep_alive else ''}")
            if args.client == "python":
                r = run_python(url, body, ctype, args.concurrency, args.requests)
                print(show("python client", r))
                return 0 if r["failed"] == 0 else 1
            run_ab(target, body_file, ctype, args.concurrency, min(500, args.requests), keep_alive=args.keep_alive)
            r = run_ab(target, body_file, ctype, args.concurrency, args.requests, keep_alive=args.keep_alive)
            print(f"$ {r['command']}")
            print(show("ab", r))
            ok = r["failed"] + r["non2xx"] == 0 and r["complete"] == args.requests
            if args.soak:
                before = rss_kib(proc.pid)
                s = run_ab(target, body_file, ctype, args.concurrency, 0, seconds=args.soak, keep_alive=args.keep_alive)
                after = rss_kib(proc.pid)
                print(f"$ {s['command']}")
                print(show(f"soak {args.soak:.0f} s", s))
                growth = 100.0 * (after - before) / before if before else float("nan")
                print(f"server resident memory: {before / 1024:.1f} MiB before the soak, {after / 1024:.1f} MiB "
                      f"after ({growth:+.1f}%)")
                ok = ok and s["failed"] + s["non2xx"] == 0 and s["complete"] > 0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
