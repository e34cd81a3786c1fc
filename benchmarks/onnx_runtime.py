"""ONNX Runtime against PyTorch on the CPU, side by side: the same model, the same preprocessed real images, the
same thread count, alternating backends in every repeat so that both see the same machine load.

    python benchmarks/onnx_runtime.py --images 64 --batch-sizes 1,32 --repeats 3 --out bench_results/onnx.json

The model is the exported folder derm-accel writes (``export_model``), here EfficientNet-Lite0 on the local
ImageNet weights with a fresh 9-class head (speed and parity do not depend on the head's training), and its ONNX
export from ``derm-accel export --format onnx``. The figure is images per second of the forward pass alone
(preprocessing is shared and done once), plus the largest probability difference on the real images.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if not __package__:  # run as `python benchmarks/onnx_runtime.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import as_list, markdown_table, provenance_lines

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "derm-sample"
WEIGHTS = REPO.parent / "shared" / "weights" / "efficientnet_lite0.in1k"


def _images(count: int, transform) -> torch.Tensor:
    from PIL import Image

    every = sorted(SAMPLE.rglob("*.jpg"))
    files = every[:: max(1, len(every) // count)][:count]  # spread over the classes
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def _rate(run, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for x in batches:
        run(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def bench_onnx(
    *,
    images: int = 64,
    batch_sizes: Any = "1,32",
    repeats: int = 3,
    threads: int | None = None,
    image_size: int = 224,
) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on the CPU: forward-pass images/s at each batch size (median of ``repeats``
    alternating runs) and the largest probability difference on real images."""
    from derm_accel.data.transforms import eval_transform
    from derm_accel.models.build import create_model, data_config, export_model
    from derm_accel.models.load import load_model
    from derm_accel.models.onnx import OnnxClassifier, export_onnx

    threads = threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    names = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    model = create_model("tf_efficientnet_lite0", len(names), pretrained_file=WEIGHTS)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, image_size, image_size)}
    with tempfile.TemporaryDirectory() as tmp:
        best = export_model(model.eval(), Path(tmp) / "best", names)
        started = time.perf_counter()
        onnx_dir = export_onnx(best, Path(tmp) / "onnx")
        export_s = time.perf_counter() - started
        net, _ = load_model(str(best))
        net = net.to(memory_format=torch.channels_last)  # predict's setting
        ort = OnnxClassifier(onnx_dir, threads=threads)
        x = _images(images, eval_transform(data_config(net)))

        def run_torch(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return net(batch.contiguous(memory_format=torch.channels_last))

        with torch.inference_mode():
            p_torch = net(x).softmax(-1).numpy()
        p_onnx = ort(x).softmax(-1).numpy()
        rows = []
        for bs in as_list(batch_sizes, int):
            batches = list(x.split(bs))
            run_torch(batches[0]), ort(batches[0])  # warm-up
            rates: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
            for _ in range(repeats):  # alternate, so both backends see the same machine load
                rates["pytorch"].append(_rate(run_torch, batches))
                rates["onnxruntime"].append(_rate(ort, batches))
            med = {k: float(np.median(v)) for k, v in rates.items()}
            rows.append(
                {
                    "batch_size": bs,
                    "img_per_s": med,
                    "runs": rates,
                    "onnxruntime_over_pytorch": med["onnxruntime"] / med["pytorch"],
                }
            )
    return {
        "settings": {
            "model": "tf_efficientnet_lite0 (local ImageNet weights, 9-class head)",
            "input_size": image_size,
            "images": len(x),
            "threads": threads,
            "repeats": repeats,
        },
        "results": rows,
        "summary": {
            "max_abs_probability_diff_real_images": float(np.abs(p_torch - p_onnx).max()),
            "top1_agreement": float((p_torch.argmax(1) == p_onnx.argmax(1)).mean()),
            "onnx_export_s": export_s,
            "opset": ort.meta["opset"],
            "onnxruntime": __import__("onnxruntime").__version__,
            "load_average_at_end": os.getloadavg(),
        },
    }


def onnx_markdown(results: dict[str, Any]) -> str:
    rows = [
        (r["batch_size"], r["img_per_s"]["pytorch"], r["img_per_s"]["onnxruntime"], r["onnxruntime_over_pytorch"])
        for r in results["results"]
    ]
    table = markdown_table(("batch", "PyTorch img/s", "ONNX Runtime img/s", "ONNX Runtime / PyTorch"), rows)
    return f"{provenance_lines(results)}\n{table}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("onnx"))
