"""Reading image files for predict, explain, evaluate's out-of-domain sets and the demo: expanding files and
folders into a list, decoding one file upright in RGB, and the message for a file that cannot be read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})



def expand_inputs(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[str, str | None]]:
    """Files stay as given; folders become their image files (recursive, sorted). Returns (path, error)."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    out: list[tuple[str, str | None]] = []
    for item in images:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                out.append((str(path), f"no image files ({exts}) in this folder"))
            out += [(str(p), None) for p in found]
        elif path.is_file():
            out.append((str(path), None))
        else:
            out.append((str(path), "file not found"))
    return out



def read_image(path: str, min_size: int) -> Any:

    from derm_accel.data.transforms import (
        decode_image,  # heavy (torch, timm): predict imports this module at `import derm_accel`
    )

    image = decode_image({"path": path}, min_size)  # upright RGB, as convert stores it
    image.load()  # decode now: truncated files fail here, inside the per-file error handling
    return image



def image_error(path: str, exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read (is it a JPEG/PNG? it may be corrupt or another format)"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return f"truncated or corrupt image ({exc})"
    return f"could not read image: {type(exc).__name__}: {exc}"

