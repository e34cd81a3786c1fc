"""Column names of public dermatology datasets that ship as a folder of images plus a metadata table.

A preset only fills in ``--image-column``, ``--label-column`` (or ISIC 2019's one-hot label columns),
``--group-column`` and the dataset's own missing-value codes; every explicit option overrides it. The sources
are documented in docs/datasets.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """How one public layout names its columns."""

    image_column: str
    label_column: str | None = None
    label_columns: tuple[str, ...] = ()  # one-hot label columns (ISIC 2019); the class is the column set to 1
    group_columns: tuple[str, ...] = ()
    na_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra per-column missing codes
    files: str = ""
    hint: str = ""  # what to do when a group column is missing


PRESETS: dict[str, Preset] = {
    "ham10000": Preset(
        image_column="image_id",
        label_column="dx",
        group_columns=("lesion_id",),
        files="HAM10000_metadata.csv; images in HAM10000_images_part_1/ and HAM10000_images_part_2/",
    ),
    "isic2019": Preset(
        image_column="image",
        label_columns=("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"),
        group_columns=("lesion_id",),
        files="ISIC_2019_Training_GroundTruth.csv and ISIC_2019_Training_Metadata.csv; images in "
        "ISIC_2019_Training_Input/",
        hint="ISIC 2019's lesion_id is in ISIC_2019_Training_Metadata.csv: pass it as a second --metadata "
        "(labels come from ISIC_2019_Training_GroundTruth.csv)",
    ),
    "isic2020": Preset(
        image_column="image_name",
        label_column="benign_malignant",
        group_columns=("patient_id",),
        files="ISIC_2020_Training_GroundTruth.csv (or _v2, or Kaggle's train.csv); images in train/",
    ),
    "pad-ufes-20": Preset(
        image_column="img_id",
        label_column="diagnostic",
        group_columns=("patient_id",),
        files="metadata.csv; images in images/imgs_part_1..3/",
    ),
    "fitzpatrick17k": Preset(
        image_column="md5hash",
        label_column="label",
        na_values={"fitzpatrick_scale": ("-1",), "fitzpatrick_centaur": ("-1",)},
        files="fitzpatrick17k.csv; images downloaded from its url column and saved as <md5hash>.jpg",
    ),
    "ddi": Preset(
        image_column="DDI_file",
        label_column="disease",
        files="ddi_metadata.csv; images 000001.png ... beside it or in images/",
    ),
}


def get_preset(name: str | None) -> Preset | None:
    """The preset called ``name`` (case-insensitive; ``pad_ufes_20`` works too), or None for no preset."""
    if name is None:
        return None
    key = name.strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[key]


def guess_preset(columns: list[str]) -> str | None:
    """The preset whose image and label columns all appear in ``columns`` (for hints in error messages)."""
    present = set(columns)
    for name, preset in PRESETS.items():
        needed = {preset.image_column, *([preset.label_column] if preset.label_column else preset.label_columns)}
        if needed <= present:
            return name
    return None
