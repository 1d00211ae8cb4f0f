"""lenet serve: the JSON API on real images, its error answers, a load test, and the page in a
real headless browser (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from . import browser
from .conftest import REPO, assert_user_error, run_cli
from .trained import mnist_run, render_set


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist):
    return mnist_run(tmp_path_factory.mktemp("runs"), mnist)


@pytest.fixture(scope="module")
def server(run_dir):
    from lenet.use.serve import make_server, running

    srv = make_server(run_dir, "127.0.0.1", 0, max_upload=1_500_000, threads=None)
    with running(srv):
        yield srv


def post(server, body: bytes, query: str = "", content_type: str = "image/png", path: str = "/api/predict"):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", path + query, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def get(server, path: str):
    with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=30) as resp:
        return resp.status, resp.headers, resp.read()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---- the API


def test_info_and_static_assets_are_served_locally(server):
    status, _, body = get(server, "/api/info")
    info = json.loads(body)
    assert status == 200 and info["dataset"] == "mnist" and info["classes"] == [str(d) for d in range(10)]
    assert info["layers"] == ["act1", "act2"] and info["preprocess"] == "digits"
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
    shapes = {a["layer"]: a["shape"] for a in out["activations"]}
    assert shapes == {"act1": [6, 28, 28], "act2": [16, 10, 10]}
    for a in out["activations"]:
        assert len(a["data"]) == int(np.prod(a["shape"])) and a["min"] <= min(a["data"]) + 1e-3
    # --no-preprocess semantics and top_k
    status, raw = post(server, path.read_bytes(), "?preprocess=0&top_k=5&activations=0")
    assert status == 200 and raw["preprocess"] == "none" and len(raw["top"]) == 5 and "activations" not in raw


def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_running(server, tmp_path):
    good = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    cases = [
        (b"%PDF-1.4 not an image", "", "application/pdf", 415, "not an image"),
        (good[:len(good) // 2], "", "image/png", 400, "corrupt or truncated"),
        (b"", "", "image/png", 400, "empty body"),
        (b"\x89PNG" + b"\0" * 1_600_000, "", "image/png", 413, "larger than the 1,500,000 allowed"),
        (good, "", "multipart/form-data; boundary=x", 415, "raw image bytes"),
        (good, "?top_k=zero", "image/png", 400, "top_k"),
        (good, "?preprocess=maybe", "image/png", 400, "preprocess"),
    ]
    for body, query, ctype, code, fragment in cases:
        status, out = post(server, body, query, ctype)
        assert status == code and fragment in out["error"], (code, out)
    assert post(server, good, path="/api/nothing")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        get(server, "/api/predict")
    assert err.value.code == 405 and "POST" in json.loads(err.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        get(server, "/../../etc/passwd")
    assert err.value.code == 404
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:  # no Content-Length
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n")[0] + b" "
    assert post(server, good)[0] == 200  # still serving


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


def test_load_benchmark_script_prints_its_figures(run_dir, tmp_path):
    path = render_set(tmp_path, variants=1)[7][0]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_serve.py"), str(run_dir), str(path),
                           "--threads", "4", "--requests", "10"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"40 ok, 0 errors .* requests/sec, latency p50 [\d.]+ ms, p99 [\d.]+ ms", proc.stdout), proc.stdout


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


def test_serve_cli_serves_until_stopped(run_dir):
    env_cmd = [sys.executable, "-m", "lenet", "serve", str(run_dir), "--port", "0"]
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(env_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        with urllib.request.urlopen(url + "api/info", timeout=30) as resp:
            assert json.loads(resp.read())["dataset"] == "mnist"
    finally:
        proc.send_signal(2)  # Ctrl-C
        out, err = proc.communicate(timeout=30)
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
