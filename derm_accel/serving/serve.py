"""The HTTP API: POST an image, get the same JSON as ``derm-accel predict --json``. FastAPI on uvicorn.

For a lab's internal tools and demos, not for clinical use. The app holds one prepared model (the same model,
preprocessing and domain guard as :func:`derm_accel.inference.predict`), so answers match the CLI. Bind to 127.0.0.1
unless a proxy sits in front.

    GET  /health          {"status": "ok", "model", "labels", "domain_guard"}
    POST /predict         one image: a multipart upload (field ``file``) or the raw file bytes as the body
    POST /predict/batch   several images, multipart (field ``files``, repeated): one answer per file, in order
    GET  /docs            the OpenAPI description (the schema itself is /openapi.json)

Bounds: a body over ``max_bytes`` gets 413 (before it is read when Content-Length says so); a client that
stops sending for ``body_timeout`` seconds gets 408; at most ``DECODE_SLOTS`` images are decoded at once, each
within the decode budget of :func:`derm_accel.data.transforms.decode_image`, and their decoded pixels together
within ``DECODE_BUDGET_BYTES`` (a :class:`~derm_accel.data.decode.PixelBudget`: a large image waits for room,
503 after ``body_timeout``); forward passes take turns on the one model. Bad uploads get 4xx with a message,
failures 500; the server keeps serving either way.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# FastAPI reads the endpoint signatures' annotations, so the names they use live at module level.
from fastapi import File, Query, Request, UploadFile
from starlette.exceptions import HTTPException

from derm_accel.core.device import default_device
from derm_accel.core.paths import shareable_path
from derm_accel.core.version import __version__
from derm_accel.data.decode import PixelBudget, decoded_bytes
from derm_accel.data.transforms import decode_image, open_image
from derm_accel.inference.predict import classify_batch, prepared_model

MAX_BYTES = 32 * 2**20  # a phone photo is a few MB; anything far larger is refused before it is read
MAX_BATCH_FILES = 64
DECODE_SLOTS = 4
DECODE_BUDGET_BYTES = 256 * 2**20  # decoded pixels held at once, over all requests (two of the largest images)
BODY_TIMEOUT_S = 30.0

_RAW_BODY = {"schema": {"type": "string", "format": "binary"}}
_PREDICT_BODY = {
    "required": True,
    "description": "The image file: a multipart form upload with the field `file` (what `curl -F file=@x.jpg` "
    "and browsers send), or the file's bytes as the whole body (`curl --data-binary @x.jpg`).",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "application/octet-stream": _RAW_BODY,
        "image/jpeg": _RAW_BODY,
        "image/png": _RAW_BODY,
    },
}
_ERROR = {"content": {"application/json": {"example": {"error": "not a readable image: ..."}}}}


class ClientError(HTTPException):
    """A request to refuse (4xx) or a failure (500): answered with ``status_code`` and ``{"error": detail}``.

    An HTTPException, so that FastAPI passes it through its body parsing unchanged."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)

    def __str__(self) -> str:
        return str(self.detail)


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed), 408 for a client that stalls."""

    def __init__(self, app: Any, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, f"body of {int(declared):,} bytes is over the {self.max_bytes:,}-byte "
                                                "limit; send a smaller image (a phone photo is a few MB)")
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise ClientError(408, f"the client sent nothing for {self.timeout:g} s; request dropped") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise ClientError(413, f"body over the {self.max_bytes:,}-byte limit; send a smaller image")
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except ClientError as e:
            if started:
                raise
            await _send_error(send, e.status_code, str(e))


async def _send_error(send: Any, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _new_app(shown: str, *, cors_origins: Sequence[str], max_bytes: int, body_timeout: float) -> Any:
    """The FastAPI app without routes: its description, CORS, the body limit and JSON error answers."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse


    app = FastAPI(
        title="derm-accel",
        version=__version__,
        summary="Skin-lesion image classification: research use only, not a medical device.",
        description=f"Model: `{shown}`. Every answer has the fields of `derm-accel predict --json` (without "
        "`path`): `label`, `probability`, `top_k`, and the domain guard's `ood_score`, `in_domain`, `abstain`, "
        "`reason`. Research use only: not a medical device, not a diagnosis.",
    )
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=max_bytes, timeout=body_timeout)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request ({problems})"}, status_code=422)

    return app


def create_app(
    model: str,
    *,
    top_k: int = 3,
    device: str | None = None,
    cors_origins: Sequence[str] = (),
    max_bytes: int = MAX_BYTES,
    body_timeout: float = BODY_TIMEOUT_S,
) -> Any:
    """Load ``model`` once (a model folder or Hub id) and return the FastAPI app serving it.

    ``cors_origins``: origins allowed to call the API from a browser (none by default; ``"*"`` allows all).
    """
    import anyio.to_thread

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
    device = device or default_device()
    prepared = prepared_model(model, device)
    shown = shareable_path(model) if Path(model).exists() else model
    decoding = asyncio.Semaphore(DECODE_SLOTS)  # bounds the threads decoding at once
    budget = PixelBudget(DECODE_BUDGET_BYTES)  # bounds the decoded pixels they hold together
    forward = asyncio.Lock()  # one model, one device: forward passes take turns

    app = _new_app(shown, cors_origins=cors_origins, max_bytes=max_bytes, body_timeout=body_timeout)

    def k_of(requested: int | None) -> int:
        return min(requested or top_k, len(prepared.labels))

    async def decode(data: bytes, name: str) -> Any:
        if not data:
            raise ClientError(400, f"{name}: empty upload; send the image file's bytes")

        def work() -> Any:
            size = decoded_bytes(open_image({"bytes": data}, prepared.min_size))  # header only; refuses bombs
            with budget.hold(size, timeout=body_timeout):
                image = decode_image({"bytes": data}, prepared.min_size)  # the decode predict does
                image.load()
                return prepared.transform(image)

        async with decoding:
            try:
                return await anyio.to_thread.run_sync(work)
            except TimeoutError as e:
                raise ClientError(503, f"{name}: the server is busy decoding other images ({e}); retry") from e
            except Exception as e:  # a bad upload is the client's error, never the server's end
                raise ClientError(400, f"{name}: not a readable image ({type(e).__name__}: {e}); "
                                       "send a JPEG or PNG file") from e

    async def classify(tensors: list[Any], k: int) -> list[dict[str, Any]]:
        async with forward:
            try:
                return await anyio.to_thread.run_sync(
                    lambda: classify_batch(prepared, tensors, top_k=k, device=device)
                )
            except Exception as e:  # e.g. out of memory: answer, and keep serving
                raise ClientError(500, f"{type(e).__name__}: {e}") from e

    @app.get("/health", summary="Liveness, the model and its classes")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": shown, "labels": prepared.labels, "domain_guard": prepared.guard is not None}

    @app.post(
        "/predict",
        summary="Classify one image (multipart field `file`, or the raw bytes as the body)",
        openapi_extra={"requestBody": _PREDICT_BODY},
        responses={400: _ERROR, 408: _ERROR, 413: _ERROR, 500: _ERROR},
    )
    async def predict_one(request: Request, top_k: int | None = Query(None, ge=1)) -> dict[str, Any]:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=1) as form:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise ClientError(400, "multipart upload without a file field named 'file' "
                                           "(curl -F file=@lesion.jpg ...)")
                name, data = upload.filename or "file", await upload.read()
        else:
            name, data = "body", await request.body()
        x = await decode(data, name)
        return (await classify([x], k_of(top_k)))[0]

    @app.post(
        "/predict/batch",
        summary="Classify several images (multipart, field `files` repeated); one answer per file, in order",
        responses={408: _ERROR, 413: _ERROR, 500: _ERROR},
    )
    async def predict_batch(
        files: list[UploadFile] = File(..., description="The image files."), top_k: int | None = Query(None, ge=1)
    ) -> list[dict[str, Any]]:
        if len(files) > MAX_BATCH_FILES:
            raise ClientError(413, f"{len(files)} files in one batch; send at most {MAX_BATCH_FILES}")
        names = [f.filename or f"file {i}" for i, f in enumerate(files)]
        decoded: list[Any] = []
        for name, upload in zip(names, files, strict=True):
            try:
                decoded.append(await decode(await upload.read(), name))
            except ClientError as e:  # one bad file: an error entry, as predict gives, the others go on
                decoded.append(e)
        good = [x for x in decoded if not isinstance(x, ClientError)]
        answers = iter(await classify(good, k_of(top_k)) if good else [])
        return [
            {"filename": name, "error": str(x)} if isinstance(x, ClientError) else {"filename": name, **next(answers)}
            for name, x in zip(names, decoded, strict=True)
        ]

    return app


class BackgroundServer:
    """uvicorn serving ``app`` from a thread (tests, notebooks): ``url`` is ready when the constructor returns."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        import uvicorn

        self.socket = socket.create_server((host, port))
        bound = self.socket.getsockname()[1]
        self.url = f"http://{host}:{bound}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            self.thread.join(0.02)
        if not self.server.started:
            raise RuntimeError(f"the server on {self.url} did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def run(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
