"""Colour constancy: a preprocessing step that removes an image's colour cast before anything else sees it.

Dermatoscopes differ in illumination and white balance, and a model learns those casts as readily as the lesion.
Shades of Gray (Finlayson & Trezzi 2004; for dermoscopy Barata et al., IEEE JBHI 2015; the colour step of
top ISIC 2018-2019 solutions) estimates the illuminant of each channel as the Minkowski ``power``-norm of
its pixels (power 1 is Gray World, infinity is max-RGB; 6 is the usual choice) and scales the channels so
that this illuminant becomes neutral gray.

It is part of a model: a recipe's ``data.color_constancy`` is recorded in the exported ``config.json``
(``derm_accel.color_constancy``), and training, evaluation, prediction, serving, the demo, the Space and the
ONNX export's ``preprocessing.json`` all apply it to the whole decoded image before resizing. Plain timm users
apply :func:`shades_of_gray` (or the numpy lines in the model card) before timm's transform.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from derm_accel.core.errors import InputError

SHADES_OF_GRAY = "shades_of_gray"
METHODS = (SHADES_OF_GRAY,)
DEFAULT_POWER = 6.0


def color_constancy_spec(method: str | None, power: float = DEFAULT_POWER, *, where: str = "color_constancy"):
    """``{"method": ..., "power": ...}`` as recorded in config.json, or None for none; bad values name ``where``."""
    if method is None or method == "none":
        return None
    if method not in METHODS:
        raise InputError(f"{where}: unknown colour constancy {method!r}; choose one of {[*METHODS, None]}.")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 1 <= float(power) <= 64:
        raise InputError(f"{where}: power must be a number from 1 (Gray World) to 64 (close to max-RGB), got {power!r}")
    return {"method": method, "power": float(power)}


def shades_of_gray(images: torch.Tensor, power: float = DEFAULT_POWER) -> torch.Tensor:
    """Shades of Gray on uint8 images ``(..., 3, H, W)`` (one image or a batch), returned as uint8.

    Per image and channel the illuminant ``e_c = mean((x_c / 255) ** p) ** (1/p)`` is normalised to unit length
    and the channel is multiplied by ``1 / (e_c * sqrt(3))``, so a neutral illuminant leaves the image as it
    is; results are clipped to 0-255 and rounded. Vectorised over pixels: the means come from a histogram of
    each channel (uint8 has 256 levels, so ``mean(x ** p)`` is the histogram times a 256-entry table,
    in float64), which costs a fraction of raising every pixel to the power (docs/benchmarks.md).
    """
    if images.dtype != torch.uint8 or images.ndim < 3 or images.shape[-3] != 3:
        shape = tuple(images.shape)
        raise ValueError(f"shades_of_gray takes uint8 RGB images (..., 3, H, W), got {images.dtype} {shape}")
    *lead, _, height, width = images.shape
    planes = images.reshape(-1, height * width)  # one row per channel of each image
    counts = torch.stack([torch.bincount(plane, minlength=256) for plane in planes])  # uint8 in, no copy
    levels = torch.arange(256, dtype=torch.float64, device=images.device).div_(255.0).pow_(power)
    means = counts.view(-1, 256).double() @ levels / max(height * width, 1)
    illuminant = means.pow_(1.0 / power).view(-1, 3)
    illuminant = illuminant / torch.linalg.vector_norm(illuminant, dim=-1, keepdim=True).clamp_min(1e-12)
    gain = (1.0 / (illuminant.clamp_min(1e-12) * math.sqrt(3.0))).float().view(*lead, 3, 1, 1)
    return (images.float() * gain).clamp_(0.0, 255.0).round_().to(torch.uint8)


class ColorConstancy:
    """The preprocessing step: uint8 CHW tensor -> uint8 tensor, PIL image -> PIL image (same pixels)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        checked = color_constancy_spec(spec.get("method"), spec.get("power", DEFAULT_POWER))
        assert checked is not None
        self.method, self.power = checked["method"], checked["power"]

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor | Image.Image:
        if isinstance(image, torch.Tensor):
            return shades_of_gray(image, self.power)
        x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        return Image.fromarray(shades_of_gray(x, self.power).permute(1, 2, 0).numpy())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method}, power={self.power:g})"


def color_constancy_step(data_cfg: dict[str, Any]) -> ColorConstancy | None:
    """The step a model's data config declares (``data_cfg["color_constancy"]``), or None."""
    spec = data_cfg.get("color_constancy")
    if not spec:
        return None
    if not isinstance(spec, dict):
        raise InputError(
            f"config.json derm_accel.color_constancy must be a mapping like {{'method': '{SHADES_OF_GRAY}', "
            f"'power': 6}}, got {spec!r}"
        )
    method = spec.get("method")
    if method not in METHODS:
        raise InputError(
            f"config.json derm_accel.color_constancy: method {method!r} is unknown to this derm-accel "
            f"(it knows {list(METHODS)}); upgrade derm-accel to use this model."
        )
    return ColorConstancy(spec)


def numpy_snippet(spec: dict[str, Any], image: str = "image") -> str:
    """numpy lines (numpy imported as ``np``, PIL's ``Image``) that apply ``spec`` to the RGB PIL image named
    ``image``, for people who load the model with timm alone: the same pixels as :func:`shades_of_gray`
    within one level of 255 (float rounding)."""
    p = f"{float(spec['power']):g}"
    return (
        f"x = np.asarray({image}, dtype=np.float32) / 255  # Shades of Gray colour constancy, power {p}\n"
        f"e = np.power(np.power(x, {p}).mean(axis=(0, 1)), 1 / {p})\n"
        "e = np.maximum(e / max(np.linalg.norm(e), 1e-6), 1e-6)\n"
        f"{image} = Image.fromarray(np.clip(np.rint(x / (e * np.sqrt(3)) * 255), 0, 255).astype(np.uint8))\n"
    )
