"""Group exact and near-duplicate images, then decide which members stay.

Groups are the unit of splitting: every member of a group lands in the same split, so no photo (or a resized,
re-encoded, slightly cropped, brightened, colour-cast, flipped or 90-degree rotated copy of it) can sit in train
and test at once. Groups are the connected components of exact copies (same content hash) and of near copies
that passed the pixel check (:mod:`derm_accel.data.near_copies`), so a group never grows through an unverified
link; a group with several labels is a label conflict, resolved by policy.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from derm_accel.data.decode import DETAIL_BITS
from derm_accel.data.near_copies import (
    DETAIL_MAX_BITS,
    VERIFY_MIN_SCORE,
    VERIFY_MIN_SCORE_CROP,
    Signatures,
    candidate_pairs,
    judge,
    verify,
)
from derm_accel.data.scan import SPLIT_ORDER, Skip

CONFLICT_POLICIES = ("drop", "keep-majority")
DUPLICATES_HOW = (
    "Exact copies (same content_hash) are grouped. Near copies are found in two stages: pairs whose pHashes lie "
    "within near_threshold bits (an image's upright pHash, or the pHash of one of 15 crop windows of it trimmed by "
    "up to 5% per side, against the other image's pHash in all 8 orientations: flips, 90/180/270-degree "
    "rotations, transposes) and whose detail hashes (the signs of the 192 DCT terms above pHash's) under the "
    "same orientation and crop differ in at most a third of their bits are only candidates; a candidate is a "
    "near copy when the two images' 32x32 grey thumbnails, aligned in that orientation and crop, agree in "
    "detail (band-pass correlation at least verify_min_score). Groups are the connected components of exact "
    "copies and verified near copies, so no group grows through an unverified link, and a group never spans "
    "two splits. Exact copies within a class are kept once (later paths are reported as 'duplicate'); near "
    "copies stay together in one split. Groups with different labels are conflicts, resolved by the conflict "
    "policy. In pre-split sources, content found in several splits is kept in the earliest split (train, "
    "validation, test) and reported as 'cross_split_duplicate' in the later ones."
)
LARGE_GROUP = 20  # more members than copies of one photo plausibly reach: reported and warned about
_MAX_LISTED = 20  # paths listed per group in the report; the count is always complete
_CLOSEST_REJECTED = 20  # rejected candidates listed in the report, best score first


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


@dataclass
class Grouping:
    """Groups (sorted row lists, ordered by first row) and what near-copy search found on the way."""

    groups: list[list[int]]
    candidates: int = 0
    verified: int = 0
    closest_rejected: list[tuple[int, int, float, int]] = field(default_factory=list)  # (row, row, score, bits)

    def summary(self, paths: Sequence[str] | None = None) -> dict[str, Any]:
        def name(i: int) -> Any:
            return paths[i] if paths is not None else i

        return {
            "near_candidates": self.candidates,
            "near_verified": self.verified,
            "near_rejected": self.candidates - self.verified,
            "detail_max_bits": {"of": DETAIL_BITS, "max": DETAIL_MAX_BITS},
            "verify_min_score": {"full_frame": VERIFY_MIN_SCORE, "crop_window": VERIFY_MIN_SCORE_CROP},
            "closest_rejected": [
                {"paths": [name(i), name(j)], "score": round(score, 3), "phash_bits": bits}
                for i, j, score, bits in self.closest_rejected
            ],
        }


def connected_groups(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Connected components of the graph on 0..n-1 with edges (a[k], b[k]): sorted members, by first member."""
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")  # members ascending within each component
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [g.tolist() for g in np.split(order, cuts)] if n else []
    return sorted(groups, key=lambda g: g[0])


def group_images(
    content_hashes: Sequence[str], signatures: Signatures | None, threshold: int
) -> Grouping:
    """Exact copies (same content hash) and verified near copies (see the module docstring), as groups.

    ``threshold`` is the pHash distance (bits) that makes a candidate; ``threshold < 0`` or no ``signatures``
    turns near-copy matching off (exact copies are still grouped). The same grouping serves ``convert`` and the
    k-fold assignment (``folds.duplicate_groups``).
    """
    n = len(content_hashes)
    _, first, inverse = np.unique(np.asarray(content_hashes, dtype=object), return_index=True, return_inverse=True)
    exact_a, exact_b = first[inverse], np.arange(n)  # each row joined to the first row of its content
    if signatures is None or threshold < 0 or n < 2:
        return Grouping(connected_groups(n, exact_a, exact_b))
    if len(signatures) != n:
        raise ValueError(f"{len(signatures)} signatures for {n} images")
    # One representative per content: exact copies are joined already, near copies of one are copies of all.
    candidates = candidate_pairs(signatures, threshold, np.sort(first))
    pairs = judge(candidates, verify(signatures, candidates), n)
    rejected = np.flatnonzero(~pairs.verified)
    closest = rejected[np.argsort(-pairs.score[rejected], kind="stable")[:_CLOSEST_REJECTED]]
    ok = pairs.verified
    groups = connected_groups(n, np.r_[exact_a, pairs.a[ok]], np.r_[exact_b, pairs.b[ok]])
    return Grouping(
        groups,
        candidates=len(pairs.a),
        verified=int(ok.sum()),
        closest_rejected=[
            (int(pairs.a[p]), int(pairs.b[p]), float(pairs.score[p]), int(pairs.bits[p])) for p in closest
        ],
    )


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
    large: list[dict[str, Any]] = []
    multi = near_groups = exact_dropped = largest = 0

    for group in groups:
        largest = max(largest, len(group))
        if len(group) == 1:
            kept.append(group)
            continue
        if len(group) > LARGE_GROUP:
            large.append(
                {
                    "size": len(group),
                    "labels": dict(Counter(class_names[labels[i]] for i in group).most_common()),
                    "paths": _listed([paths[i] for i in group]),
                }
            )
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
                        f"an exact or verified near copy of this image has another label ({labels_text}); {resolution}",
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
        "large_group_threshold": LARGE_GROUP,
        "large_groups": large,
    }
    return Resolution(kept=kept, skipped=skipped, summary=summary)
