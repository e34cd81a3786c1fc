"""Benchmark `convert`: images/s at 1 and 2 processes side by side, and peak memory at two corpus sizes.

Generates lesion-like 640x480 JPEGs (the size of the Kaggle set's images), then converts them, each run in a
fresh subprocess whose resident memory (including its worker processes) is sampled until it exits. Peak memory
that does not grow from the small to the large corpus shows that conversion streams.

    python benchmarks/convert.py     # 1,000 images for speed; 1,000 and 10,000 for memory
    python benchmarks/convert.py --sizes 500 2000 --speed-images 500   # a quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--speed-images", type=int, default=1000, help="corpus size for the 1 vs 2 process run"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="corpus sizes for memory")
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--workdir", type=Path, default=None, help="keep generated images here (reused)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/convert.json"))
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="derm-convert-bench-"))
    procs = min(2, os.cpu_count() or 1)
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "image_size": [640, 480],
        "max_size": args.max_size,
    }
    try:
        largest = max([args.speed_images, *args.sizes])
        t = time.perf_counter()
        make_corpus(workdir / "all", largest, procs)
        results["generate_s"] = round(time.perf_counter() - t, 1)

        def subset(n: int) -> Path:
            """The first ``n`` images, linked (not copied) into their own tree."""
            root = workdir / f"n{n}"
            if not root.exists():
                for i in range(n):
                    name = class_names(NUM_CLASSES)[i % NUM_CLASSES]
                    (root / name).mkdir(parents=True, exist_ok=True)
                    os.link(workdir / "all" / name / f"img_{i:06d}.jpg", root / name / f"img_{i:06d}.jpg")
            return root

        src = subset(args.speed_images)
        one = run_convert(src, workdir / "out", 1, args.max_size)
        two = run_convert(src, workdir / "out", 2, args.max_size)
        results["throughput"] = {
            "images": args.speed_images,
            "num_proc_1": one,
            "num_proc_2": two,
            "speedup_2_vs_1": round(two["images_per_s"] / one["images_per_s"], 2),
        }
        print(
            f"{args.speed_images} images: {one['images_per_s']} img/s (1 proc) vs "
            f"{two['images_per_s']} img/s (2 procs) = {results['throughput']['speedup_2_vs_1']}x",
            flush=True,
        )
        memory = []
        for n in args.sizes:
            r = two if n == args.speed_images else run_convert(subset(n), workdir / "out", 2, args.max_size)
            memory.append({"images": n, **r})
            print(
                f"{n} images, 2 procs: peak RSS {r['peak_rss_mb']} MB (private {r['peak_private_rss_mb']} MB), "
                f"{r['images_per_s']} img/s",
                flush=True,
            )
        results["memory"] = memory
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
