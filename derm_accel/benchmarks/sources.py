"""Benchmark inputs: full-size lesion-like JPEGs in class folders, and the pre-resized Arrow set made from
them.

Images are drawn at a small size by ``derm_accel.data.synthetic.render``, scaled to the camera size and given
per-pixel sensor noise at that size, so their JPEG entropy (hence decode cost) is close to a real photo's
rather than to a smooth upscale. Everything is cached under ``workdir`` keyed by size and count.
"""

from __future__ import annotations

import io
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


def _resized_jpeg(path: Path, max_size: int) -> tuple[bytes, int, int]:
    with Image.open(path) as image:
        w, h = image.size
        scale = max_size / min(w, h)
        if scale < 1:
            image.draft("RGB", (round(w * scale), round(h * scale)))
            image = image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        else:
            image = image.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)  # as convert_folders
    return buf.getvalue(), w, h


def build_arrow_inline(src: str | Path, out: str | Path, *, max_size: int = 320) -> Path:
    """A one-split ('train') DatasetDict in convert's schema, for when the convert stage is not available."""
    import hashlib

    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    src, out = Path(src), Path(out)
    names = sorted(p.name for p in src.iterdir() if p.is_dir())
    rows: dict[str, list[Any]] = {k: [] for k in ("image", "label", "source_path", "orig_width", "orig_height")}
    rows["content_hash"] = []
    for label, name in enumerate(names):
        for path in sorted((src / name).glob("*.jpg")):
            data, w, h = _resized_jpeg(path, max_size)
            rows["image"].append({"bytes": data, "path": None})
            rows["label"].append(label)
            rows["source_path"].append(path.relative_to(src).as_posix())
            rows["orig_width"].append(w)
            rows["orig_height"].append(h)
            rows["content_hash"].append(hashlib.sha256(path.read_bytes()).hexdigest())
    features = Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=names),
            "source_path": Value("string"),
            "orig_width": Value("int32"),
            "orig_height": Value("int32"),
            "content_hash": Value("string"),
        }
    )
    DatasetDict({"train": Dataset.from_dict(rows, features=features)}).save_to_disk(str(out))
    return out


def build_arrow(src: str | Path, out: str | Path, *, max_size: int = 320) -> tuple[Path, str]:
    """The Arrow set the convert stage writes from ``src`` (cached); returns (path, which builder made it).

    Uses ``derm_accel.data.convert.convert_folders`` when it exists so the benchmark reads exactly what users
    train on; otherwise an inline builder with the same schema and the same shorter-side resize.
    """
    out = Path(out)
    marker = out / ".builder"
    if marker.exists():
        return out, marker.read_text().strip()
    try:
        from derm_accel.data.convert import convert_folders
    except ImportError:
        build_arrow_inline(src, out, max_size=max_size)
        builder = "inline (derm_accel.data.convert not available)"
    else:
        convert_folders(src, out, max_size=max_size, progress=False)
        builder = "derm_accel.data.convert.convert_folders"
    marker.write_text(builder + "\n")
    return out, builder


def load_all_splits(path: str | Path) -> Any:
    """Every non-empty split of a saved DatasetDict as one Dataset: the benchmark reads all converted images.

    Splits are read one by one because a split saved with no rows has no Arrow file, which
    ``load_from_disk`` of the whole DatasetDict cannot read.
    """
    import json

    from datasets import Dataset, concatenate_datasets

    path = Path(path)
    names = json.loads((path / "dataset_dict.json").read_text())["splits"]
    splits = []
    for name in names:
        state = json.loads((path / name / "state.json").read_text())
        if state.get("_data_files"):
            splits.append(Dataset.load_from_disk(str(path / name)))
    if not splits:
        raise ValueError(f"{path} holds no images in any split")
    return splits[0] if len(splits) == 1 else concatenate_datasets(splits)
