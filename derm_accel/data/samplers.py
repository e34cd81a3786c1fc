"""Seeded, epoch-aware samplers whose draw is the same on every process.

Neither Accelerate nor timm ships a class-balanced sampler that is correct under DDP. These samplers make ONE
global draw per epoch from a generator seeded by ``seed + epoch`` (``set_epoch`` reseeds), so every
process computes the same order without communicating, a resumed run repeats the interrupted one, and the draw
does not depend on the number of processes.

Sharding: ``num_replicas``/``rank`` give each rank a disjoint strided share of the draw, for plain DDP. Under
Accelerate leave them at 1/0: ``accelerator.prepare`` wraps every DataLoader's batch sampler in
``BatchSamplerShard`` (whatever the sampler class), which hands rank ``r`` batches
``r, r + R, r + 2R, ...`` of the global draw. A rank-aware sampler there would be sharded a second time and
each rank would see 1/R² of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch) pairs across the seed space


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for one epoch's draw: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed((seed * _SEED_MIX + epoch) % (2**63))


class _EpochSampler(Sampler[int]):
    def __init__(self, num_samples: int, *, seed: int, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_samples = math.ceil(num_samples / num_replicas)  # per rank
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_draw(self) -> torch.Tensor:
        """All ``total_size`` indices of this epoch, before sharding."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_draw()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class SeededShuffleSampler(_EpochSampler):
    """A random permutation per epoch (padded by wrapping so that all ranks get equal shares)."""

    def __init__(self, dataset_size: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if dataset_size < 1:
            raise ValueError("cannot sample from an empty dataset")
        super().__init__(dataset_size, seed=seed, num_replicas=num_replicas, rank=rank)
        self.dataset_size = dataset_size

    def global_draw(self) -> torch.Tensor:
        order = torch.randperm(self.dataset_size, generator=epoch_generator(self.seed, self.epoch))
        if self.total_size > self.dataset_size:
            order = order.repeat(math.ceil(self.total_size / self.dataset_size))
        return order[: self.total_size]


class ClassBalancedSampler(_EpochSampler):
    """Draws samples with replacement so that every class is equally likely, whatever its size.

    Each epoch has ``num_samples`` draws (default: the dataset size), so an epoch costs the same as without
    balancing; rare classes are repeated (with fresh augmentation) and common ones subsampled.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() == 0:
            raise ValueError("cannot sample from an empty dataset")
        counts = torch.bincount(labels)
        # Each present class gets total weight 1; absent classes (count 0) get none.
        self.weights = (1.0 / counts.clamp(min=1).double())[labels]
        self.class_counts = counts
        super().__init__(num_samples or labels.numel(), seed=seed, num_replicas=num_replicas, rank=rank)

    def global_draw(self) -> torch.Tensor:
        return torch.multinomial(
            self.weights, self.total_size, replacement=True, generator=epoch_generator(self.seed, self.epoch)
        )


class WithSampleSeeds(Sampler[tuple[int, int]]):
    """Pairs each drawn index with its own augmentation seed, derived from (seed, epoch, draw position).

    Random augmentation then depends only on the draw, not on which worker or process loads the sample or on
    how many batches were skipped: a resumed run and a run on another number of GPUs see the same pixels.
    """

    def __init__(self, sampler: _EpochSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        generator = epoch_generator(self.sampler.seed + 1, self.sampler.epoch)
        seeds = torch.randint(0, 2**62, (self.sampler.total_size,), generator=generator)
        seeds = seeds[self.sampler.rank :: self.sampler.num_replicas].tolist()
        return iter(zip(indices, seeds, strict=True))

    def __len__(self) -> int:
        return len(self.sampler)
