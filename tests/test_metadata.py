"""convert --metadata: flat image folders with tables in each public layout, patient-level splits, typed columns
and nulls, and the accounting of every file and row."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from datasets import ClassLabel, Value, load_from_disk
from typer.testing import CliRunner

from derm_accel.cli import app
from derm_accel.data.convert import ConvertError, convert_folders
from derm_accel.data.metadata import metadata_spec
from derm_accel.data.synthetic import render
from derm_accel.data.tables import infer_feature
from tests.layouts import LAYOUTS

QUIET = {"progress": False, "near_threshold": -1, "max_size": 0}


def _rows(out: Path) -> dict[str, list[dict]]:
    data = load_from_disk(str(out))
    return {split: list(data[split].remove_columns("image")) for split in data}


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_each_preset_converts_its_layout(preset, tmp_path):
    layout = LAYOUTS[preset](tmp_path / "src")
    out = tmp_path / "out"
    report = convert_folders(tmp_path / "src", out, metadata=metadata_spec(layout["files"], preset=preset), **QUIET)
    assert report["class_names"] == sorted(layout["per_class"])
    totals = {c: sum(report["splits"][s]["per_class"][c] for s in report["splits"]) for c in layout["per_class"]}
    assert totals == layout["per_class"]
    # Every file is a row or a skip; the only skips are the tables themselves.
    assert report["skipped_by_reason"] == {"metadata_file": len(layout["files"])}
    assert report["metadata"]["rows_matched"] == report["rows_total"] == sum(layout["per_class"].values())
    rows = _rows(out)
    if layout["group"]:
        split_of = defaultdict(set)
        for split, items in rows.items():
            for row in items:
                if row[layout["group"]] is not None:
                    split_of[row[layout["group"]]].add(split)
        assert split_of and all(len(s) == 1 for s in split_of.values())
        assert report["grouping"]["columns"] == [layout["group"]]
    card = (out / "README.md").read_text()
    for column in report["metadata"]["columns"]:
        assert f"| `{column}` |" in card


def test_preset_specific_typing(tmp_path):
    """ISIC 2019's two tables join on the image; DDI's unnamed index is left out; Fitzpatrick17k -1 is null."""
    isic = LAYOUTS["isic2019"](tmp_path / "isic")
    convert_folders(
        tmp_path / "isic", tmp_path / "isic_out", metadata=metadata_spec(isic["files"], preset="isic2019"), **QUIET
    )
    features = load_from_disk(str(tmp_path / "isic_out"))["train"].features
    assert features["age_approx"] == Value("int64") and features["lesion_id"] == Value("string")
    assert not {"MEL", "NV", "UNK", "meta_image"} & set(features)  # consumed as the label and the file name

    ddi = LAYOUTS["ddi"](tmp_path / "ddi")
    report = convert_folders(
        tmp_path / "ddi",
        tmp_path / "ddi_out",
        metadata=metadata_spec(ddi["files"], preset="ddi"),
        eval_only=True,
        **QUIET,
    )
    assert report["metadata"]["unnamed_columns_left_out"] == ["ddi_metadata.csv:(empty)"]
    data = load_from_disk(str(tmp_path / "ddi_out"))
    assert list(data) == ["test"] and data["test"].num_rows == 12  # --eval-only
    assert data["test"].features["malignant"] == Value("bool")
    assert sorted(set(data["test"]["skin_tone"])) == [12, 34, 56]

    fitz = LAYOUTS["fitzpatrick17k"](tmp_path / "fitz")
    convert_folders(
        tmp_path / "fitz",
        tmp_path / "fitz_out",
        metadata=metadata_spec(fitz["files"], preset="fitzpatrick17k"),
        eval_only=True,
        **QUIET,
    )
    test = load_from_disk(str(tmp_path / "fitz_out"))["test"]
    by_name = {Path(p).stem: v for p, v in zip(test["source_path"], test["fitzpatrick_scale"], strict=True)}
    assert by_name[f"{0:032x}"] is None and by_name[f"{1:032x}"] == 2  # -1 -> null; 1 + 1 % 6 = 2


def test_a_patient_with_many_images_never_crosses_splits(tmp_path):
    """One patient with 20 images of two diagnoses (not a label conflict) plus 40 singletons, over seeds."""
    src = tmp_path / "flat"
    src.mkdir()
    rows = []
    for i in range(60):
        label = ["nevus", "melanoma"][i % 2]
        render(i % 2, 10_000 + i, 40).save(src / f"img_{i:03d}.jpg", quality=90)
        rows.append({"file": f"img_{i:03d}.jpg", "dx": label, "patient": "P0" if i < 20 else f"P{i}"})
    table = tmp_path / "meta.tsv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "dx", "patient"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    spec = metadata_spec(table, image_column="file", label_column="dx", group_columns=["patient"])
    for seed in range(3):
        out = tmp_path / f"out{seed}"
        report = convert_folders(src, out, metadata=spec, seed=seed, val_frac=0.2, test_frac=0.2, **QUIET)
        assert report["rows_total"] == 60 and report["duplicates"]["conflict_groups"] == []
        splits = {s: {r["patient"] for r in items} for s, items in _rows(out).items()}
        assert sum("P0" in patients for patients in splits.values()) == 1
        groups = {r["patient"]: set() for items in _rows(out).values() for r in items}
        for items in _rows(out).values():
            for r in items:
                groups[r["patient"]].add(r["group_id"])
        assert all(len(g) == 1 for g in groups.values())  # the patient's unit is stored as one group_id
        assert len(set().union(*groups.values())) == 41  # P0 and the 40 singletons
        counts = [len(items) for items in _rows(out).values()]
        assert max(counts) >= 20 and sum(counts) == 60


def test_typed_columns_and_nulls(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    header = ["name", "label", "age", "weight", "smoker", "sex", "zip", "note", "source_path"]
    cells = [
        ["a", "x", "34", "70.5", "True", "F", "0123", "first", "cam1"],
        ["b", "y", "", "NA", "false", "M", "0456", "", "cam2"],
        ["c", "x", "61", "80", "", "F", "", "third", ""],
        ["d", "y", "7", "", "TRUE", "", "0789", "fourth", "cam1"],
    ]
    for i, row in enumerate(cells):
        render(i % 2, 900 + i, 40).save(src / f"{row[0]}.jpg", quality=90)
    table = tmp_path / "meta.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([header, *cells])
    report = convert_folders(
        src,
        tmp_path / "out",
        metadata=metadata_spec(table, image_column="name", label_column="label"),
        eval_only=True,
        **QUIET,
    )
    test = load_from_disk(str(tmp_path / "out"))["test"]
    f = test.features
    assert f["age"] == Value("int64") and f["weight"] == Value("float64") and f["smoker"] == Value("bool")
    assert f["sex"] == ClassLabel(names=["F", "M"])
    assert f["zip"] == Value("string")  # leading zeros stay text
    assert f["note"] == Value("string") and f["meta_source_path"] == ClassLabel(names=["cam1", "cam2"])
    assert report["metadata"]["renamed_columns"] == {"source_path": "meta_source_path"}
    rows = {Path(r["source_path"]).stem: r for r in test.remove_columns("image")}
    assert rows["b"]["age"] is None and rows["b"]["weight"] is None and rows["b"]["note"] is None
    assert rows["c"]["smoker"] is None and rows["d"]["sex"] is None and rows["c"]["zip"] is None
    assert rows["a"]["zip"] == "0123" and rows["a"]["smoker"] is True and rows["b"]["smoker"] is False
    assert rows["c"]["weight"] == 80.0 and rows["a"]["age"] == 34
    assert all(v != "" for r in rows.values() for v in r.values())  # empty cells are null, never ""
    assert infer_feature(["1", "2", None])[2] == "int" and infer_feature(["1", "2.5", "-1e3"])[2] == "float"
    assert infer_feature(["1_000", "2"])[2] != "float"  # Python float() would read 1_000


def test_every_file_and_row_is_accounted(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    names = ["ok1", "ok2", "ok3", "nolabel", "unk", "dup", "twin"]
    for i, name in enumerate(names[:-1]):
        render(i % 2, 50 + i, 40).save(src / "a" / f"{name}.jpg", quality=90)
    render(0, 70, 40).save(src / "a" / "twin.jpg", quality=90)
    render(1, 71, 40).save(src / "b" / "twin.png")  # same stem in two folders: ambiguous
    render(1, 72, 40).save(src / "b" / "orphan.jpg", quality=90)  # no row
    (src / "b" / ".hidden.jpg").write_bytes(b"x")
    (src / "c").mkdir()  # a byte-identical second copy of a folder, as in Kaggle's HAM10000 upload
    (src / "c" / "ok1.jpg").write_bytes((src / "a" / "ok1.jpg").read_bytes())
    rows = [
        ["ok1", "nevus", "P1"],
        ["ok2.jpg", "melanoma", "P1"],
        ["a/ok3.jpg", "nevus", ""],
        ["nolabel", "", "P2"],
        ["unk", "unknown", "P3"],
        ["dup", "nevus", "P4"],
        ["dup", "nevus", "P4"],
        ["twin", "nevus", "P5"],
        ["ghost", "nevus", "P6"],
        ["", "nevus", "P7"],
    ]
    table = src / "labels.csv"  # inside SRC: reported as the table, not as an image without a row
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["image", "diagnosis", "patient"], *rows])
    report = convert_folders(
        src,
        tmp_path / "out",
        metadata=metadata_spec(table, image_column="image", label_column="diagnosis", group_columns=["patient"]),
        **QUIET,
    )
    by_path = {s["path"]: s["reason"] for s in report["skipped"]}
    assert by_path == {
        "a/nolabel.jpg": "missing_label",
        "a/unk.jpg": "unknown_label",
        "a/twin.jpg": "ambiguous_match",
        "b/twin.png": "ambiguous_match",
        "b/orphan.jpg": "no_metadata_row",
        "b/.hidden.jpg": "hidden",
        "labels.csv": "metadata_file",
        "c/ok1.jpg": "duplicate_file",
    }
    assert report["rows_total"] == 4 and report["files_total"] == 12
    meta = report["metadata"]
    assert meta["rows_total"] == 10 and meta["rows_matched"] == 6
    assert meta["rows_skipped_by_reason"] == {
        "ambiguous_image": 1,
        "duplicate_row": 1,
        "image_not_found": 1,
        "missing_image_name": 1,
    }
    assert {s["row"] for s in meta["rows_skipped"]} == {
        "labels.csv:8",
        "labels.csv:9",
        "labels.csv:10",
        "labels.csv:11",
    }
    saved = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert saved["metadata"]["rows_skipped"] == meta["rows_skipped"]


def test_cli_metadata_options_and_clear_errors(tmp_path):
    layout = LAYOUTS["ham10000"](tmp_path / "ham")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "convert",
            str(tmp_path / "ham"),
            str(tmp_path / "out"),
            "--metadata",
            str(layout["files"][0]),
            "--preset",
            "ham10000",
            "--near-threshold",
            "-1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 18 images" in result.output
    # Without the preset or columns: a clear error that names the matching preset.
    result = runner.invoke(
        app,
        [
            "convert",
            str(tmp_path / "ham"),
            str(tmp_path / "o2"),
            "--metadata",
            str(layout["files"][0]),
            "--image-column",
            "file",
            "--label-column",
            "dx",
        ],
    )
    assert result.exit_code == 2 and "--preset ham10000" in result.output
    with pytest.raises(ValueError, match=r"ISIC_2019_Training_Metadata\.csv"):
        isic = LAYOUTS["isic2019"](tmp_path / "isic")
        convert_folders(
            tmp_path / "isic", tmp_path / "o3", metadata=metadata_spec(isic["files"][:1], preset="isic2019"), **QUIET
        )
    with pytest.raises(ConvertError, match="No row of"):
        convert_folders(
            tmp_path / "isic", tmp_path / "o4", metadata=metadata_spec(layout["files"], preset="ham10000"), **QUIET
        )
    result = runner.invoke(app, ["convert", str(tmp_path / "ham"), str(tmp_path / "o5"), "--preset", "ham10000"])
    assert result.exit_code == 2 and "need --metadata" in result.output


def test_parquet_table_and_class_map(tmp_path):
    """A Parquet table keeps its own types and nulls; --class-map renames and drops label values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    names = [f"im{i}" for i in range(6)]
    for i, name in enumerate(names):
        render(i % 3, 700 + i, 40).save(src / f"{name}.jpg", quality=90)
    table = pa.table(
        {
            "isic_id": names,
            "dx": ["nv", "mel", "bkl", "nv", "mel", "bkl"],
            "age": [30, None, 50, 60, 70, 80],
            "smoker": [True, False, None, True, False, True],
            "size_mm": [1.5, 2.0, None, 4.25, 5.0, 6.0],
        }
    )
    pq.write_table(table, tmp_path / "meta.parquet")
    spec = metadata_spec(tmp_path / "meta.parquet", image_column="isic_id", label_column="dx")
    report = convert_folders(
        src,
        tmp_path / "out",
        metadata=spec,
        class_map={"nv": "nevus", "mel": "melanoma", "bkl": None},
        eval_only=True,
        **QUIET,
    )
    assert report["class_names"] == ["melanoma", "nevus"]
    assert sorted(s["path"] for s in report["skipped"] if s["reason"] == "dropped_class") == ["im2.jpg", "im5.jpg"]
    test = load_from_disk(str(tmp_path / "out"))["test"]
    assert test.features["age"] == Value("int64") and test.features["smoker"] == Value("bool")
    assert test.features["size_mm"] == Value("float64")
    rows = {Path(r["source_path"]).stem: r for r in test.remove_columns("image")}
    assert rows["im1"]["age"] is None and rows["im3"]["size_mm"] == 4.25 and rows["im0"]["smoker"] is True
    with pytest.raises(ConvertError, match="Class map names labels"):
        convert_folders(src, tmp_path / "o2", metadata=spec, class_map={"scc": "x"}, **QUIET)
