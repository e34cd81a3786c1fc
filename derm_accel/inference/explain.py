"""Grad-CAM heatmaps: which part of the image drove a prediction.

A reviewer's first question about a skin-lesion classifier is whether it looks at the lesion or at a ruler, an
ink mark or the vignette. Grad-CAM (Selvaraju et al., 2017) answers it for convolutional timm models: the
gradient of the class score weights the channels of the last feature map (``forward_features``), and the
positive part of that weighted sum, upsampled, is overlaid on the image exactly as the model saw it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from derm_accel.core.device import default_device
from derm_accel.core.errors import InputError
from derm_accel.core.paths import fit_name
from derm_accel.data.images import expand_inputs
from derm_accel.data.transforms import decode_image
from derm_accel.inference.predict import prepared_model
from derm_accel.models.build import data_config


class NotConvolutionalError(InputError):
    """Grad-CAM needs a convolutional feature map, and this model has none."""


def grad_cam(
    model: torch.nn.Module, pixel_values: torch.Tensor, target: int | None = None
) -> tuple[np.ndarray, int, float]:
    """Heatmap in [0, 1] at input resolution for one image (1, C, H, W); returns (cam, class index, probability)."""
    if not hasattr(model, "forward_features"):  # an ensemble: the demo then shows no heatmap
        raise NotConvolutionalError(f"Grad-CAM explains one timm network, not a {type(model).__name__}.")
    with torch.no_grad():
        features = model.forward_features(pixel_values)
    if features.ndim != 4:
        raise NotConvolutionalError(
            f"Grad-CAM needs a convolutional feature map; {type(model).__name__} gives "
            f"{tuple(features.shape)}. Use a CNN such as efficientnet_b3 or densenet121."
        )
    # Gradients through the head only, w.r.t. the feature map: no parameter .grad is touched (the model is
    # shared with predict's cache) and frozen models work too.
    features = features.detach().requires_grad_()
    logits = model.forward_head(features)
    probabilities = logits.detach().float().softmax(-1)[0]
    index = int(probabilities.argmax()) if target is None else target
    (grad,) = torch.autograd.grad(logits[0, index], features)
    if getattr(model, "output_fmt", "NCHW") == "NHWC":  # Swin, MambaOut...: channels last in the map
        features, grad = features.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True)).detach().float()
    cam = torch.nn.functional.interpolate(cam, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[0, 0]
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam.cpu().numpy(), index, float(probabilities[index])


def as_seen(pixel_values: torch.Tensor, cfg: dict[str, Any]) -> Image.Image:
    """Undo the normalisation: the crop the model actually classified."""
    mean = torch.tensor(cfg["mean"]).view(-1, 1, 1)
    std = torch.tensor(cfg["std"]).view(-1, 1, 1)
    rgb = (pixel_values[0].detach().cpu().float() * std + mean).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The crop and the crop with the heatmap blended over it, side by side."""
    heat = Image.fromarray((colormaps["inferno"](cam)[..., :3] * 255).astype(np.uint8)).resize(image.size)
    blended = Image.blend(image, heat, alpha)
    pair = Image.new("RGB", (image.width * 2, image.height))
    pair.paste(image, (0, 0))
    pair.paste(blended, (image.width, 0))
    return pair


def explain(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    model: str | os.PathLike | torch.nn.Module,
    *,
    out_dir: str | os.PathLike,
    target: str | None = None,
    device: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Write ``<name>_gradcam.png`` per image into ``out_dir``; one result dict per image.

    ``target`` names the class to explain (default: the predicted one). Unreadable files get an ``error``
    entry, as in :func:`derm_accel.inference.predict`. ``progress`` shows a progress bar (on stderr, on a terminal).
    """
    from tqdm.auto import tqdm

    device = device or default_device()
    prepared = prepared_model(model, device, guard=False)
    net, labels, transform, min_size = prepared.net, prepared.labels, prepared.transform, prepared.min_size
    if hasattr(net, "member_logits"):
        raise InputError(
            f"{model} is an ensemble; Grad-CAM explains one network. Pass one member, e.g. RUN/fold_1/best."
        )
    if target is not None and target not in labels:
        raise ValueError(f"--target {target!r} is not one of the model's classes: {labels}")
    cfg = data_config(net)
    out_dir = Path(out_dir)
    written: set[Path] = set()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for path, error in tqdm(expand_inputs(images), desc="explain", unit="img", disable=not progress or None):
        if error is None:
            try:
                image = decode_image({"path": path}, min_size)
                image.load()
            except Exception as e:  # a bad file is a per-file error, never the end of the call
                error = f"could not read image: {type(e).__name__}: {e}"
        if error is not None:
            results.append({"path": path, "error": error})
            continue
        try:
            x = transform(image).unsqueeze(0).to(device)
            with torch.enable_grad():
                cam, index, probability = grad_cam(net, x, None if target is None else labels.index(target))
            heatmap = _heatmap_path(out_dir, Path(path).stem, written)
            overlay(as_seen(x, cfg), cam).save(heatmap)
        except NotConvolutionalError:
            raise  # the model's fault, the same for every file
        except Exception as e:  # e.g. an unwritable name: this file fails, the others go on
            results.append({"path": path, "error": f"could not explain: {type(e).__name__}: {e}"})
            continue
        results.append({"path": path, "label": labels[index], "probability": probability, "heatmap": str(heatmap)})
    return results


def _heatmap_path(out_dir: Path, stem: str, written: set[Path]) -> Path:
    """``<stem>_gradcam.png``, cut to the file-name limit (keeping names unique) and never one written before:
    the same file name in two class folders gets ``<stem>_2_gradcam.png``."""
    heatmap = out_dir / fit_name(stem, "_gradcam.png")
    for n in range(2, len(written) + 2):
        if heatmap not in written:
            break
        heatmap = out_dir / fit_name(f"{stem}_{n}", "_gradcam.png")
    written.add(heatmap)
    return heatmap
