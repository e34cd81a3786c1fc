"""Train and eval transforms, and the batch transform that feeds an Arrow split to a DataLoader.

Preprocessing always follows the model's pretrained config (input size, crop_pct, interpolation, mean, std),
so the same numbers hold in training, evaluation, prediction and for anyone loading the model with timm.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from torchvision.transforms import v2

from derm_accel.data.decode import MAX_PIXELS, to_rgb

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


@dataclass
class AugmentConfig:
    """Training augmentation. A skin lesion has no up or down, so both flips are on by default."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; hue gets a quarter of it


_INTERPOLATION = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


def train_transform(
    data_cfg: dict[str, Any], aug: AugmentConfig | None = None, *, normalize: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + flips (+ optional rotation and colour jitter), then the model's normalisation.

    ``normalize=False`` stops at uint8 tensors: the training loop then normalises whole batches on its device
    (:class:`BatchNormalize`), so DataLoader workers do less and ship 4x fewer bytes (docs/benchmarks.md).
    """
    aug = aug or AugmentConfig()
    size = data_cfg["input_size"][-2:]
    interpolation = _INTERPOLATION.get(data_cfg.get("interpolation", "bicubic"), v2.InterpolationMode.BICUBIC)
    steps: list[Any] = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio, interpolation=interpolation, antialias=True),
    ]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if aug.color_jitter > 0:
        c = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(0.5, c / 4)))
    if normalize:
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(data_cfg["mean"]), std=list(data_cfg["std"])),
        ]
    return v2.Compose(steps)


class BatchNormalize:
    """uint8 NCHW batches -> float, normalised with the model's mean/std, on whatever device the batch is on."""

    def __init__(self, data_cfg: dict[str, Any]):
        self.mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            return batch  # already normalised (e.g. by a float transform)
        if self.mean.device != batch.device:
            self.mean, self.std = self.mean.to(batch.device), self.std.to(batch.device)
        return (batch.float() - self.mean) / self.std


def eval_transform(data_cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to input_size / crop_pct, centre crop, normalise: timm's own eval transform."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: data_cfg[k] for k in keys if k in data_cfg}, is_training=False)


def decode_size(input_size: int | tuple[int, ...], crop_fraction: float | None) -> int:
    """The shorter side a JPEG must keep in draft-mode decoding so a crop still has ``input_size`` pixels."""
    side = max(input_size) if isinstance(input_size, (tuple, list)) else input_size
    return math.ceil(side / (crop_fraction or 1.0))


def decode_image(value: Any, min_size: int | None = None) -> Image.Image:
    """Decode an Arrow image cell (PIL image, or dict with bytes/path) to upright 8-bit RGB.

    Files and bytes get the same treatment as in `convert` (EXIF orientation applied, alpha over white, 16-bit
    scaled), so a photo predicted from a folder looks like the training images did. With ``min_size`` a JPEG
    is decoded at the smallest DCT scale that still keeps its shorter side at least
    ``min_size`` (Pillow's draft mode), which is several times faster on large sources.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        data = value.get("bytes") if isinstance(value, dict) else None
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(value["path"])
        if min_size and image.format == "JPEG":
            w, h = image.size
            scale = min_size / min(w, h)
            if scale < 1:
                image.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
        if image.width * image.height > MAX_PIXELS:  # from the header, before a byte is decoded
            raise ValueError(
                f"{image.width}x{image.height} pixels is over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
            )
        ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def batch_transform(
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    min_size: int | None = None,
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """A ``Dataset.with_transform`` function: images -> ``pixel_values``, label -> ``labels``.

    Use on a split whose image column was cast to ``Image(decode=False)`` so that decoding (with draft mode)
    happens here, in the DataLoader workers.
    """

    def apply(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            "pixel_values": [transform(decode_image(v, min_size)) for v in batch[IMAGE_COLUMN]]
        }
        if LABEL_COLUMN in batch:
            out["labels"] = list(batch[LABEL_COLUMN])
        return out

    return apply


def with_transform(
    dataset: Any, transform: Callable[[Image.Image], torch.Tensor], *, min_size: int | None = None
) -> Any:
    """Return ``dataset`` decoding lazily through ``transform`` (images are never decoded twice)."""
    from datasets import Image as ImageFeature

    if IMAGE_COLUMN in dataset.features and getattr(dataset.features[IMAGE_COLUMN], "decode", False):
        dataset = dataset.cast_column(IMAGE_COLUMN, ImageFeature(decode=False))
    return dataset.with_transform(batch_transform(transform, min_size=min_size))
