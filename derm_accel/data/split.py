"""Stratified, group-aware train/validation/test assignment.

Each class is split on its own so rare classes keep their share in every split; whole duplicate groups move
together so copies never straddle splits. Deterministic for a seed and independent of the file walk order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

SPLITS = ("train", "validation", "test")


def split_targets(n: int, val_frac: float, test_frac: float) -> dict[str, int]:
    """Images per split for a class of ``n`` images: each within half an image of the asked fraction."""
    test = min(n, round(n * test_frac))
    val = min(n - test, round(n * val_frac))
    return {"train": n - val - test, "validation": val, "test": test}


def stratified_group_split(
    group_labels: Sequence[int],
    group_sizes: Sequence[int],
    group_keys: Sequence[str],
    *,
    val_frac: float,
    test_frac: float,
    seed: int,
) -> list[str]:
    """The split of every group.

    Per class, groups are shuffled (seeded by ``seed`` and the class), then placed largest first, each into
    the split furthest below its target. With singleton groups the targets are met exactly; a large group
    can overshoot by at most its own size. ``group_keys`` (e.g. a member's path) fix the order before
    shuffling, so the result does not depend on how the files were listed.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for g, label in enumerate(group_labels):
        by_class[label].append(g)
    out = [""] * len(group_labels)
    for label, members in by_class.items():
        members = sorted(members, key=lambda g: group_keys[g])
        random.Random(f"{seed}:{label}").shuffle(members)
        members.sort(key=lambda g: -group_sizes[g])  # stable: equal sizes keep the shuffled order
        targets = split_targets(sum(group_sizes[g] for g in members), val_frac, test_frac)
        counts = dict.fromkeys(SPLITS, 0)
        for g in members:
            split = max(SPLITS, key=lambda s: targets[s] - counts[s])
            out[g] = split
            counts[split] += group_sizes[g]
    return out
