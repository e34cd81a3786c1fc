"""Near-copy grouping on real dermoscopy: copies are grouped, look-alike lesions are not, conflicts only between
copies, lesion units stay whole, and a source JPEG is stored as it came."""

from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from datasets import Image as ImageFeature
from datasets import load_from_disk
from PIL import Image, ImageEnhance

from derm_accel.data.convert import convert_folders
from derm_accel.data.decode import (
    _WINDOW_COLS,
    _WINDOW_ROWS,
    DETAIL_BITS,
    DETAIL_WORDS,
    DecodeOptions,
    _orientations,
    content_hash,
    decode_bytes,
    detail_hashes,
    near_copy_signature,
    strip_jpeg_metadata,
)
from derm_accel.data.dedupe import LARGE_GROUP, group_images, resolve_groups
from derm_accel.data.near_copies import DETAIL_MAX_BITS, Signatures, candidate_pairs, detail_distance, judge, verify
from tests.conftest import DERM_SAMPLE, SHARED

HAM_DEV = SHARED / "data" / "ham10000-dev"
needs_ham = pytest.mark.skipif(
    not (HAM_DEV / "HAM10000_metadata.csv").is_file(),
    reason=f"ham10000-dev (real HAM10000 images + metadata) not found at {HAM_DEV} (it lies in shared/ beside the "
    "checkout)",
)
needs_real = pytest.mark.skipif(
    not DERM_SAMPLE.is_dir() or not (HAM_DEV / "images").is_dir(),
    reason=f"real dermoscopic images not found at {DERM_SAMPLE} and {HAM_DEV}",
)
# Three different HAM10000 lesions (nv, mel, bkl) whose pHashes chain: A~B and B~C within 2 bits, A and C further
# apart. pHash-only grouping joined all three into one group with three labels and dropped it.
CHAIN = ("ISIC_0027197", "ISIC_0027797", "ISIC_0029289")
FAST = {"progress": False, "val_frac": 0.25, "test_frac": 0.25, "seed": 0}


def _ham(name: str) -> Image.Image:
    with Image.open(HAM_DEV / "images" / f"{name}.jpg") as im:
        return im.convert("RGB")


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _signature(data: bytes):
    decoded = decode_bytes(0, data, DecodeOptions())
    return decoded.content_hash, decoded.signature


def _copies(image: Image.Image) -> dict[str, bytes]:
    """Edited copies of ``image``: what convert must group with it."""
    w, h = image.size
    gains = np.array([1.07, 1.0, 0.94], np.float32)
    cast = Image.fromarray(np.clip(np.asarray(image, np.float32) * gains, 0, 255).round().astype(np.uint8))
    return {
        "jpeg50": _jpeg(image, 50),
        "png": _png(image),
        "half": _jpeg(image.resize((w // 2, h // 2), Image.Resampling.BICUBIC)),
        "double": _jpeg(image.resize((w * 2, h * 2), Image.Resampling.BICUBIC)),
        "rot90": _jpeg(image.transpose(Image.Transpose.ROTATE_90)),
        "mirror": _jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "crop": _jpeg(image.crop((round(0.05 * w), round(0.04 * h), w - round(0.02 * w), h))),
        "brighter": _jpeg(ImageEnhance.Brightness(image).enhance(1.1)),
        "flatter": _jpeg(ImageEnhance.Contrast(image).enhance(0.9)),
        "cast": _jpeg(cast),
    }


@needs_real
def test_planted_copies_of_real_images_are_grouped_and_originals_are_not() -> None:
    originals = [p.read_bytes() for p in sorted(DERM_SAMPLE.glob("*/*.jpg"))[::110]]
    originals += [p.read_bytes() for p in sorted((HAM_DEV / "images").glob("*.jpg"))[::700]]
    content, signatures, source, kinds = [], [], [], []
    for i, data in enumerate(originals):
        c, s = _signature(data)
        content.append(c), signatures.append(s), source.append(i), kinds.append("original")
    for i, data in enumerate(originals):
        with Image.open(io.BytesIO(data)) as im:
            for kind, copy in _copies(im.convert("RGB")).items():
                c, s = _signature(copy)
                content.append(c), signatures.append(s), source.append(i), kinds.append(kind)
    grouping = group_images(content, Signatures.of(signatures), 4)
    group_of = {row: g for g, members in enumerate(grouping.groups) for row in members}
    missed = [(source[r], kinds[r]) for r in range(len(originals), len(content)) if group_of[r] != group_of[source[r]]]
    assert not missed, f"copies not grouped with their original: {missed}"
    assert len(grouping.groups) == len(originals)  # every group is one original with its copies, nothing more


@needs_ham
def test_a_chain_of_look_alike_lesions_does_not_become_one_group() -> None:
    content, signatures = zip(*[_signature(_jpeg(_ham(name), 95)) for name in CHAIN], strict=True)
    sig = Signatures.of(list(signatures))
    phash_only = candidate_pairs(sig, 4, detail_bits=None)
    linked = {tuple(sorted(pair)) for pair in zip(phash_only.a.tolist(), phash_only.b.tolist(), strict=True)}
    assert {(0, 1), (1, 2)} <= linked  # the pHashes do chain A~B~C: pHash alone would make one group of three
    # Either stage refuses the chain on its own: the detail hashes differ in more than a third of their bits, and
    # the thumbnails do not verify.
    assert len(candidate_pairs(sig, 4)) == 0
    assert not judge(phash_only, verify(sig, phash_only), len(sig)).verified.any()
    grouping = group_images(list(content), sig, 4)
    assert grouping.groups == [[0], [1], [2]] and grouping.verified == grouping.candidates == 0


@needs_ham
@pytest.mark.parametrize("policy", ["drop", "keep-majority"])
def test_conflicts_only_between_copies(tmp_path: Path, policy: str) -> None:
    """Exact and verified copies under two labels are conflicts; look-alike lesions under three labels are not."""
    src = tmp_path / "src"
    for name, label in zip(CHAIN, ("nv", "mel", "bkl"), strict=True):
        (src / label).mkdir(parents=True, exist_ok=True)
        (src / label / f"{name}.jpg").write_bytes((HAM_DEV / "images" / f"{name}.jpg").read_bytes())
    twin = sorted((HAM_DEV / "images").glob("*.jpg"))[1234]
    (src / "nv" / "twin.jpg").write_bytes(twin.read_bytes())
    (src / "mel" / "twin_again.jpg").write_bytes(twin.read_bytes())  # exact copy, another label
    with Image.open(twin) as im:
        mirrored = im.convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    (src / "bkl" / "twin_mirrored.png").write_bytes(_png(mirrored))  # a verified near copy, a third label
    for i, path in enumerate(sorted((HAM_DEV / "images").glob("*.jpg"))[2000:2009]):
        shutil.copy(path, src / ("nv", "mel", "bkl")[i % 3] / path.name)
    report = convert_folders(src, tmp_path / "out", conflicts=policy, **FAST)
    conflicts = sorted(s["path"] for s in report["skipped"] if s["reason"] == "conflict")
    assert conflicts == ["bkl/twin_mirrored.png", "mel/twin_again.jpg", "nv/twin.jpg"]  # a 1-1-1 tie either way
    (group,) = report["duplicates"]["conflict_groups"]
    assert group["labels"] == {"bkl": 1, "mel": 1, "nv": 1}
    rows = {p for d in load_from_disk(str(tmp_path / "out")).values() for p in d["source_path"]}
    assert {f"{label}/{name}.jpg" for name, label in zip(CHAIN, ("nv", "mel", "bkl"), strict=True)} <= rows


@needs_ham
def test_ham10000_lesion_units_never_cross_splits(tmp_path: Path) -> None:
    with open(HAM_DEV / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_lesion: dict[str, list[dict]] = {}
    for row in rows:
        by_lesion.setdefault(row["lesion_id"], []).append(row)
    several = [lesion for lesion, members in by_lesion.items() if len(members) > 1][:60]
    single = [lesion for lesion, members in by_lesion.items() if len(members) == 1][:120]
    chosen = [row for lesion in several + single for row in by_lesion[lesion]]
    images = tmp_path / "ham" / "images"
    images.mkdir(parents=True)
    for row in chosen:
        shutil.copy(HAM_DEV / "images" / f"{row['image_id']}.jpg", images)
    table = tmp_path / "ham" / "HAM10000_metadata.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    from derm_accel.data.metadata import metadata_spec

    report = convert_folders(images, tmp_path / "out", metadata=metadata_spec([table], preset="ham10000"), **FAST)
    data = load_from_disk(str(tmp_path / "out"))
    split_of: dict[str, set[str]] = {}
    for split, ds in data.items():
        for lesion in ds["lesion_id"]:
            split_of.setdefault(lesion, set()).add(split)
    assert len(split_of) == len(several) + len(single)  # no lesion lost
    assert all(len(s) == 1 for s in split_of.values()), {k: v for k, v in split_of.items() if len(v) > 1}
    assert len({s for splits in split_of.values() for s in splits}) == 3
    assert report["skipped_by_reason"].get("conflict", 0) == 0
    assert report["duplicates"]["largest_group"] <= LARGE_GROUP


def test_a_large_group_is_reported_and_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from derm_accel.data.synthetic import render

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    base = render(0, 3, 96)
    for q in range(70, 70 + LARGE_GROUP + 2):  # 22 re-encodings of one picture: near copies, none exact
        (src / "a" / f"copy_{q}.jpg").write_bytes(_jpeg(base, q))
    for i in range(6):
        (src / "b" / f"other_{i}.jpg").write_bytes(_jpeg(render(1, i, 96)))
    with caplog.at_level(logging.WARNING, logger="derm_accel.data.convert"):
        report = convert_folders(src, tmp_path / "out", max_size=32, **FAST)
    (large,) = report["duplicates"]["large_groups"]
    assert large["size"] == LARGE_GROUP + 2 and large["labels"] == {"a": LARGE_GROUP + 2}
    assert len(large["paths"]) == 21 and large["paths"][-1] == "... 2 more"
    warnings = [r.getMessage() for r in caplog.records]
    assert any("a group of 22 exact or near copies" in w and "a/copy_70.jpg" in w for w in warnings), warnings


def test_resolve_groups_lists_every_large_group() -> None:
    groups = [list(range(25)), [25], [26, 27]]
    resolution = resolve_groups(
        groups, labels=[0] * 28, class_names=["a"], paths=[f"p{i}" for i in range(28)],
        content_hashes=[f"h{i}" for i in range(28)], splits=[None] * 28,
    )
    assert [g["size"] for g in resolution.summary["large_groups"]] == [25]
    assert resolution.summary["large_group_threshold"] == LARGE_GROUP


@pytest.mark.skipif(not DERM_SAMPLE.is_dir(), reason=f"real dermoscopic sample not found at {DERM_SAMPLE}")
def test_source_jpegs_are_stored_as_they_came(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = sorted(DERM_SAMPLE.glob("*/*.jpg"))[::80]
    for path in files:
        (src / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / path.parent.name / path.name)
    with Image.open(files[0]) as im:
        upright = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display: must be re-encoded upright
    rotated = io.BytesIO()
    upright.save(rotated, format="JPEG", quality=90, exif=exif.tobytes())
    (src / files[0].parent.name / "rotated.jpg").write_bytes(rotated.getvalue())
    report = convert_folders(src, tmp_path / "out", max_size=320, **FAST)
    assert report["stored_images"]["source_jpeg"] == len(files) and report["stored_images"]["reencoded"] == 1
    data = load_from_disk(str(tmp_path / "out"))
    by_path = {}
    for ds in data.values():
        raw = ds.cast_column("image", ImageFeature(decode=False))
        for path, cell, image in zip(ds["source_path"], raw["image"], ds["image"], strict=True):
            by_path[path] = (cell["bytes"], image)
    for path in files:
        stored, image = by_path[f"{path.parent.name}/{path.name}"]
        assert stored == strip_jpeg_metadata(path.read_bytes())  # byte for byte: no second JPEG generation
        with Image.open(path) as original:
            assert image.format == "JPEG" and np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))
    stored, image = by_path[f"{files[0].parent.name}/rotated.jpg"]
    assert image.size == (upright.height, upright.width)


def test_strip_jpeg_metadata_keeps_pixels_and_drops_private_segments() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0112] = 1
    for progressive in (False, True):
        buf = io.BytesIO()
        image.save(
            buf, format="JPEG", quality=88, exif=exif.tobytes(), comment=b"patient 0042", progressive=progressive
        )
        data = buf.getvalue() + b"trailing bytes"
        stripped = strip_jpeg_metadata(data)
        assert stripped is not None and b"CameraMaker" not in stripped and b"patient" not in stripped
        assert stripped.endswith(b"\xff\xd9") and len(stripped) < len(data)
        with Image.open(io.BytesIO(stripped)) as a, Image.open(io.BytesIO(data)) as b:
            assert content_hash(a.convert("RGB")) == content_hash(b.convert("RGB"))
        decoded = decode_bytes(0, data, DecodeOptions())
        assert decoded.original and decoded.jpeg == stripped
    assert strip_jpeg_metadata(b"\xff\xd8\xff\xe1\x00") is None  # truncated segment
    assert strip_jpeg_metadata(_png(image)) is None
    grey = io.BytesIO()
    image.convert("L").save(grey, format="JPEG")
    assert not decode_bytes(0, grey.getvalue(), DecodeOptions()).original  # colour conversion: re-encoded
    assert not decode_bytes(0, buf.getvalue(), DecodeOptions(max_size=16)).original  # resized: re-encoded


def test_signature_is_small_and_from_the_phash_square() -> None:
    import imagehash

    from derm_accel.data.synthetic import render

    image = render(2, 9, 80)
    signature = near_copy_signature(image)
    assert f"{signature.variants[0]:016x}" == str(imagehash.phash(image))
    assert len(signature.windows) == 15 and len(signature.thumbnail) == 32 * 32
    row = Signatures.of([signature])
    assert sum(a.nbytes for a in (row.variants, row.windows, row.detail, row.thumbnails)) == 1760  # bytes an image


def test_detail_hashes_follow_the_orientation_and_window_of_the_square() -> None:
    from derm_accel.data.synthetic import render

    image = render(2, 9, 96)
    square = np.frombuffer(near_copy_signature(image).thumbnail, np.uint8).reshape(32, 32)
    detail = detail_hashes(square[None])[0]
    assert detail.shape == (8 + 15, DETAIL_WORDS) and detail.dtype == np.uint64
    # The 8 orientations come from the upright DCT terms by sign and transpose; the same as hashing each turned
    # square, bit for bit.
    assert np.array_equal(detail[:8], detail_hashes(np.stack(_orientations(square)))[:, 0])
    window = np.round(_WINDOW_ROWS[4] @ square.astype(np.float64) @ _WINDOW_COLS[4].T)
    assert np.unpackbits((detail[8 + 4] ^ detail_hashes(window[None])[0, 0]).view(np.uint8)).sum() <= 8
    # A real flip of the image lands on the matching orientation's hash; a different picture about half away.
    flipped = near_copy_signature(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    bits = np.frombuffer(flipped.detail, np.uint64).reshape(detail.shape)
    assert np.unpackbits((bits[0] ^ detail[1]).view(np.uint8)).sum() <= 4
    other = np.frombuffer(near_copy_signature(render(3, 4, 96)).detail, np.uint64).reshape(detail.shape)
    assert np.unpackbits((other[0] ^ detail[0]).view(np.uint8)).sum() > DETAIL_BITS // 4


@needs_ham
def test_fold_groups_use_the_same_verified_grouping(tmp_path: Path) -> None:
    from derm_accel.data.folds import duplicate_groups, pooled_rows

    src = tmp_path / "src"
    for name, label in zip(CHAIN, ("nv", "mel", "bkl"), strict=True):
        (src / label).mkdir(parents=True, exist_ok=True)
        (src / label / f"{name}.jpg").write_bytes((HAM_DEV / "images" / f"{name}.jpg").read_bytes())
    (src / "nv" / "copy_rot90.jpg").write_bytes(_jpeg(_ham(CHAIN[0]).transpose(Image.Transpose.ROTATE_90), 80))
    for i, path in enumerate(sorted((HAM_DEV / "images").glob("*.jpg"))[3000:3009]):
        shutil.copy(path, src / ("nv", "mel", "bkl")[i % 3] / path.name)
    convert_folders(src, tmp_path / "data", **FAST)
    rows = pooled_rows(tmp_path / "data")
    group = dict(zip(rows["source_path"], duplicate_groups(rows).tolist(), strict=True))
    chain = [group[f"{label}/{name}.jpg"] for name, label in zip(CHAIN, ("nv", "mel", "bkl"), strict=True)]
    assert len(set(chain)) == 3  # recomputed from the stored images: the look-alikes stay apart
    assert group["nv/copy_rot90.jpg"] == chain[0]
    assert len(set(group.values())) == len(group) - 1


def test_turned_and_cropped_copies_pass_the_detail_check_under_the_hypothesis_that_matched() -> None:
    """No shared data needed: copies of a generated image (turned, cropped, both) are found through the detail
    check, which compares the hypothesis pHash matched (crop window of one image, orientation of the other)."""
    from derm_accel.data.synthetic import render

    originals = [render(c, s, 160) for c, s in ((0, 1), (1, 2), (2, 3), (3, 4))]
    image = originals[0]
    w, h = image.size
    copies = [
        image.transpose(Image.Transpose.ROTATE_90),
        image.crop((8, 4, w, h)),
        image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).crop((0, 0, w - 6, h - 8)),
        image.transpose(Image.Transpose.TRANSVERSE),
    ]
    decoded = [decode_bytes(i, _jpeg(im, 90), DecodeOptions()) for i, im in enumerate(originals + copies)]
    sig = Signatures.of([d.signature for d in decoded])
    candidates = candidate_pairs(sig, 4)
    assert (candidates.window >= 0).any() and (candidates.orientation > 0).any()  # crops and turns both matched
    matched = detail_distance(sig, candidates.a, candidates.window, candidates.b, candidates.orientation)
    assert matched.max() <= DETAIL_MAX_BITS
    # Under another orientation of the same pair the detail hashes are far apart: the check reads the hypothesis.
    wrong = detail_distance(sig, candidates.a, candidates.window, candidates.b, (candidates.orientation + 1) % 8)
    assert wrong.min() > DETAIL_MAX_BITS
    grouping = group_images([d.content_hash for d in decoded], sig, 4)
    assert grouping.groups == [[0, 4, 5, 6, 7], [1], [2], [3]]


def test_a_mirrored_copy_is_found_when_two_orientations_share_a_phash() -> None:
    """An image whose pHash is the same in two orientations (its pixels are not): the mirrored copy is matched,
    checked and verified in the orientation it really has, not in the first with that pHash."""
    from derm_accel.data.synthetic import render

    image = render(1, 7, 160)
    decoded = [decode_bytes(i, _jpeg(im, 90), DecodeOptions())
               for i, im in enumerate((image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))]
    sig = Signatures.of([d.signature for d in decoded])
    sig.variants[0, 0] = sig.variants[0, 1]  # the original's upright pHash made equal to its mirrored one
    candidates = candidate_pairs(sig, 4)
    mirrored = (candidates.a == 1) & (candidates.b == 0) & (candidates.window == -1)
    assert candidates.orientation[mirrored].tolist() == [1]
    assert group_images([d.content_hash for d in decoded], sig, 4).groups == [[0, 1]]
