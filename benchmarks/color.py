"""Per-image cost of Shades of Gray colour constancy (derm_accel.data.color) beside the rest of the eval input.

    python benchmarks/color.py [--sizes 180x180,200x150,600x450,1024x768] [--repeats 30] [--threads 1]

For each image size: one generated JPEG (quality 90) is decoded, colour-corrected and prepared as evaluate
prepares it (``decode_tensor`` + ``ResizeCenterCrop`` to 224 px); the table gives the median milliseconds per
image of each step on one image at a time, the torch step on a batch of 32 (per image), and the numpy lines
the model card gives plain-timm users. Repeats are interleaved so that load on a shared machine hits every
column alike.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if not __package__:  # run as `python benchmarks/color.py`: import derm_accel from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.transforms import v2

from derm_accel.data.color import SHADES_OF_GRAY, numpy_snippet, shades_of_gray
from derm_accel.data.synthetic import render
from derm_accel.data.transforms import ResizeCenterCrop, decode_tensor

SPEC = {"method": SHADES_OF_GRAY, "power": 6.0}


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    render(1, 0, max(width, height)).resize((width, height)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def measure(width: int, height: int, repeats: int) -> dict[str, float]:
    data = _jpeg(width, height)
    x = decode_tensor({"bytes": data})
    batch = x.unsqueeze(0).expand(32, -1, -1, -1).contiguous()
    crop = ResizeCenterCrop(224, 256, v2.InterpolationMode.BICUBIC)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    scope = {"np": np, "Image": Image}
    code = compile(numpy_snippet(SPEC, "image"), "card", "exec")

    def numpy_lines() -> None:
        scope["image"] = pil
        exec(code, scope)

    steps = {
        "decode": lambda: decode_tensor({"bytes": data}),
        "resize + centre crop": lambda: crop(x),
        "shades of gray (torch, 1 image)": lambda: shades_of_gray(x),
        "shades of gray (torch, batch of 32, per image)": lambda: shades_of_gray(batch),
        "shades of gray (card's numpy lines)": numpy_lines,
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):  # interleaved
        for name, fn in steps.items():
            times[name] += _time(fn, 1)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["shades of gray (torch, batch of 32, per image)"] /= 32
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="180x180,200x150,600x450,1024x768")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON results (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        rows[size] = measure(w, h, args.repeats)
    cols = list(next(iter(rows.values())))
    print(f"torch {torch.__version__}, {args.threads} thread(s), median ms per image over {args.repeats} repeats\n")
    print("| image | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for size, r in rows.items():
        print(f"| {size} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "ms": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
