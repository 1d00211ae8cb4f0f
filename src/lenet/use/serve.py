"""``lenet serve``: a small local web app to draw or upload an image and watch the network classify it.

Only the standard library's :class:`~http.server.ThreadingHTTPServer`; every asset (page, script,
style, icon) is packaged in ``lenet/static/`` and served by the app, so the page works offline.
It binds 127.0.0.1 by default. Inference runs one request at a time under the predictor's lock
(a LeNet forward pass takes well under a millisecond; decoding and JSON run in parallel).

HTTP API (JSON responses; errors are ``{"error": "<one line>"}`` with a 4xx status):

``GET /api/info``
    ``{"model", "dataset", "classes", "preprocess", "layers", "max_upload_bytes"}``
``POST /api/predict[?top_k=3&preprocess=1&activations=1]``
    Body: the raw bytes of one image file (PNG, JPEG, GIF, BMP, WebP...; ``Content-Type``
    ``image/*`` or ``application/octet-stream``; not a multipart form). Answer::

        {"top": [{"class": "7", "index": 7, "probability": 0.98}, ...],
         "probabilities": [...one per class...],
         "preprocess": "digits", "inverted": true, "blank": false,
         "input": [784 ints 0-255: the 28x28 image the network saw, row by row],
         "activations": [{"layer": "act1", "shape": [6, 28, 28], "min": 0.0, "max": 1.7,
                          "data": [...C*H*W floats, row-major...]}, ...],
         "elapsed_ms": 3.1}

    ``preprocess=0`` feeds the image as is (resized to 28x28); ``activations=0`` leaves them out.
    413: body larger than ``--max-upload``; 415: not an image (or a form upload); 400: corrupt
    image, empty body or bad query; 411: no Content-Length.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import ImageError, LenetError
from ..use.predict import CorruptImageError, ImageTooLargeError, NotAnImageError, Predictor, decode_image

DEFAULT_MAX_UPLOAD = 4 * 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # bodies up to this size are read and dropped before a 413
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close


def load_static() -> dict[str, tuple[bytes, str]]:
    """The packaged static files, by URL path, with their content types."""
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files("lenet.use") / "static"
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[f"/static/{entry.name}"] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    if "/static/index.html" not in files:
        raise LenetError("lenet/static/index.html is missing from the installed package; reinstall lenet")
    files["/"] = files["/static/index.html"]
    return files


class App:
    """What the server does, independent of HTTP: info, and predict on image bytes."""

    def __init__(self, predictor: Predictor, *, max_upload: int = DEFAULT_MAX_UPLOAD):
        self.predictor = predictor
        self.max_upload = max_upload
        self.static = load_static()

    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"model": p.model_name, "dataset": p.dataset, "classes": list(p.classes),
                "preprocess": p.mode, "layers": p.layers, "max_upload_bytes": self.max_upload}

    def predict(self, data: bytes, *, top_k: int = 3, preprocess: bool = True,
                activations: bool = True) -> dict[str, Any]:
        t0 = time.perf_counter()
        img = decode_image(data, "upload")
        prepared = self.predictor.prepare(img, preprocess)
        result = self.predictor.predict([prepared], top_k, activations=activations)[0]
        out = result.to_dict()
        out["probabilities"] = [round(p, 6) for p in result.probabilities]
        out["input"] = prepared.pixels.reshape(-1).tolist()
        if activations:
            out["activations"] = [
                {"layer": name, "shape": list(a.shape), "min": round(float(a.min()), 4),
                 "max": round(float(a.max()), 4), "data": np.round(a.reshape(-1), 4).tolist()}
                for name, a in result.activations.items()]
        out["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return out


def _flag(query: dict[str, list[str]], name: str, default: bool) -> bool:
    if name not in query:
        return default
    value = query[name][-1].lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, f"query parameter {name}={value!r}: use 1 or 0")


class Handler(BaseHTTPRequestHandler):
    server: "LenetServer"
    protocol_version = "HTTP/1.1"
    server_version = "lenet-serve"
    timeout = 30  # a silent client loses its thread after 30 s

    # ---- plumbing

    def _send(self, status: int, body: bytes, content_type: str, *, close: bool = False,
              cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, close: bool = False) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json", close=close)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._json(status, {"error": message, "status": status}, close=close)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _guard(self, action) -> None:
        try:
            action()
        except ApiError as exc:
            self._error(exc.status, str(exc), close=exc.close)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client left or stalled
            self.close_connection = True
        except Exception:  # a bug: answer 500, keep serving, show the traceback on the console
            traceback.print_exc(file=sys.stderr)
            try:
                self._error(500, "internal error while handling the request (see the server's console)", close=True)
            except OSError:
                self.close_connection = True

    # ---- routes

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._guard(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _get(self) -> None:
        path = urlsplit(self.path).path
        app = self.server.app
        if path == "/api/info":
            self._json(200, app.info())
        elif path in app.static:
            body, ctype = app.static[path]
            self._send(200, body, ctype, cache="no-cache")
        elif path == "/favicon.ico":
            body, ctype = app.static.get("/static/favicon.svg", (b"", "image/svg+xml"))
            self._send(200, body, ctype, cache="no-cache")
        elif path == "/api/predict":
            raise ApiError(405, "use POST /api/predict with the image bytes as the body")
        else:
            raise ApiError(404, f"no such page: {path}")

    def _read_body(self) -> bytes:
        max_upload = self.server.app.max_upload
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or "Content-Length" not in self.headers:
            raise ApiError(411, "send the image with a Content-Length header", close=True)
        try:
            length = int(self.headers["Content-Length"])
            if length < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, f"bad Content-Length {self.headers['Content-Length']!r}", close=True) from None
        if length > max_upload:
            if length <= DRAIN_LIMIT:  # read it so the client sees our answer, not a reset
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            raise ApiError(413, f"upload of {length:,} bytes is larger than the {max_upload:,} "
                                f"allowed (--max-upload); send a smaller image", close=True)
        data = self.rfile.read(length)
        if len(data) != length:
            raise ApiError(400, f"body ended after {len(data)} of {length} bytes", close=True)
        return data

    def _post(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/predict":
            known = url.path in self.server.app.static or url.path == "/api/info"
            raise ApiError(405 if known else 404, f"no POST endpoint at {url.path}; use POST /api/predict",
                           close=True)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        data = self._read_body()
        if ctype.startswith("multipart/"):
            raise ApiError(415, f"{ctype} is not supported: send the raw image bytes as the body "
                                "(e.g. curl --data-binary @digit.png)")
        if not data:
            raise ApiError(400, "empty body: send the bytes of a PNG or JPEG image")
        query = parse_qs(url.query, keep_blank_values=True)
        top_k = query.get("top_k", ["3"])[-1]
        if not top_k.isdigit() or int(top_k) < 1:
            raise ApiError(400, f"query parameter top_k={top_k!r}: use a positive integer")
        try:
            result = self.server.app.predict(data, top_k=int(top_k), preprocess=_flag(query, "preprocess", True),
                                             activations=_flag(query, "activations", True))
        except NotAnImageError as exc:
            raise ApiError(415, str(exc)) from None
        except ImageTooLargeError as exc:
            raise ApiError(413, str(exc)) from None
        except (CorruptImageError, ImageError) as exc:
            raise ApiError(400, str(exc)) from None
        self._json(200, result)


class LenetServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, app: App, log_requests: bool = False):
        self.app = app
        self.log_requests = log_requests
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        """A client that hangs up mid-response (browsers do) is not an error worth a traceback."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def make_server(run_dir, host: str = "127.0.0.1", port: int = 8000, *, max_upload: int = DEFAULT_MAX_UPLOAD,
                threads: int | None = 1, log_requests: bool = False, predictor: Predictor | None = None,
                device: str = "cpu") -> LenetServer:
    """Load the run and bind the server (not yet serving: call ``serve_forever()``)."""
    import socket

    import torch

    if threads:
        torch.set_num_threads(threads)
    predictor = predictor or Predictor.from_run(run_dir, device)
    app = App(predictor, max_upload=max_upload)
    server_class = LenetServer
    if ":" in host:  # an IPv6 address such as ::1
        server_class = type("LenetServer6", (LenetServer,), {"address_family": socket.AF_INET6})
    try:
        return server_class((host, port), app, log_requests=log_requests)
    except OSError as exc:
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise LenetError(f"port {port} on {host} is already in use: choose another --port "
                             "(--port 0 picks a free one)") from None
        raise LenetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextmanager
def running(server: LenetServer) -> Iterator[LenetServer]:
    """Serve in a background thread for the duration of a ``with`` block (tests, benchmarks)."""
    thread = threading.Thread(target=server.serve_forever, name="lenet-serve", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
