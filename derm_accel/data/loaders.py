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
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from derm_accel.data.samplers import ClassBalancedSampler, SeededShuffleSampler, WithSampleSeeds
from derm_accel.data.transforms import LABEL_COLUMN, with_transform


class SeededSamples(Dataset):
    """Reads ``(index, seed)`` keys: the random transform of a sample runs under its own seed."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


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
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int,
    seed: int,
    balance: str = "none",
    min_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A shuffling (or class-balanced, ``balance="sampler"``) loader over the WHOLE split.

    Pass it to ``accelerator.prepare``, which shards its batches across processes; do not shard it yourself.
    """
    if balance == "sampler":
        sampler = ClassBalancedSampler(split_labels(split), seed=seed)
    else:
        sampler = SeededShuffleSampler(len(split), seed=seed)
    return DataLoader(
        SeededSamples(with_transform(split, transform, min_size=min_size)),
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
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int,
    min_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A sequential loader; under Accelerate, ``gather_for_metrics`` drops the padding of the last batch."""
    return DataLoader(
        with_transform(split, transform, min_size=min_size),
        batch_size=batch_size,
        shuffle=False,
        **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor),
    )
