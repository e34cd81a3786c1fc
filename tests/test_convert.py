"""convert: each file becomes a row or a reported skip, and no content leaks across splits."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image

from derm_accel.data.convert import ConvertError, convert_folders
from derm_accel.data.synthetic import render, write_sample
from tests.conftest import DERM_SAMPLE, needs_derm_sample

FAST = {"progress": False, "max_size": 32}


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, **kwargs)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _upright() -> Image.Image:
    """40x24, red top half, blue bottom half: orientation is visible in two pixels."""
    img = Image.new("RGB", (40, 24), (220, 20, 20))
    img.paste((20, 20, 220), (0, 12, 40, 24))
    return img


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _all_files(root: Path) -> list[str]:
    return sorted(Path(d, f).relative_to(root).as_posix() for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of small valid images plus every kind of awkward input."""
    root = tmp_path_factory.mktemp("corpus") / "src"
    for ci, name in enumerate(["alpha", "beta", "gamma"]):
        for i in range(10):
            _write(root / name / f"good_{i:03d}.jpg", _jpeg(render(ci, i, 48)))
    a = root / "alpha"
    good = _jpeg(render(0, 50, 48))
    _write(a / "zero.jpg", b"")
    _write(a / "truncated.jpg", good[: len(good) // 2])
    _write(a / "text.jpg", b"this is not a picture\n")
    _write(a / ".hidden.jpg", _jpeg(render(0, 51, 48)))
    _write(root / ".cache" / "thumb.jpg", _jpeg(render(0, 52, 48)))
    rgba = render(0, 53, 48).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 48, 10))  # transparent top band
    _write(a / "rgba.png", _png(rgba))
    _write(a / "gray.png", _png(render(0, 54, 48).convert("L")))
    _write(a / "cmyk.jpg", _jpeg(render(0, 55, 48).convert("CMYK")))
    sixteen = np.tile(np.linspace(0, 65535, 48).round().astype(np.uint16), (48, 1))
    _write(a / "sixteen.png", _png(Image.fromarray(sixteen)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the upright image turned CCW
    _write(a / "rotated.jpg", _jpeg(_upright().transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()))
    _write(a / "ünïcødé 皮膚.jpg", _jpeg(render(0, 56, 48)))
    _write(a / "bomb.png", _bomb_png())
    # Exact copy within a class, re-encoded losslessly: same decoded pixels, other bytes.
    with Image.open(a / "good_000.jpg") as im:
        _write(a / "copy_of_good_000.png", _png(im.convert("RGB")))
    # The same photo in two classes: a label conflict.
    _write(root / "beta" / "from_alpha.jpg", (a / "good_001.jpg").read_bytes())
    (root / "empty_class").mkdir()
    _write(root / "notes.txt", b"stray file at the top\n")
    return root


@pytest.fixture(scope="module")
def converted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "data"
    report = convert_folders(corpus, out, max_size=0, progress=False, seed=0)
    return out, report


def test_every_file_ends_where_it_belongs(corpus: Path, converted: tuple[Path, dict]) -> None:
    out, report = converted
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons["alpha/zero.jpg"] == "empty"
    assert reasons["alpha/truncated.jpg"] == "truncated"
    assert reasons["alpha/text.jpg"] == "not_an_image"
    assert reasons["alpha/.hidden.jpg"] == "hidden"
    assert reasons[".cache/thumb.jpg"] == "hidden"
    assert reasons["alpha/bomb.png"] == "too_large"
    assert reasons["notes.txt"] == "outside_class_folder"
    assert reasons["alpha/good_001.jpg"] == reasons["beta/from_alpha.jpg"] == "conflict"
    # copy_of_good_000.png sorts first, so it is kept and the original JPEG is the reported copy.
    assert reasons["alpha/good_000.jpg"] == "duplicate"
    detail = {s["path"]: s["detail"] for s in report["skipped"]}
    assert "alpha/copy_of_good_000.png" in detail["alpha/good_000.jpg"]
    assert "400000000 pixels" in detail["alpha/bomb.png"]  # refused from the header, nothing decoded

    data = load_from_disk(str(out))
    rows = {p for split in data.values() for p in split["source_path"]}
    for name in ("rgba.png", "gray.png", "cmyk.jpg", "sixteen.png", "rotated.jpg", "ünïcødé 皮膚.jpg"):
        assert f"alpha/{name}" in rows
    files = _all_files(corpus)
    assert report["files_total"] == len(files) == report["rows_total"] + len(report["skipped"])
    assert sorted(rows | set(reasons)) == files and not rows & set(reasons)
    assert report["empty_class_folders"] == ["empty_class"]
    assert report["class_names"] == ["alpha", "beta", "gamma"]
    assert data["train"].features["label"].names == ["alpha", "beta", "gamma"]
    assert json.loads((out / "conversion_report.json").read_text(encoding="utf-8")) == report
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| alpha |" in card and "conflict" in card and "task_categories" in card


def _row(out: Path, path: str) -> dict:
    data = load_from_disk(str(out))
    for split in data.values():
        if path in split["source_path"]:
            return split[split["source_path"].index(path)]
    raise KeyError(path)


def test_modes_become_upright_rgb(converted: tuple[Path, dict]) -> None:
    out, _ = converted
    rotated = _row(out, "alpha/rotated.jpg")
    img = np.asarray(rotated["image"].convert("RGB")).astype(int)
    assert (rotated["orig_width"], rotated["orig_height"]) == (40, 24) == rotated["image"].size
    assert img[3, 20, 0] > 150 and img[3, 20, 2] < 90  # red on top
    assert img[20, 20, 2] > 150 and img[20, 20, 0] < 90  # blue below

    rgba = np.asarray(_row(out, "alpha/rgba.png")["image"].convert("RGB")).astype(int)
    assert rgba[:8].min() > 240  # transparent band composited on white, not black

    sixteen = np.asarray(_row(out, "alpha/sixteen.png")["image"].convert("L")).astype(int)
    assert sixteen[:, 0].max() < 8 and sixteen[:, -1].min() > 247  # full 16-bit range -> 0..255, not clipped
    assert abs(int(np.median(sixteen[:, 24])) - round(24 / 47 * 255)) <= 6

    for name in ("gray.png", "cmyk.jpg", "ünïcødé 皮膚.jpg"):
        row = _row(out, f"alpha/{name}")
        assert row["image"].mode == "RGB" and row["image"].size == (48, 48)
        assert len(row["content_hash"]) == 64 and len(row["phash"]) == 16


def _labelled_hashes(out: Path) -> dict[str, list[str]]:
    data = load_from_disk(str(out))
    return {s: data[s]["content_hash"] for s in data}


def test_no_content_in_two_splits_and_fractions_hold(tmp_path: Path) -> None:
    src = write_sample(tmp_path / "src", num_classes=3, per_class=23, size=40, seed=3)
    # Near copies (resized) of a few images: each group must stay in one split.
    for i in range(4):
        with Image.open(src / "nevus" / f"nevus_{i:04d}.jpg") as im:
            im.resize((56, 56), Image.Resampling.BICUBIC).save(src / "nevus" / f"big_{i}.jpg", quality=90)
    report = convert_folders(src, tmp_path / "out", val_frac=0.2, test_frac=0.1, seed=5, **FAST)
    data = load_from_disk(str(tmp_path / "out"))
    seen: dict[str, str] = {}
    split_of: dict[str, str] = {}
    for split, ds in data.items():
        for h, path in zip(ds["content_hash"], ds["source_path"], strict=True):
            assert seen.setdefault(h, split) == split
            split_of[path] = split
    group_of = {p: g for ds in data.values() for p, g in zip(ds["source_path"], ds["group_id"], strict=True)}
    for i in range(4):
        assert split_of[f"nevus/big_{i}.jpg"] == split_of[f"nevus/nevus_{i:04d}.jpg"]
        assert group_of[f"nevus/big_{i}.jpg"] == group_of[f"nevus/nevus_{i:04d}.jpg"]  # stored for k-fold
    assert group_of["nevus/big_0.jpg"] != group_of["nevus/big_1.jpg"]
    for gid in set(group_of.values()):  # a stored group lies in one split
        assert len({split_of[p] for p, g in group_of.items() if g == gid}) == 1
    assert report["duplicates"]["groups_with_near_copies"] >= 4
    for name in ("basal_cell_carcinoma", "melanoma"):  # singleton groups: within one image of the fractions
        counts = {s: report["splits"][s]["per_class"][name] for s in data}
        assert abs(counts["validation"] - 0.2 * 23) <= 1 and abs(counts["test"] - 0.1 * 23) <= 1
        assert sum(counts.values()) == 23
    assert sum(len(ds) for ds in data.values()) == report["rows_total"] == 23 * 3 + 4


def test_same_seed_same_splits(tmp_path: Path, sample_folders: Path) -> None:
    a = convert_folders(sample_folders, tmp_path / "a", seed=7, **FAST)
    b = convert_folders(sample_folders, tmp_path / "b", seed=7, num_proc=2, **FAST)
    c = convert_folders(sample_folders, tmp_path / "c", seed=8, **FAST)
    da, db, dc = (load_from_disk(str(tmp_path / n)) for n in "abc")
    for s in da:
        assert da[s]["source_path"] == db[s]["source_path"]
        assert da[s]["content_hash"] == db[s]["content_hash"]
        assert [x.tobytes() for x in da[s][:4]["image"]] == [x.tobytes() for x in db[s][:4]["image"]]
    assert a["splits"] == b["splits"]
    assert any(da[s]["source_path"] != dc[s]["source_path"] for s in da)
    assert c["rows_total"] == a["rows_total"]


def test_refuses_bad_requests(tmp_path: Path, sample_folders: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="does not exist"):
        convert_folders(tmp_path / "missing", out, **FAST)
    (tmp_path / "nothing" / "cls").mkdir(parents=True)
    with pytest.raises(ConvertError, match="No image files"):
        convert_folders(tmp_path / "nothing", out, **FAST)
    with pytest.raises(ConvertError, match="not class folders"):
        convert_folders(sample_folders, out, class_map={"no_such_folder": "x"}, **FAST)
    with pytest.raises(ConvertError, match="non-empty class name"):
        convert_folders(sample_folders, out, class_map={"nevus": 3}, **FAST)
    with pytest.raises(ConvertError, match="inside the output"):
        convert_folders(sample_folders, sample_folders.parent, overwrite=True, **FAST)
    assert not out.exists() and sample_folders.is_dir()
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="overwrite"):
        convert_folders(sample_folders, out, **FAST)
    assert (out / "old.txt").read_text() == "keep me"
    (out / "conversion_report.json").write_text("{}")  # an earlier conversion: --overwrite may replace it
    convert_folders(sample_folders, out, overwrite=True, **FAST)
    assert not (out / "old.txt").exists() and len(load_from_disk(str(out))["train"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nothing", "out"]  # no temp folders left


def test_empty_split_is_left_out(tmp_path: Path) -> None:
    src = write_sample(tmp_path / "src", num_classes=2, per_class=4, size=32)
    report = convert_folders(src, tmp_path / "out", val_frac=0.0, test_frac=0.0, **FAST)
    assert set(load_from_disk(str(tmp_path / "out"))) == {"train"}
    assert report["empty_splits"] == ["validation", "test"] and report["splits"]["train"]["rows"] == 8


def test_interrupted_run_leaves_no_output(tmp_path: Path, sample_folders: Path, monkeypatch) -> None:
    from datasets import DatasetDict

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_folders(sample_folders, tmp_path / "out", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_pre_split_folders_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for split, seeds in (("train", range(0, 6)), ("val", range(6, 8)), ("test", range(8, 10))):
        for ci, name in enumerate(["melanoma", "nevus"]):
            for s in seeds:
                _write(src / split / name / f"{name}_{s}.jpg", _jpeg(render(ci, s, 40)))
    # Leak: a train image copied into test (kept in train, dropped from test), and a val copy of it too.
    _write(src / "test" / "nevus" / "leak.jpg", (src / "train" / "nevus" / "nevus_0.jpg").read_bytes())
    _write(src / "val" / "nevus" / "leak2.jpg", (src / "train" / "nevus" / "nevus_0.jpg").read_bytes())
    report = convert_folders(src, tmp_path / "out", **FAST)
    data = load_from_disk(str(tmp_path / "out"))
    assert report["layout"] == "pre_split"
    assert {s: len(d) for s, d in data.items()} == {"train": 12, "validation": 4, "test": 4}
    assert all(p.startswith("train/") for p in data["train"]["source_path"])
    assert all(p.startswith("val/") for p in data["validation"]["source_path"])
    reasons = {s["path"]: (s["reason"], s["detail"]) for s in report["skipped"]}
    assert reasons["test/nevus/leak.jpg"][0] == "cross_split_duplicate"
    assert reasons["val/nevus/leak2.jpg"][0] == "cross_split_duplicate"
    assert "train/nevus/nevus_0.jpg" in reasons["test/nevus/leak.jpg"][1]
    assert report["duplicates"]["cross_split_groups"][0]["kept_split"] == "train"
    assert data["train"].features["label"].names == ["melanoma", "nevus"]


def test_class_map_renames_merges_and_drops(tmp_path: Path, sample_folders: Path) -> None:
    mapping = tmp_path / "classes.yaml"
    mapping.write_text(
        "melanoma: malignant\nbasal_cell_carcinoma: malignant\nnevus: benign\npsoriasis: null\n"
    )
    report = convert_folders(sample_folders, tmp_path / "out", class_map=mapping, **FAST)
    data = load_from_disk(str(tmp_path / "out"))
    assert data["train"].features["label"].names == ["benign", "malignant"]
    assert sum(report["splits"][s]["per_class"]["malignant"] for s in data) == 24
    assert report["skipped_by_reason"] == {"dropped_class": 12}
    assert report["files_total"] == 48 and report["rows_total"] == 36
    assert report["class_map"]["psoriasis"] is None
    json_map = tmp_path / "classes.json"
    json_map.write_text(json.dumps({"nevus": "mole"}))
    report = convert_folders(sample_folders, tmp_path / "out2", class_map=json_map, **FAST)
    assert "mole" in report["class_names"] and "nevus" not in report["class_names"]


def test_conflict_policies() -> None:
    from derm_accel.data.dedupe import resolve_groups

    kwargs = dict(
        class_names=["a", "b"],
        paths=["x/1", "x/2", "x/3", "y/1"],
        content_hashes=["h1", "h2", "h3", "h1"],
        splits=[None] * 4,
    )
    groups = [[0, 1, 2, 3]]
    dropped = resolve_groups(groups, labels=[0, 0, 0, 1], conflicts="drop", **kwargs)
    assert dropped.kept == [] and {s.reason for s in dropped.skipped.values()} == {"conflict"}
    majority = resolve_groups(groups, labels=[0, 0, 0, 1], conflicts="keep-majority", **kwargs)
    assert majority.kept == [[0, 1, 2]] and majority.skipped[3].reason == "conflict"
    tie = resolve_groups(groups, labels=[0, 0, 1, 1], conflicts="keep-majority", **kwargs)
    assert tie.kept == [] and len(tie.skipped) == 4


def test_near_duplicate_index_matches_brute_force() -> None:
    from derm_accel.data.near_copies import near_duplicate_pairs

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 60, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (60, 3)).astype(np.uint64)
    near = base ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]  # at most 3 bits away
    hashes = np.unique(np.concatenate([base, near]))
    for threshold in (0, 3, 5):
        brute = {
            (i, j)
            for i in range(len(hashes))
            for j in range(i + 1, len(hashes))
            if bin(int(hashes[i] ^ hashes[j])).count("1") <= threshold
        }
        assert threshold == 0 or len(brute) >= 50
        # the plan band_plan picks for this size, and the probed plans it picks for large collections
        plans = [None] + [(b, threshold // b) for b in (2, 3) if threshold]
        for plan in plans:
            pairs = list(near_duplicate_pairs(hashes, threshold, plan))
            assert set(pairs) == brute, plan
            assert len(pairs) == len(brute)  # each pair once: none repeats across bands or probes


def test_band_plan_keeps_buckets_small_as_the_collection_grows() -> None:
    from derm_accel.data.near_copies import band_plan

    assert band_plan(4, 40_000) == (5, 0)  # 5k images x 8 orientations: exact 13-bit bands
    assert band_plan(4, 2_000_000) == (3, 1)  # 245k images: 21-bit bands probed within one bit
    assert band_plan(0, 10**6) == (1, 0)


def test_card_keeps_hub_metadata() -> None:
    from huggingface_hub import DatasetCard

    from derm_accel.data.publish import merged_card

    report = {
        "rows_total": 3,
        "files_total": 4,
        "class_names": ["a"],
        "license": "cc-by-nc-4.0",
        "layout": "class_folders",
        "splits": {s: {"rows": 1, "per_class": {"a": 1}} for s in ("train", "validation", "test")},
        "parameters": {"max_size": 32, "val_frac": 0.1, "test_frac": 0.1, "seed": 1, "near_threshold": 4},
        "duplicates": {
            "groups_with_copies": 0,
            "groups_with_near_copies": 0,
            "largest_group": 1,
            "exact_copies_dropped": 0,
            "conflict_groups": [],
            "conflict_policy": "drop",
        },
        "skipped_by_reason": {"empty": 1},
        "class_map": {"a": "a"},
    }
    hub = DatasetCard("---\nconfigs:\n- config_name: default\n  data_files: data/*\n---\nauto text\n")
    card = merged_card(hub, report, title="T")
    assert card.data.to_dict()["configs"][0]["config_name"] == "default"
    assert card.data.license == "cc-by-nc-4.0"
    assert "auto text" not in card.text and "| a | 1 | 1 | 1 | 3 |" in card.text


@needs_derm_sample
def test_real_sample_counts_add_up(tmp_path: Path) -> None:
    report = convert_folders(DERM_SAMPLE, tmp_path / "out", max_size=32, num_proc=2, progress=False)
    data = load_from_disk(str(tmp_path / "out"))
    files = _all_files(DERM_SAMPLE)
    assert report["files_total"] == len(files)
    assert report["rows_total"] == sum(len(d) for d in data.values()) == len(files) - len(report["skipped"])
    assert len(data["train"].features["label"].names) == 9
    hashes = Counter(h for d in data.values() for h in set(d["content_hash"]))
    assert max(hashes.values()) == 1  # no content in two splits
    assert all(min(im.size) == 32 for im in data["train"][:8]["image"])  # 180 px sources, shorter side -> 32


_D4 = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def _bits(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def _oblong(seed: int) -> Image.Image:
    """A 96x72 lesion-like image: not square, so a 90-degree turn swaps its sides."""
    return render(0, seed, 96).crop((0, 12, 96, 84))


def test_phash_variants_match_imagehash_and_orientations() -> None:
    import imagehash

    from derm_accel.data.decode import ORIENTATIONS, DecodeOptions, decode_bytes, phash_variants

    rng = np.random.default_rng(0)
    images = [
        render(1, 3, 64),
        _oblong(4),
        render(2, 5, 40).convert("L").convert("RGB"),
        Image.new("RGB", (30, 20), (120, 80, 60)),  # flat: every DCT coefficient ties with the median
        Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
    ]
    real = sorted(DERM_SAMPLE.glob("*/*.jpg"))[::200] if DERM_SAMPLE.is_dir() else []
    images += [Image.open(p).convert("RGB") for p in real]
    assert len(ORIENTATIONS) == len(_D4) == 8
    for image in images:
        variants = phash_variants(image)
        assert len(variants) == 8 and all(0 <= v < 2**64 for v in variants)
        assert f"{variants[0]:016x}" == str(imagehash.phash(image))
        decoded = decode_bytes(0, _png(image), DecodeOptions(max_size=16))
        assert decoded.phash == str(imagehash.phash(image)) and decoded.phash_variants == variants
    for image in images[:2]:  # variant k is the pHash of the image under transform k
        variants = phash_variants(image)
        for k, op in enumerate(_D4[1:], 1):
            turned = phash_variants(image.transpose(op))[0]
            assert _bits(variants[k], turned) <= 2 < _bits(variants[0], turned)


def test_group_images_joins_flipped_and_rotated_copies() -> None:
    from derm_accel.data.decode import near_copy_signature
    from derm_accel.data.dedupe import group_images
    from derm_accel.data.near_copies import Signatures

    images = [_oblong(100), _oblong(100).transpose(Image.Transpose.ROTATE_90), _oblong(101)]
    images.append(images[2].transpose(Image.Transpose.TRANSVERSE))
    images.append(render(1, 7, 64))
    signatures = Signatures.of([near_copy_signature(im) for im in images])
    content = [f"c{i}" for i in range(len(images))]
    assert group_images(content, signatures, 4).groups == [[0, 1], [2, 3], [4]]
    assert group_images(content, signatures, 0).groups == [[0, 1], [2, 3], [4]]
    # No signatures, or a negative threshold, turns near matching off altogether.
    assert group_images(content, None, 4).groups == [[i] for i in range(5)]
    assert group_images(content, signatures, -1).groups == [[i] for i in range(5)]
    with pytest.raises(ValueError, match="signatures"):
        group_images(content, signatures.head(3), 4)


def test_flipped_and_rotated_copies_share_a_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for ci, name in enumerate(["alpha", "beta", "gamma"]):
        for i in range(10):
            _write(src / name / f"other_{i}.jpg", _jpeg(render(ci, i, 48)))
    copies = {
        "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
        "rot90": Image.Transpose.ROTATE_90,  # 72x96: sides swapped
        "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
    }
    for seed in (100, 101, 102):
        original = _oblong(seed)
        _write(src / "alpha" / f"photo_{seed}.jpg", _jpeg(original))
        for kind, op in copies.items():
            _write(src / "alpha" / f"photo_{seed}_{kind}.jpg", _jpeg(original.transpose(op)))
    # A mirrored copy filed under another class is a label conflict.
    _write(src / "alpha" / "photo_103.jpg", _jpeg(_oblong(103)))
    _write(src / "beta" / "mirrored.jpg", _jpeg(_oblong(103).transpose(Image.Transpose.FLIP_LEFT_RIGHT)))

    report = convert_folders(src, tmp_path / "out", val_frac=0.25, test_frac=0.25, seed=1, **FAST)
    data = load_from_disk(str(tmp_path / "out"))
    split_of = {p: s for s, ds in data.items() for p in ds["source_path"]}
    for seed in (100, 101, 102):
        members = [f"alpha/photo_{seed}.jpg"] + [f"alpha/photo_{seed}_{kind}.jpg" for kind in copies]
        assert len({split_of[p] for p in members}) == 1, members
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons == {"alpha/photo_103.jpg": "conflict", "beta/mirrored.jpg": "conflict"}
    (conflict,) = report["duplicates"]["conflict_groups"]
    assert sorted(conflict["paths"]) == ["alpha/photo_103.jpg", "beta/mirrored.jpg"]
    assert conflict["labels"] == {"alpha": 1, "beta": 1}
    # Exactly the three 4-member orientation groups and the conflict pair: no unrelated image was pulled in.
    dup = report["duplicates"]
    assert (dup["groups_with_copies"], dup["groups_with_near_copies"], dup["largest_group"]) == (4, 4, 4)
    assert report["rows_total"] == 30 + 12
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "90, 180 or 270 degree rotation" in card


def test_overwrite_never_replaces_an_unrelated_folder(tmp_path: Path) -> None:
    src = write_sample(tmp_path / "src", num_classes=2, per_class=3, size=32)
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    with pytest.raises(ConvertError, match="not a dataset written by"):
        convert_folders(src, out, overwrite=True, progress=False)
    assert (out / "notes.md").read_text() == "keep me"


def test_split_folders_beside_other_folders_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for split in ("train", "test"):
        write_sample(src / split, num_classes=2, per_class=2, size=32)
    write_sample(src / "extras", num_classes=2, per_class=1, size=32)
    with pytest.raises(ConvertError, match=r"mixes split folders \['test', 'train'\] with other folders \['extras'\]"):
        convert_folders(src, tmp_path / "out", progress=False)


def test_decoding_hands_out_tasks_only_as_results_are_taken() -> None:
    """Pool.imap queues finished results without limit; the window keeps at most its size in flight."""
    import threading
    import time

    from derm_accel.data.convert import _throttled

    window, stop = threading.BoundedSemaphore(3), threading.Event()
    handed: list[int] = []
    feeder = threading.Thread(target=lambda: handed.extend(_throttled(iter(range(10)), window, stop)))
    feeder.start()

    def settles_at(count: int) -> None:
        deadline = time.monotonic() + 5
        while len(handed) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # long enough for a fourth task to be handed out if nothing held it back
        assert len(handed) == count

    settles_at(3)
    window.release()  # one result taken: one more task
    settles_at(4)
    stop.set()  # the pool closing: the feeder leaves its wait
    feeder.join(timeout=5)
    assert not feeder.is_alive() and handed == [0, 1, 2, 3]
