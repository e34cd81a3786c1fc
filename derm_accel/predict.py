"""Predict skin-lesion classes for image files or folders with a local model folder or a Hub model.

Hub models load through timm's ``hf-hub:`` path from ``model.safetensors`` only (nothing is unpickled), are
cached by huggingface_hub and therefore work with ``HF_HUB_OFFLINE=1`` once downloaded. Loaded models are kept
in a small per-process LRU cache so repeated calls do not reload them. A file that cannot be read gets an
``{"path", "error"}`` entry; the other files of the same call are still predicted.

Heavy imports (torch, timm) happen inside the functions so that ``import derm_accel`` stays fast.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MODEL_CACHE_SIZE = 4

_cache: OrderedDict[tuple[str, str, float], tuple[Any, list[str]]] = OrderedDict()
_cache_lock = threading.Lock()


def predict(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    model: str | os.PathLike | torch.nn.Module,
    *,
    top_k: int = 3,
    batch_size: int = 32,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Classify image files and folders (searched recursively); one result dict per image, in input order.

    ``model`` is a model folder (RUN/best), a Hub repo id ``ORG/NAME`` (or ``hf-hub:ORG/NAME@REV``), or an
    already loaded timm model. Each result is ``{"path", "label", "probability", "top_k": [{"label",
    "probability"}, ...]}``, or ``{"path", "error"}`` for a file that is missing or not a readable image.
    """

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = device or default_device()
    net, labels, transform, min_size = prepared_model(model, device)
    k = min(top_k, len(labels))

    entries = expand_inputs(images)
    results: list[dict[str, Any]] = [{"path": path, "error": error} if error else {} for path, error in entries]
    todo = [(i, path) for i, (path, error) in enumerate(entries) if error is None]

    def load(item: tuple[int, str]) -> tuple[int, str, Any, str | None]:
        i, path = item
        try:
            return i, path, transform(_read_image(path, min_size)), None
        except Exception as e:  # any decoder failure is a per-file error, never the end of the call
            return i, path, None, _image_error(path, e)

    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(todo), batch_size):
            loaded = list(pool.map(load, todo[start : start + batch_size]))
            good = [(i, path, x) for i, path, x, err in loaded if err is None]
            for i, path, _, err in loaded:
                if err is not None:
                    results[i] = {"path": path, "error": err}
            if not good:
                continue
            ranked_batch = rank_batch(net, labels, [x for _, _, x in good], top_k=k, device=device)
            for (i, path, _), ranked in zip(good, ranked_batch, strict=True):
                results[i] = {"path": path, **ranked[0], "top_k": ranked}
    return results


def prepared_model(model: Any, device: str) -> tuple[Any, list[str], Any, int]:
    """(model, label names, eval transform, draft-decode size): what predict, explain and serve all need.

    Decoding at the smallest JPEG DCT scale that still covers the resize before the centre crop keeps every
    entry point's pixels identical to each other.
    """
    from derm_accel.data.transforms import decode_size, eval_transform
    from derm_accel.models import data_config

    net, labels = cached_model(model, device)
    cfg = data_config(net)
    return net, labels, eval_transform(cfg), decode_size(tuple(cfg["input_size"][-2:]), cfg.get("crop_pct"))


def rank_batch(
    net: Any, labels: Sequence[str], tensors: Sequence[Any], *, top_k: int, device: str
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` classes of each preprocessed image tensor, most probable first."""
    import torch

    batch = torch.stack(list(tensors)).to(device).contiguous(memory_format=torch.channels_last)
    # bf16 autocast on CUDA, fp32 elsewhere: the fastest settings that keep top-1 unchanged.
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda")):
        probs = net(batch).float().softmax(dim=-1).cpu()
    values, indices = probs.topk(min(top_k, len(labels)), dim=-1)
    return [
        [{"label": labels[j], "probability": float(v)} for v, j in zip(vals, idxs, strict=True)]
        for vals, idxs in zip(values.tolist(), indices.tolist(), strict=True)
    ]


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


def clear_model_cache() -> None:
    """Forget loaded models (e.g. after retraining into the same folder in a long-lived process)."""
    with _cache_lock:
        _cache.clear()


def _read_image(path: str, min_size: int) -> Any:

    from derm_accel.data.transforms import decode_image

    image = decode_image({"path": path}, min_size)  # upright RGB, as convert stores it
    image.load()  # decode now: truncated files fail here, inside the per-file error handling
    return image


def _image_error(path: str, exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read (is it a JPEG/PNG? it may be corrupt or another format)"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return f"truncated or corrupt image ({exc})"
    return f"could not read image: {type(exc).__name__}: {exc}"


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cached_model(model: Any, device: str) -> tuple[Any, list[str]]:
    """A model in eval mode on ``device`` and its label names, from the per-process LRU cache if there."""
    import torch

    if isinstance(model, torch.nn.Module):
        labels = list(getattr(model, "pretrained_cfg", {}).get("label_names") or [])
        num_classes = getattr(model, "num_classes", None)
        if not labels or (num_classes is not None and len(labels) != num_classes):
            labels = [str(i) for i in range(num_classes or 0)] or labels
        return model.to(device).eval(), labels

    from derm_accel.models import WEIGHTS_NAME, resolve_model_source

    source = resolve_model_source(os.fspath(model))
    stamp = 0.0
    if source.startswith("local-dir:"):
        weights = Path(source.removeprefix("local-dir:")) / WEIGHTS_NAME
        stamp = weights.stat().st_mtime if weights.is_file() else 0.0  # a retrained folder is reloaded
    key = (source, str(device), stamp)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    from derm_accel.models import load_model

    net, labels = load_model(source, device=device)
    # channels_last: 1.4x faster inference on CPU and the layout tensor cores want (docs/benchmarks.md).
    loaded = (net.to(memory_format=torch.channels_last), labels)
    with _cache_lock:
        _cache[key] = loaded
        _cache.move_to_end(key)
        while len(_cache) > MODEL_CACHE_SIZE:
            _cache.popitem(last=False)
    return loaded
