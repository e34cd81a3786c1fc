"""The class-balanced sampler under DDP: one global draw per epoch, disjoint balanced shares per rank."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from derm_accel.data.loaders import class_weights
from derm_accel.data.samplers import ClassBalancedSampler, SeededShuffleSampler, WithSampleSeeds

# 300 / 40 / 10 images: a 30:1 imbalance, like rare diseases in the Kaggle set.
LABELS = [0] * 300 + [1] * 40 + [2] * 10


def _rank_batches(sampler, batch_size: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """The batches rank ``rank`` gets from ``accelerator.prepare`` (the same sharding function it calls)."""
    loader = DataLoader(range(len(LABELS)), batch_size=batch_size, sampler=sampler, drop_last=True)
    prepared = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False)
    return list(prepared.batch_sampler)


def _class_fractions(keys) -> list[float]:
    counts = Counter(LABELS[index] for index, _ in keys)
    return [counts[c] / len(keys) for c in range(3)]


def test_two_ranks_take_disjoint_balanced_shares_of_one_draw() -> None:
    world, batch = 2, 8
    sampler = WithSampleSeeds(ClassBalancedSampler(LABELS, seed=3))
    sampler.set_epoch(4)
    shares = [_rank_batches(sampler, batch, rank, world) for rank in range(world)]
    assert len(shares[0]) == len(shares[1]) == 350 // batch // world  # 21 batches each

    # Each draw position carries a unique 62-bit seed, so seeds identify positions in the draw.
    positions = [{seed for b in share for _, seed in b} for share in shares]
    assert not positions[0] & positions[1]  # disjoint
    # Together, in step order, the ranks cover exactly the start of the single global draw.
    draw = list(sampler)
    interleaved = [key for step in zip(*shares, strict=True) for b in step for key in b]
    assert interleaved == draw[: len(interleaved)]

    # Balanced on each rank: every class near 1/3 although class 2 has 30x fewer images.
    for share in shares:
        fractions = _class_fractions([key for b in share for key in b])
        assert all(abs(f - 1 / 3) < 0.1 for f in fractions), fractions
    # Without balancing, class 2 would be under 3% of the draw.
    plain = WithSampleSeeds(SeededShuffleSampler(len(LABELS), seed=3))
    assert _class_fractions(list(plain))[2] < 0.03


def test_draw_is_reseeded_per_epoch_and_independent_of_world_size() -> None:
    sampler = ClassBalancedSampler(LABELS, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 != epoch1
    assert list(ClassBalancedSampler(LABELS, seed=4)) != epoch0
    # One rank with batch 16 sees the same global batches as two ranks with batch 8.
    single = WithSampleSeeds(ClassBalancedSampler(LABELS, seed=3))
    one = _rank_batches(single, 16, 0, 1)
    two = [_rank_batches(single, 8, r, 2) for r in range(2)]
    for big, (a, b) in zip(one, zip(*two, strict=True), strict=False):
        assert big == a + b


def test_rank_aware_mode_for_plain_ddp() -> None:
    shares = [list(ClassBalancedSampler(LABELS, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    full = ClassBalancedSampler(LABELS, seed=1, num_replicas=3, rank=0).global_draw().tolist()
    assert all(len(s) == 117 for s in shares)  # ceil(350 / 3)
    assert [x for triple in zip(*shares, strict=True) for x in triple] == full
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler(LABELS, num_replicas=2, rank=2)


def test_shuffle_sampler_is_a_permutation_and_pads_evenly() -> None:
    sampler = SeededShuffleSampler(10, seed=0)
    assert sorted(sampler) == list(range(10))
    shares = [list(SeededShuffleSampler(10, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == 4 for s in shares)
    assert set().union(*map(set, shares)) == set(range(10))


def test_class_weights_for_weighted_loss() -> None:
    import numpy as np

    weights = class_weights(np.array(LABELS), 4)  # class 3 has no images
    counts = torch.tensor([300.0, 40.0, 10.0])
    torch.testing.assert_close(weights[:3] * counts, torch.full((3,), 350 / 3))
    assert weights[3] == 0
