"""``lenet serve``: a small local web app and JSON API to classify images with a trained run.

Starlette on uvicorn (with httptools), python-multipart for form uploads, and a micro-batcher:
the images of concurrent requests go through the network together, in one forward pass. Every
asset (page, script, style, icon) is packaged in ``lenet/use/static/`` and served by the app, so
the page works offline. It binds 127.0.0.1 by default; ``--workers N`` serves the same socket
from N processes, each with its own copy of the model.

HTTP API (JSON answers; an error is ``{"error": "<one line>", "status": N}`` with a 4xx status):

``GET /healthz`` (or ``/ping``)
    ``{"status": "ok", "model", "dataset"}``: the model is loaded and answering.
``GET /api/info``
    ``{"model", "dataset", "classes", "preprocess", "test_flip", "layers", "max_upload_bytes",
    "max_images", "max_pixels"}`` (``test_flip``: each image is scored with its mirror image too,
    as the run was evaluated)
``POST /api/predict[?top_k=3&preprocess=1&activations=1&batch=0]``
    The body is either the raw bytes of one image (PNG, JPEG, GIF, BMP, WebP...), or a
    ``multipart/form-data`` form whose file fields (any names) are images: ``curl -F
    image=@digit.png``; several file fields, several images. The parameters may also be sent as
    form fields. One image answers one object::

        {"top": [{"class": "7", "index": 7, "probability": 0.98}, ...],
         "probabilities": [...one per class...],
         "preprocess": "digits", "inverted": true, "blank": false, "decisions": {...},
         "file": "digit.png", "field": "image",          (form uploads)
         "input": [784 ints 0-255: the 28x28 image the network saw, row by row],
         "activations": [{"layer": "act1", "shape": [6, 28, 28], "min": 0.0, "max": 1.7,
                          "data": [...C*H*W floats, row-major...]}, ...],
         "elapsed_ms": 3.1}

    Several images (or ``batch=1``) answer ``{"predictions": [one object per image, in the
    order of the form], "count", "elapsed_ms"}``. A blank image has ``"blank": true`` and an
    empty ``top``: it is not classified.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator

import numpy as np

from ..errors import ImageError, LenetError
from ..options import MAX_PIXELS, SERVE_MAX_IMAGES, SERVE_MAX_UPLOAD
from ..use.predict import CorruptImageError, ImageTooLargeError, NotAnImageError, Prepared, Predictor, decode_image

INLINE_BYTES = 64 * 1024  # larger uploads are decoded in a worker thread, off the event loop
MAX_BATCH = 256  # images per forward pass
PARAMETERS = ("top_k", "preprocess", "activations", "batch")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                 b"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
    files["/favicon.ico"] = files.get("/static/favicon.svg", (b"", "image/svg+xml"))
    return files


# --------------------------------------------------------------------------------------------
# Uploads: raw bytes or multipart/form-data


@dataclass
class Upload:
    """One image of a request, and where it came from (a form's field and file name)."""

    data: bytes
    field: str = ""
    filename: str = ""

    @property
    def name(self) -> str:
        if self.filename:
            return self.filename
        return f"field {self.field!r}" if self.field else "upload"


class _FormParts:
    """python-multipart's callbacks, collecting the parts of a form; counts the images as they come."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.parts: list[dict[str, Any]] = []
        self.header, self.value = b"", b""
        self.images = 0
        self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_part_data": self.data, "on_part_end": self.end, "on_end": self.finish}

    def begin(self) -> None:
        self.parts.append({"headers": {}, "data": []})

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        self.parts[-1]["headers"][self.header.decode("latin-1").lower()] = self.value.decode("latin-1")
        self.header, self.value = b"", b""

    def data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1]["data"].append(data[start:end])

    def end(self) -> None:
        from python_multipart.multipart import parse_options_header

        part = self.parts[-1]
        disposition = parse_options_header(part["headers"].get("content-disposition", ""))[1]
        part["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        part["filename"] = disposition.get(b"filename", b"").decode("utf-8", "replace")
        part["image"] = part["name"] not in PARAMETERS or b"filename" in disposition
        self.images += part["image"]
        if self.images > self.max_images:
            raise ApiError(413, f"more than {self.max_images} images in one request (--max-images); "
                                "send them in several requests")

    def finish(self) -> None:
        self.ended = True


def parse_form(body: bytes, content_type: str, max_images: int) -> tuple[list[Upload], dict[str, str]]:
    """The images (every part that is not a parameter) and the parameters of a multipart form."""
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data without a boundary in its Content-Type")
    form = _FormParts(max_images)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart/form-data body ({exc})") from None
    if not form.ended:
        raise ApiError(400, "multipart/form-data body ends before its closing boundary (truncated upload?)")
    images, params = [], {}
    for part in form.parts:
        data = b"".join(part["data"])
        if part["image"]:
            images.append(Upload(data, part["name"], part["filename"]))
        else:
            params[part["name"]] = data.decode("utf-8", "replace").strip()
    if not images:
        raise ApiError(400, "the form has no file field: send the image as one, e.g. curl -F image=@digit.png")
    return images, params


def _flag(params: dict[str, str], name: str, default: bool) -> bool:
    if name not in params:
        return default
    value = params[name].lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, f"parameter {name}={value!r}: use 1 or 0")


# --------------------------------------------------------------------------------------------
# Micro-batching


class Batcher:
    """Runs the network for concurrent requests, several requests' images in one forward pass.

    A request queues its images and awaits the result. The first one queued schedules a pass on
    the event loop's next turn, so the requests being handled meanwhile join it: one request at a
    time is a plain call, and under load the batches grow by themselves, without a timer.
    """

    def __init__(self, predictor: Predictor, max_batch: int = MAX_BATCH):
        self.predictor = predictor
        self.max_batch = max_batch
        self._queue: list[tuple[np.ndarray, bool, asyncio.Future]] = []
        self.passes = 0
        self.images = 0

    async def run(self, pixels: np.ndarray, activations: bool = False):
        """Class scores (N, classes) for (N, 28, 28) uint8 images, and the activation maps if asked."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((pixels, activations, future))
        return await future

    def _flush(self) -> None:
        jobs, self._queue = self._queue, []
        start = 0
        while start < len(jobs):  # at most max_batch images per pass (a single request may exceed it)
            chunk, count = [], 0
            while start < len(jobs) and (not chunk or count + len(jobs[start][0]) <= self.max_batch):
                chunk.append(jobs[start])
                count += len(jobs[start][0])
                start += 1
            try:
                scores, maps = self.predictor.forward(np.concatenate([j[0] for j in chunk]),
                                                      activations=any(j[1] for j in chunk))
            except Exception as exc:  # a bug: every request of the pass gets it
                for _, _, future in chunk:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.passes += 1
            self.images += count
            row = 0
            for pixels, want_maps, future in chunk:
                n = len(pixels)
                result = (scores[row:row + n], {k: v[row:row + n] for k, v in maps.items()} if want_maps else {})
                if not future.done():  # its client may have gone
                    future.set_result(result)
                row += n


# --------------------------------------------------------------------------------------------
# The app, independent of HTTP


class App:
    """What the server does: info, and predict on uploaded images."""

    def __init__(self, predictor: Predictor, *, max_upload: int = SERVE_MAX_UPLOAD,
                 max_images: int = SERVE_MAX_IMAGES, max_pixels: int = MAX_PIXELS):
        self.predictor = predictor
        self.batcher = Batcher(predictor)
        self.max_upload = max_upload
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.static = load_static()

    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"model": p.model_name, "dataset": p.dataset, "classes": list(p.classes),
                "preprocess": p.mode, "test_flip": p.test_flip, "layers": p.layers, "max_upload_bytes": self.max_upload,
                "max_images": self.max_images, "max_pixels": self.max_pixels}

    def prepare(self, upload: Upload, preprocess: bool) -> Prepared:
        """Decode and preprocess one image; a bad image raises ApiError naming it."""
        try:
            img = decode_image(upload.data, upload.name, max_pixels=self.max_pixels)
        except NotAnImageError as exc:
            if upload.field and not upload.filename:  # a text field: curl -F image=digit.png (no @)
                raise ApiError(415, f"form field {upload.field!r} is text, not an image file: send a file "
                                    f"(curl -F {upload.field}=@digit.png)") from None
            raise ApiError(415, str(exc)) from None
        except ImageTooLargeError as exc:
            raise ApiError(413, str(exc)) from None
        except (CorruptImageError, ImageError) as exc:
            raise ApiError(400, str(exc)) from None
        return self.predictor.prepare(img, preprocess)

    def prepare_all(self, uploads: list[Upload], preprocess: bool) -> list[Prepared]:
        return [self.prepare(u, preprocess) for u in uploads]  # every image is checked before any is run

    def answer(self, uploads: list[Upload], prepared: list[Prepared], scores, maps: dict, *, top_k: int,
               activations: bool, batch: bool | None, t0: float) -> dict[str, Any]:
        results = []
        for n, (upload, p) in enumerate(zip(uploads, prepared)):
            out = self.predictor.describe(p, scores[n], top_k)
            if upload.field or upload.filename:
                out["file"], out["field"] = upload.filename, upload.field
            out["input"] = p.pixels.reshape(-1).tolist()
            if activations:
                out["activations"] = [
                    {"layer": name, "shape": list(a.shape[1:]), "min": round(float(a[n].min()), 4),
                     "max": round(float(a[n].max()), 4), "data": np.round(np.asarray(a[n], np.float32).reshape(-1), 4).tolist()}
                    for name, a in maps.items()]
            results.append(out)
        elapsed = round((time.perf_counter() - t0) * 1000, 2)
        if batch or (batch is None and len(results) > 1):
            return {"predictions": results, "count": len(results), "elapsed_ms": elapsed}
        results[0]["elapsed_ms"] = elapsed
        return results[0]

    async def predict(self, uploads: list[Upload], *, top_k: int = 3, preprocess: bool = True,
                      activations: bool = True, batch: bool | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if sum(len(u.data) for u in uploads) > INLINE_BYTES:  # big pictures: decode off the event loop
            from starlette.concurrency import run_in_threadpool

            prepared = await run_in_threadpool(self.prepare_all, uploads, preprocess)
        else:
            prepared = self.prepare_all(uploads, preprocess)
        scores, maps = await self.batcher.run(np.stack([p.pixels for p in prepared]), activations)
        return self.answer(uploads, prepared, scores, maps, top_k=top_k, activations=activations, batch=batch, t0=t0)


# --------------------------------------------------------------------------------------------
# HTTP: a Starlette app


def _json(status: int, obj: Any):
    from starlette.responses import Response

    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json",
                    headers={"cache-control": "no-store"})


def _error(status: int, message: str):
    return _json(status, {"error": message, "status": status})


async def _read_body(request, max_upload: int) -> bytes:
    """The request body, refusing more than ``max_upload`` bytes (from the header, before reading)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, f"bad Content-Length {length!r}")
        if int(length) > max_upload:
            raise ApiError(413, f"upload of {int(length):,} bytes is larger than the {max_upload:,} allowed "
                                "(--max-upload); send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():  # ClientDisconnect if the client hangs up
        size += len(chunk)
        if size > max_upload:
            raise ApiError(413, f"upload larger than the {max_upload:,} bytes allowed (--max-upload); "
                                "send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(app: App, request) -> tuple[list[Upload], dict[str, str]]:
    """The images of a predict request (raw bytes or a form) and its parameters, checked."""
    if request.method != "POST":
        raise ApiError(405, "use POST /api/predict with the image as the body or as a form's file field")
    params = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    data = await _read_body(request, app.max_upload)
    if not data:
        raise ApiError(400, "empty body: send an image (raw bytes, or a form with curl -F image=@digit.png)")
    if kind == "multipart/form-data":
        uploads, fields = parse_form(data, content_type, app.max_images)
        params.update(fields)
    elif kind.startswith("multipart/"):
        raise ApiError(415, f"{kind} is not supported: send multipart/form-data (curl -F image=@digit.png) "
                            "or the raw image bytes (curl --data-binary @digit.png)")
    else:  # the raw bytes of one image, whatever the type says (curl --data-binary says a url-encoded form)
        uploads = [Upload(data)]
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}: use {', '.join(PARAMETERS)}")
    top_k = params.get("top_k", "3")
    if not top_k.isdigit() or int(top_k) < 1:
        raise ApiError(400, f"parameter top_k={top_k!r}: use a positive integer")
    return uploads, params


async def handle_predict(app: App, request):
    """POST /api/predict: the answer, or one JSON error (4xx; 500 for a bug, shown on the console)."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    try:
        uploads, params = await read_request(app, request)
        batch = _flag(params, "batch", False) if "batch" in params else None
        result = await app.predict(uploads, top_k=int(params.get("top_k", "3")),
                                   preprocess=_flag(params, "preprocess", True),
                                   activations=_flag(params, "activations", True), batch=batch)
        return _json(200, result)
    except ApiError as exc:
        return _error(exc.status, str(exc))
    except ClientDisconnect:  # the client hung up mid-upload: nobody to answer
        return Response(status_code=400)
    except Exception:  # a bug: answer 500, keep serving, show the traceback on the console
        traceback.print_exc(file=sys.stderr)
        return _error(500, "internal error while handling the request (see the server's console)")


async def _http_error(request, exc):
    """Starlette's 404 and 405 as this API's JSON errors."""
    if exc.status_code == 405:
        message = (f"{request.method} is not supported at {request.url.path}: use GET for pages, /api/info "
                   "and /healthz, POST for /api/predict")
    elif exc.status_code == 404:
        message = f"no such page: {request.url.path}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message)


async def _server_error(request, exc):
    traceback.print_exception(exc, file=sys.stderr)
    return _error(500, "internal error while handling the request (see the server's console)")


def create_app(predictor: Predictor, *, max_upload: int = SERVE_MAX_UPLOAD, max_images: int = SERVE_MAX_IMAGES,
               max_pixels: int = MAX_PIXELS):
    """The ASGI app (Starlette) serving ``predictor``; its :class:`App` is ``.state.lenet``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    app = App(predictor, max_upload=max_upload, max_images=max_images, max_pixels=max_pixels)

    async def static(request):
        body, ctype = app.static[request.url.path]
        return Response(body, media_type=ctype, headers={"cache-control": "no-cache"})

    async def healthz(request):
        return _json(200, {"status": "ok", "model": predictor.model_name, "dataset": predictor.dataset})

    async def info(request):
        return _json(200, app.info())

    async def predict(request):
        return await handle_predict(app, request)

    routes = [Route(path, static, methods=["GET", "HEAD"]) for path in app.static]
    routes += [Route("/healthz", healthz, methods=["GET", "HEAD"]), Route("/ping", healthz, methods=["GET", "HEAD"]),
               Route("/api/info", info, methods=["GET", "HEAD"]),
               Route("/api/predict", predict, methods=["POST", "GET", "HEAD"])]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
    starlette.state.lenet = app
    return _SecurityHeaders(starlette, app)


class _SecurityHeaders:
    """ASGI wrapper adding the security headers to every HTTP answer (a Content-Security-Policy that
    allows only this server's own files)."""

    def __init__(self, inner, app: App):
        self.inner = inner
        self.lenet = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.inner(scope, receive, send_with_headers)


# --------------------------------------------------------------------------------------------
# The server


class LenetServer:
    """A bound socket and the uvicorn server that will serve the app on it."""

    def __init__(self, sock: socket.socket, asgi, config_kwargs: dict[str, Any]):
        import uvicorn

        self.socket = sock
        self.asgi = asgi
        self.app: App = asgi.lenet
        self.config_kwargs = config_kwargs
        self.uvicorn = uvicorn.Server(uvicorn.Config(asgi, **config_kwargs))

    @property
    def server_address(self) -> tuple:
        return self.socket.getsockname()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True

    def server_close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass


def _config(log_requests: bool) -> dict[str, Any]:
    return {"log_level": "warning", "access_log": log_requests, "lifespan": "off", "timeout_keep_alive": 5,
            "server_header": False, "date_header": False}


def bind(host: str, port: int) -> socket.socket:
    """Listen on host:port (port 0: a free one), with a clear error when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise LenetError(f"port {port} on {host} is already in use: choose another --port "
                             "(--port 0 picks a free one)") from None
        raise LenetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(run_dir, host: str = "127.0.0.1", port: int = 8000, *, max_upload: int = SERVE_MAX_UPLOAD,
                max_images: int = SERVE_MAX_IMAGES, max_pixels: int = MAX_PIXELS,
                threads: int | None = 1, log_requests: bool = False, predictor: Predictor | None = None,
                device: str = "cpu") -> LenetServer:
    """Load the run and bind the server (not yet serving: call ``serve_forever()``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    predictor = predictor or Predictor.from_run(run_dir, device)
    asgi = create_app(predictor, max_upload=max_upload, max_images=max_images, max_pixels=max_pixels)
    return LenetServer(bind(host, port), asgi, _config(log_requests))


# --- several worker processes (uvicorn's supervisor; each worker builds the app from this setting)

_WORKER_SETTINGS = "LENET_SERVE_WORKER"


def worker_app():
    """The ASGI app of one ``--workers`` process, from the settings its parent left in the environment."""
    import torch

    settings = json.loads(os.environ[_WORKER_SETTINGS])
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    predictor = Predictor.from_run(settings["run_dir"], settings["device"])
    return create_app(predictor, max_upload=settings["max_upload"], max_images=settings["max_images"],
                      max_pixels=settings["max_pixels"])


def serve_workers(server: LenetServer, workers: int, run_dir, *, threads: int | None = 1,
                  device: str = "cpu") -> None:
    """Serve ``server``'s socket from ``workers`` processes (1: in this process). Returns on Ctrl-C."""
    if workers <= 1:
        server.serve_forever()
        return
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    app = server.app
    os.environ[_WORKER_SETTINGS] = json.dumps({
        "run_dir": str(run_dir), "device": device, "threads": threads, "max_upload": app.max_upload,
        "max_images": app.max_images, "max_pixels": app.max_pixels})
    config = uvicorn.Config("lenet.use.serve:worker_app", factory=True, workers=workers, **server.config_kwargs)
    Multiprocess(config, sockets=[server.socket]).run()


@contextmanager
def running(server: LenetServer) -> Iterator[LenetServer]:
    """Serve in a background thread for the duration of a ``with`` block (tests, benchmarks)."""
    thread = threading.Thread(target=server.serve_forever, name="lenet-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.uvicorn.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
