"""Group exact and near-duplicate images, then decide which members stay.

Groups are the unit of splitting: every member of a group lands in the same split, so no photo (or a resized,
re-encoded or slightly edited copy of it) can sit in train and test at once.

Near duplicates are found with multi-index hashing: a 64-bit perceptual hash is cut into ``threshold + 1``
bands; two hashes within ``threshold`` bits must agree exactly on at least one band (pigeonhole), so only
hashes sharing a band value are compared. That keeps 245k images far from the O(n^2) all-pairs cost.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from derm_accel.data.scan import SPLIT_ORDER, Skip

CONFLICT_POLICIES = ("drop", "keep-majority")
DUPLICATES_HOW = (
    "Exact copies (same content_hash) and near copies (phash within near_threshold bits) are grouped with "
    "union-find; a group never spans two splits. Exact copies within a class are kept once (later paths are "
    "reported as 'duplicate'); near copies stay together in one split. Groups with different labels are "
    "conflicts, resolved by the conflict policy. In pre-split sources, content found in several splits is "
    "kept in the earliest split (train, validation, test) and reported as 'cross_split_duplicate' in the "
    "later ones."
)
_MAX_LISTED = 20  # paths listed per group in the report; the count is always complete
_BLOCK = 2048  # rows per block when comparing a large bucket


class UnionFind:
    """Disjoint sets over 0..n-1 (union by size, path halving)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def groups(self) -> list[list[int]]:
        """Components with sorted members, ordered by their smallest member."""
        by_root: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            by_root[self.find(i)].append(i)
        return sorted(by_root.values(), key=lambda g: g[0])


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    bits = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1)
    return bits.sum(axis=-1)


def near_duplicate_pairs(hashes: np.ndarray, threshold: int) -> Iterator[tuple[int, int]]:
    """Pairs (i, j), i < j, of 64-bit hashes at Hamming distance <= ``threshold`` (a pair may repeat)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2 or threshold < 1:
        return
    bands = min(threshold + 1, 64)
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    for lo, hi in itertools.pairwise(edges):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        keys = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        stops = np.r_[starts[1:], n]
        for start, stop in zip(starts, stops, strict=True):
            if stop - start < 2:
                continue
            members = order[start:stop]
            values = hashes[members]
            for b in range(0, len(members), _BLOCK):
                block = values[b : b + _BLOCK]
                dist = _popcount(block[:, None] ^ values[None, :])
                rows, cols = np.nonzero(dist <= threshold)
                for r, c in zip(rows + b, cols, strict=True):
                    if r < c:
                        i, j = int(members[r]), int(members[c])
                        yield (i, j) if i < j else (j, i)


def group_images(content_hashes: Sequence[str], phashes: Sequence[str], threshold: int) -> list[list[int]]:
    """Union-find over exact copies (same content hash) and near copies (phash within ``threshold`` bits).

    ``threshold < 0`` turns near-duplicate matching off (exact copies are still grouped).
    """
    n = len(content_hashes)
    uf = UnionFind(n)
    first_by_key: dict[str, int] = {}
    for i, key in enumerate(content_hashes):
        uf.union(first_by_key.setdefault(key, i), i)
    if threshold >= 0 and n:
        first_by_phash: dict[str, int] = {}
        for i, key in enumerate(phashes):
            uf.union(first_by_phash.setdefault(key, i), i)
        unique = list(first_by_phash)
        values = np.array([int(h, 16) for h in unique], dtype=np.uint64)
        for a, b in near_duplicate_pairs(values, threshold):
            uf.union(first_by_phash[unique[a]], first_by_phash[unique[b]])
    return uf.groups()


@dataclass
class Resolution:
    """Which members of each group stay, the skips that explain the others, and a summary for the report."""

    kept: list[list[int]]
    skipped: dict[int, Skip]
    summary: dict[str, Any] = field(default_factory=dict)


def _listed(paths: list[str]) -> list[str]:
    return paths[:_MAX_LISTED] + (
        [f"... {len(paths) - _MAX_LISTED} more"] if len(paths) > _MAX_LISTED else []
    )


def resolve_groups(
    groups: list[list[int]],
    *,
    labels: Sequence[int],
    class_names: Sequence[str],
    paths: Sequence[str],
    content_hashes: Sequence[str],
    splits: Sequence[str | None],
    conflicts: str = "drop",
) -> Resolution:
    """Apply, per group: label conflicts, then one split per content (pre-split trees), then exact copies.

    - Members with different labels are a conflict: all dropped (``drop``), or only the majority label's
      members kept (``keep-majority``; a tie drops the group).
    - In a pre-split tree, members in a later split (train < validation < test) than the first one holding
      the group are dropped as ``cross_split_duplicate``, so no content sits in two splits.
    - Exact copies within a class and split are kept once; later ones (by path) are ``duplicate``.
    """
    if conflicts not in CONFLICT_POLICIES:
        raise ValueError(f"conflicts must be one of {CONFLICT_POLICIES}, got {conflicts!r}")
    kept: list[list[int]] = []
    skipped: dict[int, Skip] = {}
    conflict_groups: list[dict[str, Any]] = []
    cross_split: list[dict[str, Any]] = []
    multi = near_groups = exact_dropped = largest = 0

    for group in groups:
        largest = max(largest, len(group))
        if len(group) == 1:
            kept.append(group)
            continue
        multi += 1
        if len({content_hashes[i] for i in group}) > 1:
            near_groups += 1
        members = group
        counts = Counter(class_names[labels[i]] for i in members)
        if len(counts) > 1:
            ranked = counts.most_common()
            majority = ranked[0][0] if ranked[0][1] > ranked[1][1] else None
            if conflicts == "keep-majority" and majority is not None:
                resolution = f"kept the {ranked[0][1]} member(s) labelled '{majority}'"
            else:
                resolution = "dropped the whole group" + (" (tie)" if conflicts == "keep-majority" else "")
                majority = None
            labels_text = ", ".join(f"{name} x{count}" for name, count in ranked)
            for i in members:
                if class_names[labels[i]] != majority:
                    skipped[i] = Skip(
                        paths[i],
                        "conflict",
                        f"same or near-identical image has different labels ({labels_text}); {resolution}",
                    )
            conflict_groups.append(
                {
                    "paths": _listed([paths[i] for i in members]),
                    "size": len(members),
                    "labels": dict(ranked),
                    "resolution": resolution,
                }
            )
            members = [i for i in members if i not in skipped]
        present = [s for s in SPLIT_ORDER if any(splits[i] == s for i in members)]
        if len(present) > 1:
            first = next(i for i in members if splits[i] == present[0])
            for i in members:
                if splits[i] != present[0]:
                    skipped[i] = Skip(
                        paths[i],
                        "cross_split_duplicate",
                        f"same or near-identical content as {paths[first]} in split '{present[0]}'; "
                        f"dropped from the later split '{splits[i]}'",
                    )
            cross_split.append(
                {
                    "kept_split": present[0],
                    "kept": _listed([paths[i] for i in members if splits[i] == present[0]]),
                    "dropped": _listed([paths[i] for i in members if splits[i] != present[0]]),
                }
            )
            members = [i for i in members if i not in skipped]
        first_copy: dict[tuple[str, str | None, int], int] = {}
        for i in members:
            key = (content_hashes[i], splits[i], labels[i])
            if key in first_copy:
                skipped[i] = Skip(paths[i], "duplicate", f"exact copy of {paths[first_copy[key]]} (kept)")
                exact_dropped += 1
            else:
                first_copy[key] = i
        members = [i for i in members if i not in skipped]
        if members:
            kept.append(members)

    summary = {
        "groups_total": len(groups),
        "groups_with_copies": multi,
        "groups_with_near_copies": near_groups,
        "largest_group": largest,
        "exact_copies_dropped": exact_dropped,
        "conflict_policy": conflicts,
        "conflict_groups": conflict_groups,
        "cross_split_groups": cross_split,
    }
    return Resolution(kept=kept, skipped=skipped, summary=summary)
