"""The domain guard: its extra cost per image next to the model's forward, and how well it separates.

Cost: the same preprocessed batch through ``model(x)`` and through the guarded path (one
``forward_intermediates`` pass, feature summaries, the Mahalanobis score), alternated ``repeats`` times; the
median time of each, and the median of the paired ratios as the overhead. Separation: the share of the
dataset's test split the guard flags, the share of each ``--ood`` folder it flags, and the AUROC of the guard,
softmax confidence and energy (see derm_accel/evaluation/ood.py).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as `python benchmarks/guard.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, provenance_lines


def _time(fn: Any, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - start


def bench_guard(
    *,
    model: str = "",
    data: str = "",
    split: str = "test",
    ood: str = "",
    batch_size: int = 32,
    repeats: int = 7,
) -> dict[str, Any]:
    """Guard cost per image vs the forward pass, and flagged shares / AUROCs on in-domain and --ood images."""
    from datasets import load_from_disk

    from derm_accel.evaluation.ood import evaluate_ood
    from derm_accel.guard.scoring import score_batches, split_batches
    from derm_accel.inference.predict import prepared_model
    from derm_accel.models.build import data_config
    from derm_accel.models.features import forward_with_features

    if not model or not data:
        raise ValueError("--model RUN/best and --data DATA (a converted dataset) are required")
    prepared = prepared_model(model, "cpu")
    if prepared.guard is None:
        raise ValueError(f"{model} has no domain guard; fit one with `derm-accel guard {model} --data {data}`")
    raw = load_from_disk(data)[split]
    x, _ = next(iter(split_batches(raw, data_config(prepared.net), batch_size=batch_size)))
    x = x.contiguous(memory_format=torch.channels_last)
    net, guard = prepared.net, prepared.guard

    def guarded(batch: torch.Tensor) -> Any:
        logits, feats = forward_with_features(net, batch, guard.max_dim)
        return logits, guard.score(feats)

    _time(net, x), _time(guarded, x)  # warm-up
    plain_s, guarded_s = [], []
    for _ in range(repeats):  # alternated, so load changes hit both alike
        plain_s.append(_time(net, x))
        guarded_s.append(_time(guarded, x))
    n = len(x)
    plain_ms, guarded_ms = 1000 * statistics.median(plain_s) / n, 1000 * statistics.median(guarded_s) / n
    # Each repeat's pair ran back to back: the median of the paired ratios resists load changes between pairs.
    paired = statistics.median(g / p for g, p in zip(guarded_s, plain_s, strict=True))
    in_dom = score_batches(net, split_batches(raw, data_config(net), batch_size=batch_size), "cpu", guard.max_dim,
                           prepared.tta)
    block, _ = evaluate_ood([model], in_dom, [ood] if ood else [], tta=prepared.tta or "none")
    results = {
        "forward_ms_per_image": plain_ms,
        "guarded_ms_per_image": guarded_ms,
        "overhead": paired - 1,
        "in_domain_flagged": block["guard"]["in_domain_flagged"],
        "in_domain_images": block["in_domain_images"],
        "answered": block["guard"].get("answered"),
        "error_among_answered": block["guard"].get("error_among_answered"),
        "aurc": block["aurc"],
        "ood_sets": block["sets"],
    }
    settings = {"model": model, "data": data, "split": split, "ood": ood, "batch_size": n, "repeats": repeats}
    return {"settings": settings, "results": results, "summary": {"overhead": results["overhead"]}}


def bench_guard_fit(
    *, sizes: Any = "1000,4000,16000", max_fit_images: int = 1000, val_images: int = 120, image_size: int = 48
) -> dict[str, Any]:
    """Time and peak memory of fitting a guard (``fit_model_guard``) as the training split grows.

    Generated lesion images (6 classes) at ``image_size`` px in a converted-dataset layout, a tiny timm model;
    the validation split stays at ``val_images``. With the fit sample bounded by ``max_fit_images``, both should
    stay flat once the training split is larger than the sample. Each size is fitted in this process, one
    after the other (after one warm-up fit at the first size), so ``peak_mb`` is the rise of the resident
    memory over its level before that fit.
    """
    import tempfile

    from benchmarks.common import PeakMemory, as_list
    from derm_accel.data.synthetic import write_dataset
    from derm_accel.guard.fit import fit_model_guard
    from derm_accel.models.build import create_model, export_model

    rows = []
    size_list = as_list(sizes, int)
    with tempfile.TemporaryDirectory() as tmp:
        for k, n in enumerate([size_list[0], *size_list]):  # the first fit warms up imports and caches
            root = Path(tmp) / f"run{k}"
            per_class = -(-n // 6)
            data = write_dataset(root / "data", {"train": [per_class] * 6, "validation": [val_images // 6] * 6,
                                                 "test": [1] * 6}, size=image_size)
            from datasets import load_from_disk

            labels = load_from_disk(str(data))["train"].features["label"].names
            net = create_model("test_efficientnet", len(labels))
            net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, image_size, image_size))
            model = export_model(net, root / "best", labels)
            with PeakMemory("cpu") as mem:
                start = time.perf_counter()
                config = fit_model_guard(model, data, max_fit_images=max_fit_images, device="cpu")
                seconds = time.perf_counter() - start
            if k == 0:
                continue
            rows.append({"train_images": per_class * 6, "fit_images": config["domain_guard"]["fit_images"],
                         "seconds": seconds, "peak_mb": mem.delta_mb})
    settings = {"sizes": sizes, "max_fit_images": max_fit_images, "val_images": val_images, "image_size": image_size}
    return {"settings": settings, "results": {"rows": rows}, "summary": {"largest_s": rows[-1]["seconds"]}}


def guard_fit_markdown(results: dict[str, Any]) -> str:
    rows = [[f"{r['train_images']:,}", r["fit_images"], f"{r['seconds']:.1f}", f"{r['peak_mb']:.0f}"]
            for r in results["results"]["rows"]]
    return markdown_table(["training images", "fitted on", "fit s", "peak MB (rise)"], rows)


def guard_markdown(results: dict[str, Any]) -> str:
    r = results["results"]
    cost = markdown_table(
        ["path", "ms / image", "vs forward"],
        [
            ["model forward", r["forward_ms_per_image"], "1.00x"],
            ["forward + guard", r["guarded_ms_per_image"], f"{1 + r['overhead']:.3f}x"],
        ],
    )
    rows = [["in-domain (" + results["settings"]["split"] + ")", r["in_domain_images"],
             f"{r['in_domain_flagged']:.1%}", "", "", ""]]
    for s in r["ood_sets"]:
        sc = s["scores"]
        rows.append([s["source"], s["images"], f"{s['guard_flagged']:.1%}", f"{sc['ood_score']['auroc']:.3f}",
                     f"{sc['softmax_confidence']['auroc']:.3f}", f"{sc['energy']['auroc']:.3f}"])
    separation = markdown_table(
        ["images", "n", "flagged by the guard", "guard AUROC", "confidence AUROC", "energy AUROC"], rows
    )
    return f"{provenance_lines(results)}\n{cost}\n\n{separation}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("guard"))
