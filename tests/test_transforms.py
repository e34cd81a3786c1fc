"""Decoding and transforms shared by training, evaluation and prediction."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from derm_accel.data.synthetic import render
from derm_accel.data.transforms import BatchNormalize, decode_image, train_transform

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
