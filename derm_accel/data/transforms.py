"""Train and eval transforms, and the batch transform that feeds an Arrow split to a DataLoader.

Preprocessing always follows the model's pretrained config (input size, crop_pct, interpolation, mean, std),
so the same numbers hold in training, evaluation, prediction and for anyone loading the model with timm. A
model's colour constancy (``data_cfg["color_constancy"]``, :mod:`derm_accel.data.color`) is the first step of
every transform here, on the whole decoded image.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import DEFAULT_CROP_PCT, create_transform
from torchvision import transforms as transforms_v1
from torchvision.transforms import RandomResizedCrop as _RandomResizedCropParams
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from derm_accel.data.color import color_constancy_step
from derm_accel.data.decode import MAX_DECODE_PIXELS, MAX_PIXELS, open_bounded, to_rgb

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
    # torchvision's automatic augmentation on the uint8 crop: trivialaugment (TrivialAugmentWide) or
    # randaugment (RandAugment, 2 ops at magnitude 9); null for none.
    auto_augment: str | None = None
    # Batch mixing with timm's Mixup (alpha of the Beta draw; 0 disables): mixup blends two images and their
    # labels, cutmix pastes a patch of one into another; with both, each batch gets one of them at random.
    mixup: float = 0.0
    cutmix: float = 0.0


AUTO_AUGMENT = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}

_INTERPOLATION = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


class RandomResizedCropFlip:
    """RandomResizedCrop, then horizontal and vertical flips, on one uint8 CHW tensor (or PIL image).

    The same augmentation as torchvision's transforms in a row, done as plain functional calls (~15% less
    time per image than a ``v2.Compose`` of the three, steps table in docs/benchmarks.md); on the
    channels-last strided tensors :func:`decode_tensor` returns, the resize takes torch's fast uint8 path.
    Random draws come from torch's global RNG, so per-sample seeding makes it reproducible.
    """

    def __init__(
        self,
        size: tuple[int, int],
        *,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip: float,
        vflip: float,
        interpolation: v2.InterpolationMode,
    ) -> None:
        self.size, self.scale, self.ratio = list(size), scale, ratio
        self.hflip, self.vflip, self.interpolation = hflip, vflip, interpolation
        self._flip_p = torch.tensor([hflip, vflip])

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        x = image if isinstance(image, torch.Tensor) else pil_to_uint8(image)
        top, left, height, width = _RandomResizedCropParams.get_params(x, list(self.scale), list(self.ratio))
        x = F.resized_crop(x, top, left, height, width, self.size, interpolation=self.interpolation, antialias=True)
        flip_h, flip_v = (torch.rand(2) < self._flip_p).tolist()
        dims = [d for d, flip in ((-1, flip_h), (-2, flip_v)) if flip]
        return x.flip(dims) if dims else x

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, vflip={self.vflip}, interpolation={self.interpolation.value})"
        )


def train_transform(
    data_cfg: dict[str, Any], aug: AugmentConfig | None = None, *, normalize: bool = True
) -> Callable[[torch.Tensor | Image.Image], torch.Tensor]:
    """Colour constancy (if the model has one), RandomResizedCrop + flips (+ optional rotation and colour
    jitter), then the model's normalisation.

    Takes uint8 CHW tensors (what :func:`decode_tensor` gives, the fast path) or PIL images.
    ``normalize=False`` stops at uint8 tensors: the training loop then normalises whole batches on its device
    (:class:`BatchNormalize`), so DataLoader workers do less and ship 4x fewer bytes (docs/benchmarks.md).
    """
    aug = aug or AugmentConfig()
    size = data_cfg["input_size"][-2:]
    interpolation = _INTERPOLATION.get(data_cfg.get("interpolation", "bicubic"), v2.InterpolationMode.BICUBIC)
    steps: list[Any] = [
        RandomResizedCropFlip(
            size, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip, vflip=aug.vflip, interpolation=interpolation
        )
    ]
    if aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if aug.color_jitter > 0:
        c = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(0.5, c / 4)))
    if aug.auto_augment:
        steps.append(AUTO_AUGMENT[aug.auto_augment](interpolation=v2.InterpolationMode.BILINEAR))
    if normalize:
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(data_cfg["mean"]), std=list(data_cfg["std"])),
        ]
    return _compose(color_constancy_step(data_cfg), steps)


def _compose(first: Callable[[Any], Any] | None, steps: list[Any]) -> Any:
    """``steps`` run after ``first`` (the colour constancy step, or None): one callable."""
    steps = ([first] if first is not None else []) + steps
    return steps[0] if len(steps) == 1 else v2.Compose(steps)


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
    """Colour constancy (if the model has one), then timm's own eval transform: resize to input_size /
    crop_pct, centre crop, normalise."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    timm_eval = create_transform(**{k: data_cfg[k] for k in keys if k in data_cfg}, is_training=False)
    step = color_constancy_step(data_cfg)
    return timm_eval if step is None else transforms_v1.Compose([step, *timm_eval.transforms])


class ResizeCenterCrop:
    """timm's eval preprocessing (shorter side to ``resize``, centre crop to ``size``) on a uint8 CHW tensor.

    Antialiased resizing in torch lands within 2 of 255 levels of timm's Pillow transform (mean difference
    ~0.003 levels) and costs less CPU per image (the steps table in docs/benchmarks.md has the figures), so
    evaluation and validation from Arrow feed a GPU with fewer cores. Normalisation is left to the device
    (:class:`BatchNormalize`).
    """

    def __init__(self, size: int, resize: int, interpolation: v2.InterpolationMode) -> None:
        self.size, self.resize, self.interpolation = size, resize, interpolation

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        x = image if isinstance(image, torch.Tensor) else pil_to_uint8(image)
        x = F.resize(x, [self.resize], interpolation=self.interpolation, antialias=True)
        return F.center_crop(x, [self.size, self.size])

    def __repr__(self) -> str:
        mode = self.interpolation.value
        return f"{type(self).__name__}(size={self.size}, resize={self.resize}, interpolation={mode})"


def eval_input(data_cfg: dict[str, Any]) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any, int | None], Any]]:
    """``(transform, decode)`` for batch evaluation from Arrow, for ``with_transform``/``eval_loader``.

    Where timm's eval transform is a plain resize + centre crop of a square input (every timm model's
    default), images are decoded to tensors and come out uint8: normalise the batch on the device with
    :class:`BatchNormalize`, which passes float batches through unchanged. Anything else (``crop_mode``
    squash or border, a non-square input, an interpolation torch lacks) keeps timm's own Pillow transform.
    """
    height, width = data_cfg["input_size"][-2:]
    interpolation = _INTERPOLATION.get(data_cfg.get("interpolation", "bicubic"))
    if height == width and data_cfg.get("crop_mode", "center") == "center" and interpolation is not None:
        resize = math.floor(height / (data_cfg.get("crop_pct") or DEFAULT_CROP_PCT))  # timm's scale_size
        crop = ResizeCenterCrop(height, resize, interpolation)
        return _compose(color_constancy_step(data_cfg), [crop]), decode_tensor
    return eval_transform(data_cfg), decode_image


def decode_size(input_size: int | tuple[int, ...], crop_fraction: float | None) -> int:
    """The shorter side a JPEG must keep in draft-mode decoding so a crop still has ``input_size`` pixels."""
    side = max(input_size) if isinstance(input_size, (tuple, list)) else input_size
    return math.ceil(side / (crop_fraction or 1.0))


def train_decode_size(img_size: int, aug: AugmentConfig | None = None) -> int:
    """The shorter side training decodes to: the smallest random crop must still cover ``img_size`` pixels."""
    return decode_size(img_size, math.sqrt((aug or AugmentConfig()).scale[0]))


def decode_image(value: Any, min_size: int | None = None) -> Image.Image:
    """Decode an Arrow image cell (PIL image, or dict with bytes/path) to upright 8-bit RGB.

    Files and bytes get the same treatment as in `convert` (EXIF orientation applied, alpha over white, 16-bit
    scaled), so a photo predicted from a folder looks like the training images did. With ``min_size`` a JPEG
    is decoded at the smallest DCT scale that still keeps its shorter side at least
    ``min_size`` (Pillow's draft mode), which is several times faster on large sources. Decoding stays within
    the decode budget (:data:`~derm_accel.data.decode.MAX_DECODE_PIXELS`, see :func:`open_image`).
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        image = open_image(value, min_size)
        ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def open_image(value: Any, min_size: int | None = None) -> Image.Image:
    """An Arrow image cell (dict with bytes/path) opened lazily within the decode budget (header read, draft
    scale set): ``size`` is what decoding will produce. Too many pixels: ``ImageTooLargeError``."""
    data = value.get("bytes") if isinstance(value, dict) else None
    return open_bounded(data if data is not None else value["path"], min_size, max_pixels=MAX_PIXELS)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 CHW tensor over HWC memory (channels-last strides, one copy)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


@functools.cache
def jpeg_decoder() -> Callable[..., torch.Tensor] | None:
    """torchcodec's JPEG decoder (libjpeg-turbo straight into a tensor), or None where it is missing or is a
    build that does not load against this torch."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # ImportError, or OSError/RuntimeError from a build for another torch
        return None
    return decode_jpeg


def decode_tensor(value: Any, min_size: int | None = None) -> torch.Tensor:
    """:func:`decode_image`, but straight to a uint8 CHW tensor: the training fast path.

    An RGB or grayscale JPEG that draft mode would not shrink (the convert stage's stored images) is decoded
    by torchcodec straight into a tensor: the same pixels as Pillow, EXIF orientation applied, in less time
    than Pillow plus the copy into a tensor (the steps table in docs/benchmarks.md has the figures).
    Anything else (other formats, CMYK, large camera files, no torchcodec) goes through
    :func:`decode_image`. The header is read by Pillow first, so the decompression-bomb limit holds on both
    paths.
    """
    if isinstance(value, Image.Image):
        return pil_to_uint8(to_rgb(value))
    data = value.get("bytes") if isinstance(value, dict) else None
    if data is None:
        with open(value["path"], "rb") as f:
            data = f.read()
    decoder = jpeg_decoder()
    if decoder is not None:
        with Image.open(io.BytesIO(data)) as header:  # parses the header only
            fmt, mode, (w, h) = header.format, header.mode, header.size
        draft_would_shrink = bool(min_size) and min(w, h) >= 2 * min_size
        within_budget = w * h <= min(MAX_PIXELS, MAX_DECODE_PIXELS)  # else Pillow decodes it at reduced scale
        if fmt == "JPEG" and mode in ("RGB", "L") and within_budget and not draft_would_shrink:
            try:
                return decoder(data, mode="RGB")
            except RuntimeError:  # e.g. a truncated file: let Pillow decode it or say what is wrong
                pass
    return pil_to_uint8(decode_image({"bytes": data}, min_size))


def raw_images(dataset: Any) -> Any:
    """``dataset`` with its image column left as undecoded bytes, so decoding happens where it is wanted."""
    from datasets import Image as ImageFeature

    if IMAGE_COLUMN in dataset.features and getattr(dataset.features[IMAGE_COLUMN], "decode", False):
        dataset = dataset.cast_column(IMAGE_COLUMN, ImageFeature(decode=False))
    return dataset


def batch_transform(
    transform: Callable[[Any], torch.Tensor],
    *,
    min_size: int | None = None,
    decode: Callable[[Any, int | None], Any] = decode_image,
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """A ``Dataset.with_transform`` function: images -> ``pixel_values``, label -> ``labels``.

    Use on a split whose image column was cast to ``Image(decode=False)`` so that decoding (with draft mode)
    happens here, in the DataLoader workers. ``decode`` is :func:`decode_image` (PIL images, for timm's eval
    transform) or :func:`decode_tensor` (uint8 tensors, for :func:`train_transform`).
    """

    def apply(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"pixel_values": [transform(decode(v, min_size)) for v in batch[IMAGE_COLUMN]]}
        if LABEL_COLUMN in batch:
            out["labels"] = list(batch[LABEL_COLUMN])
        return out

    return apply


def with_transform(
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    *,
    min_size: int | None = None,
    decode: Callable[[Any, int | None], Any] = decode_image,
) -> Any:
    """Return ``dataset`` decoding lazily through ``transform`` (images are never decoded twice)."""
    return raw_images(dataset).with_transform(batch_transform(transform, min_size=min_size, decode=decode))
