"""The dataset card (README.md) written beside the Arrow data and pushed with it to the Hub.

The card is generated from the conversion report only, so what it says about counts, drops and duplicates is
exactly what the conversion did.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from derm_accel.core.escape import md_text
from derm_accel.data.metadata import FILE_REASONS, card_lines
from derm_accel.data.split import SPLITS

_REASONS = {
    "empty": "zero-byte file",
    "not_an_image": "not an image Pillow can identify",
    "truncated": "image data ends early",
    "unreadable": "could not be read or decoded",
    "too_large": "header claims more pixels than the decompression-bomb limit",
    "hidden": "hidden file or inside a hidden folder",
    "outside_class_folder": "file not inside a class folder",
    "dropped_class": "its folder is mapped to null in the class map",
    "duplicate": "exact copy (same decoded pixels) of a kept image of the same class",
    "conflict": "same or near-identical image under different labels",
    "cross_split_duplicate": "same or near-identical content already in an earlier pre-made split",
    **FILE_REASONS,
}


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "1M<n<10M"


def card_data(report: dict[str, Any], *, pretty_name: str | None = None) -> DatasetCardData:
    """Hub metadata: license, task, size; merged into what ``push_to_hub`` writes (dataset_info, configs)."""
    return DatasetCardData(
        license=report.get("license") or None,
        task_categories=["image-classification"],
        size_categories=_size_category(report["rows_total"]),
        tags=["dermatology", "medical-imaging", "derm-accel"],
        pretty_name=pretty_name,
    )


def card_body(report: dict[str, Any], *, title: str) -> str:
    """Markdown: class-by-split table, what was dropped and why, how duplicates were handled, how to load."""
    splits = report["splits"]
    names = report["class_names"]
    lines = [f"# {title}", ""]
    lines += [
        f"Image classification data converted from "
        f"{'images and a metadata table' if report.get('metadata') else 'class folders'} by derm-accel: "
        f"{report['rows_total']} images "
        f"in {len(names)} classes, from {report['files_total']} files.",
        "",
        "Columns: `image` (JPEG, shorter side at most "
        f"{report['parameters']['max_size'] or 'unchanged'} px, EXIF orientation applied), `label`, "
        "`source_path` (relative to the source folder), `orig_width`, `orig_height` (after EXIF rotation), "
        "`content_hash` (sha256 of the decoded RGB pixels), `phash` (64-bit perceptual hash, "
        "`imagehash.phash` of the upright image), `group_id` (rows with the same id are exact or near copies, "
        "or share a patient/lesion: they lie in one split, and `train --folds` keeps them in one fold).",
        *card_lines(report),
        "",
        "## Images per class and split",
        "",
        "| class | " + " | ".join(SPLITS) + " | total |",
        "|---|" + "---:|" * (len(SPLITS) + 1),
    ]
    for name in names:
        counts = [splits[s]["per_class"].get(name, 0) for s in SPLITS]
        lines.append(f"| {md_text(name)} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    totals = [splits[s]["rows"] for s in SPLITS]
    lines.append("| **total** | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |")
    lines += ["", "## Split", ""]
    if report.get("eval_only"):
        lines.append("Every image is in the `test` split: this is an evaluation-only (external validation) set.")
    elif report["layout"] == "pre_split":
        lines.append(
            "The source already had split folders; they were kept. Content found in more than one split was "
            "kept in the earliest (train, then validation, then test) and dropped from the later ones."
        )
    else:
        p = report["parameters"]
        lines.append(
            f"Stratified by class at the level of duplicate groups (validation {p['val_frac']}, "
            f"test {p['test_frac']}, seed {p['seed']}): every group of exact or near copies lies wholly in "
            "one split, so no image leaks between train and test."
        )
    dup = report["duplicates"]
    threshold = report["parameters"]["near_threshold"]
    if threshold < 0:
        near = "near-copy matching was turned off. "
    else:
        near = (
            f"near copies are pairs whose perceptual hashes lie within {threshold} bits, also after a horizontal "
            "or vertical flip, a 90, 180 or 270 degree rotation, a transpose or a crop of up to ~10% (each image's "
            "pHash is computed in all 8 orientations and for 15 crop windows; the `phash` column holds the upright "
            "one), and whose thumbnails, aligned that way, agree in detail: a close hash alone never groups two "
            "images, so different lesions that look alike stay apart, while re-encoded, resized, cropped, "
            "brightened or flipped copies are grouped with their original. "
        )
    lines += [
        "",
        "## Duplicates",
        "",
        f"Exact copies share `content_hash`; {near}{dup['groups_with_copies']} groups held more than "
        f"one file ({dup['groups_with_near_copies']} with near copies, largest {dup['largest_group']}). "
        f"Exact copies within a class were kept once ({dup['exact_copies_dropped']} dropped); near copies "
        "stay, in the same split. "
        f"{len(dup['conflict_groups'])} groups carried different labels and were resolved with policy "
        f"`{dup['conflict_policy']}`.",
        "",
        "## Files not included",
        "",
    ]
    by_reason = report["skipped_by_reason"]
    if by_reason:
        lines += ["| reason | files | meaning |", "|---|---:|---|"]
        lines += [f"| {r} | {n} | {_REASONS.get(r, '')} |" for r, n in sorted(by_reason.items())]
        lines.append("")
        lines.append("Every such file is listed with its reason in `conversion_report.json`.")
    else:
        lines.append("None: every file became a row.")
    if report.get("empty_class_folders"):
        empty = ", ".join(map(md_text, report["empty_class_folders"]))
        lines += ["", f"Empty class folders (no class created): {empty}."]
    dropped = sorted(k for k, v in report["class_map"].items() if v is None)
    if dropped:
        lines += ["", f"Folders dropped by the class map: {', '.join(map(md_text, dropped))}."]
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_from_disk  # or load_dataset('ORG/NAME') once pushed",
        "ds = load_from_disk('DATA')",
        "```",
        "",
    ]
    if report.get("license"):
        lines += [f"License: {report['license']}.", ""]
    return "\n".join(lines)


def build_card(report: dict[str, Any], *, title: str = "Skin disease images") -> DatasetCard:
    """The complete card (YAML metadata + body)."""
    data = card_data(report, pretty_name=title)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(report, title=title)}")
