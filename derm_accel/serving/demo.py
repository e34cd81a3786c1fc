"""A Gradio page on a model: upload (or webcam), top-k classes, the Grad-CAM overlay and the domain guard's verdict.

The page uses the same prepared model as ``predict`` (one decode, one transform, one guard), so it shows what
``derm-accel predict`` prints. The not-a-medical-device notice and the model card's summary are always on the
page; an image the domain guard finds unlike the training images gets that message instead of a diagnosis.
Needs the ``demo`` extra (``pip install "derm-accel[demo]"``).

Uploads are patient photos. Each demo keeps Gradio's files (uploads, the Grad-CAM images it shows, cached
examples) in a folder of its own, not Gradio's shared one: an upload is deleted once its answer is sent, the
Grad-CAM images after an hour, and the whole folder when the demo exits (also on SIGTERM). Uploads over
``--max-upload-mb`` (serve's default) are refused before they are stored, and the folder's absolute path never
reaches the browser: clients see it as ``demo-files/`` (:class:`MaskedPaths`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from derm_accel.core.device import default_device
from derm_accel.core.paths import shareable_path
from derm_accel.data.images import IMAGE_EXTENSIONS
from derm_accel.data.transforms import decode_image
from derm_accel.inference.explain import NotConvolutionalError, as_seen, grad_cam, overlay
from derm_accel.inference.predict import classify_batch, prepared_model
from derm_accel.models.build import data_config
from derm_accel.models.load import split_hub_id
from derm_accel.serving.serve import MAX_UPLOAD_MB, upload_limit_bytes

NOTICE = (
    "**Research use only. Not a medical device, not a diagnosis.** This model has not been clinically validated. "
    "Do not use it to decide on treatment; anyone worried about a skin lesion should see a doctor."
)
OUT_OF_DOMAIN = (
    "### This does not look like the images the model was trained on\n\nNo diagnosis is shown: the model's answer "
    "for this image would not be meaningful. Upload a dermoscopic photo of a single skin lesion."
)
EXAMPLES_DIR = "examples"
SUMMARY_CHARS = 1500
FILES_ALIAS = "demo-files"  # what clients see instead of the demo's file folder
OUTPUTS_MAX_AGE_S = 3600  # Grad-CAM images (crops of the upload) are deleted this long after they were made
_TEXT_TYPES = (b"application/json", b"text/event-stream", b"text/html", b"text/plain")


def load_gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise ImportError(
            'the demo needs Gradio: pip install "derm-accel[demo]" (or pip install gradio)'
        ) from None
    return gradio


def describe(result: dict[str, Any]) -> tuple[dict[str, float], str]:
    """What the page shows for one ``classify_batch`` result: (class -> probability for gr.Label, verdict text).

    Out of domain: no classes at all, and the message saying why. Abstaining: the classes, under the reason.
    """
    if result.get("in_domain") is False:
        return {}, f"{OUT_OF_DOMAIN}\n\n<small>{result.get('reason') or ''}</small>"
    scores = {t["label"]: t["probability"] for t in result["top_k"]}
    top = f"Top class: **{result['label']}** (probability {result['probability']:.4f})"
    if result.get("abstain"):
        return scores, f"### The model abstains\n\n{result.get('reason')}\n\n{top}: treat it as unreliable."
    if result.get("in_domain") is None:
        guard = f"Domain guard: not checked ({result.get('reason') or 'this model has no domain guard'})."
    else:
        guard = f"Domain guard: looks like the training images (ood_score {result['ood_score']:.1f})."
    return scores, f"{top}\n\n{guard}"


def card_summary(model: str) -> str:
    """The model card's opening (its README.md without metadata, up to the second section), else a summary
    from config.json and training_info.json. Local folders only read local files; Hub ids read the cache."""
    text = _card_text(model)
    if text:
        summary = "\n## ".join(text.split("\n## ")[:2])  # the title, the opening and the first section
        return summary[:SUMMARY_CHARS].rstrip() + (" ..." if len(summary) > SUMMARY_CHARS else "")
    config, info = _model_json(model, "config.json"), _model_json(model, "training_info.json")
    labels = config.get("label_names") or []
    shown = shareable_path(model) if Path(model).is_dir() else model  # never the server's directory layout
    lines = [f"**Model** `{shown}`: {config.get('architecture', 'a timm model')}, {len(labels)} classes"]
    if labels:
        lines.append("Classes: " + ", ".join(labels))
    if info.get("best_val_macro_f1") is not None:
        lines.append(f"Validation macro-F1 {info['best_val_macro_f1']:.3f} (epoch {info.get('best_epoch', '?')})")
    return "\n\n".join(lines)


def _card_text(model: str) -> str:
    from huggingface_hub import ModelCard

    folder = Path(model)
    try:
        if folder.is_dir():
            return ModelCard.load(folder / "README.md").text.strip() if (folder / "README.md").is_file() else ""
        return ModelCard.load(model.removeprefix("hf-hub:").split("@")[0]).text.strip()
    except Exception:  # no card (or none reachable): fall back to the config
        return ""


def _model_json(model: str, name: str) -> dict[str, Any]:
    folder = Path(model)
    try:
        if folder.is_dir():
            path = folder / name
        else:
            from huggingface_hub import hf_hub_download

            repo_id, revision = split_hub_id(model)
            path = Path(hf_hub_download(repo_id, name, revision=revision))
        return json.loads(path.read_text()) if path.is_file() else {}
    except Exception:  # a summary is best effort; the model itself loaded, or build_demo would have failed
        return {}


def example_images(folder: str | Path | None) -> list[str]:
    """Image files in ``folder`` (sorted), or none when there is no such folder."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


class DemoModel:
    """The prepared model and what one upload turns into: (classes, verdict, Grad-CAM overlay, raw answer)."""

    def __init__(self, model: str, *, top_k: int = 3, device: str | None = None) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.device = device or default_device()
        self.prepared = prepared_model(model, self.device)
        self.top_k = min(top_k, len(self.prepared.labels))
        self.lock = threading.Lock()  # one model, one device

    def classify(self, path: str) -> tuple[dict[str, Any], Any]:
        """The same answer as ``predict`` for the file at ``path`` (and the input tensor)."""
        image = decode_image({"path": path}, self.prepared.min_size)  # refuses decompression bombs
        image.load()
        x = self.prepared.transform(image)
        with self.lock:
            return classify_batch(self.prepared, [x], top_k=self.top_k, device=self.device)[0], x

    def heatmap(self, x: Any, label: str) -> Any:
        """The crop the model saw beside the Grad-CAM overlay for ``label``; None for non-convolutional models."""
        import torch

        pixels = x.unsqueeze(0).to(self.device)
        try:
            with self.lock, torch.enable_grad():
                cam, _, _ = grad_cam(self.prepared.net, pixels, self.prepared.labels.index(label))
        except NotConvolutionalError:
            return None
        return overlay(as_seen(pixels, data_config(self.prepared.net)), cam)

    def __call__(self, path: str | None) -> tuple[dict[str, float] | None, str, Any, dict[str, Any] | None]:
        if not path:
            return None, "Upload an image (or take one with the webcam).", None, None
        try:
            result, x = self.classify(path)
        except Exception as e:  # a bad upload is the user's to fix; the page keeps working
            message = f"Could not read this image ({type(e).__name__}: {e}). Upload a JPEG or PNG."
            raise load_gradio().Error(message) from e
        scores, verdict = describe(result)
        heat = self.heatmap(x, result["label"]) if scores else None
        return scores, verdict, heat, result


@contextlib.contextmanager
def _gradio_files_in(folder: Path | None) -> Iterator[None]:
    """Gradio puts its files in GRADIO_TEMP_DIR, read when components and the server app are made."""
    if folder is None:
        yield
        return
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


def forget_upload(path: str | None, folder: Path, keep: set[str]) -> None:
    """Delete an upload in ``folder`` once it is answered (never an example, never a file outside it)."""
    if not path:
        return
    file = Path(path).resolve()
    if folder not in file.parents or str(file) in {str(Path(k).resolve()) for k in keep}:
        return
    file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # Gradio keeps each upload in a folder of its own, named by its hash
        file.parent.rmdir()


def _answering_then_forgetting(run: DemoModel, folder: Path, image: Any) -> Callable[[str | None], Any]:
    def answer(path: str | None) -> tuple[dict[str, float] | None, str, Any, dict[str, Any] | None]:
        try:
            return run(path)
        finally:
            forget_upload(path, folder, getattr(image, "keep_in_cache", set()))

    return answer


def build_demo(
    model: str, *, top_k: int = 3, device: str | None = None, examples: str | Path | None = None
) -> Any:
    """The Gradio Blocks app for ``model`` (a model folder or Hub id ``ORG/NAME``), its files in a folder of its
    own (``demo.derm_accel_files``; removed at exit).

    ``examples``: a folder of example images; by default the model folder's ``examples/`` when it has one.
    """
    model = str(model)
    run = DemoModel(model, top_k=top_k, device=device)
    files = Path(tempfile.mkdtemp(prefix="derm-accel-demo-")).resolve()
    atexit.register(shutil.rmtree, files, ignore_errors=True)
    with _gradio_files_in(files):
        demo = _blocks(run, model, examples, files)
    demo.derm_accel_files = files
    return demo


def _blocks(run: DemoModel, model: str, examples: str | Path | None, files: Path) -> Any:
    gr = load_gradio()
    if examples is None and Path(model).is_dir():
        examples = Path(model) / EXAMPLES_DIR
    shown = example_images(examples)
    with gr.Blocks(title=f"derm-accel: {Path(model).name if Path(model).is_dir() else model}",
                   analytics_enabled=False, delete_cache=(OUTPUTS_MAX_AGE_S // 4, OUTPUTS_MAX_AGE_S)) as demo:
        gr.Markdown(f"# Skin lesion classifier\n\n{NOTICE}", elem_id="notice")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "webcam"],
                                 label="Skin lesion photo", elem_id="upload")
                if shown:
                    gr.Examples(shown, inputs=image, label="Examples")
            with gr.Column():
                classes = gr.Label(num_top_classes=run.top_k, label="Top classes", elem_id="classes")
                verdict = gr.Markdown(elem_id="verdict")
                heat = gr.Image(type="pil", label="Grad-CAM: the crop the model saw, and what drove its answer",
                                interactive=False, height=320, elem_id="gradcam")
        with gr.Accordion("Answer as JSON (what `derm-accel predict --json` prints)", open=False):
            raw = gr.JSON(elem_id="raw")
        with gr.Accordion("Model card", open=True):
            gr.Markdown(card_summary(model), elem_id="card")
        outputs = [classes, verdict, heat, raw]
        # upload, webcam, example, clear; the upload is deleted once answered
        image.change(_answering_then_forgetting(run, files, image), inputs=image, outputs=outputs, api_name="classify")
    return demo


def theme() -> Any:
    """Gradio's default look with system fonts: the page loads nothing from font CDNs (air-gapped labs)."""
    gr = load_gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(demo: Any, *, max_upload_mb: float = MAX_UPLOAD_MB, **kwargs: Any) -> Any:
    """``demo.launch`` with the system-font theme, uploads up to ``max_upload_mb`` MB, and the demo's files kept
    in its own folder, masked from clients and removed when the server stops (SIGTERM included). kwargs:
    server_name, server_port, share, ..."""
    from starlette.middleware import Middleware

    max_file_size = upload_limit_bytes(max_upload_mb)
    files = getattr(demo, "derm_accel_files", None)
    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    if files is not None:
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                    Middleware(MaskedPaths, root=str(files), alias=FILES_ALIAS)]
    blocking = not kwargs.get("prevent_thread_lock", False)
    with _sigterm_as_interrupt(blocking), _gradio_files_in(files):
        try:
            return demo.launch(theme=theme(), max_file_size=max_file_size, app_kwargs=app_kwargs, **kwargs)
        finally:
            if blocking and files is not None:  # the server has stopped: nothing of its uploads stays
                shutil.rmtree(files, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt(enabled: bool) -> Iterator[None]:
    """SIGTERM (what `kill`, systemd and containers send) stops Gradio's server as Ctrl-C does, so that the
    cleanup runs; by default Python would end at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class MaskedPaths:
    """ASGI middleware: the demo's file folder ``root`` is ``alias`` to clients. Gradio names uploads and
    outputs by their server paths (FileData ``path`` and ``url``); in the text answers (JSON, event streams,
    HTML) ``root`` becomes ``alias``, and in requests (file URLs, JSON bodies) ``alias`` becomes ``root`` again
    before Gradio sees them. Image bytes pass untouched."""

    def __init__(self, app: Any, root: str, alias: str) -> None:
        self.app = app
        self.root, self.alias = root.rstrip("/").encode(), alias.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = self._unmask_path(scope)
        if dict(scope["headers"]).get(b"content-type", b"").startswith(b"application/json"):
            body = await _whole_body(receive)
            body = body.replace(b'"' + self.alias + b"/", b'"' + self.root + b"/")
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            receive = _replayed(body, receive)
        await self.app(scope, receive, self._masking(send))

    def _unmask_path(self, scope: dict) -> dict:
        masked = b"file=" + self.alias + b"/"
        raw = scope.get("raw_path") or scope["path"].encode()
        if masked not in raw:
            return scope
        raw = raw.replace(masked, b"file=" + self.root + b"/")
        path = scope["path"].replace(masked.decode(), f"file={self.root.decode()}/")
        return {**scope, "raw_path": raw, "path": path}

    def _masking(self, send: Any) -> Any:
        start: dict | None = None
        parts: list[bytes] = []

        async def masked_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(_TEXT_TYPES):
                    return await send(message)
                start = message  # held until the body is known: its length changes
                if b"content-length" not in headers:  # a stream: masked chunk by chunk
                    await send({**start, "headers": list(start["headers"])})
                    start = {"streaming": True}
                return None
            if message["type"] != "http.response.body" or start is None:
                return await send(message)
            if start.get("streaming"):
                return await send({**message, "body": self._mask(message.get("body", b""))})
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            body = self._mask(b"".join(parts))
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return None

        return masked_send

    def _mask(self, body: bytes) -> bytes:
        return body.replace(self.root + b"/", self.alias + b"/").replace(self.root, self.alias)


async def _whole_body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return b"".join(parts)


def _replayed(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
