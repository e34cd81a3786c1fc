"""Near-copy search: perceptual-hash candidates, then a check on the pixels that confirms or rejects each.

The perceptual hash only proposes candidates: pairs whose 64-bit pHashes lie within ``threshold`` bits, comparing
every image's upright pHash and the pHashes of its crop windows (decode.CROP_WINDOWS) with the other image's pHash
in each of the 8 orientations of the square, and whose detail hashes (decode.detail_hashes: the signs of the next
192 DCT terms) under the same hypothesis differ in at most ``DETAIL_MAX_BITS``. Different pictures collide in
pHash at a fixed rate per pair, so candidates, and verification's work, grow with the square of the collection;
the second hash cuts that rate by about nine tenths on dermoscopy (docs/benchmarks.md). Multi-index hashing
keeps the search far from the O(n^2) all-pairs cost: a 64-bit hash is cut into bands; two hashes within
``threshold`` bits differ by at most ``threshold // bands`` bits in at least one band (pigeonhole), so only hashes
whose band values are that close are compared. The number of bands follows the collection's size
(``band_plan``): short bands with exact matches for small collections, longer ones probed at every value within
one or two bits for large ones, so that buckets stay small.

On dermoscopy the hash alone is weak (a dark blob on lighter skin gives similar low-frequency DCT signs, so
different lesions collide), so a candidate is a near copy only when the pictures agree in detail: the two 32x32
grey thumbnails, aligned in the orientation and crop window that matched (refined per axis on their row and
column profiles), must correlate in band-pass content (a difference of Gaussians), which different lesions with
similar outlines do not. The bars (``VERIFY_MIN_SCORE``, ``VERIFY_MIN_SCORE_CROP``) were chosen by measurement on
real images with planted copies: benchmarks/dedupe.py, docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from derm_accel.data.decode import (
    CROP_WINDOWS,
    DETAIL_BITS,
    DETAIL_WORDS,
    ORIENTATIONS,
    THUMBNAIL_SIZE,
    Signature,
    resample_matrix,
)

_BLOCK_ELEMENTS = 1 << 20  # hash pairs compared at once (8 MB of uint64 XORs, a few index arrays beside)
_LARGE_BUCKET = 1 << 10  # buckets with more query x entry pairs are compared block by block
_TABLE_BITS = 24  # band keys up to this long are looked up in a direct table (64 MB at most)
_LOOKUP_COST = 8.0  # one probe's lookup, in hash comparisons (band_plan's cost model; an assumed order)
# Verification bars measured on derm-sample and ham10000-dev with planted copies
# (benchmarks/dedupe.py, docs/benchmarks.md): full-frame candidates that are copies score >= 0.97, different lesions
# with pHashes within 4 bits below 0.94; a match through a crop window has more freedom (window and alignment), so
# different lesions reach ~0.955 there and the bar is higher.
# Detail-hash bar: measured on derm-sample and ham10000-dev with planted copies (benchmarks/dedupe.py, "detail
# hash" in docs/benchmarks.md): no copy whose pair verifies is farther, most different pictures whose pHashes
# collide are.
DETAIL_MAX_BITS = DETAIL_BITS // 3
VERIFY_MIN_SCORE = 0.95
VERIFY_MIN_SCORE_CROP = 0.96
_DOG_SIGMAS = (0.7, 2.0)  # band-pass of the 32x32 thumbnails: blur at 0.7 px minus blur at 2 px
_PROFILE_MIN = 0.9  # aligned row/column profiles correlating less: not the same picture, no closer look
_PROFILE_MIN_SPREAD = 4.0  # grey levels (sd of a profile) under which profiles are not trusted to reject
_MARGIN = 2  # border pixels left out of the correlation (edge repetition after a crop alignment)
_REFINE = (-0.02, -0.01, 0.0, 0.01, 0.02)  # per-axis nudges of each window edge searched during alignment
_VERIFY_CHUNK = 4096  # pairs verified at once (~100 MB of float32 work arrays)


@dataclass
class Signatures:
    """The near-copy signatures of n images as arrays (see ``decode.near_copy_signature``).

    ``variants`` (n, 8) uint64: pHash in each orientation; ``windows`` (n, 15) uint64: pHash of each crop window;
    ``detail`` (n, 8 + 15, 3) uint64: detail hashes, orientations then windows (``decode.detail_hashes``);
    ``thumbnails`` (n, 32, 32) uint8. About 1.8 KB an image; :meth:`allocate` with a folder keeps the thumbnails
    and detail hashes in file-backed arrays, so 245k images cost page cache rather than private memory.
    """

    variants: np.ndarray
    windows: np.ndarray
    detail: np.ndarray
    thumbnails: np.ndarray

    @classmethod
    def allocate(cls, n: int, folder: Path | None = None) -> Signatures:
        def array(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
            if folder is None or n == 0:  # a file cannot map zero bytes
                return np.zeros(shape, dtype)
            return np.lib.format.open_memmap(Path(folder) / f"{name}.npy", "w+", dtype, shape)

        return cls(
            np.zeros((n, len(ORIENTATIONS)), np.uint64),
            np.zeros((n, len(CROP_WINDOWS)), np.uint64),
            array("detail", (n, len(ORIENTATIONS) + len(CROP_WINDOWS), DETAIL_WORDS), np.uint64),
            array("thumbnails", (n, THUMBNAIL_SIZE, THUMBNAIL_SIZE), np.uint8),
        )

    @classmethod
    def of(cls, signatures: Sequence[Signature]) -> Signatures:
        out = cls.allocate(len(signatures))
        for i, signature in enumerate(signatures):
            out.put(i, signature)
        return out

    def put(self, i: int, signature: Signature) -> None:
        self.variants[i] = signature.variants
        self.windows[i] = signature.windows
        self.detail[i] = np.frombuffer(signature.detail, np.uint64).reshape(self.detail.shape[1:])
        self.thumbnails[i] = np.frombuffer(signature.thumbnail, np.uint8).reshape(THUMBNAIL_SIZE, THUMBNAIL_SIZE)

    def head(self, n: int) -> Signatures:
        """The first ``n`` rows (views, no copy)."""
        return Signatures(self.variants[:n], self.windows[:n], self.detail[:n], self.thumbnails[:n])

    def full_frame(self) -> Signatures:
        """The same images with no crop windows (views, no copy): candidates on the full frame only."""
        return Signatures(self.variants, self.windows[:, :0], self.detail[:, : self.variants.shape[1]], self.thumbnails)

    def __len__(self) -> int:
        return len(self.variants)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    bits = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1)
    return bits.sum(axis=-1)


def _bands(count: int) -> list[np.ndarray]:
    """The bits of each band: j, j + count, j + 2 count, ... A pHash's bits run from low to high frequencies and
    the lowest barely vary on dermoscopy, so contiguous bands would crowd a few buckets; interleaved ones are
    about evenly informative."""
    return [np.arange(j, 64, count, dtype=np.uint64) for j in range(count)]


def _band_keys(hashes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    keys = np.zeros(len(hashes), np.uint64)
    for i, bit in enumerate(bits.tolist()):
        keys |= ((hashes >> np.uint64(bit)) & np.uint64(1)) << np.uint64(i)
    return keys


def _band_mask(bits: np.ndarray) -> np.uint64:
    return np.uint64(sum(1 << b for b in bits.tolist()))


def _probes(width: int, radius: int) -> int:
    return sum(math.comb(width, i) for i in range(radius + 1))


def band_plan(threshold: int, n_entries: int) -> tuple[int, int]:
    """(bands, radius) for the multi-index search: hashes within ``threshold`` bits differ by at most
    ``radius = threshold // bands`` bits in one of ``bands`` bands (pigeonhole). More bands mean shorter keys and
    fuller buckets (every member compared); fewer mean longer keys probed at every key within ``radius`` bits.
    Chosen for the least expected work per query: probes x (lookup + expected bucket size), so buckets stay
    small as the collection grows (Norouzi et al., "Fast search in Hamming space with multi-index hashing")."""

    def work(bands: int) -> float:
        width = 64 // bands
        probes = _probes(width, threshold // bands)
        return bands * probes * (_LOOKUP_COST + n_entries / 2.0**width)

    bands = min(range(1, min(threshold + 1, 64) + 1), key=lambda b: (work(b), -b))
    return bands, threshold // bands


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit mask with at most ``radius`` bits set (0 first)."""
    masks = [0] + [
        sum(1 << b for b in bits) for r in range(1, radius + 1) for bits in itertools.combinations(range(width), r)
    ]
    return np.array(masks, dtype=np.uint64)


def _key_runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort order of ``keys`` and, per distinct key, the key, its first position in that order and its count."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return order, ordered[starts], starts, np.diff(np.r_[starts, len(keys)])


def _small_buckets(
    q_order: np.ndarray, qs: np.ndarray, qn: np.ndarray, e_order: np.ndarray, es: np.ndarray, en: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (query, entry) index pair of the given buckets, flattened, in batches of about ``_BLOCK_ELEMENTS``
    pairs: many small buckets compared in one vectorised step instead of one Python step each."""
    sizes = qn * en
    ends = np.cumsum(sizes)
    start = 0
    while start < len(sizes):
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - sizes[start] + _BLOCK_ELEMENTS, "right")))
        size, width = sizes[start:stop], en[start:stop]
        owner = np.repeat(np.arange(stop - start), size)
        offset = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
        yield (q_order[qs[start:stop][owner] + offset // width[owner]],
               e_order[es[start:stop][owner] + offset % width[owner]])
        start = stop


def _close_in_bucket(
    q_members: np.ndarray, e_members: np.ndarray, queries: np.ndarray, entries: np.ndarray, threshold: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The (query, entry) pairs of one large bucket within ``threshold`` bits, blocks of queries broadcast
    against its entries (no per-pair gather)."""
    values = entries[e_members]
    step = max(1, _BLOCK_ELEMENTS // len(e_members))
    for b in range(0, len(q_members), step):
        block = q_members[b : b + step]
        rows, cols = np.nonzero(_popcount(queries[block][:, None] ^ values[None, :]) <= threshold)
        if len(rows):
            yield block[rows], e_members[cols]


def _band_pairs(
    queries: np.ndarray, entries: np.ndarray, threshold: int, bits: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (q, e) with equal keys on the band ``bits``; from large buckets only those within
    ``threshold`` bits, from small ones every pair (the caller measures them)."""
    q_order, q_keys, q_starts, q_counts = _key_runs(_band_keys(queries, bits))
    e_order, e_keys, e_starts, e_counts = _key_runs(_band_keys(entries, bits))
    _, qi, ei = np.intersect1d(q_keys, e_keys, assume_unique=True, return_indices=True)
    qs, qn, es, en = q_starts[qi], q_counts[qi], e_starts[ei], e_counts[ei]
    large = qn * en >= _LARGE_BUCKET
    small = ~large
    yield from _small_buckets(q_order, qs[small], qn[small], e_order, es[small], en[small])
    for b in np.flatnonzero(large).tolist():
        q_members, e_members = q_order[qs[b] : qs[b] + qn[b]], e_order[es[b] : es[b] + en[b]]
        yield from _close_in_bucket(q_members, e_members, queries, entries, threshold)


def _probe_pairs(
    queries: np.ndarray, entries: np.ndarray, bits: np.ndarray, radius: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (q, e) whose keys on the band ``bits`` differ by at most ``radius`` bits: every key within
    ``radius`` of each query's is looked up among the entries' sorted keys; each pair once (a pair's two keys
    differ by one mask only)."""
    e_order, e_keys, e_starts, e_counts = _key_runs(_band_keys(entries, bits))
    q_keys = _band_keys(queries, bits)
    flips = _flip_masks(len(bits), radius)
    table = None
    if len(bits) <= _TABLE_BITS:  # a direct table of keys -> buckets: one gather per probe, no binary search
        table = np.full(1 << len(bits), -1, np.int32)
        table[e_keys.astype(np.int64)] = np.arange(len(e_keys), dtype=np.int32)
    step = max(1, _BLOCK_ELEMENTS // len(flips))
    for start in range(0, len(queries), step):
        block = np.arange(start, min(start + step, len(queries)))
        probed = (q_keys[block, None] ^ flips[None, :]).ravel()
        if table is not None:
            at = table[probed.astype(np.int64)]
            hit = np.flatnonzero(at >= 0)
        else:
            at = np.minimum(np.searchsorted(e_keys, probed), len(e_keys) - 1)
            hit = np.flatnonzero(e_keys[at] == probed)
        owner, bucket = hit // len(flips) + start, at[hit]
        yield from _bucket_members(owner, e_order, e_starts[bucket], e_counts[bucket])


def _bucket_members(
    owner: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(owner, member) for every member of each hit bucket (``order[starts[h]:starts[h] + counts[h]]``), in
    batches of about ``_BLOCK_ELEMENTS`` pairs (a crowded bucket, e.g. thousands of blank frames, stays bounded);
    a batch of one-entry buckets, the common case once keys are about as long as log2 of the entries, by one
    gather."""
    ends = np.cumsum(counts)
    lo = 0
    while lo < len(counts):
        base = int(ends[lo] - counts[lo])
        hi = max(lo + 1, int(np.searchsorted(ends, base + _BLOCK_ELEMENTS, "right")))
        size = counts[lo:hi]
        if size.max() == 1:
            yield owner[lo:hi], order[starts[lo:hi]]
        else:
            hit = np.repeat(np.arange(lo, hi), size)
            offset = np.arange(len(hit)) - np.repeat(ends[lo:hi] - size - base, size)
            yield owner[hit], order[starts[hit] + offset]
        lo = hi


def hamming_join(
    queries: np.ndarray, entries: np.ndarray, threshold: int, plan: tuple[int, int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Multi-index search: index arrays (q, e) and distances with ``queries[q]`` within ``threshold`` bits of
    ``entries[e]`` (64-bit hashes), each (q, e) once: a pair that is also within the radius on an earlier band
    was reported there. ``plan`` (bands, radius) overrides ``band_plan``."""
    if not len(queries) or not len(entries) or threshold < 0:
        return
    count, radius = plan or band_plan(threshold, len(entries))
    bands = _bands(count)
    masks = [_band_mask(bits) for bits in bands]
    for k, bits in enumerate(bands):
        if radius:
            found = _probe_pairs(queries, entries, bits, radius)
        else:
            found = _band_pairs(queries, entries, threshold, bits)
        for q, e in found:
            diff = queries[q] ^ entries[e]
            close = _popcount(diff) <= threshold
            for earlier in masks[:k]:
                close &= _popcount(diff & earlier) > radius
            if close.any():
                yield q[close], e[close], _popcount(diff[close])


def near_duplicate_pairs(
    hashes: np.ndarray, threshold: int, plan: tuple[int, int] | None = None
) -> Iterator[tuple[int, int]]:
    """Pairs (i, j), i < j, of 64-bit hashes at Hamming distance <= ``threshold`` (a pair may repeat)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if len(hashes) < 2 or threshold < 1:
        return
    for q, t, _ in hamming_join(hashes, hashes, threshold, plan):
        forward = q < t
        yield from zip(q[forward].tolist(), t[forward].tolist(), strict=True)


@dataclass
class Candidates:
    """Candidate near-copy pairs with the hypothesis that proposed each: window ``window[p]`` of image ``a[p]``
    (-1: the full frame) looks like image ``b[p]`` in orientation ``orientation[p]``, their pHashes ``bits[p]``
    apart. An unordered pair has at most two rows: its best full-frame and its best crop-window hypothesis."""

    a: np.ndarray
    b: np.ndarray
    window: np.ndarray
    orientation: np.ndarray
    bits: np.ndarray

    def __len__(self) -> int:
        return len(self.a)

    def take(self, index: np.ndarray) -> Candidates:
        return Candidates(self.a[index], self.b[index], self.window[index], self.orientation[index], self.bits[index])

    def pair_keys(self, n: int) -> np.ndarray:
        """One int64 per row naming its unordered pair of rows (0..n-1)."""
        return pair_keys(self.a, self.b, n)


def pair_keys(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """One int64 per (a[k], b[k]) naming the unordered pair of rows (0..n-1)."""
    return np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)


def _best_per_pair(a: np.ndarray, b: np.ndarray, window: np.ndarray, orientation: np.ndarray, bits: np.ndarray,
                   n: int) -> Candidates:
    """Per unordered pair, the full-frame hypothesis and the crop-window one with the fewest bits (if any)."""
    c = Candidates(a, b, window, orientation, bits)
    key = c.pair_keys(n) * 2 + (window >= 0)
    order = np.lexsort((window, bits, key))
    first = order[np.r_[True, key[order][1:] != key[order][:-1]]] if len(order) else order
    return c.take(first)


def detail_distance(signatures: Signatures, a: np.ndarray, window: np.ndarray, b: np.ndarray,
                     orientation: np.ndarray) -> np.ndarray:
    """Bits in which the detail hash of image a's query (window, -1 the upright frame) and image b's in
    ``orientation`` differ."""
    n_orient = signatures.variants.shape[1]
    query = signatures.detail[a, np.where(window < 0, 0, n_orient + window)]
    entry = signatures.detail[b, orientation]
    return _popcount(query ^ entry).sum(axis=-1, dtype=np.int64)


def _distinct_entries(signatures: Signatures, values: np.ndarray, rows: np.ndarray,
                      orientation: np.ndarray) -> np.ndarray:
    """Indices of the entries to search: an orientation whose pHash equals another's of the same image (a
    symmetric picture's flips) once, unless its detail hash differs (pHash agrees, the picture does not: the
    orientation a copy matches must be the one the check and verification then turn it by)."""
    order = np.lexsort((orientation, rows, values))
    if not len(order):
        return order
    dup = np.flatnonzero((np.diff(values[order]) == 0) & (np.diff(rows[order]) == 0)) + 1
    now, before = order[dup], order[dup - 1]
    same = (signatures.detail[rows[now], orientation[now]] == signatures.detail[rows[before], orientation[before]])
    keep = np.ones(len(order), bool)
    keep[dup[same.all(axis=-1)]] = False
    return order[keep]


def candidate_pairs(signatures: Signatures, threshold: int, rows: np.ndarray | None = None,
                    detail_bits: int | None = DETAIL_MAX_BITS) -> Candidates:
    """Pairs of ``rows`` (default all) proposed by pHash: a query (an image's upright pHash, or a crop window's)
    within ``threshold`` bits of the other image's pHash in one of the 8 orientations, and their detail hashes
    under that hypothesis within ``detail_bits`` (None: pHash alone, for comparison)."""
    rows = np.arange(len(signatures)) if rows is None else np.asarray(rows, dtype=np.int64)
    n_windows = signatures.windows.shape[1]
    # Entries: every orientation of every row; equal (hash, row) entries (a symmetric image's flips) once.
    e_rows = np.repeat(rows, signatures.variants.shape[1])
    e_orient = np.tile(np.arange(signatures.variants.shape[1]), len(rows))
    e_values = signatures.variants[rows].ravel()
    fresh = _distinct_entries(signatures, e_values, e_rows, e_orient)
    e_rows, e_orient, e_values = e_rows[fresh], e_orient[fresh], e_values[fresh]
    # Queries: the upright hash (window -1) and each crop window of every row.
    q_rows = np.repeat(rows, 1 + n_windows)
    q_window = np.tile(np.arange(-1, n_windows), len(rows))
    q_values = np.concatenate([signatures.variants[rows, :1], signatures.windows[rows]], axis=1).ravel()
    found: list[Candidates] = []
    n, pending, folded = len(signatures), 0, 0
    for q, e, bits in hamming_join(q_values, e_values, threshold):
        a, b, window, orientation = q_rows[q], e_rows[e], q_window[q], e_orient[e]
        keep = a != b
        if detail_bits is not None:
            keep[keep] = detail_distance(signatures, a[keep], window[keep], b[keep], orientation[keep]) <= detail_bits
        found.append(  # compact rows: int32 images, int8 hypotheses
            Candidates(
                a[keep].astype(np.int32),
                b[keep].astype(np.int32),
                window[keep].astype(np.int8),
                orientation[keep].astype(np.int8),
                bits[keep].astype(np.int8),
            )
        )
        pending += int(keep.sum())
        if pending > max(_BLOCK_ELEMENTS, 2 * folded):  # fold the hits together now and then: bounded memory
            found = [_concat_best(found, n)]
            pending = folded = len(found[0])
    return _concat_best(found, n)


def _concat_best(parts: list[Candidates], n: int) -> Candidates:
    if not parts:
        empty = np.zeros(0, np.int64)
        return Candidates(empty, empty, empty, empty, empty)
    cat = [np.concatenate([getattr(p, f) for p in parts]) for f in ("a", "b", "window", "orientation", "bits")]
    return _best_per_pair(*cat, n)


def _orientation_index() -> np.ndarray:
    """(8, S*S) gather indices: ``x.ravel()[index[k]]`` is ``x`` under ORIENTATIONS[k] (as decode orients)."""
    s = THUMBNAIL_SIZE
    grid = np.arange(s * s).reshape(s, s)
    turned = (grid, grid[:, ::-1], grid[::-1, :], np.rot90(grid, 1), np.rot90(grid, 2), np.rot90(grid, 3),
              grid.T, np.rot90(grid, 2).T)
    return np.stack([t.ravel() for t in turned])


def _blur_matrix(sigma: float, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """(size, size) Gaussian blur of a row, edges reflected."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    m = np.zeros((size, size))
    for i in range(size):
        for offset, w in zip(range(-radius, radius + 1), taps, strict=True):
            j = i + offset
            j = -j - 1 if j < 0 else (2 * size - j - 1 if j >= size else j)
            m[i, j] += w
    return m


def _spans() -> tuple[np.ndarray, np.ndarray]:
    """Per window (full frame last, index -1) and refinement: the (rows, cols) resampling matrices, shapes
    (windows + 1, R*R, S, S) flattened over the R x R nudges of the span's two edges."""
    windows = [*CROP_WINDOWS, (0.0, 0.0, 0.0, 0.0)]
    nudges = list(itertools.product(_REFINE, _REFINE))
    size = THUMBNAIL_SIZE
    rows = np.stack([[resample_matrix(t + d0, 1 - b + d1, size) for d0, d1 in nudges] for (_, _, t, b) in windows])
    cols = np.stack([[resample_matrix(lo + d0, 1 - hi + d1, size) for d0, d1 in nudges] for (lo, hi, _, _) in windows])
    return rows.astype(np.float32), cols.astype(np.float32)


_ORIENT = _orientation_index()
_SPAN_ROWS, _SPAN_COLS = _spans()
_BLURS = np.stack([_blur_matrix(s) for s in _DOG_SIGMAS]).astype(np.float32)


def _apply(left: np.ndarray, x: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ x @ right.T`` for a stack of images, with one (S, S) or per-image (P, S, S) matrix on each side
    (numpy's stacked matmul: measured faster here than one large product over reshaped stacks)."""
    return np.matmul(np.matmul(left, x), np.swapaxes(right, -1, -2))


def _ncc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of paired rows of two (P, k) arrays (0 where either is flat)."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denom = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    return np.where(denom > 1e-6, (x * y).sum(axis=1) / np.maximum(denom, 1e-12), 0.0)


def _best_span(profile_a: np.ndarray, profile_b: np.ndarray, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the span (index into ``spans`` (R, S, S)) whose resampling of ``profile_a`` (P, S) correlates
    best with ``profile_b``, and that correlation."""
    r, s, _ = spans.shape
    resampled = (profile_a @ spans.reshape(r * s, s).T).reshape(-1, r, s)
    target = profile_b - profile_b.mean(axis=1, keepdims=True)  # centred: the dot product ignores a's mean
    target /= np.sqrt(np.maximum((target * target).sum(axis=1, keepdims=True), 1e-6))
    dots = np.einsum("prs,ps->pr", resampled, target)
    spread = (resampled * resampled).sum(axis=2) - resampled.sum(axis=2) ** 2 / s
    scores = dots / np.sqrt(np.maximum(spread, 1e-6))
    best = scores.argmax(axis=1)
    return best, scores[np.arange(len(best)), best]


def _band_pass(x: np.ndarray) -> np.ndarray:
    fine, coarse = _BLURS
    return _apply(fine, x, fine) - _apply(coarse, x, coarse)


def _verify_window(a: np.ndarray, b: np.ndarray, window: int) -> np.ndarray:
    """Scores of pairs of thumbnails (P, S, S) float32, b already oriented, for one crop window of a."""
    rows, cols = _SPAN_ROWS[window], _SPAN_COLS[window]
    col, col_fit = _best_span(a.mean(axis=1), b.mean(axis=1), cols)
    row, row_fit = _best_span(a.mean(axis=2), b.mean(axis=2), rows)
    scores = np.full(len(a), -1.0, np.float32)
    # Cheap first: copies' row and column profiles agree almost perfectly once aligned, most other pairs' do not
    # (profiles of a low-contrast image are mostly noise, so those pairs always get the closer look).
    flat_profiles = np.minimum(b.mean(axis=1).std(axis=1), b.mean(axis=2).std(axis=1)) < _PROFILE_MIN_SPREAD
    fit = np.flatnonzero((np.minimum(col_fit, row_fit) >= _PROFILE_MIN) | flat_profiles)
    if len(fit):
        aligned = _apply(rows[row[fit]], a[fit], cols[col[fit]])
        s, m = THUMBNAIL_SIZE, _MARGIN
        pa = _band_pass(aligned)[:, m : s - m, m : s - m].reshape(len(fit), -1)
        pb = _band_pass(b[fit])[:, m : s - m, m : s - m].reshape(len(fit), -1)
        scores[fit] = _ncc(pa, pb)
    return scores


def verify(signatures: Signatures, candidates: Candidates) -> np.ndarray:
    """The agreement score of every candidate (float32, -1..1; a near copy scores at least ``VERIFY_MIN_SCORE``,
    through a crop window ``VERIFY_MIN_SCORE_CROP``).

    Image b is put in the orientation that matched and image a's crop window resampled onto it; each edge of
    that window is nudged by up to 2% of the side where the row and column profiles (mean of each column, of
    each row) agree best. Pairs whose profiles then still disagree (correlation below ``_PROFILE_MIN``) score
    -1; the others score the correlation of the band-pass of the aligned thumbnails, their borders left out.
    """
    scores = np.zeros(len(candidates), np.float32)
    if not len(candidates):
        return scores
    flat = signatures.thumbnails.reshape(len(signatures), -1)
    s = THUMBNAIL_SIZE
    windows = np.where(candidates.window < 0, len(CROP_WINDOWS), candidates.window)
    order = np.argsort(windows, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(windows[order]) != 0, True])
    for lo, hi in itertools.pairwise(bounds.tolist()):
        for start in range(lo, hi, _VERIFY_CHUNK):
            chunk = order[start : min(start + _VERIFY_CHUNK, hi)]
            a = flat[candidates.a[chunk]].astype(np.float32).reshape(-1, s, s)
            turned = np.take_along_axis(flat[candidates.b[chunk]], _ORIENT[candidates.orientation[chunk]], axis=1)
            b = turned.astype(np.float32).reshape(-1, s, s)
            scores[chunk] = _verify_window(a, b, int(windows[chunk[0]]))
    return scores


@dataclass
class Judged:
    """One row per candidate pair: its best verification score, the pHash bits of that hypothesis, and whether
    any hypothesis passed its bar."""

    a: np.ndarray
    b: np.ndarray
    score: np.ndarray
    bits: np.ndarray
    verified: np.ndarray


def judge(candidates: Candidates, scores: np.ndarray, n: int) -> Judged:
    """Candidate rows (up to two hypotheses a pair) folded into pairs: verified when a full-frame hypothesis
    reaches ``VERIFY_MIN_SCORE`` or a crop-window one ``VERIFY_MIN_SCORE_CROP``."""
    passed = scores >= np.where(candidates.window < 0, VERIFY_MIN_SCORE, VERIFY_MIN_SCORE_CROP)
    keys = candidates.pair_keys(n)
    order = np.lexsort((-scores, keys))  # per pair, its best score first
    first = order[np.r_[True, keys[order][1:] != keys[order][:-1]]] if len(order) else order
    verified_keys = keys[passed]
    return Judged(
        candidates.a[first],
        candidates.b[first],
        scores[first],
        candidates.bits[first],
        np.isin(keys[first], verified_keys),
    )
