"""``convert``: class folders -> a leakage-free Hugging Face ``DatasetDict`` (train/validation/test) on disk.

Two passes keep memory flat whatever the number of images:

1. every file is decoded in ``num_proc`` worker processes and streamed, as a re-encoded JPEG plus hashes,
   into one Arrow staging file (only paths, labels and hashes stay in RAM);
2. duplicates are grouped, conflicts resolved and groups split; each split is then an index selection of the
   memory-mapped staging file, written with ``save_to_disk``.

Everything is written into a temporary folder beside OUT and renamed at the end, so an interrupted run never
leaves an OUT that loads as complete.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo
from datasets.arrow_writer import ArrowWriter
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from derm_accel.core.errors import InputError
from derm_accel.core.fileio import atomic_write_json, replace_dir
from derm_accel.core.paths import shareable_path
from derm_accel.data.card import build_card
from derm_accel.data.decode import (
    MAX_DECODE_PIXELS,
    MAX_PIXELS,
    Decoded,
    DecodeOptions,
    decode_file,
    decode_task,
)
from derm_accel.data.dedupe import CONFLICT_POLICIES, DUPLICATES_HOW, LARGE_GROUP, group_images, resolve_groups
from derm_accel.data.metadata import (
    MetadataSpec,
    join_groups,
    row_metadata,
    scan_metadata,
    unit_label,
    with_metadata_features,
)
from derm_accel.data.near_copies import Signatures
from derm_accel.data.publish import push_dataset
from derm_accel.data.report import (
    REPORT_NAME,
    check_accounting,
    is_failed_conversion,
    split_counts,
    versions,
    write_failure_report,
)
from derm_accel.data.scan import ScanError, ScanResult, Skip, SourceFile, load_class_map, scan_source
from derm_accel.data.schema import GROUP_COLUMN, dataset_features
from derm_accel.data.split import SPLITS, stratified_group_split
from derm_accel.data.tempdirs import make_temp_dir, remove_stale_temp_dirs

CARD_TITLE = "Skin disease images"
IN_FLIGHT_CHUNKS = 4  # results decoded but not yet written, per worker, in chunks: a few MB of JPEGs
logger = logging.getLogger(__name__)
STORED_HOW = (
    "An RGB JPEG that needs no resize (shorter side at most max_size), no EXIF rotation and no colour conversion "
    "is stored as the source file's own JPEG stream, its metadata segments (EXIF, XMP, comments...) removed and "
    "its compressed pixels unchanged; every other image is re-encoded as JPEG at the given quality."
)


class ConvertError(InputError):
    """The conversion cannot start as asked (missing SRC, existing OUT, no images, bad class map...)."""


def _check_arguments(
    src: Path,
    out: Path,
    val_frac: float,
    test_frac: float,
    max_size: int,
    quality: int,
    near_threshold: int,
    conflicts: str,
    overwrite: bool,
) -> None:
    if not src.is_dir():
        raise ConvertError(
            f"Source folder {src} does not exist or is not a folder; pass the folder of class folders."
        )
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ConvertError(
            f"val_frac={val_frac} and test_frac={test_frac} must each be in [0, 1) and sum to less than 1."
        )
    if max_size < 0:
        raise ConvertError(f"max_size={max_size} must be >= 0 (0 keeps the original size).")
    if not 1 <= quality <= 100:
        raise ConvertError(f"quality={quality} must be between 1 and 100.")
    if conflicts not in CONFLICT_POLICIES:
        raise ConvertError(f"conflicts={conflicts!r} must be one of {', '.join(CONFLICT_POLICIES)}.")
    if not -1 <= near_threshold <= 16:
        raise ConvertError(
            f"near_threshold={near_threshold} must be between 0 and 16 bits (-1 turns near duplicates off)."
        )
    if out == src or out.is_relative_to(src):
        raise ConvertError(f"Output {out} lies inside the source folder {src}; write it elsewhere.")
    if src.is_relative_to(out):
        raise ConvertError(f"Source {src} lies inside the output folder {out}; writing OUT would destroy it.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_failed_conversion(out):
        if not overwrite:
            raise ConvertError(f"Output {out} already exists; pass overwrite=True (--overwrite) to replace it.")
        if not (out / REPORT_NAME).is_file():
            # --overwrite replaces an earlier conversion, never an unrelated folder.
            raise ConvertError(
                f"Output {out} is not a dataset written by `derm-accel convert` (no {REPORT_NAME}); "
                f"--overwrite only replaces earlier conversions. Choose another OUT."
            )


def _decoded_stream(
    files: list[SourceFile], options: DecodeOptions, num_proc: int, progress: bool
) -> Iterator[Decoded]:
    """Decoded files in input order; in worker processes when ``num_proc > 1``."""
    bar = tqdm(total=len(files), desc="convert: decoding", unit="img", disable=not progress)
    tasks = ((i, f.path, options) for i, f in enumerate(files))
    try:
        if num_proc <= 1:
            for task in tasks:
                yield decode_file(*task)
                bar.update()
            return
        chunksize = max(1, min(32, len(files) // (num_proc * 16)))
        window, stop = threading.BoundedSemaphore(IN_FLIGHT_CHUNKS * num_proc * chunksize), threading.Event()
        with multiprocessing.get_context().Pool(num_proc) as pool:
            try:
                for result in pool.imap(decode_task, _throttled(tasks, window, stop), chunksize=chunksize):
                    window.release()
                    yield result
                    bar.update()
            finally:
                stop.set()  # before the pool closes: its task thread may be waiting on the window
    finally:
        bar.close()


def _throttled(tasks: Iterator[Any], window: threading.BoundedSemaphore, stop: threading.Event) -> Iterator[Any]:
    """``tasks``, each handed out only once the window has room. ``Pool.imap`` queues every result its workers
    finish until the caller takes it, with no limit: when writing rows is slower than decoding, encoded images
    pile up in the main process (measured: ~20 KB an image). The caller releases the window per result taken."""
    for task in tasks:
        while not window.acquire(timeout=0.1):
            if stop.is_set():
                return
        yield task


@dataclass
class Staged:
    """Pass 1's outcome: the staged rows, each row's file index, the files that failed (by index), each row's
    near-copy signature (file-backed, in the temporary folder; never published) and how many rows keep the
    source file's own JPEG."""

    rows: Dataset
    row_files: list[int]
    failed: dict[int, Decoded]
    signatures: Signatures
    originals: int


def _stage(
    scan: ScanResult, info: DatasetInfo, tmp: Path, options: DecodeOptions, num_proc: int, progress: bool
) -> Staged:
    """Pass 1: write every decodable file as a row of one Arrow file (``tmp/staging.arrow``)."""
    features = info.features
    label_of = {name: i for i, name in enumerate(scan.class_names)}
    row_files: list[int] = []
    signatures = Signatures.allocate(len(scan.files), tmp)
    failed: dict[int, Decoded] = {}
    originals = 0
    # Small batches: rows hold encoded images, so RAM stays at a few MB whatever the number of files.
    with ArrowWriter(features=features, path=str(tmp / "staging.arrow"), writer_batch_size=100) as writer:
        for result in _decoded_stream(scan.files, options, num_proc, progress):
            if result.jpeg is None or result.signature is None:
                failed[result.index] = result
                continue
            source = scan.files[result.index]
            writer.write(
                features.encode_example(
                    {
                        "image": {"bytes": result.jpeg, "path": None},
                        "label": label_of[source.class_name],
                        "source_path": source.rel,
                        "orig_width": result.width,
                        "orig_height": result.height,
                        "content_hash": result.content_hash,
                        "phash": result.phash,
                        **row_metadata(scan, result.index),
                    }
                )
            )
            signatures.put(len(row_files), result.signature)
            row_files.append(result.index)
            originals += result.original
        writer.finalize()
    rows = Dataset.from_file(str(tmp / "staging.arrow"), info=info)
    return Staged(rows, row_files, failed, signatures.head(len(row_files)), originals)


def _system_arrow_pool() -> Any:
    """Make the C library's allocator pyarrow's pool while convert writes; return the pool to put back.

    pyarrow's default pool (mimalloc) keeps the pages of the image batches it has freed: measured, the main
    process grew ~5.7 KB per image (48 px JPEGs; more with larger ones) over the staging and save passes, where
    with the system allocator it stays at its per-row record (~1.5 KB: paths, hashes, labels for grouping).
    Buffers remember their pool, so putting the previous one back is safe."""
    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    return before


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence datasets' own progress bars for ``progress=False`` and put the setting back afterwards."""
    was_disabled = are_progress_bars_disabled()
    if enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if enabled and not was_disabled:
            enable_progress_bars()


def _skips(scan: ScanResult, failed: dict[int, Decoded], resolution: Any) -> list[Skip]:
    """Every file that did not become a row, with its reason, sorted."""
    skipped = list(scan.skipped)
    skipped += [Skip(scan.files[i].rel, d.reason or "unreadable", d.detail) for i, d in failed.items()]
    skipped += list(resolution.skipped.values())
    return sorted(skipped, key=lambda s: (s.path, s.reason))


def _failure(src: Path, out: Path, scan: ScanResult, skipped: list[Skip], empty: list[str]) -> ConvertError:
    """Write the report of a conversion that cannot produce a usable dataset; the error to raise."""
    reasons = dict(sorted(Counter(s.reason for s in skipped).items()))
    if len(empty) == len(scan.class_names):
        message = f"No image under {src} could be converted (skipped: {reasons})."
    else:
        message = (
            f"Classes {empty} have no usable image left (every file was skipped). Fix or remove those files, or "
            f"pass --drop-empty-classes to leave these classes out of the label set."
        )
    report = {
        "format_version": 1,
        "error": message,
        "src": shareable_path(src),
        "layout": scan.layout,
        "files_total": len(scan.files) + len(scan.skipped),
        "rows_total": 0,
        "class_names": scan.class_names,
        "empty_classes": empty,
        "skipped_total": len(skipped),
        "skipped_by_reason": reasons,
        "versions": versions(),
        "skipped": [s.as_dict() for s in skipped],
    }
    path = write_failure_report(out, report)
    return ConvertError(f"{message} Nothing was written to {out}; every skipped file and its reason: {path}")


def _drop_classes(
    staging: Dataset, labels: list[int], class_names: list[str], empty: list[int]
) -> tuple[Dataset, list[int], list[str]]:
    """The staged rows relabelled without the ``empty`` classes (rows already dropped as duplicates get -1)."""
    keep = [c for c in range(len(class_names)) if c not in set(empty)]
    new_id = {old: new for new, old in enumerate(keep)}
    names = [class_names[c] for c in keep]
    features = staging.features.copy()
    features["label"] = ClassLabel(names=names)
    staging = staging.map(
        lambda batch: {"label": [new_id.get(x, -1) for x in batch["label"]]},
        batched=True,
        features=features,
        load_from_cache_file=False,
        desc="convert: dropping empty classes",
    )
    return staging, [new_id.get(x, -1) for x in labels], names


def _scan(
    src: Path, class_map: str | Path | dict | None, metadata: MetadataSpec | None, follow_external_links: bool
) -> ScanResult:
    """The files of SRC (class folders, or a folder of images with a metadata table), or a ConvertError."""
    try:
        mapping = load_class_map(class_map)
        scan = (
            scan_source(src, mapping, follow_external_links=follow_external_links)
            if metadata is None
            else scan_metadata(src, metadata, mapping, follow_external_links=follow_external_links)
        )
    except ScanError as exc:
        raise ConvertError(str(exc)) from exc
    if not scan.files:
        reasons = Counter(s.reason for s in scan.skipped)
        raise ConvertError(
            f"No image files found in class folders under {src} "
            f"(skipped: {dict(reasons) or 'nothing found'}). "
            "Expected SRC/<class>/<images> or SRC/train|val|test/<class>/<images>."
        )
    return scan


def _find_duplicates(
    staged: Staged, scan: ScanResult, *, near_threshold: int, conflicts: str
) -> tuple[list[str], list[int], list[str | None], Any]:
    """Exact and verified near copies grouped (see dedupe), label conflicts resolved; the rows' paths, labels and
    split folders (pre-split layouts) come with the resolution."""
    files = scan.files
    paths = [files[f].rel for f in staged.row_files]
    labels = staged.rows["label"]
    hashes = staged.rows["content_hash"]
    splits_hint = [files[f].split for f in staged.row_files]
    grouping = group_images(hashes, staged.signatures, near_threshold)
    resolution = resolve_groups(
        grouping.groups,
        labels=labels,
        class_names=scan.class_names,
        paths=paths,
        content_hashes=hashes,
        splits=splits_hint,
        conflicts=conflicts,
    )
    resolution.summary["near_copy_search"] = grouping.summary(paths)
    for group in resolution.summary["large_groups"]:
        logger.warning(
            "a group of %d exact or near copies (more than %d): %s%s; see 'large_groups' in %s",
            group["size"],
            LARGE_GROUP,
            ", ".join(group["paths"][:3]),
            ", ..." if group["size"] > 3 else "",
            REPORT_NAME,
        )
    return paths, labels, splits_hint, resolution


def _with_group_ids(staging: Dataset, kept: list[list[int]]) -> Dataset:
    """The staged rows with their unit's number as ``group_id`` (the index of the unit in ``kept``: duplicate
    groups joined with patients/lesions); rows that were dropped get -1 and are not selected into any split.
    One int64 column held in RAM (8 bytes a row), so train --folds reads groups instead of decoding images."""
    ids = np.full(len(staging), -1, dtype=np.int64)
    if kept:
        ids[np.concatenate([np.asarray(u, dtype=np.int64) for u in kept])] = np.repeat(
            np.arange(len(kept), dtype=np.int64), [len(u) for u in kept]
        )
    return staging.add_column(GROUP_COLUMN, ids, feature=dataset_features([])[GROUP_COLUMN])


def _assign_splits(
    kept: list[list[int]],
    labels: list[int],
    paths: list[str],
    splits_hint: list[str | None],
    *,
    layout: str,
    eval_only: bool,
    val_frac: float,
    test_frac: float,
    seed: int,
) -> dict[str, list[int]]:
    """The rows of each split: a duplicate or patient group stays in one split."""
    if eval_only:
        group_splits = ["test"] * len(kept)
    elif layout == "pre_split":
        group_splits = [splits_hint[g[0]] or "train" for g in kept]
    else:
        group_splits = stratified_group_split(
            [unit_label(g, labels) for g in kept],
            [len(g) for g in kept],
            [paths[g[0]] for g in kept],
            val_frac=val_frac,
            test_frac=test_frac,
            seed=seed,
        )
    rows_by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
    for group, split in zip(kept, group_splits, strict=True):
        rows_by_split[split].extend(group)
    for rows in rows_by_split.values():
        rows.sort()
    return rows_by_split


def _report(
    src: Path,
    scan: ScanResult,
    resolution: Any,
    *,
    class_names: list[str],
    empty: list[int],
    rows_by_split: dict[str, list[int]],
    labels: list[int],
    skipped: list[Skip],
    files_total: int,
    rows_total: int,
    stored: dict[str, int],
    grouping: Any,
    eval_only: bool,
    seed: int,
    license: str | None,
    push_to_hub: str | None,
    started: float,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """conversion_report.json: every file as a row or a skip with its reason, and how the rows were made."""
    return {
        "format_version": 1,
        "src": shareable_path(src),  # the report is published with the dataset
        "layout": scan.layout,
        "files_total": files_total,
        "rows_total": rows_total,
        # Staged rows whose image is the source JPEG's own stream (metadata segments removed) vs re-encoded;
        # duplicates and conflicts dropped later are counted too.
        "stored_images": {**stored, "how": STORED_HOW},
        "skipped_total": len(skipped),
        "class_names": class_names,
        "class_map": dict(scan.folders),
        "empty_class_folders": scan.empty_folders,
        "dropped_empty_classes": [scan.class_names[c] for c in empty],
        "splits": split_counts(rows_by_split, labels, class_names),
        "empty_splits": [s for s in SPLITS if not rows_by_split[s]],
        "skipped_by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
        "duplicates": {
            **resolution.summary,
            "how": DUPLICATES_HOW,
        },
        "eval_only": eval_only,
        "metadata": getattr(scan, "report", None),
        "grouping": grouping,
        "parameters": parameters,
        "seed": seed,
        "license": license,
        "push_to_hub": push_to_hub,
        "versions": versions(),
        "skipped": [s.as_dict() for s in skipped],
        "elapsed_s": round(time.time() - started, 2),
    }


def convert_folders(
    src: str | Path,
    out: str | Path,
    *,
    class_map: str | Path | dict | None = None,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 42,
    max_size: int = 320,
    quality: int = 95,
    near_threshold: int = 4,
    conflicts: str = "drop",
    num_proc: int = 1,
    overwrite: bool = False,
    license: str | None = None,
    push_to_hub: str | None = None,
    progress: bool = True,
    metadata: MetadataSpec | None = None,
    eval_only: bool = False,
    drop_empty_classes: bool = False,
    follow_external_links: bool = False,
) -> dict:
    """Convert SRC (class folders, or train/ val/ test/ folders of class folders) to a DatasetDict at OUT.

    Writes ``OUT`` (``datasets.load_from_disk``), ``OUT/conversion_report.json`` and the card
    ``OUT/README.md``; with ``push_to_hub`` also uploads them to that Hub dataset repo. Returns the report.
    ``metadata`` (see ``metadata.metadata_spec``): SRC is a folder of images and labels, groups and extra
    columns come from a table. ``eval_only`` puts every image in the ``test`` split (external validation).

    Fails (:class:`ConvertError`, report written) when no image converts, or when a class is left with no
    images, unless ``drop_empty_classes`` drops such classes from the label set. Files reached through links
    that lead outside SRC are skipped unless ``follow_external_links``.
    """
    started = time.time()
    src = Path(src).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    _check_arguments(src, out, val_frac, test_frac, max_size, quality, near_threshold, conflicts, overwrite)
    num_proc = num_proc if num_proc > 0 else (os.cpu_count() or 1)
    scan = _scan(src, class_map, metadata, follow_external_links)

    features = with_metadata_features(dataset_features(scan.class_names, with_group=False), scan)
    options = DecodeOptions(max_size=max_size, quality=quality)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out, "tmp")  # left by a killed run; only folders provably ours
    tmp = make_temp_dir(out, "tmp")
    arrow_pool = _system_arrow_pool()
    try:
        info = DatasetInfo(
            description="Skin disease images converted from class folders by derm-accel.",
            license=license or "",
            features=features,
        )
        staged = _stage(scan, info, tmp, options, num_proc, progress)
        staging, row_files, failed = staged.rows, staged.row_files, staged.failed
        paths, labels, splits_hint, resolution = _find_duplicates(
            staged, scan, near_threshold=near_threshold, conflicts=conflicts
        )
        stored = {"source_jpeg": staged.originals, "reencoded": len(row_files) - staged.originals}
        del staged
        kept, grouping = join_groups(resolution.kept, scan, row_files)  # patients/lesions: one split each
        class_names = scan.class_names
        empty = sorted({*range(len(class_names))} - {labels[i] for unit in kept for i in unit})
        if empty and (not drop_empty_classes or len(empty) == len(class_names)):
            raise _failure(src, out, scan, _skips(scan, failed, resolution), [class_names[c] for c in empty])
        if empty:
            staging, labels, class_names = _drop_classes(staging, labels, class_names, empty)
        rows_by_split = _assign_splits(
            kept,
            labels,
            paths,
            splits_hint,
            layout=scan.layout,
            eval_only=eval_only,
            val_frac=val_frac,
            test_frac=test_frac,
            seed=seed,
        )

        skipped = _skips(scan, failed, resolution)
        kept_paths = [paths[i] for rows in rows_by_split.values() for i in rows]
        all_files = [f.rel for f in scan.files] + [s.path for s in scan.skipped]
        check_accounting(all_files, kept_paths, skipped)

        staging = _with_group_ids(staging, kept)
        # datasets cannot reload an empty split from disk, so a split with no rows is left out (and reported).
        dataset = DatasetDict({s: staging.select(rows_by_split[s]) for s in SPLITS if rows_by_split[s]})
        final = tmp / "out"
        with _quiet(not progress):
            dataset.save_to_disk(str(final))
        del dataset, staging

        report = _report(
            src,
            scan,
            resolution,
            class_names=class_names,
            empty=empty,
            rows_by_split=rows_by_split,
            labels=labels,
            skipped=skipped,
            files_total=len(all_files),
            rows_total=len(kept_paths),
            stored=stored,
            grouping=grouping,
            eval_only=eval_only,
            seed=seed,
            license=license,
            push_to_hub=push_to_hub,
            started=started,
            parameters={
                "class_map": str(class_map) if isinstance(class_map, (str, Path)) else class_map,
                "val_frac": val_frac,
                "test_frac": test_frac,
                "seed": seed,
                "max_size": max_size,
                "quality": quality,
                "near_threshold": near_threshold,
                "conflicts": conflicts,
                "max_pixels": MAX_PIXELS,
                "max_decode_pixels": MAX_DECODE_PIXELS,
                "num_proc": num_proc,
                "drop_empty_classes": drop_empty_classes,
                "follow_external_links": follow_external_links,
            },
        )
        atomic_write_json(final / REPORT_NAME, report)
        build_card(report, title=CARD_TITLE).save(final / "README.md")
        replace_dir(final, out)  # an old OUT is only removed once the new one is there
    finally:
        pa.set_memory_pool(arrow_pool)
        shutil.rmtree(tmp, ignore_errors=True)

    if push_to_hub:
        report["hub_url"] = push_dataset(out, push_to_hub, report, title=CARD_TITLE)
    return report
