"""Per-image cost of each step of the training input, the earlier way against the current way.

Both ways run on the same stored JPEGs (the convert stage's Arrow set) in one process, repeats interleaved,
so each ratio says what one change buys:

* decode: Pillow (``decode_image``) then a copy into a tensor, against ``decode_tensor`` (torchcodec);
* augment: a ``v2.Compose`` of RandomResizedCrop and both flips, against ``RandomResizedCropFlip``;
* seed: ``torch.manual_seed`` per sample (which also queues seeding for every GPU backend, with a stack
  trace each time) against seeding the CPU generator only, both inside ``fork_rng`` as the loader does;
* eval input (what ``evaluate`` and validation read): Pillow decode + timm's eval transform (resize,
  centre crop, to float, normalise) against ``decode_tensor`` + ``ResizeCenterCrop`` (normalised on the
  device).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.data import DEFAULT_CROP_PCT
from torchvision.transforms import v2

if not __package__:  # run as `python benchmarks/steps.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, parse_size, provenance_lines
from benchmarks.data import model_data_config
from benchmarks.sources import build_arrow, load_all_splits, write_sources
from derm_accel.data.transforms import (
    AugmentConfig,
    RandomResizedCropFlip,
    decode_image,
    decode_size,
    decode_tensor,
    eval_input,
    eval_transform,
    pil_to_uint8,
    raw_images,
    train_decode_size,
    train_transform,
)


def _seeded(seed_fn: Callable[[int], Any]) -> Callable[[int], None]:
    def run(seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            seed_fn(seed)

    return run


def _compose_crop_flip(data_cfg: dict[str, Any], aug: AugmentConfig) -> v2.Compose:
    size = list(data_cfg["input_size"][-2:])
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(aug.hflip),
            v2.RandomVerticalFlip(aug.vflip),
        ]
    )


def _per_image_ms(fn: Callable[[Any], Any], inputs: list[Any]) -> float:
    t0 = time.perf_counter()
    for x in inputs:
        fn(x)
    return (time.perf_counter() - t0) / len(inputs) * 1e3


def bench_steps(
    *,
    images: int = 128,
    source_size: str = "640x480",
    img_size: int = 224,
    model: str = "efficientnet_b3",
    max_size: int = 320,
    threads: int = 1,
    workdir: str | Path | None = None,
    repeats: int = 5,
) -> dict[str, Any]:
    """Milliseconds per image of decode, augment, per-sample seeding and the eval input, earlier vs current."""
    torch.set_num_threads(threads)
    w, h = parse_size(source_size)
    workdir = Path(workdir) if workdir else Path("bench_results") / "cache"
    src = write_sources(workdir / f"src_{w}x{h}_{images}", (w, h), images)
    arrow_path = build_arrow(src, workdir / f"arrow_{w}x{h}_{images}_{max_size}", max_size=max_size)
    arrow = raw_images(load_all_splits(arrow_path))
    cells = arrow[: len(arrow)]["image"]
    seeds = list(range(len(cells)))
    data_cfg = model_data_config(model, img_size)
    aug = AugmentConfig()
    min_size = train_decode_size(img_size, aug)  # as derm-accel train decodes
    decoded = [decode_tensor(c, min_size) for c in cells]
    crop_flip = train_transform(data_cfg, aug, normalize=False)
    assert isinstance(crop_flip, RandomResizedCropFlip)
    eval_cfg = {**data_cfg, "crop_pct": data_cfg.get("crop_pct") or DEFAULT_CROP_PCT}
    eval_size = decode_size(img_size, eval_cfg["crop_pct"])
    timm_eval = eval_transform(eval_cfg)
    tensor_eval, tensor_decode = eval_input(eval_cfg)
    cases: list[tuple[str, str, Callable[[Any], Any], list[Any]]] = [
        ("decode", "Pillow decode_image + copy to tensor", lambda c: pil_to_uint8(decode_image(c, min_size)), cells),
        ("decode", "decode_tensor (torchcodec)", lambda c: decode_tensor(c, min_size), cells),
        ("augment", "v2.Compose(RandomResizedCrop, flips)", _compose_crop_flip(data_cfg, aug), decoded),
        ("augment", "RandomResizedCropFlip", crop_flip, decoded),
        ("seed", "torch.manual_seed in fork_rng", _seeded(torch.manual_seed), seeds),
        ("seed", "CPU generator seed in fork_rng", _seeded(torch.default_generator.manual_seed), seeds),
        ("eval input", "Pillow + timm eval transform", lambda c: timm_eval(decode_image(c, eval_size)), cells),
        ("eval input", "decode_tensor + ResizeCenterCrop", lambda c: tensor_eval(tensor_decode(c, eval_size)), cells),
    ]
    best = [math.inf] * len(cases)
    for _ in range(max(1, repeats)):  # interleaved: a load spike hits both ways of a step alike
        for i, (_, _, fn, inputs) in enumerate(cases):
            best[i] = min(best[i], _per_image_ms(fn, inputs))
    rows = []
    for i in range(0, len(cases), 2):
        (step, before, _, _), (_, after, _, _) = cases[i], cases[i + 1]
        rows.append(
            {
                "step": step,
                "earlier": before,
                "earlier_ms": round(best[i], 4),
                "current": after,
                "current_ms": round(best[i + 1], 4),
                "speedup": round(best[i] / best[i + 1], 2),
            }
        )
    training = [r for r in rows if r["step"] in ("decode", "augment", "seed")]
    earlier, current = sum(r["earlier_ms"] for r in training), sum(r["current_ms"] for r in training)
    settings = {
        "images": len(cells),
        "source_size": f"{w}x{h}",
        "stored": f"shorter side {max_size}, as convert stores it",
        "img_size": img_size,
        "model_preprocessing": model,
        "decode_min_size": min_size,
        "eval_decode_min_size": eval_size,
        "threads": threads,
        "repeats": repeats,
    }
    summary = {"earlier_ms": round(earlier, 4), "current_ms": round(current, 4), "speedup": round(earlier / current, 2)}
    return {"settings": settings, "results": rows, "summary": summary}


def steps_markdown(results: dict[str, Any]) -> str:
    table = markdown_table(
        ["step", "earlier", "ms/image", "current", "ms/image", "speedup"],
        [
            (r["step"], r["earlier"], r["earlier_ms"], r["current"], r["current_ms"], f"{r['speedup']:.2f}x")
            for r in results["results"]
        ],
    )
    s = results["summary"]
    total = (
        f"Training input, decode + augment + seed: {s['earlier_ms']:.3f} -> {s['current_ms']:.3f} ms per image "
        f"({s['speedup']:.2f}x)."
    )
    return f"{provenance_lines(results)}\n{table}\n\n{total}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("steps"))
