"""lenet serve: the JSON API on real images (raw and multipart uploads, batches), every bad request,
clients that hang up, a load test, the CLI, and the page in a real headless browser (Debian's
chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from . import browser
from .conftest import REPO, assert_user_error, run_cli
from .trained import mnist_run, render_set

BOUNDARY = "testboundary0123"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist):
    return mnist_run(tmp_path_factory.mktemp("runs"), mnist)


@pytest.fixture(scope="module")
def server(run_dir):
    from lenet.use.serve import make_server, running

    srv = make_server(run_dir, "127.0.0.1", 0, max_upload=1_500_000, max_images=8, max_pixels=4_000_000, threads=None)
    with running(srv):
        yield srv


def request(server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def post(server, body: bytes, query: str = "", content_type: str = "image/png", path: str = "/api/predict"):
    return request(server, "POST", path + query, body, {"Content-Type": content_type})


def form(*parts) -> tuple[bytes, str]:
    """A multipart/form-data body from (name, filename or None, bytes) parts, and its Content-Type."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename else ""
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def post_form(server, *parts, query: str = ""):
    body, ctype = form(*parts)
    return post(server, body, query, ctype)


def get(server, path: str):
    with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=30) as resp:
        return resp.status, resp.headers, resp.read()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a few bytes of data: decoding it
    in full would take width*height bytes of memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


# ---- the API


def test_info_health_and_static_assets_are_served_locally(server):
    assert server.server_address[0] == "127.0.0.1"
    status, _, body = get(server, "/api/info")
    info = json.loads(body)
    assert status == 200 and info["dataset"] == "mnist" and info["classes"] == [str(d) for d in range(10)]
    assert info["layers"] == ["act1", "act2"] and info["preprocess"] == "digits" and info["test_flip"] is False
    assert info["max_images"] == 8 and info["max_upload_bytes"] == 1_500_000 and info["max_pixels"] == 4_000_000
    for path in ("/healthz", "/ping"):
        status, _, body = get(server, path)
        assert status == 200 and json.loads(body) == {"status": "ok", "model": "classic", "dataset": "mnist"}
    status, headers, page = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.decode())
    assert refs and all(ref.startswith("/static/") for ref in refs), refs  # no CDN: every asset is ours
    for ref in refs:
        assert get(server, ref)[0] == 200
    for name in ("app.js", "style.css"):
        text = get(server, f"/static/{name}")[2].decode()
        assert "http://" not in text and "https://" not in text


def test_api_accuracy_equals_the_evaluation_on_300_test_images(server, run_dir, mnist):
    from lenet.inspect.evaluation import evaluate
    from lenet.training.runs import load_run

    n = 300
    images, labels = mnist.test.images[:n], mnist.test.labels[:n]
    report = evaluate(load_run(run_dir).model, images, labels, mnist.classes)
    predicted = []
    for i in range(n):
        status, out = post(server, png_bytes(images[i].numpy()), "?preprocess=0&activations=0&top_k=1")
        assert status == 200, out
        predicted.append(out["top"][0]["index"])
    api_acc = float(np.mean(np.array(predicted) == labels.numpy()))
    print(f"API accuracy {api_acc:.4f}, evaluation accuracy {report.accuracy:.4f} on {n} MNIST test images")
    assert predicted == report.scores.argmax(dim=1).tolist()
    assert api_acc == pytest.approx(report.accuracy, abs=1e-6)  # evaluate() averages in float32


def test_predict_answer_has_top_k_input_and_activation_maps(server, tmp_path):
    (path, digit), = [x for x in render_set(tmp_path, variants=1) if x[1] == 3]
    status, out = post(server, path.read_bytes(), content_type="image/jpeg" if path.suffix == ".jpg" else "image/png")
    assert status == 200
    assert [t["class"] for t in out["top"]][0] == "3" and len(out["top"]) == 3
    assert len(out["probabilities"]) == 10 and abs(sum(out["probabilities"]) - 1) < 1e-4
    assert out["inverted"] and len(out["input"]) == 784 and max(out["input"]) == 255
    assert out["decisions"]["polarity"] == "dark on light" and "file" not in out
    shapes = {a["layer"]: a["shape"] for a in out["activations"]}
    assert shapes == {"act1": [6, 28, 28], "act2": [16, 10, 10]}
    for a in out["activations"]:
        assert len(a["data"]) == int(np.prod(a["shape"])) and a["min"] <= min(a["data"]) + 1e-3
    # --no-preprocess semantics and top_k
    status, raw = post(server, path.read_bytes(), "?preprocess=0&top_k=5&activations=0")
    assert status == 200 and raw["preprocess"] == "none" and len(raw["top"]) == 5 and "activations" not in raw
    # curl --data-binary sends application/x-www-form-urlencoded: still the raw image
    status, same = post(server, path.read_bytes(), "?activations=0", "application/x-www-form-urlencoded")
    assert status == 200 and same["top"] == post(server, path.read_bytes(), "?activations=0")[1]["top"]


def test_multipart_upload_as_curl_sends_it(server, mnist, tmp_path):
    digit = tmp_path / "digit.png"
    Image.fromarray(mnist.test.images[0].numpy()).save(digit)  # a 7
    if shutil.which("curl"):
        proc = subprocess.run(["curl", "-s", "-F", f"image=@{digit}", server.url + "api/predict"],
                              capture_output=True, text=True, timeout=60)
        out = json.loads(proc.stdout)
    else:  # the same form, built here
        status, out = post_form(server, ("image", "digit.png", digit.read_bytes()))
        assert status == 200
    assert out["top"][0]["class"] == "7" and out["file"] == "digit.png" and out["field"] == "image"
    assert len(out["top"]) == 3 and "activations" in out
    # parameters as form fields, any field name for the file, and batch=1 for the list form
    status, out = post_form(server, ("top_k", None, b"1"), ("activations", None, b"0"), ("picture", "x.png", digit.read_bytes()),
                            query="?batch=1")
    assert status == 200 and out["count"] == 1 and len(out["predictions"][0]["top"]) == 1
    assert out["predictions"][0]["field"] == "picture" and "activations" not in out["predictions"][0]


def test_a_batch_answers_one_result_per_image_in_order_from_one_forward_pass(server, mnist):
    picks = [int(np.flatnonzero(mnist.test.labels.numpy() == d)[0]) for d in (4, 0, 9, 2, 7, 1)]
    parts = [("images", f"digit{n}.png", png_bytes(mnist.test.images[i].numpy())) for n, i in enumerate(picks)]
    singles = [post_form(server, p, query="?activations=0")[1]["top"] for p in parts]
    batcher = server.app.batcher
    passes = batcher.passes
    status, out = post_form(server, *parts, query="?activations=0")
    assert status == 200 and out["count"] == len(parts) and batcher.passes == passes + 1
    assert [p["file"] for p in out["predictions"]] == [f"digit{n}.png" for n in range(len(parts))]
    for batched, single in zip(out["predictions"], singles):  # the same answer as alone (batch sizes round differently)
        assert [t["class"] for t in batched["top"]] == [t["class"] for t in single]
        assert np.allclose([t["probability"] for t in batched["top"]], [t["probability"] for t in single], atol=1e-5)
    assert [p["top"][0]["class"] for p in out["predictions"]] == ["4", "0", "9", "2", "7", "1"]
    # with activation maps, each image gets its own
    status, out = post_form(server, *parts[:2])
    assert status == 200 and [len(p["activations"]) for p in out["predictions"]] == [2, 2]
    assert out["predictions"][0]["activations"][0]["data"] != out["predictions"][1]["activations"][0]["data"]


def test_concurrent_requests_share_forward_passes(server, mnist):
    body = png_bytes(mnist.test.images[1].numpy())
    batcher = server.app.batcher
    passes, images = batcher.passes, batcher.images
    answers = []

    def client():
        for _ in range(10):
            answers.append(post(server, body, "?activations=0&top_k=1"))

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 120 and all(s == 200 and o["top"][0]["class"] == "2" for s, o in answers)
    assert batcher.images - images == 120 and batcher.passes - passes < 120  # some passes carried several


def test_every_bad_request_gets_one_clear_json_error_and_the_server_keeps_running(server, mnist):
    good = png_bytes(mnist.test.images[0].numpy())
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    nine = [("image", f"d{i}.png", good) for i in range(9)]
    cases = [
        (post(server, b"%PDF-1.4 not an image", "", "application/pdf"), 415, "not an image"),
        (post(server, noise[:len(noise) // 2]), 400, "corrupt or truncated"),
        (post(server, b""), 400, "empty body"),
        (post(server, b"\x89PNG" + b"\0" * 1_600_000), 413, "larger than the 1,500,000 allowed"),
        (post(server, png_bomb(30_000, 30_000)), 413, "900,000,000 pixels, more than the 4,000,000 allowed"),
        (post(server, png_bomb(5_000, 1_000)), 413, "5000x1000 pixels, more than the 4,000,000 allowed"),
        (post_form(server, *nine), 413, "more than 8 images"),
        (post_form(server, ("image", "a.png", good), ("image", "notes.txt", b"hello")), 415, "notes.txt: not an image"),
        (post_form(server, ("image", None, b"digit.png")), 415, "form field 'image' is text"),
        (post_form(server, ("top_k", None, b"2")), 400, "no file field"),
        (post(server, form(("image", "a.png", good))[0][:-30], "", f"multipart/form-data; boundary={BOUNDARY}"), 400,
         "closing boundary"),
        (post(server, good, "", "multipart/form-data"), 400, "boundary"),
        (post(server, good, "", "multipart/mixed; boundary=x"), 415, "multipart/mixed is not supported"),
        (post(server, good, "?top_k=zero"), 400, "top_k"),
        (post(server, good, "?preprocess=maybe"), 400, "preprocess"),
        (post(server, good, "?colour=1"), 400, "unknown parameter 'colour'"),
        (post(server, good, path="/api/nothing"), 404, "no such page"),
        (post(server, good, path="/api/info"), 405, "POST is not supported"),
        (request(server, "DELETE", "/api/predict"), 405, "DELETE is not supported"),
        (request(server, "PUT", "/api/predict", good, {"Content-Type": "image/png"}), 405, "PUT is not supported"),
        (request(server, "GET", "/api/predict"), 405, "use POST"),
        (request(server, "GET", "/../../etc/passwd"), 404, "no such page"),
    ]
    for (status, out), code, fragment in cases:
        assert status == code and out["status"] == code and fragment in out["error"], (code, fragment, out)
        assert "\n" not in out["error"] and "Traceback" not in out["error"]
    t0 = time.perf_counter()
    assert post(server, png_bomb(60_000, 60_000))[0] == 413  # refused from the header: 3.6 GB never decoded
    assert time.perf_counter() - t0 < 2
    assert post(server, good)[0] == 200  # still serving


def test_clients_that_hang_up_mid_request_cost_nothing(server, mnist):
    host, port = server.server_address[:2]
    good = png_bytes(mnist.test.images[0].numpy())
    body, ctype = form(("image", "a.png", good))
    def head(length: int) -> bytes:
        return (f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    for n in range(40):
        with socket.create_connection((host, port), timeout=10) as s:
            if n % 2:  # announce more than is sent, and hang up half-way through the body
                s.sendall(head(len(body) + 5000) + body[:len(body) // 2])
            else:  # send it all and leave before the answer
                s.sendall(head(len(body)) + body)
    for _ in range(3):
        status, out = post_form(server, ("image", "a.png", good), query="?activations=0")
        assert status == 200 and out["top"][0]["class"] == "7"


def test_load_test_zero_errors(server, tmp_path):
    from lenet.use.loadtest import run_load

    path = render_set(tmp_path, variants=1)[7][0]
    report = run_load(server.url, path.read_bytes(), threads=8, requests_per_thread=25,
                      content_type="image/jpeg" if path.suffix == ".jpg" else "image/png")
    print(report.format())
    assert report.errors == 0, report.first_error
    assert report.ok == 200 and report.requests_per_sec > 0 and report.p99_ms >= report.p50_ms > 0


def test_load_test_refuses_remote_targets():
    from lenet.errors import LenetError
    from lenet.use.loadtest import run_load

    with pytest.raises(LenetError, match="only a server on this machine"):
        run_load("http://example.com:80/", b"x", threads=1, requests_per_thread=1)


@pytest.mark.slow
def test_load_benchmark_script_prints_its_figures(run_dir, mnist, tmp_path):
    image = tmp_path / "digit.png"
    Image.fromarray(mnist.test.images[0].numpy()).save(image)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_serve.py"), str(run_dir), str(image),
                           "--client", "python", "--concurrency", "4", "--requests", "40"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"40 requests, 0 errors, \d+ requests/s, latency p50 \d+ ms, p99 \d+ ms", proc.stdout), proc.stdout


# ---- the CLI


def test_serve_cli_starts_and_reports_a_busy_port(run_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_cli("serve", str(run_dir), "--port", str(port), timeout=120)
        assert_user_error(proc, f"port {port}", "already in use", code=2)
    assert_user_error(run_cli("serve", str(run_dir / "nope")), "not found", code=2)
    assert_user_error(run_cli("serve", str(run_dir), "--port", "70000"), "--port", code=2)
    assert_user_error(run_cli("serve", str(run_dir), "--max-images", "0"), "--max-images", code=2)


def _serve(run_dir, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "lenet", "serve", str(run_dir), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert match, line + proc.stderr.read() if proc.poll() is not None else line
    return proc, match.group(0)


def _wait_healthy(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=10) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_serve_cli_serves_until_stopped(run_dir):
    proc, url = _serve(run_dir)
    try:
        assert _wait_healthy(url)["dataset"] == "mnist"
        with urllib.request.urlopen(url + "api/info", timeout=30) as resp:
            assert json.loads(resp.read())["dataset"] == "mnist"
    finally:
        proc.send_signal(2)  # Ctrl-C
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.slow
def test_serve_cli_with_two_worker_processes(run_dir, mnist):
    proc, url = _serve(run_dir, "--workers", "2")
    try:
        assert _wait_healthy(url)["status"] == "ok"
        body, ctype = form(("image", "d.png", png_bytes(mnist.test.images[0].numpy())))
        for _ in range(20):
            req = urllib.request.Request(url + "api/predict?activations=0", data=body, headers={"Content-Type": ctype})
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert json.loads(resp.read())["top"][0]["class"] == "7"
    finally:
        proc.send_signal(2)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


# ---- the page, in a real headless browser

needs_browser = pytest.mark.skipif(browser.missing_reason() is not None, reason=str(browser.missing_reason()))


@needs_browser
def test_browser_draw_a_seven_and_upload_images(server, tmp_path):
    from selenium.webdriver.common.by import By

    with browser.chromium() as web:
        web.get(server.url)
        browser.wait_for_info(web)
        browser.draw(web, browser.SEVEN)
        label, text = browser.wait_for_prediction(web)
        assert label == "7", text
        assert len(web.find_elements(By.CSS_SELECTOR, "#predictions li")) == 3
        layers = web.find_elements(By.CSS_SELECTOR, "#maps .layer")
        assert [el.get_attribute("data-layer") for el in layers] == ["act1", "act2"]
        assert len(layers[0].find_elements(By.TAG_NAME, "canvas")) == 6
        assert len(layers[1].find_elements(By.TAG_NAME, "canvas")) == 16

        (path, digit), = [x for x in render_set(tmp_path, variants=1) if x[1] == 4]
        web.find_element(By.ID, "upload").send_keys(str(path))
        label, text = browser.wait_for_prediction(web, previous=text)
        assert text.startswith(path.name) and label == "4", text

        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        web.find_element(By.ID, "upload").send_keys(str(bad))
        status = browser.wait_for_error(web)
        assert "not an image" in status.text

        web.find_element(By.ID, "clear").click()
        assert web.find_elements(By.CSS_SELECTOR, "#predictions li") == []
        severe = [e for e in web.get_log("browser") if e["level"] == "SEVERE" and "api/predict" not in e["message"]]
        assert severe == [], severe  # no script errors, no blocked (non-local) resources
