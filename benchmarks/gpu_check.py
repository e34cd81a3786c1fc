"""One-GPU check, sized to finish in a few minutes: mixed-precision training and inference speed, bf16
correctness, and whether the input pipeline keeps the GPU busy.

Run through ``benchmarks/gpu_check.sh``. Results go to ``$OUT/gpu_check.json`` (else
``bench_results/gpu_check.json``) after every section, so a run cut short still leaves what it measured, plus
``gpu_check.md`` with rows ready for docs/benchmarks.md. ``GPU_CHECK_DRY=1`` (automatic without CUDA) runs
the same code at toy sizes on the CPU.
"""

from __future__ import annotations

import io
import os
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

if not __package__:  # run as `python benchmarks/gpu_check.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, now_iso, synchronize
from derm_accel.core.fileio import atomic_write_json

# What the issue asks for, per GPU; the original study ran on an A100.
REFERENCE = {
    "original_train_img_s_a100": 280,
    "original_infer_img_s_a100": 600,
    "target_train_img_s": 4 * 280,
    "target_infer_img_s": 10 * 600,
    "timm_infer_efficientnet_b3_288_rtx4090_amp": 2800,
    "timm_train_efficientnet_b3_288_rtx3090": 570,
}
ARROW_SHORT_SIDE = 320


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def settings_from_env() -> dict[str, Any]:
    dry = os.environ.get("GPU_CHECK_DRY", "") not in ("", "0") or not torch.cuda.is_available()
    if dry:
        return {
            "dry": True,
            "device": "cpu",
            "model": os.environ.get("GPU_CHECK_MODEL", "test_efficientnet"),
            "sizes": [32],
            "train_batch": 2,
            "train_steps": 1,
            "train_warmup": 1,
            "infer_batch": 4,
            "infer_batches": 2,
            "loader_images": 8,
            "loader_steps": 2,
            "loader_workers": 1,
            "check_images": 8,
            "compile": False,
            "budget_s": _env_int("GPU_CHECK_BUDGET_S", 120),
        }
    return {
        "dry": False,
        "device": "cuda",
        "model": os.environ.get("GPU_CHECK_MODEL", "efficientnet_b3"),
        "sizes": [int(s) for s in os.environ.get("GPU_CHECK_SIZES", "224,288").split(",")],
        "train_batch": _env_int("GPU_CHECK_TRAIN_BATCH", 64),
        "train_steps": 30,
        "train_warmup": 10,
        "infer_batch": _env_int("GPU_CHECK_INFER_BATCH", 256),
        "infer_batches": 20,
        "loader_images": _env_int("GPU_CHECK_LOADER_IMAGES", 2048),
        "loader_steps": 60,
        "loader_workers": _env_int("GPU_CHECK_WORKERS", max(1, min(14, (os.cpu_count() or 2) - 2))),
        "check_images": 512,
        "compile": True,
        "budget_s": _env_int("GPU_CHECK_BUDGET_S", 420),
    }


# ---------------------------------------------------------------- inputs


def _jpeg_bytes(args: tuple[int, int, int, int]) -> bytes:
    """A lesion-like JPEG at the size convert stores (shorter side 320), as Arrow holds it."""
    from benchmarks.sources import source_image

    class_index, seed, w, h = args
    buf = io.BytesIO()
    source_image(class_index, seed, w, h).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_jpegs(count: int, *, num_classes: int = 6, seed0: int = 0, processes: int = 1) -> list[tuple[bytes, int]]:
    w, h = ARROW_SHORT_SIDE * 4 // 3, ARROW_SHORT_SIDE
    jobs = [(i % num_classes, seed0 + i, w, h) for i in range(count)]
    if processes > 1:
        with Pool(processes) as pool:
            blobs = pool.map(_jpeg_bytes, jobs, chunksize=16)
    else:
        blobs = [_jpeg_bytes(j) for j in jobs]
    return [(b, j[0]) for b, j in zip(blobs, jobs, strict=True)]


class JpegBytes(Dataset):
    """In-memory JPEG bytes decoded like an Arrow image cell: the fallback when ``datasets`` is missing."""

    def __init__(self, items: list[tuple[bytes, int]], transform: Callable, min_size: int):
        self.items, self.transform, self.min_size = items, transform, min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from derm_accel.data.transforms import decode_tensor

        data, label = self.items[i]
        return {"pixel_values": self.transform(decode_tensor({"bytes": data}, self.min_size)), "labels": label}


def image_loader(
    items: list[tuple[bytes, int]],
    transform: Callable,
    *,
    img_size: int,
    batch_size: int,
    workers: int,
    pin_memory: bool,
) -> tuple[DataLoader, str]:
    """``derm-accel train``'s loader over Arrow when ``datasets`` is installed, else the same decode in memory."""
    from derm_accel.data.transforms import train_decode_size

    min_size = train_decode_size(img_size)
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    try:
        from datasets import ClassLabel, Features
        from datasets import Dataset as ArrowDataset
        from datasets import Image as ImageFeature

        from derm_accel.data.loaders import train_loader
    except ImportError:
        loader = DataLoader(
            JpegBytes(items, transform, min_size), batch_size=batch_size, shuffle=True, drop_last=True, **options
        )
        return loader, "in-memory JPEG bytes (datasets not installed)"
    labels = sorted({lab for _, lab in items})
    ds = ArrowDataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b, _ in items], "label": [lab for _, lab in items]},
        features=Features({"image": ImageFeature(), "label": ClassLabel(num_classes=max(labels) + 1)}),
    )
    loader = train_loader(ds, transform, batch_size=batch_size, seed=0, min_size=min_size, **options)
    return loader, "Arrow (datasets) via derm_accel.data.loaders.train_loader"


# ---------------------------------------------------------------- sections


def section_train(s: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.train import train_step_bench

    rows = []
    for i, size in enumerate(s["sizes"]):
        amps = ["none", "bf16", "fp16"] if i == 0 else ["bf16"]
        for amp in amps:
            if amp == "fp16" and s["device"] == "cpu":
                rows.append({"img_size": size, "amp": amp, "skipped": "fp16 needs a GPU"})
                continue
            r = train_step_bench(
                s["model"],
                batch_size=s["train_batch"],
                img_size=size,
                steps=s["train_steps"],
                warmup=s["train_warmup"],
                channels_last=True,
                compile=False,
                amp=amp,
                device=s["device"],
            )
            rows.append(r)
    return rows


def section_infer(s: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    from benchmarks.infer import infer_pass
    from derm_accel.models.build import create_model

    rows = []
    for size in s["sizes"]:
        for dtype, comp in (("fp32", False), ("bf16", False), ("bf16", True)):
            if comp and not s["compile"]:
                rows.append({"img_size": size, "dtype": dtype, "compile": True, "skipped": "compile off in dry mode"})
                continue
            if time.time() > deadline:
                rows.append({"img_size": size, "dtype": dtype, "compile": comp, "skipped": "time budget"})
                continue
            torch.manual_seed(0)
            model = create_model(s["model"], 35).eval().to(s["device"]).to(memory_format=torch.channels_last)
            net = torch.compile(model) if comp else model
            x = torch.randn(s["infer_batch"], 3, size, size, device=s["device"])
            warm = 3 if comp else 2
            t0 = time.perf_counter()
            r = infer_pass(
                net,
                (x for _ in range(s["infer_batches"] + warm)),
                device=s["device"],
                dtype=dtype,
                channels_last=True,
                warmup_batches=warm,
            )
            rows.append(
                {
                    "img_size": size,
                    "dtype": dtype,
                    "compile": comp,
                    "batch_size": s["infer_batch"],
                    "images_per_s": round(r["images_per_s"], 1),
                    "warmup_s": round(r["startup_s"], 1),
                    "total_s": round(time.perf_counter() - t0, 1),
                }
            )
            if comp:
                torch._dynamo.reset()
    return rows


def section_loader(s: dict[str, Any]) -> tuple[dict[str, Any], torch.nn.Module, list[tuple[bytes, int]]]:
    """Train from decoded JPEGs through the DataLoader and from one fixed tensor; the ratio says who waits."""
    from benchmarks.data import model_data_config
    from derm_accel.data.transforms import BatchNormalize, train_transform
    from derm_accel.models.build import create_model

    size = s["sizes"][0]
    device = s["device"]
    t0 = time.perf_counter()
    items = make_jpegs(s["loader_images"], processes=max(1, min(16, os.cpu_count() or 1)) if not s["dry"] else 1)
    held_out = make_jpegs(
        s["check_images"], seed0=10**6, processes=max(1, min(16, os.cpu_count() or 1)) if not s["dry"] else 1
    )
    gen_s = time.perf_counter() - t0
    data_cfg = model_data_config(s["model"], size)
    workers = s["loader_workers"]
    # Exactly the training input: uint8 crops from the workers, normalised on the device.
    loader, source = image_loader(
        items,
        train_transform(data_cfg, normalize=False),
        img_size=size,
        batch_size=s["train_batch"],
        workers=workers,
        pin_memory=device == "cuda",
    )
    normalize = BatchNormalize(data_cfg)

    def batches():
        while True:
            yield from loader

    # Loader alone: the pipeline's ceiling with no GPU work.
    it = batches()
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(max(1, s["loader_steps"] // 2)):
        n += len(next(it)["labels"])
    loader_only = n / (time.perf_counter() - t)

    torch.manual_seed(0)
    fmt = torch.channels_last
    model = create_model(s["model"], 6).to(device).to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def fetch() -> tuple[torch.Tensor, torch.Tensor]:
        b = next(it)
        x = normalize(b["pixel_values"].to(device, non_blocking=True))
        return x.contiguous(memory_format=fmt), b["labels"].to(device, non_blocking=True)

    warm = 1 if s["dry"] else 5
    for _ in range(warm):
        step(*fetch())
    synchronize(device)
    wait = 0.0
    t = time.perf_counter()
    for _ in range(s["loader_steps"]):
        tw = time.perf_counter()
        x, y = fetch()
        wait += time.perf_counter() - tw
        step(x, y)
    synchronize(device)
    fed_s = time.perf_counter() - t
    fed = s["loader_steps"] * s["train_batch"] / fed_s
    x, y = fetch()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(s["loader_steps"]):
        step(x, y)
    synchronize(device)
    synthetic = s["loader_steps"] * s["train_batch"] / (time.perf_counter() - t)
    result = {
        "img_size": size,
        "amp": "bf16",
        "channels_last": True,
        "source": source,
        "images": len(items),
        "stored_jpeg": f"{ARROW_SHORT_SIDE * 4 // 3}x{ARROW_SHORT_SIDE} q95 (as convert writes)",
        "workers": workers,
        "generate_s": round(gen_s, 1),
        "loader_only_img_s": round(loader_only, 1),
        "loader_fed_img_s": round(fed, 1),
        "synthetic_tensor_img_s": round(synthetic, 1),
        "fed_vs_synthetic": round(fed / synthetic, 3),
        "data_wait_fraction": round(wait / fed_s, 3),
        "keeps_up": fed / synthetic >= 0.95,
    }
    return result, model, held_out


def section_gpu_decode(s: dict[str, Any], items: list[tuple[bytes, int]]) -> dict[str, Any]:
    """The same stored JPEGs decoded by nvJPEG (torchcodec's batched decode_jpeg on the GPU, else
    torchvision's) and augmented there: the fast path when the CPU cannot feed the GPU."""
    from torchvision.transforms import v2

    try:
        from torchcodec.decoders import decode_jpeg

        decoder = "torchcodec.decoders.decode_jpeg"
    except Exception:  # not installed, or a build for another torch
        from torchvision.io import decode_jpeg

        decoder = "torchvision.io.decode_jpeg"

    from benchmarks.data import model_data_config

    size = s["sizes"][0]
    cfg = model_data_config(s["model"], size)
    device = s["device"]
    tf = v2.Compose(
        [
            v2.RandomResizedCrop((size, size), scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
        ]
    )
    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b, _ in items]
    chunks = [raw[i : i + s["train_batch"]] for i in range(0, len(raw), s["train_batch"])]

    def one(chunk: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([tf(im) for im in decode_jpeg(chunk, device=device)])

    one(chunks[0])
    synchronize(device)
    t = time.perf_counter()
    n = sum(one(c).shape[0] for c in chunks)
    synchronize(device)
    return {
        "device": device,
        "images": n,
        "batch_size": s["train_batch"],
        "decode_augment_img_s": round(n / (time.perf_counter() - t), 1),
        "decoder": decoder,
    }


def section_bf16_correctness(
    s: dict[str, Any], model: torch.nn.Module, held_out: list[tuple[bytes, int]], tol_prob: float = 0.05
) -> dict[str, Any]:
    """bf16 autocast against true fp32 (TF32 off) on held-out images, with the model trained just above."""
    from benchmarks.data import model_data_config
    from derm_accel.data.transforms import decode_image, eval_transform

    size = s["sizes"][0]
    transform = eval_transform(model_data_config(s["model"], size))
    x = torch.stack([transform(decode_image({"bytes": b})) for b, _ in held_out]).to(s["device"])
    model = model.eval()
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            chunks = x.split(64)
            p32 = torch.cat(
                [model(c.contiguous(memory_format=torch.channels_last)).float().softmax(-1) for c in chunks]
            )
            dev = "cuda" if s["device"] == "cuda" else "cpu"
            with torch.autocast(dev, dtype=torch.bfloat16):
                p16 = torch.cat(
                    [model(c.contiguous(memory_format=torch.channels_last)).float().softmax(-1) for c in chunks]
                )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    top2 = p32.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) >= 0.05
    agree = p32.argmax(-1) == p16.argmax(-1)
    diff = (p32 - p16).abs()
    agreement_conf = agree[confident].float().mean().item() if confident.any() else float("nan")
    labels = torch.tensor([lab for _, lab in held_out], device=p32.device)
    return {
        "images": len(held_out),
        "fp32_accuracy_after_loader_run": round((p32.argmax(-1) == labels).float().mean().item(), 4),
        "top1_agreement": round(agree.float().mean().item(), 4),
        "confident_images": int(confident.sum().item()),
        "top1_agreement_confident": round(agreement_conf, 4),
        "max_abs_prob_diff": round(diff.max().item(), 5),
        "mean_abs_prob_diff": round(diff.mean().item(), 6),
        "tolerance": (f"top-1 agreement >= 99% on images with an fp32 top-2 margin >= 0.05, max |dp| <= {tol_prob}"),
        "passed": bool(diff.max().item() <= tol_prob and (not confident.any() or agreement_conf >= 0.99)),
    }


# ---------------------------------------------------------------- driver


def versus_targets(report: dict[str, Any]) -> dict[str, Any]:
    """Best measured rates over the issue's per-GPU targets (>= 1 meets the target) at the first size."""
    size = report["settings"]["sizes"][0]
    train = [r["images_per_s"] for r in report.get("train") or [] if "images_per_s" in r and r["img_size"] == size]
    infer = [r["images_per_s"] for r in report.get("infer") or [] if "images_per_s" in r and r["img_size"] == size]
    out: dict[str, Any] = {"img_size": size}
    if train:
        out["train_best_over_target"] = round(max(train) / REFERENCE["target_train_img_s"], 2)
    if infer:
        out["infer_best_over_target"] = round(max(infer) / REFERENCE["target_infer_img_s"], 2)
    loader = report.get("loader")
    if isinstance(loader, dict) and "loader_fed_img_s" in loader:
        out["loader_fed_over_train_target"] = round(loader["loader_fed_img_s"] / REFERENCE["target_train_img_s"], 2)
    return out


def summary_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"GPU check {report['created']} on {m.get('gpu', 'CPU (dry run)')}, torch {m['torch']}:", ""]
    lines += ["| what | setting | img/s | peak MB |", "|---|---|---|---|"]
    for r in report.get("train", []):
        if "skipped" in r:
            continue
        lines.append(
            f"| train {r['model']} | {r['img_size']}px b{r['batch_size']} {r['amp']} cl | "
            f"{r['images_per_s']:.1f} | {r['peak_memory_mb']:.0f} |"
        )
    for r in report.get("infer", []):
        if "skipped" in r:
            continue
        compiled = " compiled" if r["compile"] else ""
        lines.append(
            f"| infer | {r['img_size']}px b{r['batch_size']} {r['dtype']}{compiled} | {r['images_per_s']:.1f} | - |"
        )
    lf = report.get("loader")
    if isinstance(lf, dict) and "loader_fed_img_s" in lf:
        lines.append(
            f"| train, loader-fed | {lf['img_size']}px bf16, {lf['workers']} workers | "
            f"{lf['loader_fed_img_s']:.1f} (tensor-fed {lf['synthetic_tensor_img_s']:.1f}, "
            f"ratio {lf['fed_vs_synthetic']:.2f}) | - |"
        )
    g = report.get("gpu_decode")
    if isinstance(g, dict) and "decode_augment_img_s" in g:
        lines.append(
            f"| decode+augment on {g['device']} (nvJPEG) | {g['images']} stored JPEGs b{g['batch_size']} | "
            f"{g['decode_augment_img_s']:.1f} | - |"
        )
    v = report.get("versus_targets") or {}
    if len(v) > 1:
        lines += ["", "Versus the per-GPU targets (>= 1 meets them): " + ", ".join(f"{k} {x}" for k, x in v.items())]
    c = report.get("bf16_check")
    if isinstance(c, dict) and "passed" in c:
        lines += [
            "",
            f"bf16 vs fp32: top-1 agreement {c['top1_agreement']:.2%} "
            f"(confident {c['top1_agreement_confident']}), max |dp| {c['max_abs_prob_diff']}, "
            f"passed={c['passed']}",
        ]
    return "\n".join(lines) + "\n"


def run(out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    s = settings_from_env()
    print(f"[gpu_check] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, dry: {s['dry']}")
    out_dir = Path(out_dir or os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = out_dir / "gpu_check.json"
    start = time.time()
    deadline = start + s["budget_s"]
    report: dict[str, Any] = {
        "kind": "gpu_check",
        "created": now_iso(),
        "machine": machine_info(s["device"]),
        "settings": s,
        "reference": REFERENCE,
        "errors": {},
    }
    if s["device"] == "cuda":
        torch.backends.cudnn.benchmark = True

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        t = time.time()
        try:
            value = fn()
        except Exception:
            report["errors"][name] = traceback.format_exc()[-4000:]
            value = None
        report.setdefault("section_seconds", {})[name] = round(time.time() - t, 1)
        atomic_write_json(out_json, report, default=str)
        print(f"[gpu_check] {name} done in {time.time() - t:.1f}s", flush=True)
        return value

    report["train"] = attempt("train", lambda: section_train(s))
    loader_out = attempt("loader", lambda: section_loader(s))
    if loader_out:
        report["loader"], model, held_out = loader_out
        report["bf16_check"] = attempt("bf16_check", lambda: section_bf16_correctness(s, model, held_out))
        report["gpu_decode"] = attempt("gpu_decode", lambda: section_gpu_decode(s, held_out))
        del model
    report["infer"] = attempt("infer", lambda: section_infer(s, deadline))
    report["versus_targets"] = versus_targets(report)
    report["total_s"] = round(time.time() - start, 1)
    atomic_write_json(out_json, report, default=str)
    (out_dir / "gpu_check.md").write_text(summary_markdown(report))
    print(summary_markdown(report))
    if report["errors"]:
        print("[gpu_check] sections with errors:", ", ".join(report["errors"]))
    print(f"[gpu_check] wrote {out_json} in {report['total_s']}s")
    return report


if __name__ == "__main__":
    result = run()
    raise SystemExit(1 if result["errors"] else 0)
