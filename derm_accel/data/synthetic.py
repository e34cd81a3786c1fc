"""A small, deterministic, lesion-like image set in the Kaggle layout (one folder per class).

Classes differ in shape, colour and texture, with skin-tone, lighting and placement noise so the task is
learnable but not trivial. Used by the quickstart and the tests; never a substitute for real data.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from derm_accel.data.schema import dataset_features

# (name, lesion RGB, shape, texture)
_CLASSES: list[tuple[str, tuple[int, int, int], str, str]] = [
    ("melanoma", (60, 35, 30), "irregular", "speckled"),
    ("nevus", (120, 75, 50), "round", "smooth"),
    ("basal_cell_carcinoma", (200, 140, 150), "oval", "vessels"),
    ("psoriasis", (190, 80, 70), "patches", "scaly"),
    ("vascular_lesion", (170, 30, 60), "round", "lobules"),
    ("tinea", (180, 110, 90), "ring", "smooth"),
]
_SKIN_TONES = [(236, 200, 170), (214, 170, 135), (180, 130, 95), (140, 95, 65), (95, 65, 45)]


def class_names(num_classes: int) -> list[str]:
    if not 2 <= num_classes <= len(_CLASSES):
        raise ValueError(f"num_classes must be between 2 and {len(_CLASSES)}")
    return [c[0] for c in _CLASSES[:num_classes]]


def _lesion_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, size * 0.08, 2)
    r = size * rng.uniform(0.18, 0.3)
    ang = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(xx - cx, yy - cy)
    if shape == "round":
        return dist < r
    if shape == "oval":
        t = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
        v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        return (u / (r * 1.5)) ** 2 + (v / (r * 0.7)) ** 2 < 1
    if shape == "irregular":
        k = rng.integers(3, 7)
        edge = r * (1 + 0.35 * np.sin(k * ang + rng.uniform(0, 6)) + 0.15 * np.sin(2 * k * ang))
        return dist < edge
    if shape == "ring":
        return (dist < r * 1.2) & (dist > r * 0.75)
    # patches: several small blobs
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(3, 6)):
        px, py = rng.uniform(size * 0.2, size * 0.8, 2)
        mask |= np.hypot(xx - px, yy - py) < size * rng.uniform(0.07, 0.14)
    return mask


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "speckled":
        return (rng.random((size, size)) < 0.08) * -40.0
    if kind == "vessels":
        f = rng.uniform(0.05, 0.12)
        return 35.0 * (np.abs(np.sin(xx * f + 3 * np.sin(yy * f / 2))) < 0.12)
    if kind == "scaly":
        return 45.0 * ((np.sin(xx * 0.9) * np.sin(yy * 0.9)) > 0.6)
    if kind == "lobules":
        return -25.0 * (np.sin(xx * 0.35) * np.sin(yy * 0.35) > 0.3)
    return np.zeros((size, size), np.float32)


def render(class_index: int, seed: int, size: int = 128) -> Image.Image:
    """One image of class ``class_index``; the same (class, seed, size) always gives the same pixels."""
    _, colour, shape, texture = _CLASSES[class_index]
    rng = np.random.default_rng([class_index, seed])
    skin = np.array(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], np.float32)
    img = np.broadcast_to(skin, (size, size, 3)).copy()
    img += rng.normal(0, 6, (size, size, 1))  # skin texture
    mask = _lesion_mask(shape, size, rng)
    lesion = np.array(colour, np.float32) + rng.normal(0, 18, 3)  # colour varies within a class
    tex = _texture(texture, size, rng)[..., None]
    img[mask] = (0.75 * lesion + 0.25 * skin) + tex[mask]
    yy, xx = np.mgrid[0:size, 0:size]
    light = 1 + 0.25 * ((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / size)  # uneven lighting
    img *= light[..., None] * rng.uniform(0.8, 1.15)
    img += rng.normal(0, 10, img.shape)  # sensor noise
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))


def write_sample(
    root: str | Path,
    *,
    num_classes: int = 6,
    per_class: int = 60,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``per_class`` JPEGs for each of ``num_classes`` classes under ``root/<class>/``."""
    root = Path(root)
    for ci, name in enumerate(class_names(num_classes)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(ci, seed * 100_003 + i, size).save(folder / f"{name}_{i:04d}.jpg", quality=92)
    return root


def write_dataset(
    root: str | Path,
    split_counts: dict[str, list[int]],
    *,
    size: int = 48,
    names: list[str] | None = None,
) -> Path:
    """Save a DatasetDict in the schema `convert` writes, straight from rendered images (no conversion run).

    ``split_counts[split][i]`` images of class ``names[i]`` (default: the sorted sample class names). Tests and
    benchmarks of the later stages use it to start from a known, tiny dataset.
    """
    from datasets import Dataset, DatasetDict

    num_classes = len(next(iter(split_counts.values())))
    names = names or sorted(class_names(num_classes))
    order = [c[0] for c in _CLASSES]
    features = dataset_features(names)
    splits, seed = {}, 0
    for split, counts in split_counts.items():
        rows: dict[str, list] = {key: [] for key in features}
        for label, name in enumerate(names):
            for _ in range(counts[label]):
                seed += 1
                buf = io.BytesIO()
                render(order.index(name) if name in order else label, seed, size).save(buf, "JPEG", quality=90)
                data = buf.getvalue()
                rows["image"].append({"bytes": data, "path": None})
                rows["label"].append(label)
                rows["source_path"].append(f"{name}/{split}_{seed:05d}.jpg")
                rows["orig_width"].append(size)
                rows["orig_height"].append(size)
                rows["content_hash"].append(hashlib.sha256(data).hexdigest())
                rows["phash"].append("")
                rows["group_id"].append(seed)  # every rendered image is its own unit
        splits[split] = Dataset.from_dict(rows, features=features)
    DatasetDict(splits).save_to_disk(str(root))
    return Path(root)
