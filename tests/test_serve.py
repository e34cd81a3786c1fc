"""The HTTP server answers like predict(), refuses bad uploads with 4xx, and stays up afterwards."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from derm_accel.data.synthetic import render
from derm_accel.models import create_model, export_model
from derm_accel.predict import predict
from derm_accel.serve import make_server

LABELS = ["melanoma", "nevus", "psoriasis"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_model(create_model("test_resnet", 3), tmp_path_factory.mktemp("serve") / "best", LABELS)


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    server = make_server(str(model_dir), port=0, top_k=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_lists_the_labels(url: str) -> None:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        assert json.loads(response.read())["labels"] == LABELS


def test_prediction_matches_predict(url: str, model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "lesion.jpg"
    render(1, 3, 96).save(path, quality=92)
    status, answer = _post(url, path.read_bytes())
    expected = predict(str(path), model=str(model_dir), top_k=2)[0]
    assert status == 200 and answer["label"] == expected["label"] and len(answer["top_k"]) == 2
    assert answer["probability"] == pytest.approx(expected["probability"], abs=1e-6)


def test_bad_uploads_get_4xx_and_the_server_stays_up(url: str) -> None:
    assert _post(url, b"definitely not a jpeg")[0] == 400
    assert _post(url, b"")[0] == 400
    buf = io.BytesIO()
    render(0, 1, 64).save(buf, format="PNG")
    assert _post(url, buf.getvalue())[0] == 200


def test_oversized_header_is_refused_before_decoding(url: str) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # claims 20000x20000 RGB
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    status, answer = _post(url, bomb)
    assert status == 400 and "pixel" in answer["error"]


def test_top_k_must_be_positive(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="top_k"):
        make_server(str(model_dir), port=0, top_k=0)
