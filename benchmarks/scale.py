"""Benchmark every stage at three or more sizes up to the real collection's (245k rows): time, peak memory and
the fitted growth exponent, in one run.

Each (stage, size) runs in a fresh process, so one stage's memory never hides another's; its time and peak
memory cover the stage's own call only (the rows it reads are generated first, outside the timing). Rows are
generated where real ones are too slow to make here: hashes for grouping, predictions for the metrics and the
subgroups, feature arrays for the guard, tiny (48 px) JPEGs for convert and the inference input, and a
dataset of one tiny image per row (unique hashes and paths) for the k-fold preparation. The exponent is the
slope of log(seconds) over log(rows), fitted over the sizes: 1 is linear, 2 quadratic. Peak memory is the
private (anonymous) RSS of the process, sampled every 5 ms; its exponent is fitted on the rise over the
process's memory before the call (flat memory: near 0).

    python benchmarks/scale.py --quick          # a few minutes on 2 cores
    python benchmarks/scale.py                  # up to 245k rows (about 15 minutes on 2 cores)
    python benchmarks/scale.py --stages kfold --kfold-sizes 10000,245000
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as `python benchmarks/scale.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, as_list, markdown_table, provenance_lines

COLLECTION = 245_000
NUM_CLASSES = 35
GUARD_DIMS = (16, 24, 40, 64)  # per-depth feature widths: small, so 245k rows fit in minutes here
STAGES = ("convert", "grouping", "grouping_near", "kfold", "metrics", "subgroups", "guard", "inference")
SIZES = {  # full run; --quick uses QUICK_SIZES
    "convert": (1000, 2000, 4000),
    "grouping": (10_000, 50_000, COLLECTION),
    "grouping_near": (10_000, 50_000, COLLECTION),
    "kfold": (10_000, 50_000, COLLECTION),
    "metrics": (10_000, 50_000, COLLECTION),
    "subgroups": (1000, 2000, 4000),
    "guard": (10_000, 50_000, COLLECTION),
    "inference": (1000, 4000, 16_000),
}
QUICK_SIZES = {
    "convert": (300, 600, 1200),
    "grouping": (10_000, 50_000, COLLECTION),
    "grouping_near": (5000, 20_000, 50_000),
    "kfold": (5000, 20_000, COLLECTION),
    "metrics": (5000, 20_000, 50_000),
    "subgroups": (500, 1000, 2000),
    "guard": (5000, 20_000, 50_000),
    "inference": (500, 1000, 2000),
}
WHAT = {
    "convert": "convert: files -> Arrow (48 px JPEGs, 2 processes; main and worker memory)",
    "grouping": "grouping: exact + near copies, spread pHashes (dedupe.group_images)",
    "grouping_near": "grouping: every image with 7 near copies (1-2 bits flipped)",
    "kfold": "k-fold preparation: 5 folds from the stored group_id (data.folds.make_fold_datasets)",
    "metrics": "evaluate: headline metrics + bootstrap, 35 classes (derm_metrics)",
    "subgroups": "evaluate --subgroups age,sex,site: per-group bootstrap (subgroups.evaluate_subgroups)",
    "guard": f"guard fit on feature arrays ({sum(GUARD_DIMS)} floats per image; guard.fit.fit_guard)",
    "inference": "evaluate's inference input: Arrow -> decode -> batches -> logits (trivial net)",
}


# ---------------------------------------------------------------------------------------------- memory
def _private_kb(pid: int | str = "self") -> int:
    """Anonymous (private) resident memory of a process, in kB: what holding data in RAM costs. File-backed
    pages of memory-mapped Arrow files are left out: the kernel drops them at will."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    import psutil

    info = psutil.Process(None if pid == "self" else int(pid)).memory_info()
    return (info.rss - getattr(info, "shared", 0)) // 1024


class Sampler:
    """Peak private memory of this process and of its children (the largest one), sampled every 5 ms."""

    def __init__(self) -> None:
        self.main_kb = self.worker_kb = self.start_kb = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self.main_kb = max(self.main_kb, _private_kb())
            with contextlib.suppress(psutil.Error):
                for child in me.children(recursive=True):
                    self.worker_kb = max(self.worker_kb, _private_kb(child.pid))
            self._stop.wait(0.005)

    def __enter__(self) -> Sampler:
        import gc

        gc.collect()
        self.start_kb = self.main_kb = _private_kb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------ generated rows
def _tiny_jpeg(i: int, size: int = 48) -> bytes:
    import io

    from derm_accel.data.synthetic import render

    buf = io.BytesIO()
    render(i % 6, i, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)


def _flip_bits(values: np.ndarray, rng: np.random.Generator, max_bits: int) -> np.ndarray:
    out = values.copy()
    for _ in range(max_bits):
        bits = rng.integers(0, 64, size=len(values)).astype(np.uint64)
        out ^= np.left_shift(np.uint64(1), bits) * (rng.random(len(values)) < 0.75).astype(np.uint64)
    return out


def _grouping_input(n: int, near: bool, folder: Path) -> tuple[list[str], Any]:
    """Content hashes and near-copy signatures (file-backed under ``folder``) of ``n`` made-up images: spread
    hashes and unrelated noise thumbnails, or (``near``) n/8 images each with 7 near copies, every orientation's
    and crop window's hash (pHash, and each word of the detail hash) flipped by up to 2 bits and the thumbnail by
    a little noise, so the copies verify."""
    from derm_accel.data.near_copies import Signatures

    rng = np.random.default_rng(n)
    sig = Signatures.allocate(n, folder)
    copies = 8 if near else 1
    originals = -(-n // copies)
    for columns, target in ((sig.variants.shape[1], sig.variants), (sig.windows.shape[1], sig.windows)):
        base = np.repeat(np.stack([_hashes(originals, rng) for _ in range(columns)], axis=1), copies, axis=0)[:n]
        target[:] = np.stack([_flip_bits(base[:, k], rng, 2 if near else 0) for k in range(columns)], axis=1)
    detail = sig.detail.reshape(n, -1)  # the detail hashes alike, word by word (a copy stays within a few bits)
    for k in range(detail.shape[1]):
        detail[:, k] = _flip_bits(np.repeat(_hashes(originals, rng), copies)[:n], rng, 2 if near else 0)
    block = 8192 - 8192 % copies  # thumbnails in blocks of whole copy groups: a few MB of noise at once
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        own = rng.integers(0, 256, (-(-len(rows) // copies), *sig.thumbnails.shape[1:]), dtype=np.int16)
        noise = rng.integers(-3, 4, (len(rows), *own.shape[1:]), dtype=np.int16) if near else 0
        sig.thumbnails[rows] = np.clip(own[(rows - start) // copies] + noise, 0, 255).astype(np.uint8)
    return [f"{i:064x}" for i in range(n)], sig


def _predictions(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    y = rng.integers(0, NUM_CLASSES, n)
    logits = rng.normal(0, 1, (n, NUM_CLASSES)).astype(np.float32)
    logits[np.arange(n), y] += 2.0  # a model that is right about 60% of the time
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return y, (probs / probs.sum(1, keepdims=True)).astype(np.float32)


def _kfold_dataset(root: Path, n: int) -> Path:
    """A converted-schema DatasetDict of ``n`` rows (4096 16 px JPEGs cycled, unique hashes and paths, units of
    about 1.7 rows), 80/10/10 over train/validation/test; reused when already there."""
    out = root / f"kfold_data_{n}"
    if (out / "dataset_dict.json").is_file():
        return out
    import pyarrow as pa
    from datasets import Dataset, DatasetDict, DatasetInfo

    from derm_accel.data.schema import dataset_features

    features = dataset_features([f"class_{c:02d}" for c in range(NUM_CLASSES)])
    rng = np.random.default_rng(n)
    jpegs = [_tiny_jpeg(i, 16) for i in range(min(n, 4096))]  # distinct images, so older code's regrouping has units
    group = np.cumsum(rng.random(n) < 0.6) - 1  # about 1.7 rows a unit
    label = (group * 7919 % NUM_CLASSES).astype(np.int64)  # a unit has one label
    columns = {
        "image": pa.StructArray.from_arrays(
            [pa.array([jpegs[i % len(jpegs)] for i in range(n)], pa.binary()), pa.nulls(n, pa.string())],
            names=["bytes", "path"],
        ),
        "label": pa.array(label),
        "source_path": pa.array([f"class_{c:02d}/img_{i:07d}.jpg" for i, c in enumerate(label)]),
        "orig_width": pa.array(np.full(n, 640, np.int32)),
        "orig_height": pa.array(np.full(n, 480, np.int32)),
        "content_hash": pa.array([f"{i:064x}" for i in range(n)]),
        "phash": pa.array([f"{int(h):016x}" for h in _hashes(n, rng)]),
        "group_id": pa.array(group.astype(np.int64)),
    }
    table = pa.table({k: v for k, v in columns.items() if k in features})  # (a schema without group_id: older code)
    full = Dataset(table.cast(features.arrow_schema), info=DatasetInfo(features=features))
    a, b = int(0.8 * n), int(0.9 * n)
    DatasetDict({"train": full.select(range(a)), "validation": full.select(range(a, b)),
                 "test": full.select(range(b, n))}).save_to_disk(str(out))
    return out


def _image_dataset(root: Path, n: int, distinct: int = 256) -> Path:
    """``n`` rows of 48 px JPEGs (``distinct`` rendered images, cycled) in the converted schema."""
    out = root / f"images_{n}"
    if (out / "dataset_dict.json").is_file():
        return out
    from datasets import Dataset, DatasetDict

    from derm_accel.data.schema import dataset_features

    jpegs = [_tiny_jpeg(i) for i in range(min(n, distinct))]
    features = dataset_features([f"class_{c:02d}" for c in range(NUM_CLASSES)])
    rows = {
        "image": [{"bytes": jpegs[i % len(jpegs)], "path": None} for i in range(n)],
        "label": [i % NUM_CLASSES for i in range(n)],
        "source_path": [f"x/{i}.jpg" for i in range(n)],
        "orig_width": [48] * n,
        "orig_height": [48] * n,
        "content_hash": [f"{i:064x}" for i in range(n)],
        "phash": [""] * n,
        "group_id": list(range(n)),
    }
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(out))
    return out


def _image_tree(root: Path, n: int) -> Path:
    """``n`` distinct 48 px JPEGs in 6 class folders (files already there are reused)."""
    from derm_accel.data.synthetic import class_names

    tree = root / f"tree_{n}"
    names = class_names(6)
    for i in range(n):
        path = tree / names[i % 6] / f"img_{i:06d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_tiny_jpeg(i))
    return tree


# ------------------------------------------------------------------------------------- the stages' calls
def _prepare(stage: str, n: int, work: Path) -> tuple[Callable[[], dict[str, Any]], Callable[[], None]]:
    """(the timed call, which returns extra figures; a cleanup) for ``stage`` at ``n`` rows."""
    if stage == "convert":
        from derm_accel.data.convert import convert_folders

        src, out = _image_tree(work, n), work / f"convert_out_{n}"

        def run() -> dict[str, Any]:
            report = convert_folders(src, out, num_proc=2, max_size=48, progress=False, overwrite=True)
            return {"rows_written": report["rows_total"]}

        return run, lambda: shutil.rmtree(out, ignore_errors=True)
    if stage in ("grouping", "grouping_near"):
        from derm_accel.data.dedupe import group_images

        folder = work / f"signatures_{stage}_{n}"
        folder.mkdir(parents=True, exist_ok=True)
        content, signatures = _grouping_input(n, stage == "grouping_near", folder)
        return (
            (lambda: {"groups": len(group_images(content, signatures, 4).groups)}),
            lambda: shutil.rmtree(folder, ignore_errors=True),
        )
    if stage == "kfold":
        return _prepare_kfold(n, work)
    if stage == "metrics":
        from derm_accel.evaluation.outputs import score

        y, probs = _predictions(n)
        names = [f"class_{c:02d}" for c in range(NUM_CLASSES)]
        return (lambda: {"macro_f1": round(score(y, probs, names)["macro_f1"], 3)}), lambda: None
    if stage == "subgroups":
        return _prepare_subgroups(n)
    if stage == "guard":
        return _prepare_guard(n)
    if stage == "inference":
        return _prepare_inference(n, work)
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _prepare_kfold(n: int, work: Path) -> tuple[Callable[[], dict[str, Any]], Callable[[], None]]:
    from derm_accel.data import folds

    data, out = _kfold_dataset(work, n), work / f"kfold_out_{n}"
    shutil.rmtree(out, ignore_errors=True)
    decoded = [0]
    decode = folds.decode_image

    def counting(*args: Any, **kwargs: Any) -> Any:
        decoded[0] += 1
        return decode(*args, **kwargs)

    folds.decode_image = counting  # counts images decoded to regroup (none when group_id is stored)

    def run() -> dict[str, Any]:
        paths = folds.make_fold_datasets(data, out, 5, seed=0)
        return {
            "images_decoded": decoded[0],
            "dataset_mb": round(_dir_mb(data), 1),
            "fold_data_mb": round(_dir_mb(out), 1),
            "arrow_files_in_fold_data": len(list(out.rglob("*.arrow"))),
            "folds": len(paths),
        }

    return run, lambda: shutil.rmtree(out, ignore_errors=True)


def _prepare_subgroups(n: int) -> tuple[Callable[[], dict[str, Any]], Callable[[], None]]:
    from datasets import Dataset

    from derm_accel.evaluation.subgroups import evaluate_subgroups, parse_subgroups

    y, probs = _predictions(n)
    rng = np.random.default_rng(n + 1)
    split = Dataset.from_dict({
        "age": rng.integers(5, 90, n).tolist(),
        "sex": rng.choice(["male", "female"], n).tolist(),
        "site": rng.choice(["head/neck", "trunk", "upper extremity", "lower extremity", "palms/soles"], n).tolist(),
    })
    spec = parse_subgroups("age,sex,site")
    return (lambda: {"subgroups": len(evaluate_subgroups(split, spec, y, probs)[0]["rows"])}), lambda: None


def _prepare_guard(n: int) -> tuple[Callable[[], dict[str, Any]], Callable[[], None]]:
    import torch

    from derm_accel.guard.fit import fit_guard
    from derm_accel.guard.scoring import Scored

    def scored(m: int, seed: int) -> Scored:
        rng = np.random.default_rng(seed)
        y, _ = _predictions(m)
        logits = torch.from_numpy(rng.normal(0, 1, (m, NUM_CLASSES)).astype(np.float32))
        logits[torch.arange(m), torch.from_numpy(y)] += 2.0
        feats = [torch.from_numpy(rng.normal(0, 1, (m, d)).astype(np.float32)) for d in GUARD_DIMS]
        return Scored(logits=logits, features=feats, labels=torch.from_numpy(y))

    train, val = scored(n, 1), scored(max(200, n // 9), 2)

    def run() -> dict[str, Any]:
        guard, _ = fit_guard(train, val)
        return {"fit_images": guard.settings["domain_guard"]["fit_images"]}

    return run, lambda: None


def _prepare_inference(n: int, work: Path) -> tuple[Callable[[], dict[str, Any]], Callable[[], None]]:
    import torch
    from accelerate import Accelerator
    from datasets import load_from_disk

    from derm_accel.data.transforms import BatchNormalize, decode_size, eval_input, with_transform
    from derm_accel.evaluation.inference import predict_logits

    torch.set_num_threads(1)
    cfg = {"input_size": (3, 32, 32), "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    transform, decode = eval_input(cfg)
    split = load_from_disk(str(_image_dataset(work, n)))["test"]
    rows = with_transform(split, transform, min_size=decode_size(32, 0.875), decode=decode)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, NUM_CLASSES))

    def run() -> dict[str, Any]:
        result = predict_logits(net, rows, Accelerator(cpu=True), batch_size=64, num_workers=0,
                                normalize=BatchNormalize(cfg))
        return {"scored": int(result.logits.shape[0])}

    return run, lambda: None


def child(stage: str, n: int, work: str) -> None:
    """Measure one (stage, size) in this process; print its figures as JSON (the last line)."""
    run, cleanup = _prepare(stage, n, Path(work))
    try:
        with Sampler() as mem:
            start = time.perf_counter()
            extra = run()
            seconds = time.perf_counter() - start
    finally:
        cleanup()
    figures = {
        "stage": stage,
        "rows": n,
        "seconds": round(seconds, 3),
        "peak_private_mb": round(mem.main_kb / 1024, 1),
        "rise_mb": round((mem.main_kb - mem.start_kb) / 1024, 1),
        **({"worker_peak_private_mb": round(mem.worker_kb / 1024, 1)} if mem.worker_kb else {}),
        **extra,
    }
    print(json.dumps(figures))


def _measure(stage: str, n: int, work: Path, timeout_s: int) -> dict[str, Any]:
    code = f"from benchmarks.scale import child; child({stage!r}, {n}, {str(work)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "2")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=timeout_s, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"stage": stage, "rows": n, "error": f"over {timeout_s} s"}
    if done.returncode != 0:
        return {"stage": stage, "rows": n, "error": done.stderr.strip().splitlines()[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def exponent(sizes: list[int], values: list[float], floor: float = 0.0) -> float | None:
    """The slope of log(value) over log(size): ``value ~ size ** slope``; None with fewer than two points."""
    points = [(s, max(v, floor)) for s, v in zip(sizes, values, strict=True) if v is not None and max(v, floor) > 0]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def growth(sizes: list[int], seconds: list[float], rises_mb: list[float]) -> dict[str, float | None]:
    """Exponents over all sizes, and of time between the two largest (where a superlinear cost shows first)."""
    return {
        "time_exponent": exponent(sizes, seconds),
        "time_exponent_largest_step": exponent(sizes[-2:], seconds[-2:]),
        "memory_exponent": exponent(sizes, rises_mb, floor=1.0),  # rises under 1 MB count as flat
    }


def _sweep(stages: list[str], sizes: dict[str, list[int]], work: Path, timeout_s: int) -> Iterator[dict[str, Any]]:
    for stage in stages:
        for n in sizes[stage]:
            row = _measure(stage, n, work, timeout_s)
            print(json.dumps(row), flush=True)
            yield row


def bench_scale(
    *,
    quick: bool = False,
    stages: Any = ",".join(STAGES),
    convert_sizes: Any = None,
    grouping_sizes: Any = None,
    grouping_near_sizes: Any = None,
    kfold_sizes: Any = None,
    metrics_sizes: Any = None,
    subgroups_sizes: Any = None,
    guard_sizes: Any = None,
    inference_sizes: Any = None,
    timeout_s: int = 900,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Every stage at three or more sizes (each in a fresh process): seconds, peak private memory and the fitted
    growth exponents; ``--quick`` for smaller sizes (a few minutes); ``--STAGE-sizes 1000,2000`` to choose."""
    chosen = as_list(stages)
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    given = {"convert": convert_sizes, "grouping": grouping_sizes, "grouping_near": grouping_near_sizes,
             "kfold": kfold_sizes, "metrics": metrics_sizes, "subgroups": subgroups_sizes, "guard": guard_sizes,
             "inference": inference_sizes}
    defaults = QUICK_SIZES if quick else SIZES
    sizes = {s: as_list(given[s], int) if given[s] else list(defaults[s]) for s in STAGES}
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="derm-scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = list(_sweep(chosen, sizes, work, timeout_s))
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for stage in chosen:
        done = [r for r in rows if r["stage"] == stage and "error" not in r]
        ns = [r["rows"] for r in done]
        summary[stage] = growth(ns, [r["seconds"] for r in done], [r["rise_mb"] for r in done])
    settings = {"quick": quick, "stages": ",".join(chosen), "sizes": {s: sizes[s] for s in chosen},
                "near_threshold": 4, "classes": NUM_CLASSES}
    return {"settings": settings, "results": rows, "summary": summary}


def _cell(values: list[Any], fmt: Callable[[Any], str]) -> str:
    return " / ".join("-" if v is None else fmt(v) for v in values)


def scale_markdown(results: dict[str, Any]) -> str:
    def secs(v: float) -> str:
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"

    table = []
    for stage, fitted in results["summary"].items():
        rows = [r for r in results["results"] if r["stage"] == stage]
        done = [r for r in rows if "error" not in r]
        worker = [r.get("worker_peak_private_mb") for r in done]
        memory = _cell([r["peak_private_mb"] for r in done], lambda v: f"{v:.0f}")
        if any(w is not None for w in worker):
            memory += " (workers " + _cell(worker, lambda v: f"{v:.0f}") + ")"
        failed = "; ".join(f"{r['rows']:,}: {r['error']}" for r in rows if "error" in r)
        table.append([
            WHAT[stage],
            _cell([r["rows"] for r in done], lambda v: f"{v:,}"),
            _cell([r["seconds"] for r in done], secs),
            _cell([fitted["time_exponent"], fitted.get("time_exponent_largest_step")], lambda v: f"{v:.2f}"),
            memory,
            "-" if fitted["memory_exponent"] is None else f"{fitted['memory_exponent']:.2f}",
            failed,
        ])
    headers = ["stage", "rows", "seconds", "time exponent (all / largest step)", "peak private MB", "memory exponent",
               "not measured"]
    kfold = [r for r in results["results"] if r["stage"] == "kfold" and "error" not in r]
    extra = ""
    if kfold:
        big = kfold[-1]
        extra = (
            f"\nk-fold preparation at {big['rows']:,} rows: {big['images_decoded']} images decoded, "
            f"{big['arrow_files_in_fold_data']} Arrow files and {big['fold_data_mb']} MB in RUN/fold_data for "
            f"5 folds of a {big['dataset_mb']} MB dataset.\n"
        )
    return f"{provenance_lines(results)}\n{markdown_table(headers, table)}\n{extra}"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("scale"))
