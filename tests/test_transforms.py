"""Decoding and transforms shared by training, evaluation and prediction."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from derm_accel.data.synthetic import render
from derm_accel.data.transforms import (
    BatchNormalize,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    decode_image,
    decode_tensor,
    eval_input,
    eval_transform,
    pil_to_uint8,
    train_transform,
)

CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_exif_rotated_file_is_decoded_upright(tmp_path) -> None:
    upright = Image.new("RGB", (40, 20), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 20))  # red left half
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote the pixels: 20x40
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 270 to display (undoes ROTATE_90)
    path = tmp_path / "photo.jpg"
    path.write_bytes(_bytes(stored, "JPEG", quality=95, exif=exif))
    image = decode_image({"path": str(path)})
    assert image.size == (40, 20)
    left, right = np.asarray(image)[10, 5], np.asarray(image)[10, 35]
    assert left[0] > 200 and left[2] < 60 and right[2] > 200 and right[0] < 60


def test_sixteen_bit_and_alpha_match_convert() -> None:
    gray16 = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    out = np.asarray(decode_image({"bytes": _bytes(gray16, "PNG")}))
    assert out.shape == (8, 8, 3) and abs(int(out[0, 0, 0]) - 127) <= 1  # scaled, not clipped to 255
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    out = np.asarray(decode_image({"bytes": _bytes(rgba, "PNG")}))
    assert (out == 255).all()  # composited over white, as convert stores it


def test_uint8_pipeline_plus_batch_normalize_equals_float_pipeline() -> None:
    image = render(0, 1, 48)
    torch.manual_seed(0)
    as_float = train_transform(CFG)(image)
    torch.manual_seed(0)
    as_uint8 = train_transform(CFG, normalize=False)(image)
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 32, 32)
    torch.testing.assert_close(BatchNormalize(CFG)(as_uint8[None])[0], as_float, atol=1e-5, rtol=1e-5)


def _exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _bytes(image, "JPEG", quality=95, exif=exif)


def _equal_decodes(value: dict, min_size: int | None = None) -> None:
    as_tensor = decode_tensor(value, min_size)
    as_pil = torch.from_numpy(np.asarray(decode_image(value, min_size)).copy()).permute(2, 0, 1)
    assert as_tensor.dtype == torch.uint8 and as_tensor.shape == as_pil.shape
    assert (as_tensor.int() - as_pil.int()).abs().max() <= 1  # same libjpeg-turbo; 1 level of slack across builds


def test_decode_tensor_gives_decode_image_pixels_for_every_input_kind(tmp_path) -> None:
    photo = render(2, 7, 96).resize((120, 80))
    _equal_decodes({"bytes": _bytes(photo, "JPEG", quality=95)})
    (tmp_path / "photo.jpg").write_bytes(_bytes(photo, "JPEG", quality=95))
    _equal_decodes({"bytes": None, "path": str(tmp_path / "photo.jpg")})  # an Arrow cell that holds a path
    assert torch.equal(decode_tensor(photo), pil_to_uint8(photo))  # an already decoded image
    for orientation in range(1, 9):  # every EXIF orientation lands upright, as convert stores it
        _equal_decodes({"bytes": _exif_jpeg(photo, orientation)})
    _equal_decodes({"bytes": _bytes(photo.convert("L"), "JPEG")})
    _equal_decodes({"bytes": _bytes(photo.convert("CMYK"), "JPEG")})  # Pillow path
    _equal_decodes({"bytes": _bytes(photo.convert("RGBA"), "PNG")})  # Pillow path: alpha over white
    big = photo.resize((960, 640))
    _equal_decodes({"bytes": _bytes(big, "JPEG", quality=90)}, min_size=100)  # draft mode shrinks: Pillow path
    assert decode_tensor({"bytes": _bytes(big, "JPEG", quality=90)}, 100).shape == (3, 160, 240)


def test_decode_tensor_takes_the_torchcodec_path_for_stored_jpegs(monkeypatch) -> None:
    pytest.importorskip("torchcodec.decoders", reason="torchcodec is not installed: the Pillow path is used")
    from derm_accel.data import transforms

    if transforms.jpeg_decoder() is None:
        pytest.skip("torchcodec does not load against this torch build: the Pillow path is used")
    data = _bytes(render(1, 3, 64), "JPEG", quality=95)
    expected = decode_tensor({"bytes": data})

    def no_pillow(*args, **kwargs):
        raise AssertionError("fell back to Pillow")

    monkeypatch.setattr(transforms, "decode_image", no_pillow)
    assert torch.equal(decode_tensor({"bytes": data}), expected)
    with pytest.raises(AssertionError, match="fell back"):
        decode_tensor({"bytes": _bytes(render(1, 3, 64), "PNG")})


def test_decode_tensor_refuses_decompression_bombs(monkeypatch) -> None:
    from derm_accel.data import transforms

    monkeypatch.setattr(transforms, "MAX_PIXELS", 100)
    with pytest.raises(ValueError, match="decompression bomb"):
        decode_tensor({"bytes": _bytes(render(0, 0, 32), "JPEG")})


def test_crop_flip_is_seeded_and_takes_tensors_or_pil_alike() -> None:
    image = render(3, 5, 80)
    crop = RandomResizedCropFlip(
        (32, 32), scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=0.5, vflip=0.5, interpolation=v2.InterpolationMode.BICUBIC
    )
    outs = []
    for source in (image, pil_to_uint8(image), decode_tensor({"bytes": _bytes(image, "PNG")})):
        torch.manual_seed(11)
        outs.append(crop(source))
    assert outs[0].shape == (3, 32, 32) and outs[0].dtype == torch.uint8
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.manual_seed(12)
    assert not torch.equal(crop(image), outs[0])


def test_crop_flip_flips_what_it_is_told() -> None:
    image = pil_to_uint8(render(4, 2, 40))
    whole = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "interpolation": v2.InterpolationMode.BILINEAR}
    plain = RandomResizedCropFlip((40, 40), hflip=0.0, vflip=0.0, **whole)(image)
    assert torch.equal(plain, image)  # the whole square image at its own size: untouched
    assert torch.equal(RandomResizedCropFlip((40, 40), hflip=1.0, vflip=0.0, **whole)(image), image.flip(-1))
    assert torch.equal(RandomResizedCropFlip((40, 40), hflip=0.0, vflip=1.0, **whole)(image), image.flip(-2))
    both = RandomResizedCropFlip((40, 40), hflip=1.0, vflip=1.0, **whole)(image)
    assert torch.equal(both, image.flip(-1).flip(-2))


def test_truncated_jpeg_fails_the_same_way_on_both_paths() -> None:
    data = _bytes(render(0, 1, 64), "JPEG", quality=95)
    cut = {"bytes": data[: len(data) // 2]}
    with pytest.raises(OSError, match="truncated"):
        decode_image(cut)
    with pytest.raises(OSError, match="truncated"):
        decode_tensor(cut)


def test_tensor_eval_path_matches_timms_pillow_transform() -> None:
    cfg = {
        "input_size": (3, 64, 64),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    transform, decode = eval_input(cfg)
    assert isinstance(transform, ResizeCenterCrop) and decode is decode_tensor and transform.resize == 71
    timm_pil = eval_transform(cfg)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    for size in ((300, 220), (97, 131), (71, 71)):
        value = {"bytes": _bytes(render(5, size[0], 128).resize(size), "JPEG", quality=95)}
        ours = BatchNormalize(cfg)(transform(decode(value, None))[None])[0]
        theirs = timm_pil(decode_image(value))
        levels = (ours - theirs).abs() * std * 255  # difference in 0-255 pixel levels
        assert ours.shape == theirs.shape == (3, 64, 64)
        assert levels.max() <= 2.01 and levels.mean() < 0.1


def test_eval_input_keeps_timms_transform_where_it_is_not_resize_and_centre_crop() -> None:
    base = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    for cfg in ({**base, "crop_mode": "squash"}, {**base, "input_size": (3, 64, 80)}):
        transform, decode = eval_input(cfg)
        assert decode is decode_image and not isinstance(transform, ResizeCenterCrop)
        out = transform(decode({"bytes": _bytes(render(0, 0, 90), "PNG")}, None))
        assert out.dtype == torch.float32 and out.shape == (3, *cfg["input_size"][-2:])


def test_decode_tensor_without_torchcodec_uses_pillow(monkeypatch) -> None:
    import sys

    from derm_accel.data import transforms

    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as where torchcodec is missing or broken
    transforms.jpeg_decoder.cache_clear()
    try:
        assert transforms.jpeg_decoder() is None
        _equal_decodes({"bytes": _bytes(render(1, 9, 64), "JPEG", quality=95)})
    finally:
        transforms.jpeg_decoder.cache_clear()
