"""A small HTTP inference server: POST an image, get the top-k classes as JSON.

For a lab's internal tools and demos, not for clinical use. It is the standard library's threading HTTP server
in front of the same model cache and preprocessing as :func:`derm_accel.predict`, so answers match the CLI. A
lock serialises forward passes (one model, one device); bind to 127.0.0.1 unless a proxy sits in front.

    GET  /health    {"status": "ok", "model": ..., "labels": [...]}
    POST /predict   body: the image file's bytes -> {"label", "probability", "top_k": [...]}
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from derm_accel.data.transforms import decode_image
from derm_accel.paths import shareable_path
from derm_accel.predict import classify_batch, default_device, prepared_model

MAX_BYTES = 32 * 2**20  # a phone photo is a few MB; anything far larger is refused before it is read
DECODE_SLOTS = 4


def make_server(
    model: str, *, host: str = "127.0.0.1", port: int = 8000, top_k: int = 3, device: str | None = None
) -> ThreadingHTTPServer:
    """Load ``model`` once and return a server ready for ``serve_forever()`` (port 0 picks a free port)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    device = device or default_device()
    prepared = prepared_model(model, device)
    labels, transform, min_size = prepared.labels, prepared.transform, prepared.min_size
    lock = threading.Lock()  # one model, one device: forward passes take turns
    decoding = threading.BoundedSemaphore(DECODE_SLOTS)  # bounds the memory of concurrent decodes
    shown = shareable_path(model) if Path(model).exists() else model

    class Handler(BaseHTTPRequestHandler):
        server_version = "derm-accel"
        timeout = 30  # a client that stops sending does not hold a thread forever

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /predict"})
            self._reply(HTTPStatus.OK, {"status": "ok", "model": shown, "labels": labels})

        def do_POST(self) -> None:
            if self.path != "/predict":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "POST the image bytes to /predict"})
            try:
                size = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                size = 0
            if size <= 0:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": "empty body: POST the image file's bytes"})
            if size > MAX_BYTES:
                return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"image over {MAX_BYTES} bytes"})
            data = self.rfile.read(size)
            try:
                with decoding:
                    image = decode_image({"bytes": data}, min_size)  # refuses decompression bombs
                    x = transform(image)
            except Exception as e:  # a bad upload is the client's error, never the server's end
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": f"not a readable image: {e}"})
            try:
                with lock:
                    result = classify_batch(prepared, [x], top_k=top_k, device=device)[0]
            except Exception as e:  # e.g. out of memory: answer, and keep serving
                return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
            self._reply(HTTPStatus.OK, result)

    return ThreadingHTTPServer((host, port), Handler)
