"""The HTTP API: POST an image, get the same JSON as ``derm-accel predict --json``. FastAPI on uvicorn.

For a lab's internal tools and demos, not for clinical use. The app holds one prepared model (the same model,
preprocessing and domain guard as :func:`derm_accel.inference.predict`), so answers match the CLI. Bind to 127.0.0.1
unless a proxy sits in front.

    GET  /health          {"status": "ok", "model", "labels", "domain_guard"}
    POST /predict         one image: a multipart upload (field ``file``) or the raw file bytes as the body
    POST /predict/batch   several images, multipart (field ``files``, repeated): one answer per file, in order
    GET  /docs            the OpenAPI description (the schema itself is /openapi.json)

Answers and errors are pydantic models (:class:`Prediction`, :class:`FilePrediction`, :class:`FileError`,
:class:`ErrorBody`, :class:`Health`), so ``/openapi.json`` documents every field and clients can be generated
from it.

Bounds: a body over ``max_bytes`` gets 413 (before it is read when Content-Length says so); a body that has not
arrived whole ``body_timeout`` seconds after its request began gets 408, however it trickles in; a server run by
:func:`run` or :class:`BackgroundServer` holds at most ``max_connections`` connections (a request on one more
gets uvicorn's 503); at most ``DECODE_SLOTS`` images are decoded at once, each
within the decode budget of :func:`derm_accel.data.transforms.decode_image`, and their decoded pixels together
within ``DECODE_BUDGET_BYTES`` (a :class:`~derm_accel.data.decode.PixelBudget`: a large image waits for room,
503 after ``body_timeout``); forward passes take turns on the one model. Bad uploads get 4xx with a message,
failures 500; the server keeps serving either way.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

# FastAPI reads the endpoint signatures' annotations, so the names they use live at module level.
from fastapi import File, Query, Request, UploadFile
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from derm_accel.core.device import default_device
from derm_accel.core.errors import InputError
from derm_accel.core.paths import shareable_path
from derm_accel.core.version import __version__
from derm_accel.data.decode import PixelBudget, decoded_bytes
from derm_accel.data.transforms import decode_image, open_image
from derm_accel.inference.predict import classify_batch, prepared_model

MAX_UPLOAD_MB = 32.0  # a phone photo is a few MB; anything far larger is refused before it is read (serve, demo)
MAX_BYTES = int(MAX_UPLOAD_MB * 2**20)
MAX_BATCH_FILES = 64
MAX_CONNECTIONS = 64
DECODE_SLOTS = 4
DECODE_BUDGET_BYTES = 256 * 2**20  # decoded pixels held at once, over all requests (two of the largest images)
BODY_TIMEOUT_S = 30.0
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # e.g. PIL naming its <_io.BytesIO object at 0x..>


class ClassScore(BaseModel):
    label: str = Field(description="A class of the model.")
    probability: float = Field(ge=0, le=1, description="Its softmax probability (after the model's TTA).")


class Prediction(BaseModel):
    """One image's answer: the fields of `derm-accel predict --json` without `path`."""

    label: str = Field(description="The most probable class.")
    probability: float = Field(ge=0, le=1, description="Its probability.")
    top_k: list[ClassScore] = Field(description="The most probable classes, most probable first.")
    ood_score: float | None = Field(
        description="The domain guard's score: higher is less like the training images; null without a guard."
    )
    in_domain: bool | None = Field(
        description="Whether the image looks like the training images (ood_score at most the guard's threshold); "
        "null when the model has no domain guard."
    )
    abstain: bool = Field(description="True when the answer should not be trusted (out of domain, low confidence).")
    reason: str | None = Field(description="Why it abstains, or why the guard did not check; null otherwise.")


class FilePrediction(Prediction):
    filename: str = Field(description="The uploaded file's name.")


class FileError(BaseModel):
    filename: str = Field(description="The uploaded file's name.")
    error: str = Field(description="Why this file got no answer (e.g. not a readable image).")


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong and what to change.")


class Health(BaseModel):
    status: Literal["ok"]
    model: str = Field(description="The model served (a Hub id, or the folder's name).")
    labels: list[str] = Field(description="Its classes, in output order.")
    domain_guard: bool = Field(description="Whether answers carry a domain guard's verdict.")


def upload_limit_bytes(max_upload_mb: float) -> int:
    """``--max-upload-mb`` in bytes, refused unless a finite number of megabytes above 0 (serve and demo)."""
    if not isinstance(max_upload_mb, (int, float)) or not math.isfinite(max_upload_mb) or max_upload_mb <= 0:
        raise InputError(
            f"--max-upload-mb must be a finite number of megabytes above 0 (e.g. {MAX_UPLOAD_MB:g}), got "
            f"{max_upload_mb!r}"
        )
    return max(1, int(max_upload_mb * 2**20))


def check_max_connections(max_connections: int) -> int:
    if max_connections < 1:
        raise InputError(f"--max-connections must be at least 1 (e.g. {MAX_CONNECTIONS}), got {max_connections}")
    return max_connections

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
_ERROR = {"model": ErrorBody, "content": {"application/json": {"example": {"error": "not a readable image: ..."}}}}


class ClientError(HTTPException):
    """A request to refuse (4xx) or a failure (500): answered with ``status_code`` and ``{"error": detail}``.

    An HTTPException, so that FastAPI passes it through its body parsing unchanged."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, _OBJECT_REPR.sub("the upload", message))  # no Python object reprs for clients

    def __str__(self) -> str:
        return str(self.detail)


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed), 408 for a body not whole
    ``timeout`` seconds after the request began (one deadline for the whole body, not one per chunk)."""

    def __init__(self, app: Any, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, f"body of {int(declared):,} bytes is over the {self.max_bytes:,}-byte "
                                                "limit; send a smaller image (a phone photo is a few MB)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received = 0
        started = complete = False

        async def limited_receive() -> dict:
            nonlocal received, complete
            if complete:  # the body is in: later receives only wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise ClientError(408, f"the request body did not arrive whole within {self.timeout:g} s of the "
                                       "request; request dropped") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
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
                raise ClientError(400, f"{name}: not a readable image ({_reason(e)}); send a JPEG or PNG file") from e

    async def classify(tensors: list[Any], k: int) -> list[dict[str, Any]]:
        async with forward:
            try:
                return await anyio.to_thread.run_sync(
                    lambda: classify_batch(prepared, tensors, top_k=k, device=device)
                )
            except Exception as e:  # e.g. out of memory: answer, and keep serving
                raise ClientError(500, _reason(e)) from e

    @app.get("/health", summary="Liveness, the model and its classes")
    async def health() -> Health:
        return Health(status="ok", model=shown, labels=prepared.labels, domain_guard=prepared.guard is not None)

    @app.post(
        "/predict",
        summary="Classify one image (multipart field `file`, or the raw bytes as the body)",
        openapi_extra={"requestBody": _PREDICT_BODY},
        responses={400: _ERROR, 408: _ERROR, 413: _ERROR, 422: _ERROR, 500: _ERROR, 503: _ERROR},
    )
    async def predict_one(request: Request, top_k: int | None = Query(None, ge=1)) -> Prediction:
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
        return Prediction(**(await classify([x], k_of(top_k)))[0])

    @app.post(
        "/predict/batch",
        summary="Classify several images (multipart, field `files` repeated); one answer per file, in order",
        responses={408: _ERROR, 413: _ERROR, 422: _ERROR, 500: _ERROR, 503: _ERROR},
    )
    async def predict_batch(
        files: list[UploadFile] = File(..., description="The image files."), top_k: int | None = Query(None, ge=1)
    ) -> list[FilePrediction | FileError]:
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
            FileError(filename=name, error=str(x)) if isinstance(x, ClientError)
            else FilePrediction(filename=name, **next(answers))
            for name, x in zip(names, decoded, strict=True)
        ]

    return app


def _reason(error: Exception) -> str:
    """An exception as a client may read it: its kind and message, without Python object reprs."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):  # its message names the file object by repr
        return "UnidentifiedImageError: not a JPEG, PNG or other image format Pillow reads"
    return _OBJECT_REPR.sub("the upload", f"{type(error).__name__}: {error}")


def _uvicorn_config(app: Any, max_connections: int, **config: Any) -> Any:
    import uvicorn

    check_max_connections(max_connections)
    # uvicorn answers 503 to a request when its open connections, that one's own included, reach the limit.
    return uvicorn.Config(app, limit_concurrency=max_connections + 1, **config)


class BackgroundServer:
    """uvicorn serving ``app`` from a thread (tests, notebooks): ``url`` is ready when the constructor returns."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = MAX_CONNECTIONS,
        **config: Any,
    ) -> None:
        import uvicorn

        self.socket = socket.create_server((host, port))
        bound = self.socket.getsockname()[1]
        self.url = f"http://{host}:{bound}"
        self.server = uvicorn.Server(_uvicorn_config(app, max_connections, log_level="warning", **config))
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


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, *, max_connections: int = MAX_CONNECTIONS) -> None:
    """Serve until interrupted, with at most ``max_connections`` open connections."""
    import uvicorn

    uvicorn.Server(_uvicorn_config(app, max_connections, host=host, port=port, log_level="info")).run()
