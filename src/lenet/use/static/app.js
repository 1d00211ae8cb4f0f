// lenet serve: draw or upload an image, POST it to /api/predict, show top-3 and activation maps.
"use strict";
(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const statusLine = document.getElementById("status");
  const list = document.getElementById("predictions");
  const seen = document.getElementById("seen");
  const maps = document.getElementById("maps");
  const preprocess = document.getElementById("preprocess");
  const upload = document.getElementById("upload");
  let info = null;
  let drawing = false, dirty = false, busy = false, again = false, last = null;
  let seq = 0, pending = 0;  // pending: requests asked for and not yet shown (tests wait for 0)

  function setPending(delta) {
    pending += delta;
    document.body.dataset.pending = String(pending);
  }

  function status(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", !!isError);
  }

  function clearPad() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
    dirty = false;
  }

  function point(ev) {
    const r = pad.getBoundingClientRect();
    return { x: (ev.clientX - r.left) * pad.width / r.width, y: (ev.clientY - r.top) * pad.height / r.height };
  }

  function stroke(from, to) {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = pad.width / 14;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
  }

  pad.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    pad.setPointerCapture(ev.pointerId);
    drawing = true;
    dirty = true;
    last = point(ev);
    stroke(last, last);
  });
  pad.addEventListener("pointermove", (ev) => {
    if (!drawing) return;
    const p = point(ev);
    stroke(last, p);
    last = p;
    if (!busy) sendCanvas();  // live update while drawing, one request in flight at most
  });
  function endStroke() {
    if (!drawing) return;
    drawing = false;
    sendCanvas();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  document.getElementById("clear").addEventListener("click", () => {
    seq++;  // an answer still on its way is for the old picture: drop it
    clearPad();
    list.replaceChildren();
    maps.replaceChildren();
    seen.getContext("2d").clearRect(0, 0, 28, 28);
    status("Draw in the box with the mouse or a finger, or upload a photo.");
  });

  preprocess.addEventListener("change", () => { if (dirty) sendCanvas(); });

  upload.addEventListener("change", () => {
    const file = upload.files && upload.files[0];
    if (!file) return;
    upload.value = "";
    status("Classifying " + file.name + "…");
    setPending(1);
    showUpload(file);
    send(file, file.name);
  });

  function showUpload(file) {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      clearPad();
      const s = Math.min(pad.width / img.width, pad.height / img.height);
      const w = img.width * s, h = img.height * s;
      ctx.drawImage(img, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
      dirty = true;
      URL.revokeObjectURL(url);
    };
    img.onerror = () => URL.revokeObjectURL(url);
    img.src = url;
  }

  function sendCanvas() {
    if (!dirty) return;
    if (busy) {
      if (!again) { again = true; setPending(1); }
      return;
    }
    busy = true;
    setPending(1);
    pad.toBlob((blob) => send(blob, "your drawing"), "image/png");
  }

  async function send(blob, label) {
    busy = true;
    const mine = ++seq;
    try {
      const q = "?top_k=3&activations=1&preprocess=" + (preprocess.checked ? "1" : "0");
      const res = await fetch("/api/predict" + q, {
        method: "POST", body: blob, headers: { "Content-Type": blob.type || "application/octet-stream" },
      });
      const data = await res.json().catch(() => ({ error: "the server's answer is not JSON (HTTP " + res.status + ")" }));
      if (mine !== seq) return;
      if (!res.ok) {
        status(data.error || ("HTTP " + res.status), true);
        return;
      }
      render(data);
      if (data.blank || !data.top.length) {
        status(label + ": blank, not classified (" + ((data.decisions && data.decisions.blank) || "no content found") + ")");
        return;
      }
      const top = data.top[0];
      status(label + ": " + top["class"] + " (" + (100 * top.probability).toFixed(1) + "%) in " + data.elapsed_ms + " ms");
    } catch (err) {
      status("cannot reach the server: " + err.message, true);
    } finally {
      busy = false;
      if (again) { again = false; setPending(-1); sendCanvas(); }
      setPending(-1);
    }
  }

  function render(data) {
    list.replaceChildren(...data.top.map((t) => {
      const li = document.createElement("li");
      li.dataset["class"] = t["class"];
      li.dataset.probability = String(t.probability);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = t["class"];
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = Math.max(0.5, 100 * t.probability).toFixed(1) + "%";
      track.appendChild(fill);
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = (100 * t.probability).toFixed(1) + "%";
      li.append(name, track, prob);
      return li;
    }));
    drawGrey(seen, data.input, 28, 28);
    renderMaps(data.activations || []);
  }

  function drawGrey(canvas, values, w, h) {
    const c = canvas.getContext("2d");
    const img = c.createImageData(w, h);
    for (let i = 0; i < w * h; i++) {
      const v = values[i];
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
      img.data[4 * i + 3] = 255;
    }
    c.putImageData(img, 0, 0);
  }

  // A perceptually ordered colour map (dark blue -> teal -> yellow), 5 stops interpolated.
  const STOPS = [[13, 8, 135], [84, 2, 163], [33, 145, 140], [122, 209, 81], [253, 231, 37]];
  function colour(t) {
    const x = Math.min(0.9999, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.floor(x), f = x - i, a = STOPS[i], b = STOPS[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }

  function renderMaps(layers) {
    maps.replaceChildren(...layers.map((layer, li) => {
      const [C, H, W] = layer.shape;
      const box = document.createElement("div");
      box.className = "layer";
      box.dataset.layer = layer.layer;
      const h = document.createElement("h3");
      h.textContent = (li === 0 ? "First" : "Second") + " layer (" + layer.layer + "): " + C + " maps of " +
                      H + "×" + W + ", values " + layer.min.toFixed(2) + " to " + layer.max.toFixed(2);
      const row = document.createElement("div");
      row.className = "maps";
      const span = layer.max - layer.min || 1;
      const size = Math.max(56, Math.min(84, 4 * W));
      for (let c = 0; c < C; c++) {
        const cv = document.createElement("canvas");
        cv.width = W; cv.height = H;
        cv.style.width = size + "px"; cv.style.height = size + "px";
        cv.title = layer.layer + " map " + (c + 1);
        const g = cv.getContext("2d"), img = g.createImageData(W, H);
        for (let i = 0; i < H * W; i++) {
          const rgb = colour((layer.data[c * H * W + i] - layer.min) / span);
          img.data[4 * i] = rgb[0]; img.data[4 * i + 1] = rgb[1]; img.data[4 * i + 2] = rgb[2]; img.data[4 * i + 3] = 255;
        }
        g.putImageData(img, 0, 0);
        row.appendChild(cv);
      }
      box.append(h, row);
      return box;
    }));
  }

  clearPad();
  setPending(0);
  fetch("/api/info").then((r) => r.json()).then((data) => {
    info = data;
    document.getElementById("model-info").textContent =
      data.model + " trained on " + data.dataset + " · " + data.classes.length + " classes · preprocessing: " + data.preprocess;
  }).catch(() => status("cannot reach the server", true));
})();
