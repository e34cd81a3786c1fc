"""The HTTP API answers like predict (multipart and raw bodies), refuses bad uploads with 4xx, bounds body
size and slow clients, documents itself, and stays up under concurrent requests."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import select
import shutil
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from derm_accel.data.synthetic import render
from derm_accel.inference.predict import predict
from derm_accel.models.build import create_model, export_model
from derm_accel.serving.serve import BackgroundServer, create_app
from tests.conftest import DERM_SAMPLE

LABELS = ["melanoma", "nevus", "psoriasis"]
MAX_BYTES = 2 * 2**20
BODY_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = create_model("test_resnet", 3)
    net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, 64, 64))  # fast on two cores
    return export_model(net, tmp_path_factory.mktemp("serve") / "best", LABELS)


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    app = create_app(str(model_dir), top_k=2, max_bytes=MAX_BYTES, body_timeout=BODY_TIMEOUT)
    server = BackgroundServer(app)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def lesion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real dermoscopic JPEG when the shared sample is present, a generated one otherwise."""
    if DERM_SAMPLE.is_dir():
        return sorted(next(d for d in sorted(DERM_SAMPLE.iterdir()) if d.is_dir()).glob("*.jpg"))[0]
    path = tmp_path_factory.mktemp("img") / "lesion.jpg"
    render(1, 3, 96).save(path, quality=92)
    return path


def _expected(path: Path, model_dir: Path, top_k: int = 2) -> dict:
    answer = predict(str(path), model=str(model_dir), top_k=top_k)[0]
    answer.pop("path")
    return answer


def _same(answer: dict, expected: dict) -> None:
    assert answer.keys() == expected.keys()
    assert [t["label"] for t in answer["top_k"]] == [t["label"] for t in expected["top_k"]]
    for got, want in zip(answer["top_k"], expected["top_k"], strict=True):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
    assert answer["label"] == expected["label"]
    assert {k: answer[k] for k in ("ood_score", "in_domain", "abstain", "reason")} == {
        k: expected[k] for k in ("ood_score", "in_domain", "abstain", "reason")
    }


def test_health_lists_the_labels(url: str) -> None:
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["labels"] == LABELS and health["domain_guard"] is False


def test_multipart_and_raw_uploads_answer_like_predict(url: str, model_dir: Path, lesion: Path) -> None:
    expected = _expected(lesion, model_dir)
    multipart = httpx.post(f"{url}/predict", files={"file": (lesion.name, lesion.read_bytes(), "image/jpeg")})
    raw = httpx.post(f"{url}/predict", content=lesion.read_bytes(), headers={"content-type": "image/jpeg"})
    assert multipart.status_code == 200 and raw.status_code == 200
    _same(multipart.json(), expected)
    _same(raw.json(), expected)
    three = httpx.post(f"{url}/predict?top_k=3", content=lesion.read_bytes()).json()
    _same(three, _expected(lesion, model_dir, top_k=3))


def test_batch_answers_each_file_in_order_and_reports_bad_ones(url: str, model_dir: Path, tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.jpg")
        render(i, i, 80).save(paths[-1], quality=90)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files.insert(1, ("files", ("broken.jpg", b"not an image", "image/jpeg")))
    response = httpx.post(f"{url}/predict/batch", files=files)
    assert response.status_code == 200
    answers = response.json()
    assert [a["filename"] for a in answers] == ["img0.jpg", "broken.jpg", "img1.jpg", "img2.jpg"]
    assert "broken.jpg" in answers[1]["error"] and "not a readable image" in answers[1]["error"]
    for answer, path in zip([answers[0], *answers[2:]], paths, strict=True):
        answer.pop("filename")
        _same(answer, _expected(path, model_dir))


def test_fifty_concurrent_requests_are_all_answered(url: str, model_dir: Path, lesion: Path) -> None:
    expected = _expected(lesion, model_dir)
    body = lesion.read_bytes()

    def one(i: int) -> httpx.Response:
        if i % 2:
            return httpx.post(f"{url}/predict", content=body, timeout=120)
        return httpx.post(f"{url}/predict", files={"file": ("x.jpg", body)}, timeout=120)

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    for r in responses:
        _same(r.json(), expected)


def test_a_slow_client_does_not_block_the_others(url: str, lesion: Path) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        # Promise 1000 bytes, send 10, then stall.
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\xff\xd8" + b"0" * 8)
        answers = [httpx.post(f"{url}/predict", content=lesion.read_bytes(), timeout=30) for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3
        reply = _read_response(slow).decode()  # the stalled request is dropped after body_timeout, not held forever
    assert reply.startswith("HTTP/1.1 408") and "did not arrive whole" in reply
    assert reply.endswith("}") and "request dropped" in reply  # the whole JSON body, not its first TCP read


def test_a_body_trickling_in_gets_408_at_the_whole_body_deadline(url: str) -> None:
    """One byte every 0.3 s never stalls for body_timeout, but the body must be whole body_timeout after the
    request began."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        while not select.select([slow], [], [], 0.3)[0] and time.monotonic() - start < 4 * BODY_TIMEOUT:
            slow.sendall(b"0")
        elapsed = time.monotonic() - start
        reply = _read_response(slow).decode()
    assert reply.startswith("HTTP/1.1 408") and "did not arrive whole" in reply
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 1.5


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers, then Content-Length bytes of body, or up to the server's close), however
    many TCP reads it arrives in."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")[1:]
                       if line.lower().startswith(b"content-length:")]
            if lengths and len(body) >= int(lengths[0]):
                return data
        chunk = sock.recv(4096)
        if not chunk:  # the server closed the connection: that is the whole response
            return data
        data += chunk


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # claims 20000x20000 RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_bad_uploads_get_4xx_with_a_message_and_the_server_stays_up(url: str) -> None:
    cases = {
        "garbage raw": httpx.post(f"{url}/predict", content=b"definitely not a jpeg"),
        "garbage multipart": httpx.post(f"{url}/predict", files={"file": ("x.jpg", b"definitely not a jpeg")}),
        "empty raw": httpx.post(f"{url}/predict", content=b""),
        "empty multipart": httpx.post(f"{url}/predict", files={"file": ("x.jpg", b"")}),
        "no file field": httpx.post(f"{url}/predict", files={"image": ("x.jpg", b"abc")}),
        "bomb": httpx.post(f"{url}/predict", content=_bomb()),
        "batch without files": httpx.post(f"{url}/predict/batch", data={"x": "1"}),
        "top_k 0": httpx.post(f"{url}/predict?top_k=0", content=b"abc"),
    }
    statuses = {name: r.status_code for name, r in cases.items()}
    assert statuses == {
        "garbage raw": 400, "garbage multipart": 400, "empty raw": 400, "empty multipart": 400,
        "no file field": 400, "bomb": 400, "batch without files": 422, "top_k 0": 422,
    }
    assert all(r.json()["error"] for r in cases.values())
    assert "not a readable image" in cases["garbage raw"].json()["error"]
    assert "empty" in cases["empty multipart"].json()["error"]
    assert "'file'" in cases["no file field"].json()["error"]
    assert "pixel" in cases["bomb"].json()["error"]
    for name, response in cases.items():  # messages for people: no Python object reprs like <_io.BytesIO ...>
        assert " at 0x" not in response.text and "<_io" not in response.text, (name, response.text)
    buf = io.BytesIO()
    render(0, 1, 64).save(buf, format="PNG")
    assert httpx.post(f"{url}/predict", content=buf.getvalue()).status_code == 200


def test_oversized_bodies_get_413_declared_or_streamed(url: str) -> None:
    big = b"\xff\xd8" + b"0" * MAX_BYTES
    declared = httpx.post(f"{url}/predict", content=big)
    multipart = httpx.post(f"{url}/predict/batch", files=[("files", ("a.jpg", big[: MAX_BYTES // 2 + 1]))] * 2)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
        for start in range(0, len(big), 2**16):
            yield big[start : start + 2**16]

    streamed = httpx.post(f"{url}/predict", content=chunks())
    for response in (declared, multipart, streamed):
        assert response.status_code == 413 and "limit" in response.json()["error"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_failing_forward_pass_answers_500_and_the_server_keeps_serving(
    model_dir: Path, lesion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    predict_module = importlib.import_module("derm_accel.serving.serve")  # where serve looks classify_batch up
    real, calls = predict_module.classify_batch, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "classify_batch", out_of_memory_once)
    client = TestClient(create_app(str(model_dir)))
    failed = client.post("/predict", content=lesion.read_bytes())
    assert failed.status_code == 500 and "out of memory" in failed.json()["error"]
    assert client.post("/predict", content=lesion.read_bytes()).status_code == 200


def test_schema_documents_typed_answers_and_errors(model_dir: Path) -> None:
    schema = TestClient(create_app(str(model_dir))).get("/openapi.json").json()
    components = schema["components"]["schemas"]

    def resolved(node: dict) -> dict:
        return components[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    def answer(path: str, status: str) -> dict:
        return resolved(schema["paths"][path]["post"]["responses"][status]["content"]["application/json"]["schema"])

    one = answer("/predict", "200")
    fields = {"label", "probability", "top_k", "ood_score", "in_domain", "abstain", "reason"}
    assert set(one["properties"]) == fields and set(one["required"]) == fields
    assert one["properties"]["probability"]["type"] == "number" and one["properties"]["abstain"]["type"] == "boolean"
    assert {t.get("type") for t in one["properties"]["in_domain"]["anyOf"]} == {"boolean", "null"}
    top = resolved(one["properties"]["top_k"]["items"])
    assert set(top["properties"]) == {"label", "probability"}
    batch = answer("/predict/batch", "200")
    assert batch["type"] == "array"
    kinds = [resolved(k) for k in batch["items"]["anyOf"]]
    assert [set(k["properties"]) for k in kinds] == [fields | {"filename"}, {"filename", "error"}]
    for path, status in [("/predict", "400"), ("/predict", "413"), ("/predict", "422"), ("/predict/batch", "413")]:
        assert answer(path, status)["properties"] == {"error": {"type": "string", "title": "Error",
                                                                "description": "What went wrong and what to change."}}
    health = resolved(schema["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(health["properties"]) == {"status", "model", "labels", "domain_guard"}


def test_connections_over_the_cap_get_503_and_the_server_recovers(model_dir: Path, lesion: Path) -> None:
    server = BackgroundServer(create_app(str(model_dir)), max_connections=2)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]  # open, sending nothing
        time.sleep(0.2)  # let the server accept them
        refused = httpx.post(f"{server.url}/predict", content=lesion.read_bytes(), timeout=10)
        assert refused.status_code == 503
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while (status := httpx.post(f"{server.url}/predict", content=lesion.read_bytes(), timeout=10).status_code) \
                == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200
    finally:
        server.stop()


def test_bad_option_values_are_refused_by_name_in_megabytes(model_dir: Path) -> None:
    from typer.testing import CliRunner

    from derm_accel.cli import app

    for value, shown in [("inf", "got inf"), ("-1", "got -1.0"), ("nan", "got nan"), ("0", "got 0.0")]:
        result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--max-upload-mb", value])
        assert result.exit_code == 2, (value, result.output)
        assert "--max-upload-mb must be a finite number of megabytes above 0" in result.output
        assert shown in result.output
        assert "Traceback" not in result.output and "1048576" not in result.output
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--max-connections", "0"])
    assert result.exit_code == 2 and "--max-connections must be at least 1" in result.output


def test_an_ensemble_member_whose_config_names_another_architecture_is_refused_by_name(
    model_dir: Path, tmp_path: Path
) -> None:
    from derm_accel.models.ensemble import EnsembleError, write_ensemble

    run = tmp_path / "run"
    for member in ("fold_1", "fold_2"):
        shutil.copytree(model_dir, run / member)
    torch.manual_seed(1)
    other = create_model("test_efficientnet", len(LABELS))
    other.pretrained_cfg = dict(other.pretrained_cfg, input_size=(3, 64, 64))
    other_dir = export_model(other, tmp_path / "other", LABELS)
    shutil.copy(other_dir / "config.json", run / "fold_2" / "config.json")  # config of another architecture
    assert json.loads((run / "fold_2" / "config.json").read_text())["architecture"] == "test_efficientnet"
    write_ensemble(run, ["fold_1", "fold_2"])
    with pytest.raises(EnsembleError) as refused:
        create_app(str(run))
    message = str(refused.value)
    assert "fold_2" in message and "test_efficientnet" in message and "different models" in message
    assert "fold_1" not in message.split(":")[0]


def test_schema_lists_the_endpoints_and_both_body_kinds(model_dir: Path) -> None:
    client = TestClient(create_app(str(model_dir)))
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health"} <= set(schema["paths"])
    bodies = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/octet-stream"} <= set(bodies)
    assert "multipart/form-data" in schema["paths"]["/predict/batch"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text


def test_cors_is_off_by_default_and_configurable(model_dir: Path) -> None:
    preflight = {"Origin": "https://lab.example", "Access-Control-Request-Method": "POST"}
    closed = TestClient(create_app(str(model_dir))).options("/predict", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = TestClient(create_app(str(model_dir), cors_origins=["https://lab.example"]))
    allowed = opened.options("/predict", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://lab.example"
    other = opened.options("/predict", headers={**preflight, "Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


def test_top_k_must_be_positive(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="top_k"):
        create_app(str(model_dir), top_k=0)


def test_decoded_pixels_of_concurrent_uploads_stay_within_the_budget(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import derm_accel.serving.serve as serve_module
    from derm_accel.data.decode import PixelBudget

    holds: list[tuple[int, int]] = []  # (bytes asked for, bytes held by all decodes while this one runs)

    class Recording(PixelBudget):
        @contextlib.contextmanager
        def hold(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
            with super().hold(nbytes, timeout):
                holds.append((nbytes, self.in_use))
                yield

    capacity = 2 * 200 * 150 * 3  # room for two decoded 200x150 images
    monkeypatch.setattr(serve_module, "PixelBudget", Recording)
    monkeypatch.setattr(serve_module, "DECODE_BUDGET_BYTES", capacity)
    server = BackgroundServer(create_app(str(model_dir)))
    try:
        body = io.BytesIO()
        render(2, 0, 96).resize((200, 150)).save(body, format="PNG")  # PNG: decoded at full size
        with ThreadPoolExecutor(max_workers=12) as pool:
            statuses = list(pool.map(lambda _: httpx.post(f"{server.url}/predict", content=body.getvalue(),
                                                          timeout=60).status_code, range(12)))
    finally:
        server.stop()
    assert statuses == [200] * 12
    assert [n for n, _ in holds] == [200 * 150 * 3] * 12
    assert all(in_use <= capacity for _, in_use in holds)
