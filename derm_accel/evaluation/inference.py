"""Batch inference over a dataset split on one or many processes.

Every rank scores its shard; ``accelerator.gather_for_metrics`` drops the padding accelerate adds to uneven
shards, and the gathered row indices prove that each sample was scored exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from derm_accel.data.selection import load_converted
from derm_accel.data.transforms import BatchNormalize, decode_size, eval_input, with_transform
from derm_accel.evaluation.calibration import tta_probabilities
from derm_accel.models.build import data_config
from derm_accel.models.features import forward_with_features
from derm_accel.models.load import load_model
from derm_accel.models.tta import flip_views

TTA_VIEWS: dict[str | None, tuple[str, ...]] = {
    None: ("original",),
    "flip": ("original", "hflip", "vflip"),
}
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class InferenceResult:
    """Logits of every view, in dataset order: ``logits`` is (N, V, C) float32, ``labels`` (N,) int64;
    ``features``: the domain guard's per-depth summaries [(N, D_i)] of the original view, when asked for."""

    logits: torch.Tensor
    labels: torch.Tensor
    views: tuple[str, ...]
    features: list[torch.Tensor] | None = None

    def rows(self, index: torch.Tensor) -> InferenceResult:
        """The same result for the rows ``index`` (features included)."""
        features = None if self.features is None else [f[index] for f in self.features]
        return InferenceResult(self.logits[index], self.labels[index], self.views, features)


class _Indexed(Dataset):
    """Adds the row index to each item, so gathered rows can be checked and put back in order."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.dataset[index], index=index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # One Arrow read and one transform call per batch instead of one per sample.
        batch = self.dataset[list(indices)]
        return [
            {"pixel_values": pv, "labels": label, "index": i}
            for pv, label, i in zip(batch["pixel_values"], batch["labels"], indices, strict=True)
        ]


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "labels": torch.tensor([int(it["labels"]) for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def resolve_mixed_precision(mixed_precision: str | None, device: torch.device) -> str:
    """bf16 on GPUs that support it (fast and range-safe), fp32 elsewhere: bf16 autocast on CPU is slow."""
    if mixed_precision is not None:
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        return mixed_precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _views(pixel_values: torch.Tensor, tta: str | None) -> torch.Tensor:
    if tta is None:
        return pixel_values
    return torch.cat([pixel_values, *flip_views(pixel_values)])


def predict_logits(
    model: torch.nn.Module,
    dataset: Any,
    accelerator: Accelerator,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    tta: str | None = None,
    channels_last: bool = True,
    mixed_precision: str | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    guard_dim: int | None = None,
) -> InferenceResult:
    """Score ``dataset`` (items with ``pixel_values`` and ``labels``) on all ranks; every rank gets all rows.

    ``tta="flip"`` scores the original, horizontally and vertically flipped image in one forward pass.
    ``normalize`` turns uint8 batches into the model's input on the device (:class:`BatchNormalize`).
    ``progress`` shows a progress bar over batches on the main process (on stderr, and only on a terminal).
    ``guard_dim``: also return the domain guard's features of the original view (:mod:`derm_accel.models.features`,
    summaries of at most that width) from the same forward pass, so the guard needs no second pass over the split.
    """
    if tta not in TTA_VIEWS:
        raise ValueError(
            f"Unknown test-time augmentation {tta!r}; choose one of {[v for v in TTA_VIEWS if v]}."
        )
    views = TTA_VIEWS[tta]
    device = accelerator.device
    precision = resolve_mixed_precision(mixed_precision, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = getattr(model, "_orig_mod", model).to(device, memory_format=memory_format).eval()

    loader = DataLoader(
        _Indexed(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    loader = accelerator.prepare_data_loader(loader)

    logits_parts, label_parts, index_parts, feature_parts = [], [], [], []
    show = progress and accelerator.is_main_process
    with torch.inference_mode():
        for batch in tqdm(loader, desc="inference", unit="batch", disable=not show or None):
            x = batch["pixel_values"].to(device, non_blocking=True)
            if normalize is not None:
                x = normalize(x)
            x = x.contiguous(memory_format=memory_format)
            x = _views(x, tta)
            autocast = (  # the guard's features in float32, as it was fitted
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None and guard_dim is None
                else nullcontext()
            )
            n = batch["labels"].shape[0]
            with autocast:
                if guard_dim is None:
                    out = model(x)
                else:  # the original view is the first n rows of x (_views)
                    out, features = forward_with_features(model, x, guard_dim)
                    feature_parts.append(accelerator.gather_for_metrics([f[:n].float() for f in features]))
            # (V*B, C) -> (B, V, C); softmax later in float32.
            out = out.float().reshape(len(views), n, -1).transpose(0, 1).contiguous()
            gathered = accelerator.gather_for_metrics(
                {"logits": out, "labels": batch["labels"].to(device), "index": batch["index"].to(device)}
            )
            logits_parts.append(gathered["logits"].cpu())
            label_parts.append(gathered["labels"].cpu())
            index_parts.append(gathered["index"].cpu())

    if not index_parts:
        raise ValueError("the split is empty; nothing to evaluate")
    index = torch.cat(index_parts)
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(len(dataset))):
        raise RuntimeError(
            f"distributed inference returned {len(index)} rows ({index.unique().numel()} distinct) "
            f"for {len(dataset)} samples"
        )
    features = None
    if feature_parts:
        features = [torch.cat([part[i].cpu() for part in feature_parts])[order] for i in range(len(feature_parts[0]))]
    return InferenceResult(
        logits=torch.cat(logits_parts)[order], labels=torch.cat(label_parts)[order], views=views, features=features
    )


def score_split(
    model_dir: Path, data: str | Path, split: str, *, tta: str | None = None, batch_size: int = 64
) -> dict[str, Any]:
    """Probabilities of ``model_dir`` on ``data[split]`` (every process gets all rows)."""
    from accelerate import Accelerator

    net, labels = load_model(str(model_dir))
    cfg = data_config(net)
    transform, decode = eval_input(cfg)
    test = load_converted(data)[split]
    min_size = decode_size(cfg["input_size"][-1], cfg.get("crop_pct"))
    split = with_transform(test, transform, min_size=min_size, decode=decode)
    result = predict_logits(
        net, split, Accelerator(), batch_size=batch_size, num_workers=0, tta=tta, normalize=BatchNormalize(cfg)
    )
    return {
        "probabilities": tta_probabilities(result.logits).numpy(),
        "labels": result.labels.numpy(),
        "source_paths": list(test["source_path"]),
        "label_names": labels,
    }
