"""Flat image folders with metadata tables in the layouts public dermatology datasets ship in (tiny, generated).

Each writer returns the metadata file(s) and the expected outcome: rows per class and the group column. The
column names, file naming and value formats follow the public releases (see docs/datasets.md).
"""

from __future__ import annotations

import csv
from pathlib import Path

from derm_accel.data.synthetic import render

SIZE = 40


def _image(path: Path, class_index: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = render(class_index % 6, 7919 * seed + 13, SIZE)
    if path.suffix == ".png":
        image.save(path)
    else:
        image.save(path, quality=90)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ham10000(root: Path) -> dict:
    """HAM10000_metadata.csv: several images per lesion (lesion_id), age as a float with blanks."""
    dx = ["nv", "mel", "bkl"]
    rows = []
    for i in range(18):
        lesion, label = i // 3, dx[(i // 3) % 3]  # three images of each lesion, one label per lesion
        name = f"ISIC_{24306 + i:07d}"
        part = "HAM10000_images_part_1" if i < 9 else "HAM10000_images_part_2"
        _image(root / part / f"{name}.jpg", dx.index(label), i)
        age = "" if i % 7 == 0 else f"{30 + 5 * (i % 9)}.0"
        rows.append([f"HAM_{lesion:07d}", name, label, "histo", age, ["male", "female"][i % 2], "back", "vidir"])
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    table = _write_csv(root / "HAM10000_metadata.csv", header, rows)
    return {"files": [table], "per_class": {"bkl": 6, "mel": 6, "nv": 6}, "group": "lesion_id"}


def isic2019(root: Path) -> dict:
    """Ground truth as one-hot columns; lesion_id (blank for some) in a second table."""
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    truth, meta = [], []
    for i in range(12):
        label = ["MEL", "NV", "BCC"][i % 3]
        name = f"ISIC_{i:07d}" + ("_downsampled" if i % 4 == 0 else "")
        _image(root / "ISIC_2019_Training_Input" / f"{name}.jpg", i % 3, 100 + i)
        truth.append([name, *("1.0" if c == label else "0.0" for c in classes)])
        lesion = f"BCN_{i // 2:07d}" if i < 8 else ""
        meta.append([name, f"{40 + 5 * i}", "anterior torso", lesion, "female" if i % 2 else "male"])
    gt = _write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *classes], truth)
    md = _write_csv(
        root / "ISIC_2019_Training_Metadata.csv",
        ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
        meta,
    )
    return {"files": [gt, md], "per_class": {"BCC": 4, "MEL": 4, "NV": 4}, "group": "lesion_id"}


def isic2020(root: Path) -> dict:
    """Kaggle/ISIC 2020 training table: benign_malignant label, several images per patient_id."""
    header = [
        "image_name",
        "patient_id",
        "sex",
        "age_approx",
        "anatom_site_general_challenge",
        "diagnosis",
        "benign_malignant",
        "target",
    ]
    rows = []
    for i in range(14):
        malignant = i % 2 == 1
        name = f"ISIC_{2637011 + i}"
        _image(root / "train" / f"{name}.jpg", int(malignant), 200 + i)
        rows.append(
            [
                name,
                f"IP_{i // 4:07d}",
                "male",
                "" if i == 3 else f"{45 + 5 * (i % 3)}.0",
                "torso",
                "melanoma" if malignant else "unknown",
                "malignant" if malignant else "benign",
                int(malignant),
            ]
        )
    table = _write_csv(root / "ISIC_2020_Training_GroundTruth.csv", header, rows)
    return {"files": [table], "per_class": {"benign": 7, "malignant": 7}, "group": "patient_id"}


def pad_ufes_20(root: Path) -> dict:
    """PAD-UFES-20 metadata.csv: True/False cells with blanks, fitspatrick as a float, PNG images."""
    header = [
        "patient_id",
        "lesion_id",
        "smoke",
        "drink",
        "age",
        "gender",
        "fitspatrick",
        "region",
        "diameter_1",
        "diagnostic",
        "itch",
        "biopsed",
        "img_id",
    ]
    diag = ["BCC", "ACK", "NEV"]
    rows = []
    for i in range(15):
        patient, lesion = f"PAT_{1500 + i // 3}", 1700 + i
        name = f"{patient}_{lesion}_{500 + i}.png"
        _image(root / "images" / f"imgs_part_{1 + i % 2}" / name, i % 3, 300 + i)
        smoke = "" if i % 5 == 0 else ("True" if i % 2 else "False")
        rows.append(
            [
                patient,
                lesion,
                smoke,
                "False",
                50 + i,
                "FEMALE",
                "" if i % 6 == 0 else f"{1 + i % 6}.0",
                "FACE",
                "" if i % 4 == 0 else f"{5 + i}.0",
                diag[i % 3],
                "True",
                "True" if i % 3 == 0 else "False",
                name,
            ]
        )
    table = _write_csv(root / "metadata.csv", header, rows)
    return {"files": [table], "per_class": {"ACK": 5, "BCC": 5, "NEV": 5}, "group": "patient_id"}


def fitzpatrick17k(root: Path) -> dict:
    """fitzpatrick17k.csv: images saved as <md5hash>.jpg, -1 codes an unknown Fitzpatrick type."""
    header = [
        "md5hash",
        "fitzpatrick_scale",
        "fitzpatrick_centaur",
        "label",
        "nine_partition_label",
        "three_partition_label",
        "qc",
        "url",
        "url_alphanum",
    ]
    labels = ["psoriasis", "folliculitis", "melanoma"]
    rows = []
    for i in range(12):
        md5 = f"{i:032x}"
        _image(root / "images" / f"{md5}.jpg", i % 3, 400 + i)
        fitz = -1 if i % 5 == 0 else 1 + i % 6
        three = "malignant" if labels[i % 3] == "melanoma" else "non-neoplastic"
        url = f"https://example.org/{md5}.jpg"
        rows.append([md5, fitz, fitz, labels[i % 3], "inflammatory", three, "", url, url.replace("/", "")])
    table = _write_csv(root / "fitzpatrick17k.csv", header, rows)
    return {"files": [table], "per_class": {"folliculitis": 4, "melanoma": 4, "psoriasis": 4}, "group": None}


def ddi(root: Path) -> dict:
    """ddi_metadata.csv, written by pandas with its unnamed index column; skin_tone 12/34/56."""
    diseases = ["melanoma-in-situ", "seborrheic-keratosis", "basal-cell-carcinoma"]
    rows = []
    for i in range(12):
        name = f"{i + 1:06d}.png"
        _image(root / "images" / name, i % 3, 500 + i)
        rows.append(
            [i, i + 1, name, [12, 34, 56][i % 3], str(diseases[i % 3] != "seborrheic-keratosis"), diseases[i % 3]]
        )
    table = _write_csv(root / "ddi_metadata.csv", ["", "DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"], rows)
    return {
        "files": [table],
        "per_class": {"basal-cell-carcinoma": 4, "melanoma-in-situ": 4, "seborrheic-keratosis": 4},
        "group": None,
    }


LAYOUTS = {
    "ham10000": ham10000,
    "isic2019": isic2019,
    "isic2020": isic2020,
    "pad-ufes-20": pad_ufes_20,
    "fitzpatrick17k": fitzpatrick17k,
    "ddi": ddi,
}
