"""A Gradio page on a model: upload (or webcam), top-k classes, the Grad-CAM overlay and the domain guard's verdict.

The page uses the same prepared model as ``predict`` (one decode, one transform, one guard), so it shows what
``derm-accel predict`` prints. The not-a-medical-device notice and the model card's summary are always on the
page; an image the domain guard finds unlike the training images gets that message instead of a diagnosis.
Needs the ``demo`` extra (``pip install "derm-accel[demo]"``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from derm_accel.core.device import default_device
from derm_accel.data.images import IMAGE_EXTENSIONS
from derm_accel.data.transforms import decode_image
from derm_accel.inference.explain import NotConvolutionalError, as_seen, grad_cam, overlay
from derm_accel.inference.predict import classify_batch, prepared_model
from derm_accel.models.build import data_config
from derm_accel.models.load import split_hub_id

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
    lines = [f"**Model** `{model}`: {config.get('architecture', 'a timm model')}, {len(labels)} classes"]
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


def build_demo(
    model: str, *, top_k: int = 3, device: str | None = None, examples: str | Path | None = None
) -> Any:
    """The Gradio Blocks app for ``model`` (a model folder or Hub id ``ORG/NAME``).

    ``examples``: a folder of example images; by default the model folder's ``examples/`` when it has one.
    """
    gr = load_gradio()
    model = str(model)
    run = DemoModel(model, top_k=top_k, device=device)
    if examples is None and Path(model).is_dir():
        examples = Path(model) / EXAMPLES_DIR
    shown = example_images(examples)
    with gr.Blocks(title=f"derm-accel: {Path(model).name if Path(model).is_dir() else model}",
                   analytics_enabled=False) as demo:
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
        image.change(run, inputs=image, outputs=outputs)  # upload, webcam, example, clear
    return demo


def theme() -> Any:
    """Gradio's default look with system fonts: the page loads nothing from font CDNs (air-gapped labs)."""
    gr = load_gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(demo: Any, **kwargs: Any) -> Any:
    """``demo.launch`` with the system-font theme (kwargs: server_name, server_port, share, ...)."""
    return demo.launch(theme=theme(), **kwargs)
