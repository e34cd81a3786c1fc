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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from derm_accel.core.device import default_device
from derm_accel.core.errors import InputError
from derm_accel.data.images import expand_inputs, image_error, read_image

if TYPE_CHECKING:
    import torch

MODEL_CACHE_SIZE = 4
BACKENDS = ("torch", "onnxruntime")

_cache: OrderedDict[tuple[tuple[str, ...], str, float, bool], tuple[Any, list[str], Any]] = OrderedDict()
_cache_lock = threading.Lock()


class NonFiniteOutputError(InputError):
    """The model's outputs hold NaN or inf: nothing trustworthy can be reported."""


def predict(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    model: str | os.PathLike | torch.nn.Module | Sequence[str | os.PathLike],
    *,
    top_k: int = 3,
    batch_size: int = 32,
    device: str | None = None,
    guard: bool = True,
    backend: str = "torch",
    progress: bool = False,
    tta: str | None = None,
) -> list[dict[str, Any]]:
    """Classify image files and folders (searched recursively); one result dict per image, in input order.

    ``model`` is a model folder (RUN/best), a Hub repo id ``ORG/NAME`` (or ``hf-hub:ORG/NAME@REV``), an
    already loaded timm model, or a list of models / an ensemble folder (probabilities averaged); with
    ``backend="onnxruntime"`` it is a folder written by ``derm-accel export --format onnx`` (CPU, no domain
    guard). Each result is ``{"path", "label", "probability", "top_k":
    [{"label", "probability"}, ...]}``, or ``{"path", "error"}`` for a file that is missing or not a readable
    image. ``progress`` shows a progress bar over the images (on stderr). ``tta``: "flip", "none", or None for
    the test-time augmentation the model's config declares (:mod:`derm_accel.models.tta`).
    """

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = "cpu" if backend == "onnxruntime" else device or default_device()
    prepared = prepared_model(model, device, backend=backend, guard=guard, tta=tta)
    transform, min_size = prepared.transform, prepared.min_size
    k = min(top_k, len(prepared.labels))

    entries = expand_inputs(images)
    results: list[dict[str, Any]] = [{"path": path, "error": error} if error else {} for path, error in entries]
    todo = [(i, path) for i, (path, error) in enumerate(entries) if error is None]

    def load(item: tuple[int, str]) -> tuple[int, str, Any, str | None]:
        i, path = item
        try:
            return i, path, transform(read_image(path, min_size)), None
        except Exception as e:  # any decoder failure is a per-file error, never the end of the call
            return i, path, None, image_error(path, e)

    from tqdm.auto import tqdm

    workers = min(4, os.cpu_count() or 1)
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress or None)
    with ThreadPoolExecutor(max_workers=workers) as pool, bar:
        for start in range(0, len(todo), batch_size):
            loaded = list(pool.map(load, todo[start : start + batch_size]))
            bar.update(len(loaded))
            good = [(i, path, x) for i, path, x, err in loaded if err is None]
            for i, path, _, err in loaded:
                if err is not None:
                    results[i] = {"path": path, "error": err}
            if not good:
                continue
            classified = classify_batch(prepared, [x for _, _, x in good], top_k=k, device=device, guard=guard)
            for (i, path, _), result in zip(good, classified, strict=True):
                results[i] = {"path": path, **result}
    return results


class PreparedModel(NamedTuple):
    """What predict, explain, serve and the demo all need: one model, one preprocessing, one guard."""

    net: Any
    labels: list[str]
    transform: Any  # timm's eval transform: PIL image -> normalised tensor
    min_size: int  # draft-decode size that still covers the resize before the centre crop
    guard: Any = None  # DomainGuard, or None when the model folder has none
    tta: str | None = None  # test-time augmentation every answer uses (derm_accel.tta), None: single view


def prepared_model(
    model: Any, device: str, *, backend: str = "torch", guard: bool = True, tta: str | None = None
) -> PreparedModel:
    """The model, its label names, eval transform, draft-decode size, domain guard (None if it has none,
    or with ``guard=False``, which does not read the guard at all) and test-time augmentation (``tta``: "flip",
    "none", or None for the one the model's config declares).

    Decoding at the smallest JPEG DCT scale that still covers the resize before the centre crop keeps every
    entry point's pixels identical to each other.
    """
    from derm_accel.data.transforms import (  # heavy: torch, timm stay off `import derm_accel`
        decode_size,
        eval_transform,
    )
    from derm_accel.models.build import (
        data_config,  # heavy: torch, timm stay off `import derm_accel`
    )

    if backend == "onnxruntime":
        from derm_accel.models.onnx import (
            OnnxClassifier,  # heavy: torch, timm stay off `import derm_accel`
        )

        if isinstance(model, (list, tuple)):
            raise InputError("--backend onnxruntime runs one exported model; pass one --model (or use torch).")
        net: Any = OnnxClassifier(os.fspath(model))
        labels, domain_guard = net.labels, None
    else:
        net, labels, domain_guard = cached_model(model, device, guard=guard)
    cfg = data_config(net)
    min_size = decode_size(tuple(cfg["input_size"][-2:]), cfg.get("crop_pct"))
    from derm_accel.models.tta import (
        resolve,  # heavy: torch, timm stay off `import derm_accel`
    )

    return PreparedModel(net, labels, eval_transform(cfg), min_size, domain_guard, resolve(tta, net))


def classify_batch(
    prepared: PreparedModel, tensors: Sequence[Any], *, top_k: int, device: str, guard: bool = True
) -> list[dict[str, Any]]:
    """One result per preprocessed image: ``label``, ``probability``, ``top_k`` and the guard's verdict.

    With a domain guard (and ``guard=True``) the logits and the guard's features come from one forward pass;
    every result carries ``ood_score``, ``in_domain``, ``abstain`` and ``reason``. The guard never changes the
    predicted label: it only says whether the answer should be trusted.
    """
    import torch

    from derm_accel.guard.model import (
        verdict,  # heavy: torch, timm stay off `import derm_accel`
    )
    from derm_accel.models.features import (
        forward_with_features,  # heavy: torch, timm stay off `import derm_accel`
    )
    from derm_accel.models.tta import (
        answer_logits,  # heavy: torch, timm stay off `import derm_accel`
    )

    use_guard = guard and prepared.guard is not None
    batch = torch.stack(list(tensors)).to(device).contiguous(memory_format=torch.channels_last)
    # bf16 autocast on CUDA, fp32 elsewhere: the fastest settings that keep top-1 unchanged.
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda")):
        if use_guard:
            logits, features = forward_with_features(prepared.net, batch, prepared.guard.max_dim)
            scores = prepared.guard.score(features).float().cpu().tolist()
        else:
            logits, scores = prepared.net(batch), [None] * len(batch)
        # The guard judges the original view; the answer averages the views of the model's TTA.
        logits = answer_logits(prepared.net, batch, logits, prepared.tta)
    ranked = rank_logits(logits, prepared.labels, top_k=top_k)
    results = []
    for top, score in zip(ranked, scores, strict=True):
        result = {**top[0], "top_k": top}
        if use_guard:
            result.update(verdict(prepared.guard, score, top[0]["probability"]))
        elif not guard or prepared.guard is not None:
            result.update(ood_score=None, in_domain=None, abstain=False, reason="domain guard turned off")
        else:
            result.update(verdict(None, None, top[0]["probability"]))
            result["reason"] = getattr(prepared.net, "guard_note", result["reason"])
        results.append(result)
    return results


def rank_batch(
    net: Any, labels: Sequence[str], tensors: Sequence[Any], *, top_k: int, device: str
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` classes of each preprocessed image tensor, most probable first (no guard)."""
    import torch

    batch = torch.stack(list(tensors)).to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda")):
        logits = net(batch)
    return rank_logits(logits, labels, top_k=top_k)


def rank_logits(logits: Any, labels: Sequence[str], *, top_k: int) -> list[list[dict[str, Any]]]:
    """Softmax in float32 and the ``top_k`` classes of each row, most probable first."""
    probs = logits.float().softmax(dim=-1).cpu()
    finite = probs.isfinite().all(dim=-1)
    if not bool(finite.all()):  # never NaN in an answer (it is not even valid JSON)
        raise NonFiniteOutputError(
            f"the model gave NaN/inf outputs for {int((~finite).sum())} of {len(finite)} images; its weights "
            f"or its numerics are broken (a diverged training run?). No prediction was made for them."
        )
    values, indices = probs.topk(min(top_k, len(labels)), dim=-1)
    return [
        [{"label": labels[j], "probability": float(v)} for v, j in zip(vals, idxs, strict=True)]
        for vals, idxs in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def clear_model_cache() -> None:
    """Forget loaded models (e.g. after retraining into the same folder in a long-lived process)."""
    with _cache_lock:
        _cache.clear()


def cached_model(model: Any, device: str, *, guard: bool = True) -> tuple[Any, list[str], Any]:
    """A model in eval mode on ``device``, its label names and its domain guard (or None), from the per-process
    LRU cache if there."""
    import torch

    if isinstance(model, torch.nn.Module):
        labels = list(getattr(model, "pretrained_cfg", {}).get("label_names") or [])
        num_classes = getattr(model, "num_classes", None)
        if not labels or (num_classes is not None and len(labels) != num_classes):
            labels = [str(i) for i in range(num_classes or 0)] or labels
        return model.to(device).eval(), labels, getattr(model, "domain_guard", None) if guard else None

    from derm_accel.models.ensemble import (  # heavy: torch, timm stay off `import derm_accel`
        expand_sources,
        load_models,
    )
    from derm_accel.models.load import (
        resolve_model_source,  # heavy: torch, timm stay off `import derm_accel`
    )

    # Several models, or an ensemble folder/repo, load as one Ensemble (guarded by its first member's guard).
    listed = [os.fspath(m) for m in model] if isinstance(model, (list, tuple)) else os.fspath(model)
    sources = tuple(resolve_model_source(s) for s in expand_sources(listed))
    key = (sources, str(device), sum(_stamp(s) for s in sources), guard)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    from derm_accel.guard.model import (
        load_guard,  # heavy: torch, timm stay off `import derm_accel`
    )

    net, labels = load_models(list(sources), device=device)
    domain_guard = load_guard(sources[0]) if guard else None
    # channels_last: faster inference on CPU (infer table in docs/benchmarks.md), the layout tensor cores want.
    on_device = None if domain_guard is None else domain_guard.to(device)
    loaded = (net.to(memory_format=torch.channels_last), labels, on_device)
    with _cache_lock:
        _cache[key] = loaded
        _cache.move_to_end(key)
        while len(_cache) > MODEL_CACHE_SIZE:
            _cache.popitem(last=False)
    return loaded


def _stamp(source: str) -> int:
    """Modification times of a local model's weights and guard: a retrained or refitted folder is reloaded."""
    from derm_accel.core.artifacts import (
        WEIGHTS_NAME,  # heavy: torch, timm stay off `import derm_accel`
    )
    from derm_accel.guard.model import (
        GUARD_FILE,  # heavy: torch, timm stay off `import derm_accel`
    )

    if not source.startswith("local-dir:"):
        return 0
    folder = Path(source.removeprefix("local-dir:"))
    # nanoseconds and sizes: a guard refitted within the same second still reloads (guard.fit writes it anew)
    return sum(
        p.stat().st_mtime_ns + p.stat().st_size for p in (folder / WEIGHTS_NAME, folder / GUARD_FILE) if p.is_file()
    )
