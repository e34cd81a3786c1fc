"""Benchmark `convert`: images/s at 1 and 2 processes side by side, and peak memory at two corpus sizes.

Generates lesion-like 640x480 JPEGs (the size of the Kaggle set's images), then converts them, each run in a
fresh subprocess whose resident memory (including its worker processes) is sampled until it exits. Peak memory
that does not grow from the small to the large corpus shows that conversion streams.

    python benchmarks/convert.py     # 1,000 images for speed; 1,000 and 10,000 for memory
    python benchmarks/convert.py --sizes 500,2000 --speed-images 500   # a quicker look
"""

from __future__ import annotations

import contextlib
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
from PIL import Image

if not __package__:  # run as `python benchmarks/convert.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import as_list, markdown_table, provenance_lines
from derm_accel.data.synthetic import class_names, render

NUM_CLASSES = 6
_NOISE = np.random.default_rng(0).normal(0, 4, (480, 640, 3)).round().astype(np.int16)


def _write_one(args: tuple[Path, int]) -> None:
    root, i = args
    ci = i % NUM_CLASSES
    path = root / class_names(NUM_CLASSES)[ci] / f"img_{i:06d}.jpg"
    if path.exists():
        return
    base = render(ci, i, 96).resize((640, 480), Image.Resampling.BICUBIC)
    # Sensor-like noise gives the JPEGs realistic entropy; a shifted shared field keeps generation cheap.
    shift = np.random.default_rng(i).integers(0, [480, 640])
    noise = np.roll(_NOISE, tuple(int(s) for s in shift), axis=(0, 1))
    pixels = np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_corpus(root: Path, n: int, procs: int) -> Path:
    """``n`` distinct 640x480 JPEGs in class folders; files already there are reused."""
    for name in class_names(NUM_CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool(procs) as pool:
        pool.map(_write_one, [(root, i) for i in range(n)], chunksize=32)
    return root


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, private RSS) of a process and its children.

    RSS counts the pages of memory-mapped Arrow files that the kernel can drop at will; the private part
    (RSS minus file-backed shared pages) is what would grow if the conversion held images in memory.
    """
    total = private = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = p.memory_info()
            total += info.rss
            private += info.rss - getattr(info, "shared", 0)
    return total, private


_CHILD = """
import json, sys
from derm_accel.data.convert import convert_folders
src, out, num_proc, max_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = convert_folders(src, out, num_proc=num_proc, max_size=max_size, progress=False)
print(json.dumps({"files": r["files_total"], "rows": r["rows_total"], "elapsed_s": r["elapsed_s"]}))
"""


def run_convert(src: Path, out: Path, num_proc: int, max_size: int) -> dict:
    """Convert in a fresh process; return its report numbers, wall time and peak RSS of the process tree."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(src), str(out), str(num_proc), str(max_size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = peak_private = 0
    proc = psutil.Process(child.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_private
        while not stop.is_set():
            try:
                rss, private = _tree_rss(proc)
                peak, peak_private = max(peak, rss), max(peak_private, private)
            except psutil.Error:
                return
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"conversion failed with exit code {child.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(
        num_proc=num_proc,
        wall_s=round(wall, 2),
        images_per_s=round(result["files"] / result["elapsed_s"], 1),
        peak_rss_mb=round(peak / 2**20, 1),
        peak_private_rss_mb=round(peak_private / 2**20, 1),
    )
    shutil.rmtree(out, ignore_errors=True)
    return result


def bench_convert(
    *,
    speed_images: int = 1000,
    sizes: Any = "1000,10000",
    max_size: int = 320,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Convert with 1 and 2 processes on ``speed_images`` images (images/s), then with 2 processes at each of
    ``sizes`` (peak memory of the process tree); generated images are reused from ``workdir`` when given."""
    sizes = as_list(sizes, int)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="derm-convert-bench-"))
    procs = min(2, os.cpu_count() or 1)
    try:
        t = time.perf_counter()
        make_corpus(root / "all", max([speed_images, *sizes]), procs)
        generate_s = round(time.perf_counter() - t, 1)

        def subset(n: int) -> Path:
            """The first ``n`` images, linked (not copied) into their own tree."""
            tree = root / f"n{n}"
            if not tree.exists():
                for i in range(n):
                    name = class_names(NUM_CLASSES)[i % NUM_CLASSES]
                    (tree / name).mkdir(parents=True, exist_ok=True)
                    os.link(root / "all" / name / f"img_{i:06d}.jpg", tree / name / f"img_{i:06d}.jpg")
            return tree

        src = subset(speed_images)
        one = {"images": speed_images, **run_convert(src, root / "out", 1, max_size)}
        two = {"images": speed_images, **run_convert(src, root / "out", 2, max_size)}
        rows = [one, two]
        for n in sizes:
            if n != speed_images:
                rows.append({"images": n, **run_convert(subset(n), root / "out", 2, max_size)})
            r = next(r for r in rows if r["images"] == n and r["num_proc"] == 2)
            print(f"{n} images, 2 procs: peak RSS {r['peak_rss_mb']} MB (private {r['peak_private_rss_mb']} MB)")
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "settings": {"image_size": "640x480", "max_size": max_size, "speed_images": speed_images, "sizes": sizes},
        "results": rows,
        "summary": {
            "speedup_2_vs_1": round(two["images_per_s"] / one["images_per_s"], 2),
            "peak_private_rss_mb_by_images": {r["images"]: r["peak_private_rss_mb"] for r in rows[1:]},
            "generate_s": generate_s,
        },
    }


def convert_markdown(results: dict[str, Any]) -> str:
    rows = [
        (r["images"], r["num_proc"], r["images_per_s"], r["peak_rss_mb"], r["peak_private_rss_mb"])
        for r in results["results"]
    ]
    headers = ("images", "processes", "images/s", "peak RSS, tree (MB)", "peak private RSS, tree (MB)")
    return f"{provenance_lines(results)}\n{markdown_table(headers, rows)}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("convert"))
