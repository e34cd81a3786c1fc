"""ONNX Runtime against PyTorch on the CPU, side by side: the same model, the same preprocessed real images, the
same thread count, alternating backends in every repeat so that both see the same machine load.

    python benchmarks/onnx_runtime.py --images 64 --batch-sizes 1,32 --repeats 3 --out bench_results/onnx.json

The model is the exported folder derm-accel writes (``export_model``), here EfficientNet-Lite0 on the local
ImageNet weights with a fresh 9-class head (speed and parity do not depend on the head's training), and its ONNX
export from ``derm-accel export --format onnx``. The figure is images per second of the forward pass alone
(preprocessing is shared and done once), plus the largest probability difference on the real images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "onnx.json")
    args = parser.parse_args()

    from derm_accel.data.transforms import eval_transform
    from derm_accel.models import create_model, data_config, export_model, load_model
    from derm_accel.onnx_export import OnnxClassifier, export_onnx

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    model = create_model("tf_efficientnet_lite0", len(names), pretrained_file=WEIGHTS)
    size = args.image_size
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
    with tempfile.TemporaryDirectory() as tmp:
        best = export_model(model.eval(), Path(tmp) / "best", names)
        started = time.perf_counter()
        onnx_dir = export_onnx(best, Path(tmp) / "onnx")
        export_s = time.perf_counter() - started
        net, _ = load_model(str(best))
        net = net.to(memory_format=torch.channels_last)  # predict's setting (docs: 1.4x on CPU)
        ort = OnnxClassifier(onnx_dir, threads=args.threads)
        x = _images(args.images, eval_transform(data_config(net)))

        def run_torch(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return net(batch.contiguous(memory_format=torch.channels_last))

        with torch.inference_mode():
            p_torch = net(x).softmax(-1).numpy()
        p_onnx = ort(x).softmax(-1).numpy()
        rows = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            batches = list(x.split(bs))
            run_torch(batches[0]), ort(batches[0])  # warm-up
            rates: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
            for _ in range(args.repeats):  # alternate, so both backends see the same machine load
                rates["pytorch"].append(_rate(run_torch, batches))
                rates["onnxruntime"].append(_rate(ort, batches))
            med = {k: float(np.median(v)) for k, v in rates.items()}
            rows.append({"batch_size": bs, "img_per_s": med, "runs": rates,
                         "onnxruntime_over_pytorch": med["onnxruntime"] / med["pytorch"]})
    result = {
        "model": "tf_efficientnet_lite0 (local ImageNet weights, 9-class head)",
        "input_size": size,
        "images": len(x),
        "threads": args.threads,
        "rows": rows,
        "max_abs_probability_diff_real_images": float(np.abs(p_torch - p_onnx).max()),
        "top1_agreement": float((p_torch.argmax(1) == p_onnx.argmax(1)).mean()),
        "onnx_export_s": export_s,
        "opset": ort.meta["opset"],
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| batch | PyTorch img/s | ONNX Runtime img/s | ONNX Runtime / PyTorch |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        m = r["img_per_s"]
        ratio = r["onnxruntime_over_pytorch"]
        print(f"| {r['batch_size']} | {m['pytorch']:.1f} | {m['onnxruntime']:.1f} | {ratio:.2f}x |")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
