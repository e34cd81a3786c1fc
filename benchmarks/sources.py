"""Benchmark inputs: full-size lesion-like JPEGs in class folders, and the pre-resized Arrow set made from
them.

Images are drawn at a small size by ``derm_accel.data.synthetic.render``, scaled to the camera size and given
per-pixel sensor noise at that size, so their JPEG entropy (hence decode cost) is close to a real photo's
rather than to a smooth upscale. Everything is cached under ``workdir`` keyed by size and count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from derm_accel.data.synthetic import class_names, render

JPEG_QUALITY = 92


def source_image(class_index: int, seed: int, width: int, height: int) -> Image.Image:
    """One camera-sized lesion image: drawn at 256 px, scaled up, then noised at full size."""
    base = render(class_index, seed, 256)
    side = max(width, height)
    image = base.resize((side, side), Image.Resampling.BICUBIC)
    left, top = (side - width) // 2, (side - height) // 2
    image = image.crop((left, top, left + width, top + height))
    rng = np.random.default_rng([class_index, seed, width, height])
    pixels = np.asarray(image, np.float32) + rng.normal(0, 5, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_sources(root: str | Path, size: tuple[int, int], count: int, *, num_classes: int = 6) -> Path:
    """``count`` JPEGs of ``size`` (width, height) spread over class folders under ``root``; cached."""
    root = Path(root)
    width, height = size
    names = class_names(num_classes)
    done = root / ".complete"
    if done.exists() and done.read_text().strip() == f"{width}x{height}:{count}:{num_classes}":
        return root
    for i in range(count):
        ci = i % num_classes
        folder = root / names[ci]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{names[ci]}_{i:05d}.jpg"
        if not path.exists():
            source_image(ci, i, width, height).save(path, quality=JPEG_QUALITY)
    done.write_text(f"{width}x{height}:{count}:{num_classes}\n")
    return root


def build_arrow(src: str | Path, out: str | Path, *, max_size: int = 320) -> Path:
    """The Arrow set `derm-accel convert` writes from ``src`` (cached), so benchmarks read what users train on."""
    from derm_accel.data.convert import convert_folders

    out = Path(out)
    if not (out / "dataset_dict.json").exists():
        convert_folders(src, out, max_size=max_size, progress=False, overwrite=True)
    return out


def load_all_splits(path: str | Path) -> Any:
    """Every split of a converted DatasetDict as one Dataset: the benchmark reads all converted images."""
    from datasets import concatenate_datasets, load_from_disk

    return concatenate_datasets(list(load_from_disk(str(path)).values()))
