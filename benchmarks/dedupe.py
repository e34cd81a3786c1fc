"""Benchmark near-duplicate grouping: is it right on real dermoscopy, and does it stay near-linear?

Three parts, one run:

* **quality**: the real images of derm-sample and ham10000-dev, plus ``planted`` edited copies of randomly chosen
  ones (re-encoded as JPEG q50-q100 or PNG, resized 0.5x-2x, flipped/rotated/transposed, cropped by up to 10% of
  each side, brightness or contrast +-10%, a colour cast of up to +-8% per channel, or several of these at
  once). Every copy goes through convert's own decoding. Recall: the share of copies grouped with their original,
  by edit. Candidate pairs (pHash within ``threshold`` bits) and verified pairs are counted by what they truly
  are: a planted copy, the same file twice (derm-sample's 30), another photo of the same HAM lesion (lesion_id),
  or different images; the closest rejected and accepted pairs of different images are listed. The pHash-only
  grouping this replaces (candidates joined without verification) is scored on the same images.
* **convert**: `derm-accel convert` of ham10000-dev with ``--preset ham10000`` in a fresh process (2 workers):
  rows, files dropped by reason, groups, the largest group outside lesion units, lesion units across splits.
* **scale**: grouping ``sizes`` signatures (default 10k / 50k / 245k), each in a fresh process (wall time and peak
  RSS of ``group_images`` + ``resolve_groups``; then the candidate search and the verification timed apart, and
  the candidates pHash alone would propose). Stand-in images: views of the real images, each view of an image
  turned, zoomed and mirrored unlike the others so they are different pictures (see ``_view``), drawn at the
  window's own size (no upsampling), 5% of them given an edited copy
  as above, a fifth of those copies under another label, so drops by reason show the conflicts that must appear
  (views of one lesion, or of one derm-sample file name, share its label). Groups that join views of different
  lesions (file names) count the false links at that size.
  The growth exponent is fitted to the times and peak RSS.

    python benchmarks/dedupe.py --update-docs
    python benchmarks/dedupe.py --sizes 10000 --planted 300 --convert-ham off   # a quicker look
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image, ImageEnhance

if not __package__:  # run as `python benchmarks/dedupe.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, as_list, markdown_table, parse_bool, provenance_lines
from derm_accel.data.decode import (
    DETAIL_BITS,
    DecodeOptions,
    content_hash,
    decode_bytes,
    detail_hashes,
    near_copy_signature,
)
from derm_accel.data.dedupe import connected_groups, group_images
from derm_accel.data.near_copies import (
    DETAIL_MAX_BITS,
    VERIFY_MIN_SCORE,
    VERIFY_MIN_SCORE_CROP,
    Signatures,
    candidate_pairs,
    detail_distance,
    judge,
    pair_keys,
    verify,
)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
EDITS = ("jpeg", "png", "resize", "orientation", "crop", "brightness", "contrast", "colour_cast", "combined")
_TRANSPOSES = tuple(Image.Transpose)[:7]  # every non-identity element of D4


def _encode(image: Image.Image, rng: np.random.Generator, fmt: str = "JPEG", quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=quality or int(rng.integers(75, 96)))
    return buf.getvalue()


def _crop(image: Image.Image, rng: np.random.Generator, most: float = 0.1) -> Image.Image:
    """Up to ``most`` of each side's length cut away, split at random between its two ends."""
    w, h = image.size
    (tx, ty), (fx, fy) = rng.uniform(0, most, 2), rng.uniform(0, 1, 2)
    left, top = round(w * tx * fx), round(h * ty * fy)
    return image.crop((left, top, w - round(w * tx * (1 - fx)), h - round(h * ty * (1 - fy))))


def _resize(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    return image.resize((max(8, round(w * factor)), max(8, round(h * factor))), Image.Resampling.BICUBIC)


def _cast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    gains = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * gains, 0, 255).round().astype(np.uint8))


def edited_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """The file bytes of an edited copy of ``image`` (see the module docstring for the edits)."""
    if kind == "jpeg":
        return _encode(image, rng, quality=int(rng.integers(50, 101)))
    if kind == "png":
        return _encode(image, rng, "PNG")
    if kind == "resize":
        return _encode(_resize(image, float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))), rng)
    if kind == "orientation":
        return _encode(image.transpose(_TRANSPOSES[int(rng.integers(0, 7))]), rng)
    if kind == "crop":
        return _encode(_crop(image, rng), rng)
    if kind == "brightness":
        return _encode(ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1)), rng)
    if kind == "contrast":
        return _encode(ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1)), rng)
    if kind == "colour_cast":
        return _encode(_cast(image, rng), rng)
    if kind == "combined":  # crop, turn, resize, brighten and recompress at once
        image = _crop(image, rng, 0.06).transpose(_TRANSPOSES[int(rng.integers(0, 7))])
        image = ImageEnhance.Brightness(_resize(image, rng.uniform(0.6, 1.6))).enhance(rng.uniform(0.92, 1.08))
        return _encode(image, rng, quality=int(rng.integers(60, 96)))
    raise ValueError(f"unknown edit {kind!r}; one of {EDITS}")


def _real_images(data_root: Path, sources: list[str]) -> list[dict[str, Any]]:
    """Path, label, name and (HAM) lesion id of every real image of the named sources."""
    out: list[dict[str, Any]] = []
    if "derm-sample" in sources:
        root = data_root / "derm-sample"
        for path in sorted(root.glob("*/*.jpg")):
            out.append({"path": path, "label": path.parent.name, "name": path.stem, "lesion": ""})
    if "ham10000-dev" in sources:
        root = data_root / "ham10000-dev"
        with open(root / "HAM10000_metadata.csv", newline="") as f:
            rows = {r["image_id"]: r for r in csv.DictReader(f)}
        for path in sorted((root / "images").glob("*.jpg")):
            row = rows[path.stem]
            out.append({"path": path, "label": row["dx"], "name": path.stem, "lesion": row["lesion_id"]})
    if not out:
        raise FileNotFoundError(f"no images of {sources} under {data_root}; pass --data-root (the shared/data folder)")
    return out


def _decode(data: bytes) -> tuple[str, Any]:
    decoded = decode_bytes(0, data, DecodeOptions())
    if decoded.signature is None:
        raise RuntimeError(f"benchmark image failed to decode: {decoded.reason} {decoded.detail}")
    return decoded.content_hash, decoded.signature


def _truth(pair_a: np.ndarray, pair_b: np.ndarray, meta: dict[str, np.ndarray]) -> np.ndarray:
    """What each pair truly is: copy (same source image), same_file (one name twice), same_lesion, different."""
    src = meta["source"]
    same_src = src[pair_a] == src[pair_b]
    same_name = meta["name"][pair_a] == meta["name"][pair_b]
    lesion_a, lesion_b = meta["lesion"][pair_a], meta["lesion"][pair_b]
    same_lesion = (lesion_a == lesion_b) & (lesion_a != "")
    return np.select([same_src, same_name, same_lesion], ["copy", "same_file", "same_lesion"], "different")


def _false_merges(groups: list[list[int]], meta: dict[str, np.ndarray]) -> tuple[int, int]:
    """Groups holding two source images that are neither the same file nor the same lesion, and their images."""
    bad = images = 0
    for g in groups:
        sources = {int(meta["source"][i]) for i in g}
        if len(sources) < 2:
            continue
        keys = {meta["lesion"][s] or f"name:{meta['name'][s]}" for s in sources}
        if len(keys) > 1:
            bad += 1
            images += len(g)
    return bad, images


def _pair_names(a: np.ndarray, b: np.ndarray, scores: np.ndarray, index: np.ndarray, meta: dict) -> list[dict]:
    return [
        {"images": [str(meta["name"][meta["source"][a[p]]]), str(meta["name"][meta["source"][b[p]]])],
         "score": round(float(scores[p]), 3)}
        for p in index
    ]


def _plain_correlation(sig: Signatures, cands: Any) -> np.ndarray:
    """Correlation of the two thumbnails in the orientation that matched, with no crop alignment: the baseline."""
    s = sig.thumbnails.shape[1]
    grid = np.arange(s * s).reshape(s, s)
    turned = (grid, grid[:, ::-1], grid[::-1, :], np.rot90(grid, 1), np.rot90(grid, 2), np.rot90(grid, 3),
              grid.T, np.rot90(grid, 2).T)
    index = np.stack([t.ravel() for t in turned])  # decode.ORIENTATIONS order
    flat = sig.thumbnails.reshape(len(sig), -1)
    a = flat[cands.a].astype(np.float64)
    b = np.take_along_axis(flat[cands.b], index[cands.orientation], axis=1).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt(np.maximum((a * a).sum(axis=1) * (b * b).sum(axis=1), 1e-9))


def real_candidate_rate(sig: Signatures, meta: dict[str, np.ndarray], originals: int, threshold: int,
                        seed: int) -> list[dict[str, Any]]:
    """How the candidates among different real pictures grow with the collection: on random subsets of the real
    images (no planted copies), candidate pairs of different pictures per pair of images, by pHash alone (with
    crop windows, and full frame only) and past the detail check (what convert verifies). A fixed rate per pair
    means candidates grow as n^2 (what verification pays)."""
    rng = np.random.default_rng(seed)
    picture = np.array([lesion or f"name:{name}" for lesion, name in zip(meta["lesion"], meta["name"], strict=True)])
    full = sig.full_frame()
    rows = []
    for n in sorted({min(originals, m) for m in (1000, 2000, 4000, originals)}):
        subset = np.sort(rng.choice(originals, n, replace=False))
        row: dict[str, Any] = {"images": n}
        for name, s, detail in (("with_windows", sig, None), ("full_frame", full, None),
                                ("detail_checked", sig, DETAIL_MAX_BITS)):
            c = candidate_pairs(s, threshold, subset, detail_bits=detail)
            keys = np.unique(c.pair_keys(len(sig))[picture[c.a] != picture[c.b]])
            row[name] = {"pairs": len(keys), "per_pair": float(len(keys) / (n * (n - 1) / 2))}
        rows.append(row)
    return rows


def _copy_kind(a: np.ndarray, b: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """The edit of a pair's copy (a copy pair is an original and its copy)."""
    return np.where(kinds[a] == "original", kinds[b], kinds[a])


def _score_checks(sig: Signatures, cands: Any, pairs: Any, truth: np.ndarray, kinds: np.ndarray) -> dict[str, Any]:
    """The plain correlation (baseline) and the verification score of candidate pairs of different images and of
    copies by edit, the better of a pair's hypotheses (``pairs`` from judge(), in the order of their keys)."""
    keys = cands.pair_keys(len(sig))
    by_key = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(keys[by_key]) != 0])
    plain = np.maximum.reduceat(_plain_correlation(sig, cands)[by_key], starts)
    different, copies = np.flatnonzero(truth == "different"), np.flatnonzero(truth == "copy")
    kind = _copy_kind(pairs.a, pairs.b, kinds)
    checks: dict[str, Any] = {
        name: {
            "different_max": round(float(values[different].max()), 3) if len(different) else None,
            "different_p99_9": round(float(np.percentile(values[different], 99.9)), 3) if len(different) else None,
            "copy_min_by_edit": {
                k: round(float(values[copies][kind[copies] == k].min()), 3) for k in EDITS if (kind[copies] == k).any()
            },
        }
        for name, values in (("plain_correlation", plain), ("verification_score", pairs.score))
    }
    checks["profile_rejected"] = {
        "different": round(float((pairs.score[different] == -1).mean()), 3) if len(different) else None,
        "copy": int((pairs.score[copies] == -1).sum()),
    }
    return checks


def _detail_distances(sig: Signatures, cands: Any, scores: np.ndarray, meta: dict[str, np.ndarray],
                      kinds: np.ndarray) -> dict[str, Any]:
    """Detail-hash bits apart, per pair of pHash candidates (the closest hypothesis): copies whose hypothesis
    verifies (the closest verifying one), by edit, and different images; against the bar."""
    bits = detail_distance(sig, cands.a, cands.window, cands.b, cands.orientation)
    passed = scores >= np.where(cands.window < 0, VERIFY_MIN_SCORE, VERIFY_MIN_SCORE_CROP)
    keys = cands.pair_keys(len(sig))
    truth = _truth(cands.a, cands.b, meta)

    def closest(rows: np.ndarray) -> np.ndarray:  # per pair among ``rows``, the row with the fewest bits
        order = rows[np.lexsort((bits[rows], keys[rows]))]
        return order[np.r_[True, keys[order][1:] != keys[order][:-1]]] if len(order) else order

    copies = closest(np.flatnonzero((truth == "copy") & passed))
    different = closest(np.flatnonzero(truth == "different"))
    kind = _copy_kind(cands.a[copies], cands.b[copies], kinds)
    return {
        "bits": DETAIL_BITS,
        "bar": DETAIL_MAX_BITS,
        "verified_copy_max_by_edit": {k: int(bits[copies][kind == k].max()) for k in EDITS if (kind == k).any()},
        "different_quantiles": {q: int(np.percentile(bits[different], float(q))) for q in ("1", "5", "50")}
        if len(different)
        else {},
        "different_within_bar": round(float((bits[different] <= DETAIL_MAX_BITS).mean()), 4)
        if len(different)
        else None,
    }


def bench_quality(data_root: Path, sources: list[str], planted: int, threshold: int, seed: int) -> dict[str, Any]:
    """Recall, pair precision and rejected pairs on real images with planted copies (see the module docstring)."""
    rng = np.random.default_rng(seed)
    images = _real_images(data_root, sources)
    content, signatures, source, kinds = [], [], [], []
    started = time.perf_counter()
    for i, image in enumerate(images):
        c, s = _decode(image["path"].read_bytes())
        content.append(c), signatures.append(s), source.append(i), kinds.append("original")
    originals = rng.choice(len(images), size=min(planted, len(images)), replace=False)
    for n, i in enumerate(originals.tolist()):
        kind = EDITS[n % len(EDITS)]
        with Image.open(images[i]["path"]) as im:
            c, s = _decode(edited_copy(im.convert("RGB"), kind, rng))
        content.append(c), signatures.append(s), source.append(i), kinds.append(kind)
    signature_s = time.perf_counter() - started
    meta = {
        "source": np.array(source),
        "name": np.array([im["name"] for im in images]),
        "lesion": np.array([im["lesion"] for im in images]),
    }
    meta["name"] = meta["name"][meta["source"]]
    meta["lesion"] = meta["lesion"][meta["source"]]
    meta["source"] = np.arange(len(images))[meta["source"]]
    sig = Signatures.of(signatures)

    started = time.perf_counter()
    grouping = group_images(content, sig, threshold)
    group_s = time.perf_counter() - started
    group_of = np.empty(len(content), np.int64)
    for g, members in enumerate(grouping.groups):
        group_of[members] = g
    copies = np.arange(len(images), len(content))
    hit = group_of[copies] == group_of[meta["source"][copies]]
    kinds_arr = np.array(kinds)
    recall = {k: round(float(hit[kinds_arr[copies] == k].mean()), 3) for k in EDITS if (kinds_arr[copies] == k).any()}

    # Every candidate with its score and truth (the same search and check group_images ran).
    unique_rows = np.sort(np.unique(np.asarray(content, dtype=object), return_index=True)[1])
    cands = candidate_pairs(sig, threshold, unique_rows)
    pairs = judge(cands, verify(sig, cands), len(content))
    scores, accepted = pairs.score, pairs.verified
    truth = _truth(pairs.a, pairs.b, meta)
    table = {
        t: {"candidates": int((truth == t).sum()), "verified": int((accepted & (truth == t)).sum())}
        for t in ("copy", "same_file", "same_lesion", "different")
    }
    # The same search without the detail check: what it removes, and the verified pairs it costs.
    n = len(content)
    loose = candidate_pairs(sig, threshold, unique_rows, detail_bits=None)
    loose_scores = verify(sig, loose)
    loose_pairs = judge(loose, loose_scores, n)
    loose_truth = _truth(loose_pairs.a, loose_pairs.b, meta)
    kept = np.isin(pair_keys(loose_pairs.a, loose_pairs.b, n), pair_keys(pairs.a, pairs.b, n))
    for t in table:
        table[t]["phash_candidates"] = int((loose_truth == t).sum())
        table[t]["verified_without_detail_check"] = int((loose_pairs.verified & (loose_truth == t)).sum())
        table[t]["verified_pairs_detail_check_removed"] = int((loose_pairs.verified & ~kept & (loose_truth == t)).sum())
    different = np.flatnonzero(truth == "different")
    checks = _score_checks(sig, loose, loose_pairs, loose_truth, kinds_arr)  # over every pHash candidate
    detail = _detail_distances(sig, loose, loose_scores, meta, kinds_arr)
    closest_rejected = different[~accepted[different]]
    closest_rejected = closest_rejected[np.argsort(-scores[closest_rejected])[:8]]
    wrongly_accepted = different[accepted[different]]
    verified_known = sum(table[t]["verified"] for t in ("copy", "same_file", "different"))

    # The pHash-only grouping this replaces: every full-frame candidate joined, no verification.
    old = candidate_pairs(sig.full_frame(), threshold, unique_rows, detail_bits=None)
    exact_first = np.unique(np.asarray(content, dtype=object), return_index=True, return_inverse=True)
    old_groups = connected_groups(
        len(content), np.r_[exact_first[1][exact_first[2]], old.a], np.r_[np.arange(len(content)), old.b]
    )
    old_of = np.empty(len(content), np.int64)
    for g, members in enumerate(old_groups):
        old_of[members] = g
    old_recall = float((old_of[copies] == old_of[meta["source"][copies]]).mean())
    new_false = _false_merges(grouping.groups, meta)
    old_false = _false_merges(old_groups, meta)
    return {
        "images": len(images),
        "planted": len(copies),
        "signature_s": round(signature_s, 2),
        "group_s": round(group_s, 2),
        "recall": round(float(hit.mean()), 4),
        "recall_by_edit": recall,
        "pairs": table,
        "pair_precision": round(
            (table["copy"]["verified"] + table["same_file"]["verified"]) / max(1, verified_known), 4
        ),
        "checks": checks,
        "detail": detail,
        "closest_rejected_different": _pair_names(pairs.a, pairs.b, scores, closest_rejected, meta),
        "accepted_different": _pair_names(pairs.a, pairs.b, scores, wrongly_accepted, meta),
        "largest_group": max(len(g) for g in grouping.groups),
        "real_candidates": real_candidate_rate(sig, meta, len(images), threshold, seed),
        "false_merge_groups": new_false[0],
        "false_merge_images": new_false[1],
        "phash_only": {
            "recall": round(old_recall, 4),
            "largest_group": max(len(g) for g in old_groups),
            "false_merge_groups": old_false[0],
            "false_merge_images": old_false[1],
        },
    }


# ---------------------------------------------------------------------------------------------------- convert


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _run_child(code: str, *args: str) -> tuple[dict[str, Any], float, float]:
    """Run ``code`` in a fresh Python; its last stdout line (JSON), wall seconds and peak RSS (MB) of its tree."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    proc, peak, stop = psutil.Process(child.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"benchmark child failed with exit code {child.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), wall, peak / 2**20


_CONVERT_CHILD = """
import json, sys
from collections import Counter
from datasets import load_from_disk
from derm_accel.data.convert import convert_folders
from derm_accel.data.metadata import metadata_spec
src, out, table = sys.argv[1], sys.argv[2], sys.argv[3]
r = convert_folders(src, out, metadata=metadata_spec([table], preset="ham10000"), num_proc=2, progress=False)
data = load_from_disk(out)
splits_of = {}
for split, ds in data.items():
    for lesion in ds["lesion_id"]:
        splits_of.setdefault(lesion, set()).add(split)
dup = r["duplicates"]
print(json.dumps({
    "files": r["files_total"], "rows": r["rows_total"], "skipped_by_reason": r["skipped_by_reason"],
    "elapsed_s": r["elapsed_s"], "largest_group": dup["largest_group"], "groups_with_copies": dup["groups_with_copies"],
    "conflict_groups": len(dup["conflict_groups"]), "large_groups": len(dup["large_groups"]),
    "near": {k: v for k, v in dup["near_copy_search"].items() if k != "closest_rejected"},
    "largest_unit": (r.get("grouping") or {}).get("largest_unit"),
    "lesions_in_two_splits": sum(len(s) > 1 for s in splits_of.values()),
    "stored_images": {k: v for k, v in r["stored_images"].items() if k != "how"},
}))
"""


def bench_convert_ham(data_root: Path, workdir: Path) -> dict[str, Any]:
    src = data_root / "ham10000-dev"
    out = workdir / "ham10000-dev-converted"
    shutil.rmtree(out, ignore_errors=True)
    result, wall, peak = _run_child(_CONVERT_CHILD, str(src / "images"), str(out), str(src / "HAM10000_metadata.csv"))
    shutil.rmtree(out, ignore_errors=True)
    return {**result, "wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1)}


# ------------------------------------------------------------------------------------------------------ scale



_SOURCE_CACHE: dict[str, Image.Image] = {}


def _source(path: str) -> Image.Image:
    """The decoded real image (tasks come sorted by source, so a one-image cache serves most of them)."""
    if path not in _SOURCE_CACHE:
        _SOURCE_CACHE.clear()
        with Image.open(path) as im:
            _SOURCE_CACHE[path] = im.convert("RGB")
    return _SOURCE_CACHE[path]


_R3 = 1 / 1.2207440846057596 ** np.arange(1, 4)  # steps of the R3 low-discrepancy sequence (Roberts 2018)


def _view(args: tuple[str, int, int, int]) -> tuple[str, Any, int, str, Any]:
    """A stand-in image: view ``k`` of a real one; sometimes with an edited copy. Returns the view's content hash
    and signature, whether a copy was planted (-1 none, 0 same label, 1 other label) and the copy's.

    Views of one image should be different pictures, not near copies of each other. Up to the 8 orientations
    (which grouping ignores), a view is a turn by 0-90 degrees, a zoom of 1.25-2x and a place of the window;
    view k takes them from point k of a 3-D low-discrepancy sequence, so any two views of one image differ
    clearly in one of them, and it is drawn at the window's own size (no upsampling). Then one of the 8
    orientations, by k."""
    path, seed, planted, k = args
    rng = np.random.default_rng(seed)
    image = _source(path)
    w, h = image.size
    u_angle, u_zoom, u_place = (0.5 + (k + 1) * _R3) % 1.0
    angle = np.deg2rad(90 * u_angle)
    cos, sin = np.cos(angle), np.sin(angle)
    span_x, span_y = w * abs(cos) + h * abs(sin), w * abs(sin) + h * abs(cos)  # turned window's box at zoom 1
    zoom = max(1.25 + 0.75 * u_zoom, 1.02 * max(span_x / w, span_y / h))
    cx = span_x / zoom / 2 + u_place * (w - span_x / zoom)
    cy = span_y / zoom / 2 + ((u_place * 7.31) % 1.0) * (h - span_y / zoom)
    size = (max(16, round(w / zoom)), max(16, round(h / zoom)))
    # One affine map from the output to the source: the window turned about its centre, at 1:1 scale.
    sx, sy = w / zoom / size[0], h / zoom / size[1]
    a, b, d, e = cos * sx, -sin * sy, sin * sx, cos * sy
    c = cx - a * size[0] / 2 - b * size[1] / 2
    f = cy - d * size[0] / 2 - e * size[1] / 2
    view = image.transform(size, Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR)
    if k % 8:
        view = view.transpose(_TRANSPOSES[k % 8 - 1])
    if planted < 0:
        return content_hash(view), near_copy_signature(view), -1, "", None
    copy_content, copy_signature = _decode(edited_copy(view, EDITS[seed % len(EDITS)], rng))
    return content_hash(view), near_copy_signature(view), planted, copy_content, copy_signature


def _add_detail(folder: Path, chunk: int = 8192) -> None:
    """detail.npy of cached stand-ins, from their thumbnails (decode computes the same from the same square)."""
    thumbnails = np.load(folder / "thumbnails.npy", mmap_mode="r")
    first = detail_hashes(thumbnails[:1])
    part = folder / "detail.npy.part"
    out = np.lib.format.open_memmap(part, "w+", first.dtype, (len(thumbnails), *first.shape[1:]))
    for start in range(0, len(thumbnails), chunk):
        out[start : start + chunk] = detail_hashes(thumbnails[start : start + chunk])
    out.flush()
    del out
    part.rename(folder / "detail.npy")


def make_stand_ins(data_root: Path, sources: list[str], n: int, folder: Path, seed: int = 0) -> Path:
    """``n`` stand-in signatures (views, then 5% planted copies of views) with labels and, per row, the view a
    copy was made of (-1 for a view), saved under ``folder``; cached."""
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"n": n, "seed": seed}:
        if not (folder / "detail.npy").is_file():  # made before the detail hash: it follows from the thumbnails
            _add_detail(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    images = _real_images(data_root, sources)
    rng = np.random.default_rng(seed)
    copies = int(n * 0.05)
    n_views = n - copies
    picks = rng.integers(0, len(images), n_views)
    planted = np.full(n_views, -1)
    planted[rng.choice(n_views, copies, replace=False)] = (rng.random(copies) < 0.2).astype(int)  # 1: relabelled
    # One picture: a HAM10000 lesion, or a derm-sample file name (30 names are one file in two class folders).
    # Its views share its label, as photos of one lesion do, and count as one image for "groups joining".
    _, picture = np.unique([im["lesion"] or f"name:{im['name']}" for im in images], return_inverse=True)
    picture_label = rng.integers(0, 9, picture.max() + 1)  # 9 classes, as derm-sample
    labels = np.empty(n, np.int64)
    labels[:n_views] = picture_label[picture[picks]]
    source = np.full(n, -1)
    source[:n_views] = picture[picks]
    copy_of = np.full(n, -1)
    sig = Signatures.allocate(n, folder)
    content = np.empty(n, dtype=object)
    order = np.argsort(picks, kind="stable")  # work by source, so each worker decodes a source once
    view_index = np.empty(n_views, np.int64)  # k: how many views of the same image come before this one
    view_index[order] = np.arange(n_views) - np.searchsorted(picks[order], picks[order])
    tasks = [
        (str(images[picks[i]]["path"]), int(seed * 10_000_000 + i), int(planted[i]), int(view_index[i]))
        for i in order.tolist()
    ]
    planted_copies = []
    with multiprocessing.Pool(min(2, os.cpu_count() or 1)) as pool:
        for i, (c, s, kind, cc, cs) in zip(order.tolist(), pool.imap(_view, tasks, chunksize=64), strict=True):
            content[i] = c
            sig.put(i, s)
            if kind >= 0:
                planted_copies.append((i, kind, cc, cs))
    for row, (i, kind, cc, cs) in enumerate(sorted(planted_copies, key=lambda t: t[0]), n_views):
        content[row], copy_of[row], source[row] = cc, i, picture[picks[i]]  # copies follow their views' order
        sig.put(row, cs)
        labels[row] = labels[i] if kind == 0 else (labels[i] + 1) % 9
    np.save(folder / "variants.npy", sig.variants)
    np.save(folder / "windows.npy", sig.windows)
    np.save(folder / "labels.npy", labels)
    np.save(folder / "copy_of.npy", copy_of)
    np.save(folder / "source.npy", source)
    (folder / "content.json").write_text(json.dumps(content.tolist()))
    sig.thumbnails.flush()
    sig.detail.flush()
    done.write_text(json.dumps({"n": n, "seed": seed}))
    return folder


_SCALE_CHILD = """
import json, sys, time
from collections import Counter
import numpy as np
from derm_accel.data.dedupe import group_images, resolve_groups
from derm_accel.data.near_copies import Signatures, candidate_pairs, verify
folder, n, threshold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
copy_of = np.load(f"{folder}/copy_of.npy")
views = np.flatnonzero(copy_of < 0)
copies = np.flatnonzero(copy_of >= 0)
# The first m views and the copies planted for them: about n rows (copies follow their views' order).
m = int(np.searchsorted(np.arange(len(views)) + np.searchsorted(copy_of[copies], np.arange(len(views))), n))
rows = np.r_[views[:m], copies[copy_of[copies] < m]]
load = lambda name: np.load(f"{folder}/{name}.npy", mmap_mode="r")
sig = Signatures(load("variants")[rows], load("windows")[rows], load("detail")[rows], load("thumbnails")[rows])
every_content = json.loads(open(f"{folder}/content.json").read())
content = [every_content[r] for r in rows.tolist()]
labels = np.load(f"{folder}/labels.npy")[rows].tolist()
source = np.load(f"{folder}/source.npy")[rows]
start = time.perf_counter()
grouping = group_images(content, sig, threshold)
resolution = resolve_groups(grouping.groups, labels=labels, class_names=[str(i) for i in range(9)],
    paths=[str(i) for i in range(len(rows))], content_hashes=content, splits=[None] * len(rows))
seconds = time.perf_counter() - start
# Its two parts again, timed apart (after the measured run: its peak RSS is the run's), and the pHash-only count.
first = np.sort(np.unique(np.asarray(content, dtype=object), return_index=True)[1])
start = time.perf_counter()
candidates = candidate_pairs(sig, threshold, first)
search_s = time.perf_counter() - start
start = time.perf_counter()
verify(sig, candidates)
verify_s = time.perf_counter() - start
phash_candidates = len(np.unique(candidate_pairs(sig, threshold, first, detail_bits=None).pair_keys(len(sig))))
mixed = [g for g in grouping.groups if len(set(source[g].tolist())) > 1]
print(json.dumps({"n": len(rows), "planted": int((copy_of[rows] >= 0).sum()), "seconds": seconds,
    "groups_joining_sources": len(mixed), "images_in_them": sum(len(g) for g in mixed),
    "groups": len(grouping.groups), "largest_group": max(len(g) for g in grouping.groups),
    "candidates": grouping.candidates, "verified": grouping.verified, "phash_candidates": phash_candidates,
    "search_s": round(search_s, 2), "verify_s": round(verify_s, 2),
    "dropped": dict(Counter(s.reason for s in resolution.skipped.values()))}))
"""


def bench_scale(data_root: Path, sources: list[str], sizes: list[int], threshold: int, workdir: Path) -> dict:
    rows = []
    if not sizes:
        return {"rows": rows, "fit": {}}
    folder = make_stand_ins(data_root, sources, max(sizes), workdir / f"stand-ins-{max(sizes)}")
    for n in sizes:
        result, wall, peak = _run_child(_SCALE_CHILD, str(folder), str(n), str(threshold))
        rows.append({**result, "seconds": round(result["seconds"], 2), "wall_s": round(wall, 1),
                     "peak_rss_mb": round(peak, 1)})
        print(f"{result['n']} signatures: {rows[-1]['seconds']} s, peak RSS {rows[-1]['peak_rss_mb']} MB", flush=True)
    fit = {}
    if len(rows) > 1:
        logn = np.log([r["n"] for r in rows])
        fit = {
            "time_exponent": round(float(np.polyfit(logn, np.log([r["seconds"] for r in rows]), 1)[0]), 2),
            "rss_exponent": round(float(np.polyfit(logn, np.log([r["peak_rss_mb"] for r in rows]), 1)[0]), 2),
        }
    return {"rows": rows, "fit": fit}


def bench_dedupe(
    *,
    data_root: str = "",
    sources: Any = "derm-sample,ham10000-dev",
    planted: int = 1000,
    threshold: int = 4,
    sizes: Any = "10000,50000,245000",
    convert_ham: Any = "on",
    seed: int = 0,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Grouping quality on real images with planted copies, a ham10000-dev convert, and grouping time/memory at
    ``sizes`` (stand-in signatures cached in ``workdir``)."""
    root = Path(data_root) if data_root else SHARED_DATA
    source_list = as_list(sources)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="derm-dedupe-bench-"))
    try:
        quality = bench_quality(root, source_list, planted, threshold, seed)
        print(f"recall {quality['recall']}, pair precision {quality['pair_precision']}", flush=True)
        ham = bench_convert_ham(root, work) if parse_bool(convert_ham) else None
        scale = bench_scale(root, source_list, as_list(sizes, int), threshold, work)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    settings = {"sources": ",".join(source_list), "planted": planted, "threshold": threshold,
                "sizes": ",".join(str(s) for s in as_list(sizes, int)), "seed": seed}
    return {
        "settings": settings,
        "results": {"quality": quality, "convert_ham10000_dev": ham, "scale": scale},
        "summary": {
            "recall": quality["recall"],
            "pair_precision": quality["pair_precision"],
            "false_merge_groups": quality["false_merge_groups"],
            **({"ham_conflicts": ham["skipped_by_reason"].get("conflict", 0)} if ham else {}),
            **scale["fit"],
        },
    }


def dedupe_markdown(results: dict[str, Any]) -> str:
    q = results["results"]["quality"]
    old = q["phash_only"]
    quality = markdown_table(
        ("grouping", "recall of planted copies", "largest group", "groups joining different images (images)"),
        [
            ("pHash only (before)", f"{old['recall']:.1%}", old["largest_group"],
             f"{old['false_merge_groups']} ({old['false_merge_images']})"),
            ("pHash + detail candidates, verified", f"{q['recall']:.1%}", q["largest_group"],
             f"{q['false_merge_groups']} ({q['false_merge_images']})"),
        ],
    )
    by_edit = markdown_table(list(q["recall_by_edit"]), [[f"{v:.1%}" for v in q["recall_by_edit"].values()]])
    pairs = markdown_table(
        ("candidate pair is", "pHash candidates", "past the detail check", "verified", "rejected",
         "verified without the detail check", "of those, removed by it"),
        [(t, v["phash_candidates"], v["candidates"], v["verified"], v["candidates"] - v["verified"],
          v["verified_without_detail_check"], v["verified_pairs_detail_check_removed"])
         for t, v in q["pairs"].items()],
    )
    checks = q["checks"]
    edits = list(checks["verification_score"]["copy_min_by_edit"])
    check_table = markdown_table(
        ("score", "different images: max", "p99.9", *[f"copies, {e}: min" for e in edits]),
        [
            (name.replace("_", " "), *[f"{checks[name][k]:.3f}" for k in ("different_max", "different_p99_9")],
             *[f"{checks[name]['copy_min_by_edit'][e]:.3f}" if e in checks[name]["copy_min_by_edit"] else ""
               for e in edits])
            for name in ("plain_correlation", "verification_score")
        ],
    )
    def named(pairs: list[dict]) -> list[str]:  # a copy's pair names its original: list each pair of names once
        return list(dict.fromkeys(f"{'/'.join(sorted(p['images']))} {p['score']}" for p in pairs))

    d = q["detail"]
    most = ", ".join(f"{k} {v}" for k, v in d["verified_copy_max_by_edit"].items())
    rejected = ", ".join(named(q["closest_rejected_different"])[:5])
    accepted = ", ".join(named(q["accepted_different"])) or "none"
    lines = [
        provenance_lines(results),
        f"**Quality**: {q['images']} real images + {q['planted']} planted copies (signatures {q['signature_s']} s, "
        f"grouping {q['group_s']} s).",
        "",
        quality,
        "",
        "Recall by edit:",
        "",
        by_edit,
        "",
        f"Pairs (pair precision {q['pair_precision']:.2%}, counting copies and same-file pairs as right and "
        "other photos of one lesion as neither):",
        "",
        pairs,
        "",
        f"Detail hash, bits apart of {d['bits']} under a pair's closest hypothesis (bar: {d['bar']}): copies whose "
        f"pair verifies without the check, most by edit: {most}; different images' pHash candidates: 1st / 5th / "
        f"50th percentile {' / '.join(str(v) for v in d['different_quantiles'].values())}, "
        f"{d['different_within_bar']:.1%} within the bar.",
        "",
        f"Closest rejected pairs of different images (score): {rejected}. Accepted pairs of different images: "
        f"{accepted}.",
        "",
        "Scores of the pHash candidate pairs, before the detail check (plain correlation: the thumbnails in the "
        "matched orientation, no crop alignment; verification score: convert's check, -1 where the profiles "
        "already disagree; a copy pair counted under the edit of its copy):",
        "",
        check_table,
        "",
        f"The profile test alone rejected {checks['profile_rejected']['different']:.0%} of the candidates of "
        f"different images and {checks['profile_rejected']['copy']} copy pairs.",
        "",
        "Candidates among different real pictures (random subsets of the real images, no planted copies; "
        "pairs of different pictures proposed, and per pair of images):",
        "",
        "| images | pHash, with crop windows | per pair | pHash, full frame only | per pair | "
        "past the detail check | per pair |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['images']} | {r['with_windows']['pairs']} | {r['with_windows']['per_pair']:.1e} | "
            f"{r['full_frame']['pairs']} | {r['full_frame']['per_pair']:.1e} | "
            f"{r['detail_checked']['pairs']} | {r['detail_checked']['per_pair']:.1e} |"
            for r in q.get("real_candidates", [])
        ),
        "",
    ]
    ham = results["results"]["convert_ham10000_dev"]
    if ham:
        near = ham["near"]
        lines += [
            f"**ham10000-dev convert** (`--preset ham10000`, 2 workers): {ham['files']} files, {ham['rows']} rows, "
            f"skipped {ham['skipped_by_reason'] or 'none'}; {ham['groups_with_copies']} groups of copies, largest "
            f"{ham['largest_group']}, {ham['large_groups']} over 20; {near['near_candidates']} candidate pairs, "
            f"{near['near_verified']} verified; largest lesion unit {ham['largest_unit']}; lesions in two splits: "
            f"{ham['lesions_in_two_splits']}; stored as the source JPEG: {ham['stored_images']['source_jpeg']}, "
            f"re-encoded: {ham['stored_images']['reencoded']}; {ham['elapsed_s']} s, peak RSS "
            f"{ham['peak_rss_mb']} MB.",
            "",
        ]
    scale = results["results"]["scale"]
    lines += [
        "**Scale** (stand-in signatures, grouping + conflict resolution in a fresh process):",
        "",
        markdown_table(
            ("signatures", "planted copies", "seconds", "of which search / verification", "peak RSS (MB)",
             "pHash candidates", "candidates (past the detail check)", "verified", "groups", "largest group",
             "groups joining different images (images)", "dropped by reason"),
            [(r["n"], r["planted"], r["seconds"], f"{r['search_s']} / {r['verify_s']}", r["peak_rss_mb"],
              r["phash_candidates"], r["candidates"], r["verified"], r["groups"],
              r["largest_group"], f"{r['groups_joining_sources']} ({r['images_in_them']})",
              ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items())) or "none")
             for r in scale["rows"]],
        ),
        "",
    ]
    if scale["fit"]:
        lines.append(
            f"Growth exponent fitted over the sizes: time n^{scale['fit']['time_exponent']}, peak RSS "
            f"n^{scale['fit']['rss_exponent']}."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("dedupe"))
