"""DataLoaders for training and evaluation over a converted Arrow split.

Training batches are a pure function of (seed, epoch): a seeded sampler fixes the order and every sample
carries its own augmentation seed (see :class:`~derm_accel.data.samplers.WithSampleSeeds`). That is what makes
a resumed run, or a run on a different number of processes, see exactly the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from derm_accel.data.samplers import ClassBalancedSampler, SeededShuffleSampler, WithSampleSeeds
from derm_accel.data.transforms import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    decode_image,
    decode_tensor,
    raw_images,
    with_transform,
)


class SeededSamples(Dataset):
    """Reads ``(index, seed)`` keys: the random transform of a sample runs under its own seed.

    A batch of keys costs one Arrow read (``__getitems__``); each image is then decoded and transformed in
    the DataLoader worker.
    """

    def __init__(
        self,
        split: Any,
        transform: Callable[[Any], torch.Tensor],
        *,
        min_size: int | None = None,
        decode: Callable[[Any, int | None], Any] = decode_tensor,
    ) -> None:
        columns = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c in split.column_names]
        self.split = raw_images(split.select_columns(columns)).with_format(None)
        self.transform, self.min_size, self.decode = transform, min_size, decode

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        rows = self.split[[index for index, _ in keys]]
        labels = rows.get(LABEL_COLUMN, [None] * len(keys))
        samples = []
        for (_, seed), cell, label in zip(keys, rows[IMAGE_COLUMN], labels, strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues GPU seeding
                sample = {"pixel_values": self.transform(self.decode(cell, self.min_size))}
            if label is not None:
                sample["labels"] = label
            samples.append(sample)
        return samples

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]


def split_labels(split: Any) -> np.ndarray:
    """The integer labels of a split, read from Arrow without decoding a single image."""
    return np.asarray(split[LABEL_COLUMN], dtype=np.int64)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights (mean 1 over present classes); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def _loader_kwargs(num_workers: int, pin_memory: bool, persistent_workers: bool, prefetch_factor: int) -> dict:
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:  # DataLoader rejects these without workers
        kwargs["persistent_workers"] = persistent_workers
        kwargs["prefetch_factor"] = prefetch_factor
    return kwargs


def train_loader(
    split: Any,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int,
    seed: int,
    balance: str = "none",
    min_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int = 2,
    decode: Callable[[Any, int | None], Any] = decode_tensor,
) -> DataLoader:
    """A shuffling (or class-balanced, ``balance="sampler"``) loader over the WHOLE split.

    ``transform`` receives uint8 CHW tensors (:func:`~derm_accel.data.transforms.decode_tensor`, the fast
    path :func:`~derm_accel.data.transforms.train_transform` is built for); pass ``decode=decode_image`` for
    a transform that wants PIL images. Pass the loader to ``accelerator.prepare``, which shards its batches
    across processes; do not shard it yourself.
    """
    if balance == "sampler":
        sampler = ClassBalancedSampler(split_labels(split), seed=seed)
    else:
        sampler = SeededShuffleSampler(len(split), seed=seed)
    return DataLoader(
        SeededSamples(split, transform, min_size=min_size, decode=decode),
        batch_size=batch_size,
        sampler=WithSampleSeeds(sampler),
        drop_last=True,  # a last batch of 1 breaks BatchNorm and skews the step
        # Worker base seeds come from here, not from the global RNG, so a new iterator (e.g. after resuming)
        # does not shift the dropout masks of the steps that follow.
        generator=torch.Generator().manual_seed(seed),
        **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor),
    )


def eval_loader(
    split: Any,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int,
    min_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int = 2,
    decode: Callable[[Any, int | None], Any] = decode_image,
) -> DataLoader:
    """A sequential loader; under Accelerate, ``gather_for_metrics`` drops the padding of the last batch.

    ``transform`` receives PIL images (timm's eval transform), or tensors with ``decode=decode_tensor``.
    """
    return DataLoader(
        with_transform(split, transform, min_size=min_size, decode=decode),
        batch_size=batch_size,
        shuffle=False,
        **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor),
    )
