"""Batch-inference throughput, end to end (decode + eval transform + forward) from Arrow and from a folder,
next to the model alone on a fixed tensor, for each channels_last / dtype / compile setting.

The model-only row is the ceiling the loaders should reach; the gap between them is the input pipeline's cost.
The summary names the fastest setting per device, which is what predict and evaluate should default to.
"""

from __future__ import annotations

import math
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

if not __package__:  # run as `python benchmarks/infer.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    as_bools,
    as_list,
    markdown_table,
    parse_size,
    provenance_lines,
    resolve_device,
    synchronize,
)
from benchmarks.data import model_data_config
from benchmarks.sources import build_arrow, load_all_splits, write_sources
from derm_accel.data.transforms import BatchNormalize, decode_image, eval_input, eval_transform, with_transform

SOURCES = ("tensor", "arrow", "folder")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class ImageFiles(Dataset):
    """Every image under a folder, decoded with draft mode to what the eval transform needs."""

    def __init__(self, root: str | Path, transform: Any, min_size: int | None):
        self.paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise FileNotFoundError(f"No images under {root}")
        self.transform, self.min_size = transform, min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(decode_image({"path": str(self.paths[i])}, self.min_size))


def _pixels(batch: Any) -> torch.Tensor:
    return batch["pixel_values"] if isinstance(batch, dict) else batch


def _prepare(model: torch.nn.Module, *, device: str, dtype: str, channels_last: bool, compile: bool) -> Any:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def _forward(
    model: Any, x: torch.Tensor, *, device: str, dtype: str, channels_last: bool, normalize: Any = None
) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if normalize is not None:
        x = normalize(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if dtype == "fp32":
        return model(x)
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=DTYPES[dtype]):
        return model(x)


def infer_pass(
    model: Any,
    batches: Any,
    *,
    device: str,
    dtype: str,
    channels_last: bool,
    warmup_batches: int = 1,
    normalize: Any = None,
) -> dict[str, float]:
    """Images/s over ``batches`` (an iterable of tensors or dicts); the first batches are warm-up.

    ``normalize`` (a :class:`BatchNormalize`) turns uint8 batches into model input on the device.
    """
    images = 0
    startup = 0.0
    with torch.inference_mode():
        t0 = time.perf_counter()
        t_start = None
        for i, batch in enumerate(batches):
            x = _pixels(batch)
            out = _forward(model, x, device=device, dtype=dtype, channels_last=channels_last, normalize=normalize)
            out.float().softmax(-1)
            if i + 1 == warmup_batches:
                synchronize(device)
                t_start = time.perf_counter()
                startup = t_start - t0
            elif i + 1 > warmup_batches:
                images += x.shape[0]
        synchronize(device)
    if t_start is None or images == 0:
        raise ValueError("Too few batches to time after warm-up; raise images or lower batch_size.")
    elapsed = time.perf_counter() - t_start
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed, "startup_s": startup}


def bench_infer(
    *,
    model: str = "efficientnet_b3",
    img_size: int = 224,
    batch_size: int | None = None,
    images: int | None = None,
    source_size: str = "640x480",
    sources: Any = SOURCES,
    channels_last: Any = (False, True),
    dtypes: Any = None,
    compile: Any = False,
    workers: int = 2,
    device: str | None = "auto",
    num_classes: int = 35,
    threads: int | None = None,
    workdir: str | Path | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Sweep channels_last x dtype x compile over the sources; Arrow and folder sets hold the same images."""
    from derm_accel.models.build import create_model

    device = resolve_device(device)
    on_gpu = device.startswith("cuda")
    batch_size = batch_size or (256 if on_gpu else 16)
    images = images or (4096 if on_gpu else 64)
    dtype_list = as_list(dtypes) if dtypes else (["fp32", "bf16"] if on_gpu else ["fp32"])
    bad = set(dtype_list) - set(DTYPES)
    if bad:
        raise ValueError(f"Unknown dtypes {sorted(bad)}; choose from {sorted(DTYPES)}")
    if "fp16" in dtype_list and not on_gpu:
        raise ValueError("fp16 inference needs a CUDA GPU; on the CPU use fp32 or bf16.")
    source_list = as_list(sources)
    bad = set(source_list) - set(SOURCES)
    if bad:
        raise ValueError(f"Unknown sources {sorted(bad)}; choose from {SOURCES}")
    if images < 2 * batch_size:
        raise ValueError(f"images={images} must be at least 2 x batch_size={batch_size} (one batch is warm-up)")
    if threads:
        torch.set_num_threads(threads)
    workdir = Path(workdir) if workdir else Path("bench_results") / "cache"
    data_cfg = model_data_config(model, img_size)
    data_cfg["crop_pct"] = data_cfg.get("crop_pct", 0.875)
    resize_to = math.floor(img_size / data_cfg["crop_pct"])
    transform = eval_transform(data_cfg)
    normalize = BatchNormalize(data_cfg)

    loaders: dict[str, Any] = {}
    w, h = parse_size(source_size)
    if {"arrow", "folder"} & set(source_list):
        src = write_sources(workdir / f"src_{w}x{h}_{images}", (w, h), images)
        if "folder" in source_list:
            loaders["folder"] = lambda: DataLoader(
                ImageFiles(src, transform, resize_to),
                batch_size=batch_size,
                num_workers=workers,
                pin_memory=on_gpu,
            )
        if "arrow" in source_list:
            arrow_path = build_arrow(src, workdir / f"arrow_{w}x{h}_{images}_320", max_size=320)
            # What `evaluate` reads: uint8 batches normalised on the device where timm's eval transform allows.
            arrow_transform, decode = eval_input(data_cfg)
            arrow = with_transform(load_all_splits(arrow_path), arrow_transform, min_size=resize_to, decode=decode)
            loaders["arrow"] = lambda: DataLoader(arrow, batch_size=batch_size, num_workers=workers, pin_memory=on_gpu)
    fixed = torch.randn(batch_size, 3, img_size, img_size)
    n_batches = max(2, images // batch_size)
    loaders["tensor"] = lambda: (fixed for _ in range(n_batches))

    settings = {
        "device": device,
        "model": model,
        "img_size": img_size,
        "batch_size": batch_size,
        "images": images,
        "source_size": f"{w}x{h}",
        "workers": workers,
        "resize_then_crop": f"{resize_to}->{img_size}",
        "inference_mode": True,
        "threads": threads or "torch default",
        "repeats": repeats,
    }
    torch.manual_seed(0)
    base = create_model(model, num_classes).eval()
    best: dict[tuple[str, bool, str, bool], dict[str, Any]] = {}
    configs = list(product(as_bools(channels_last), dtype_list, as_bools(compile)))
    # Interleave repeats (A B C A B C) and keep the fastest pass: the least disturbed on a shared machine.
    for _ in range(max(1, repeats)):
        for cl, dtype, comp in configs:
            net = _prepare(base, device=device, dtype=dtype, channels_last=cl, compile=comp)
            for source in [s for s in SOURCES if s in source_list]:
                r = infer_pass(
                    net, loaders[source](), device=device, dtype=dtype, channels_last=cl, normalize=normalize
                )
                key = (source, cl, dtype, comp)
                if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
                    best[key] = {
                        "source": source,
                        "channels_last": cl,
                        "dtype": dtype,
                        "compile": comp,
                        "images_per_s": round(r["images_per_s"], 2),
                        "startup_s": round(r["startup_s"], 2),
                        "images_timed": r["images"],
                    }
            if comp:
                torch._dynamo.reset()
            base = base.to(memory_format=torch.contiguous_format)
    rows = list(best.values())
    return {"settings": settings, "results": rows, "summary": recommend(rows)}


def _label(r: dict[str, Any]) -> str:
    on = {True: "on", False: "off"}
    return f"{r['source']}/cl={on[r['channels_last']]}/{r['dtype']}/compile={on[r['compile']]}"


def recommend(rows: list[dict[str, Any]], margin: float = 0.03) -> dict[str, Any]:
    """The fastest safe setting: channels_last / compile only when they win by more than ``margin``.

    Judged on end-to-end rows (arrow, else folder, else tensor) in fp32, the dtype needing no accuracy check.
    """
    summary: dict[str, Any] = {}
    for source in SOURCES:
        mine = [r for r in rows if r["source"] == source]
        if mine:
            best = max(mine, key=lambda r: r["images_per_s"])
            summary[f"best_{source}"] = {k: best[k] for k in ("channels_last", "dtype", "compile", "images_per_s")}
    judge = next((s for s in ("arrow", "folder", "tensor") if any(r["source"] == s for r in rows)), None)
    fp32 = {
        (r["channels_last"], r["compile"]): r["images_per_s"]
        for r in rows
        if r["source"] == judge and r["dtype"] == "fp32"
    }

    def wins(on: float | None, off: float | None) -> bool | None:
        # None: the sweep lacks one side of the comparison, so nothing can be recommended.
        return None if on is None or off is None else on > off * (1 + margin)

    cl = wins(fp32.get((True, False)), fp32.get((False, False)))
    cl_for_compile = cl
    if cl is None:  # compare compile at whichever layout has both sides
        cl_for_compile = next((c for c in (True, False) if (c, True) in fp32 and (c, False) in fp32), False)
    summary["recommended_channels_last"] = cl
    summary["recommended_compile"] = wins(fp32.get((cl_for_compile, True)), fp32.get((cl_for_compile, False)))
    summary["judged_on"] = judge
    tensor = {
        (r["channels_last"], r["dtype"], r["compile"]): r["images_per_s"] for r in rows if r["source"] == "tensor"
    }
    summary["end_to_end_vs_model_only"] = {
        _label(r): round(r["images_per_s"] / tensor[k], 2)
        for r in rows
        if r["source"] != "tensor" and (k := (r["channels_last"], r["dtype"], r["compile"])) in tensor
    }
    return summary


def infer_markdown(results: dict[str, Any]) -> str:
    table = markdown_table(
        ["source", "channels_last", "dtype", "compile", "img/s", "warm-up s"],
        [
            (
                r["source"],
                "on" if r["channels_last"] else "off",
                r["dtype"],
                "on" if r["compile"] else "off",
                r["images_per_s"],
                r["startup_s"],
            )
            for r in results["results"]
        ],
    )
    s = results["summary"]

    def word(v: bool | None) -> str:
        return "not compared" if v is None else ("on" if v else "off")

    rec = (
        f"Recommended defaults on this device (judged on `{s['judged_on']}`, fp32, >3% to switch on): "
        f"channels_last={word(s['recommended_channels_last'])}, compile={word(s['recommended_compile'])}."
    )
    return f"{provenance_lines(results)}\n{table}\n\n{rec}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("infer"))
