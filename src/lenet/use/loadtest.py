"""A bounded load test for ``lenet serve``: N threads each send M requests, then it stops.

Each thread keeps one HTTP/1.1 connection (``http.client``) and posts the same image to
``/api/predict``; latency is measured per request, from sending to having read the whole answer.
Only meant for a server on this machine (it refuses hosts other than loopback addresses).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from ..errors import LenetError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadReport:
    threads: int
    requests: int
    ok: int
    errors: int
    seconds: float
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    first_error: str = ""

    def format(self) -> str:
        return (f"{self.requests} requests ({self.threads} threads): {self.ok} ok, {self.errors} errors in "
                f"{self.seconds:.2f} s: {self.requests_per_sec:.0f} requests/sec, latency p50 "
                f"{self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms"
                + (f"; first error: {self.first_error}" if self.first_error else ""))

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def run_load(url: str, body: bytes, *, threads: int = 8, requests_per_thread: int = 50,
             path: str = "/api/predict", content_type: str = "image/png", timeout: float = 30.0) -> LoadReport:
    """Send ``threads * requests_per_thread`` POSTs of ``body`` to ``url + path``; collect latencies."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    if host not in LOOPBACK:
        raise LenetError(f"load test target {url}: only a server on this machine (127.0.0.1) may be loaded")
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        start.wait()
        for _ in range(requests_per_thread):
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or "top" not in json.loads(data):
                    raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
                latencies[n].append(time.perf_counter() - t0)
            except Exception as exc:  # count it, reconnect, go on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.close()

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    flat = [x * 1000 for per in latencies for x in per]
    total = threads * requests_per_thread
    return LoadReport(threads, total, len(flat), len(errors), seconds, len(flat) / seconds if seconds else 0.0,
                      percentile(flat, 50), percentile(flat, 99), max(flat) if flat else float("nan"),
                      errors[0] if errors else "")
