"""Input-pipeline throughput: pre-resized Arrow JPEGs versus the original study's full-size folder decode.

All pipelines read the same images in the same run, so their ratio holds even on a busy machine:

* ``original``: torchvision ImageFolder over the camera-size JPEGs, full decode, Resize(img/0.875) +
  RandomCrop + flip (the original study's pipeline).
* ``folder_draft``: the same files, decoded with Pillow's draft mode down to the Arrow shorter side, then
  derm-accel's train transform: what draft mode alone buys.
* ``arrow``: derm-accel's training loader (``train_loader``: shuffled, per-sample seeds, the convert stage's
  shorter-side-320 JPEGs read from Arrow) with float conversion and normalisation in the workers.
* ``arrow_uint8``: exactly what ``derm-accel train`` runs: the same loader shipping uint8 batches, float
  conversion and normalisation left to the device.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

if not __package__:  # run as `python benchmarks/data.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import as_list, markdown_table, parse_size, provenance_lines
from benchmarks.sources import build_arrow, load_all_splits, write_sources
from derm_accel.data.loaders import train_loader
from derm_accel.data.transforms import AugmentConfig, decode_image, jpeg_decoder, train_decode_size, train_transform

PIPELINES = ("original", "folder_draft", "arrow", "arrow_uint8")


def model_data_config(model: str, img_size: int) -> dict[str, Any]:
    """A model's preprocessing (mean, std, interpolation) at ``img_size``, without building the model."""
    import timm
    from timm.data import resolve_data_config

    cfg = timm.models.get_pretrained_cfg(model)
    data_cfg = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    data_cfg["input_size"] = (3, img_size, img_size)
    return data_cfg


def uint8_train_transform(data_cfg: dict[str, Any]) -> Any:
    """The transform the training loop uses: uint8 out, float conversion and normalisation on the device."""
    return train_transform(data_cfg, AugmentConfig(), normalize=False)


class _DraftFolder(Dataset):
    """(path, label) pairs decoded with draft mode and derm-accel's train transform."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any, min_size: int):
        self.samples, self.transform, self.min_size = samples, transform, min_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(decode_image({"path": path}, self.min_size)), label


def _original_dataset(root: Path, keep: set[str], data_cfg: dict[str, Any]) -> Dataset:
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T

    size = data_cfg["input_size"][-1]
    transform = T.Compose(
        [
            T.Resize(round(size / 0.875)),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(data_cfg["mean"], data_cfg["std"]),
        ]
    )
    return tv_datasets.ImageFolder(
        str(root), transform=transform, is_valid_file=lambda p: Path(p).relative_to(root).as_posix() in keep
    )


def _train_loader(split: Any, transform: Any, batch_size: int, workers: int, img_size: int) -> DataLoader:
    """The loader ``derm-accel train`` builds, with its decode size for the default augmentation."""
    min_size = train_decode_size(img_size)
    return train_loader(split, transform, batch_size=batch_size, seed=0, min_size=min_size, num_workers=workers)


def time_loader(dataset: Any, *, batch_size: int, workers: int, max_images: int | None = None) -> dict[str, float]:
    """Steady-state images/s of a DataLoader (or of a Dataset in one): the first batch (worker start-up) is
    timed apart."""
    if isinstance(dataset, DataLoader):
        loader = dataset
    else:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - t0
    n_first = len(first["pixel_values"] if isinstance(first, dict) else first[0])
    images = 0
    t1 = time.perf_counter()
    for batch in it:
        images += len(batch["pixel_values"] if isinstance(batch, dict) else batch[0])
        if max_images and images >= max_images:
            break
    elapsed = time.perf_counter() - t1
    del it
    if images == 0:
        # Too few images for a steady state: count the first batch, start-up included.
        images, elapsed = n_first, startup
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed, "startup_s": startup}


def bench_data(
    *,
    sizes: Any = ("640x480", "1024x768"),
    images: int = 192,
    workers: Any = (1, 2),
    batch_size: int = 32,
    img_size: int = 224,
    model: str = "efficientnet_b3",
    max_size: int = 320,
    pipelines: Any = PIPELINES,
    workdir: str | Path | None = None,
    repeats: int = 2,
) -> dict[str, Any]:
    """Measure each pipeline for each source size and worker count; ratios are against ``original``.

    Each figure is the best of ``repeats`` interleaved runs: the least disturbed one on a shared machine.
    """
    sizes_wh = [parse_size(s) for s in as_list(sizes)]
    worker_counts = as_list(workers, int)
    pipes = as_list(pipelines)
    unknown = set(pipes) - set(PIPELINES)
    if unknown:
        raise ValueError(f"Unknown pipelines {sorted(unknown)}; choose from {PIPELINES}")
    if images < batch_size:
        raise ValueError(f"images={images} must be at least batch_size={batch_size}")
    workdir = Path(workdir) if workdir else Path("bench_results") / "cache"
    data_cfg = model_data_config(model, img_size)
    settings = {
        "sizes": [f"{w}x{h}" for w, h in sizes_wh],
        "images": images,
        "workers": worker_counts,
        "batch_size": batch_size,
        "img_size": img_size,
        "model_preprocessing": model,
        "arrow_max_size": max_size,
        "augment": "RandomResizedCrop(0.35-1)+hflip+vflip",
        "train_jpeg_decoder": "torchcodec" if jpeg_decoder() is not None else "Pillow",
        "repeats": repeats,
    }
    rows: list[dict[str, Any]] = []
    for w, h in sizes_wh:
        src = write_sources(workdir / f"src_{w}x{h}_{images}", (w, h), images)
        arrow_path = build_arrow(src, workdir / f"arrow_{w}x{h}_{images}_{max_size}", max_size=max_size)
        arrow = load_all_splits(arrow_path)
        keep = set(arrow["source_path"])
        samples = sorted((str(src / p), arrow.features["label"].str2int(p.split("/")[0])) for p in keep)
        make = {
            "original": lambda nw, src=src, keep=keep: _original_dataset(src, keep, data_cfg),
            "folder_draft": lambda nw, samples=samples: _DraftFolder(
                samples, train_transform(data_cfg, AugmentConfig()), max_size
            ),
            "arrow": lambda nw, arrow=arrow: _train_loader(arrow, train_transform(data_cfg), batch_size, nw, img_size),
            "arrow_uint8": lambda nw, arrow=arrow: _train_loader(
                arrow, uint8_train_transform(data_cfg), batch_size, nw, img_size
            ),
        }
        for nw in worker_counts:
            # Interleave repeats (A B C A B C) so a load spike on a shared machine hits every pipeline alike.
            runs: dict[str, list[dict[str, float]]] = {p: [] for p in pipes}
            for _ in range(max(1, repeats)):
                for pipe in pipes:
                    runs[pipe].append(time_loader(make[pipe](nw), batch_size=batch_size, workers=nw))
            for pipe in pipes:
                best = max(runs[pipe], key=lambda r: r["images_per_s"])
                rows.append(
                    {
                        "source": f"{w}x{h}",
                        "pipeline": pipe,
                        "workers": nw,
                        "images_per_s": round(best["images_per_s"], 2),
                        "images_per_s_per_worker": round(best["images_per_s"] / max(nw, 1), 2),
                        "startup_s": round(best["startup_s"], 3),
                        "images_timed": best["images"],
                        "dataset_size": len(keep),
                    }
                )
    base = {(r["source"], r["workers"]): r["images_per_s"] for r in rows if r["pipeline"] == "original"}
    for r in rows:
        b = base.get((r["source"], r["workers"]))
        r["speedup_vs_original"] = round(r["images_per_s"] / b, 2) if b else None
    summary = {
        "arrow_speedup_vs_original": {
            f"{r['source']}/{r['workers']}w": r["speedup_vs_original"] for r in rows if r["pipeline"] == "arrow"
        },
        "arrow_images_per_s_per_worker": {
            f"{r['source']}/{r['workers']}w": r["images_per_s_per_worker"] for r in rows if r["pipeline"] == "arrow"
        },
    }
    return {"settings": settings, "results": rows, "summary": summary}


def data_markdown(results: dict[str, Any]) -> str:
    table = markdown_table(
        ["source JPEG", "pipeline", "workers", "img/s", "img/s per worker", "vs original", "start-up s"],
        [
            (
                r["source"],
                r["pipeline"],
                r["workers"],
                r["images_per_s"],
                r["images_per_s_per_worker"],
                f"{r['speedup_vs_original']:.2f}x" if r["speedup_vs_original"] else "-",
                r["startup_s"],
            )
            for r in results["results"]
        ],
    )
    return f"{provenance_lines(results)}\nArrow set built by: derm_accel.data.convert.convert_folders.\n\n{table}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("data"))
