"""Group exact and near-duplicate images, then decide which members stay.

Groups are the unit of splitting: every member of a group lands in the same split, so no photo (or a resized,
re-encoded, slightly edited, flipped or 90-degree rotated copy of it) can sit in train and test at once.

Near duplicates are found with multi-index hashing: a 64-bit perceptual hash is cut into ``threshold + 1``
bands; two hashes within ``threshold`` bits must agree exactly on at least one band (pigeonhole), so only
hashes sharing a band value are compared. That keeps 245k images far from the O(n^2) all-pairs cost.
Flips and rotations are matched by also indexing each image's pHash in the 8 orientations of the square
(decode.ORIENTATIONS) and comparing every image's upright hash against all of them.
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
    "Exact copies (same content_hash) and near copies (phash within near_threshold bits, also after a "
    "horizontal or vertical flip, a 90/180/270-degree rotation or a transpose: an image's hash is compared "
    "with the other image's hash in all 8 orientations) are grouped with union-find; a group never spans "
    "two splits. Exact copies within a class are kept once (later paths are "
    "reported as 'duplicate'); near copies stay together in one split. Groups with different labels are "
    "conflicts, resolved by the conflict policy. In pre-split sources, content found in several splits is "
    "kept in the earliest split (train, validation, test) and reported as 'cross_split_duplicate' in the "
    "later ones."
)
_MAX_LISTED = 20  # paths listed per group in the report; the count is always complete
_BLOCK_ELEMENTS = 1 << 22  # distances per block when comparing a large bucket (32 MB of uint64 XORs)


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


def _bucket_pairs(
    hashes: np.ndarray, threshold: int, is_query: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Multi-index search: index arrays (q, t) with ``hashes[q]`` within ``threshold`` bits of ``hashes[t]``,
    q != t, q a query (every row when ``is_query`` is None). A pair may repeat across bands."""
    n = len(hashes)
    bands = min(threshold + 1, 64)
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    for lo, hi in itertools.pairwise(edges):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        keys = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        shared = sizes > 1
        for start, size in zip(starts[shared].tolist(), sizes[shared].tolist(), strict=True):
            members = order[start : start + size]
            queries = members if is_query is None else members[is_query[members]]
            if not len(queries):
                continue
            values = hashes[members]
            step = max(1, _BLOCK_ELEMENTS // len(members))
            for b in range(0, len(queries), step):
                block = queries[b : b + step]
                dist = _popcount(hashes[block][:, None] ^ values[None, :])
                rows, cols = np.nonzero(dist <= threshold)
                q, t = block[rows], members[cols]
                keep = q != t
                if keep.any():
                    yield q[keep], t[keep]


def near_duplicate_pairs(hashes: np.ndarray, threshold: int) -> Iterator[tuple[int, int]]:
    """Pairs (i, j), i < j, of 64-bit hashes at Hamming distance <= ``threshold`` (a pair may repeat)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if len(hashes) < 2 or threshold < 1:
        return
    for q, t in _bucket_pairs(hashes, threshold, None):
        forward = q < t
        yield from zip(q[forward].tolist(), t[forward].tolist(), strict=True)


def group_images(
    content_hashes: Sequence[str],
    phashes: Sequence[str],
    threshold: int,
    variants: np.ndarray | None = None,
) -> list[list[int]]:
    """Union-find over exact copies (same content hash) and near copies (phash within ``threshold`` bits).

    ``variants`` (uint64, shape (n, 8), column 0 = ``phashes``; see ``decode.phash_variants``) also groups
    flipped and 90-degree rotated copies: rows A and B are near copies when B's upright pHash lies within
    ``threshold`` bits of A's pHash in some orientation. Without it only upright hashes are compared.
    ``threshold < 0`` turns near-duplicate matching off (exact copies are still grouped).
    """
    n = len(content_hashes)
    uf = UnionFind(n)
    first_by_key: dict[str, int] = {}
    for i, key in enumerate(content_hashes):
        uf.union(first_by_key.setdefault(key, i), i)
    if threshold < 0 or not n:
        return uf.groups()
    first_by_phash: dict[str, int] = {}
    for i, key in enumerate(phashes):
        uf.union(first_by_phash.setdefault(key, i), i)
    if variants is None:
        unique = list(first_by_phash)
        values = np.array([int(h, 16) for h in unique], dtype=np.uint64)
        for a, b in near_duplicate_pairs(values, threshold):
            uf.union(first_by_phash[unique[a]], first_by_phash[unique[b]])
        return uf.groups()

    variants = np.asarray(variants, dtype=np.uint64)
    if variants.ndim != 2 or len(variants) != n:
        raise ValueError(f"variants must have shape ({n}, k), got {variants.shape}")
    # One row per upright pHash (rows sharing it are already joined above, so a cluster of near-identical
    # images costs one entry, not k^2 pairs): every orientation's hash, tagged with its row. Equal
    # (hash, row) entries, e.g. the flips of a symmetric image, are kept once. A row's upright hash is a
    # query; queries are compared with all entries.
    rows = np.fromiter(first_by_phash.values(), dtype=np.int64, count=len(first_by_phash))
    owners = np.repeat(rows, variants.shape[1])
    values = variants[rows].ravel()
    order = np.lexsort((owners, values))
    owners, values = owners[order], values[order]
    fresh = np.r_[True, (values[1:] != values[:-1]) | (owners[1:] != owners[:-1])]
    owners, values = owners[fresh], values[fresh]
    is_query = values == variants[owners, 0]
    # Cost, 245k rows, threshold 4, hashes spread at random: 8 x 245k = 2M entries, 5 bands of ~13 bits
    # (8k buckets of ~240 entries, ~30 of them queries), so 5 x 245k x 240 = 3e8 popcounts in numpy
    # blocks: a few seconds and tens of MB, against 5 x 2M x 240 = 2.4e9 for an all-entries self-join.
    # Real hashes cluster, so buckets grow; the blocks keep memory bounded whatever their size.
    for q, t in _bucket_pairs(values, threshold, is_query):
        a, b = owners[q], owners[t]
        keep = a != b
        pairs = np.unique(np.stack([np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])], axis=1), axis=0)
        for i, j in pairs.tolist():
            uf.union(i, j)
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
