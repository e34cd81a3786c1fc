"""Training-step throughput and peak memory on synthetic tensors: the model's ceiling, without data loading.

Each configuration (model x channels_last x compile) runs, by default, in its own Python process so that peak
memory and compiled graphs of one do not leak into the next. Compile time (the first steps) is reported apart
from the steady-state rate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/train.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO_ROOT,
    PeakMemory,
    as_bools,
    as_list,
    markdown_table,
    provenance_lines,
    resolve_device,
    synchronize,
)

AMP_DTYPES = ("none", "bf16", "fp16")


def _autocast(device: str, amp: str) -> Any:
    import contextlib

    import torch

    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def train_step_bench(
    model_name: str,
    *,
    batch_size: int,
    img_size: int,
    steps: int,
    warmup: int,
    channels_last: bool,
    compile: bool,
    amp: str = "none",
    device: str = "cpu",
    num_classes: int = 35,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time ``steps`` optimizer steps after ``warmup`` steps of one model on a fixed random batch."""
    import torch

    from derm_accel.models.build import create_model

    if amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r}; choose one of {AMP_DTYPES}")
    if amp == "fp16" and not device.startswith("cuda"):
        raise ValueError("amp='fp16' needs a CUDA GPU (on the CPU autocast runs it in fp32); use 'bf16' or 'none'.")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with PeakMemory(device) as mem:
        model = create_model(model_name, num_classes).to(device).train()
        model = model.to(memory_format=fmt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        step_model = torch.compile(model) if compile else model
        x = torch.randn(batch_size, 3, img_size, img_size, device=device).to(memory_format=fmt)
        y = torch.randint(0, num_classes, (batch_size,), device=device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                loss = torch.nn.functional.cross_entropy(step_model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        first_step_s = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            step()
        synchronize(device)
        step_times = []
        t1 = time.perf_counter()
        for _ in range(steps):
            ts = time.perf_counter()
            step()
            if not device.startswith("cuda"):  # a GPU step is timed as a whole: syncing each would slow it
                step_times.append(time.perf_counter() - ts)
        synchronize(device)
        elapsed = time.perf_counter() - t1
    step_s = elapsed / steps
    return {
        "model": model_name,
        "channels_last": channels_last,
        "compile": compile,
        "amp": amp,
        "batch_size": batch_size,
        "img_size": img_size,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "images_per_s": round(batch_size / step_s, 2),
        "step_ms": round(step_s * 1000, 1),
        # The fastest single step: on a shared CPU the least disturbed estimate of the model's own speed.
        "best_step_ms": round(min(step_times) * 1000, 1) if step_times else round(step_s * 1000, 1),
        "first_step_s": round(first_step_s, 2),
        # The first step holds graph capture and code generation when compiling.
        "compile_s": round(max(0.0, first_step_s - step_s), 2) if compile else None,
        "peak_memory_mb": round(mem.peak_mb, 1),
        "peak_memory_delta_mb": round(mem.delta_mb, 1),
        "memory_kind": mem.kind,
    }


def _run_isolated(kwargs: dict[str, Any]) -> dict[str, Any]:
    code = (
        "import json,sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from benchmarks.train import train_step_bench\n"
        "print('@@RESULT@@' + json.dumps(train_step_bench(**json.loads(sys.argv[1]))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    raise RuntimeError(f"train bench for {kwargs} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def bench_train(
    *,
    models: Any = ("efficientnet_b3", "densenet121"),
    img_size: int = 224,
    batch_size: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    channels_last: Any = (False, True),
    compile: Any = (False, True),
    amp: str = "none",
    device: str | None = "auto",
    num_classes: int = 35,
    threads: int | None = None,
    isolate: bool = True,
    repeats: int = 1,
) -> dict[str, Any]:
    """Sweep models x channels_last x compile; CPU defaults are small (batch 8, 3 steps after 2 warm-up).

    With ``repeats`` > 1 each figure is the fastest of interleaved runs.
    """
    device = resolve_device(device)
    on_gpu = device.startswith("cuda")
    batch_size = batch_size or (64 if on_gpu else 8)
    steps = steps or (30 if on_gpu else 3)
    warmup = warmup if warmup is not None else (10 if on_gpu else 2)
    model_names = as_list(models)
    settings = {
        "device": device,
        "img_size": img_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "amp": amp,
        "optimizer": "AdamW",
        "num_classes": num_classes,
        "threads": threads or "torch default",
        "isolated_processes": isolate,
        "repeats": repeats,
    }
    configs = list(product(model_names, as_bools(channels_last), as_bools(compile)))
    best: dict[tuple[str, bool, bool], dict[str, Any]] = {}
    # Interleave repeats (A B C A B C) so a load spike on a shared machine hits every configuration alike.
    for _ in range(max(1, repeats)):
        for name, cl, comp in configs:
            kwargs = dict(
                model_name=name,
                batch_size=batch_size,
                img_size=img_size,
                steps=steps,
                warmup=max(1, warmup),
                channels_last=cl,
                compile=comp,
                amp=amp,
                device=device,
                num_classes=num_classes,
                threads=threads,
            )
            row = _run_isolated(kwargs) if isolate else train_step_bench(**kwargs)
            print(
                f"[bench train] {name} channels_last={cl} compile={comp}: {row['images_per_s']} img/s, "
                f"peak {row['peak_memory_mb']} MB",
                file=sys.stderr,
                flush=True,
            )
            key = (name, cl, comp)
            if key not in best or row["best_step_ms"] < best[key]["best_step_ms"]:
                best[key] = row
    rows = [best[c] for c in configs]
    summary: dict[str, Any] = {}
    for name in model_names:
        mine = [r for r in rows if r["model"] == name]
        best = min(mine, key=lambda r: r["best_step_ms"])
        plain = next((r for r in mine if not r["channels_last"] and not r["compile"]), None)
        summary[name] = {
            "best": {k: best[k] for k in ("channels_last", "compile", "images_per_s", "best_step_ms")},
            "best_vs_plain": round(plain["best_step_ms"] / best["best_step_ms"], 2) if plain else None,
        }
    return {"settings": settings, "results": rows, "summary": summary}


def train_markdown(results: dict[str, Any]) -> str:
    table = markdown_table(
        [
            "model",
            "channels_last",
            "compile",
            "amp",
            "batch",
            "img/s",
            "step ms",
            "best step ms",
            "compile s",
            "peak MB",
            "memory",
        ],
        [
            (
                r["model"],
                "on" if r["channels_last"] else "off",
                "on" if r["compile"] else "off",
                r["amp"],
                r["batch_size"],
                r["images_per_s"],
                r["step_ms"],
                r["best_step_ms"],
                "-" if r["compile_s"] is None else r["compile_s"],
                r["peak_memory_mb"],
                r["memory_kind"],
            )
            for r in results["results"]
        ],
    )
    return f"{provenance_lines(results)}\n{table}\n"


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main("train"))
