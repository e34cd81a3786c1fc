"""The other commands: guard, explain, serve, demo, quickstart, bench and export.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from derm_accel.cli.app import BenchKind, ExportFormat, Quiet, app, key_value


@app.command(
    epilog="**Examples**\n\n"
    "derm-accel guard runs/effnet_b3/best --data data/derm35\n\n"
    "derm-accel guard RUN/best --data DATA --in-domain-share 0.97 --target-error 0.05\n\n"
    "derm-accel guard RUN/best --data DATA --target-coverage 0.9 --max-fit-images 2000",
)
def guard(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (RUN/best) to fit the guard for.")],
    data: Annotated[Path, typer.Option(help="The converted dataset the model was trained on.")],
    train_split: Annotated[str, typer.Option(help="Split whose features the guard models.")] = "train",
    val_split: Annotated[str, typer.Option(help="Split that sets the confidence threshold.")] = "validation",
    in_domain_share: Annotated[
        float, typer.Option(help="Share of held-out in-domain images the ood_score threshold lets pass.")
    ] = 0.95,
    target_coverage: Annotated[
        float, typer.Option(help="Abstention: share of in-domain validation images answered (most confident first).")
    ] = 0.8,
    target_error: Annotated[
        float | None,
        typer.Option(help="Abstention by error instead: error rate allowed among answered validation images."),
    ] = None,
    max_fit_images: Annotated[
        int, typer.Option(help="Training images the guard is fitted on (a seeded, class-stratified sample).")
    ] = 5000,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
) -> None:
    """Fit (or refit) the domain guard and abstention threshold of a trained model.

    Writes `domain_guard.safetensors` into the model folder and its settings into `config.json` under
    `derm_accel`; plain timm ignores both. `train` does this itself when it ends.
    """
    from derm_accel.guard.fit import fit_model_guard  # loaded when the command runs: the CLI starts without torch

    config = fit_model_guard(
        model_dir, data, train_split=train_split, val_split=val_split, in_domain_share=in_domain_share,
        target_error=target_error, target_coverage=target_coverage, max_fit_images=max_fit_images,
        batch_size=batch_size,
    )
    g, sel = config["domain_guard"], config["selective_prediction"]
    typer.echo(
        f"domain guard: ood_score threshold {g['threshold']:.2f} ({g['in_domain_share']:.0%} of "
        f"{g['threshold_images']} held-out in-domain images pass)"
    )
    met = "" if sel["target_met"] else f" (target {sel['target_error']:.0%} not reachable: lowest error kept)"
    typer.echo(f"fitted on {g['fit_sample']['images']} of {g['fit_sample']['of']} training images")
    typer.echo(
        f"abstention: answer when top-1 probability >= {sel['confidence_threshold']:.3f}: "
        f"{sel['validation_coverage']:.0%} of validation images answered, error {sel['validation_risk']:.1%}{met}"
    )



@app.command(
    epilog="**Examples**\n\n"
    "derm-accel explain lesion.jpg --model runs/effnet_b3/best --out heatmaps/\n\n"
    "derm-accel explain photos/ --model my-lab/effnet-b3-derm35 --target melanoma --out heatmaps/",
)
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    model: Annotated[str, typer.Option(help="Model folder (RUN/best) or Hub repo id ORG/NAME (a CNN).")],
    out: Annotated[Path, typer.Option(help="Folder for the <image>_gradcam.png files.")] = Path("heatmaps"),
    target: Annotated[str | None, typer.Option(help="Class to explain (default: the predicted one).")] = None,
    quiet: Quiet = False,
) -> None:
    """Grad-CAM heatmaps: which part of each image drove the prediction (lesion, or ruler and ink?)."""
    from derm_accel.inference.explain import (
        explain as run_explain,  # loaded when the command runs: the CLI starts without torch
    )

    results = run_explain([str(p) for p in images], model, out_dir=out, target=target, progress=not quiet)
    for r in results:
        if "error" in r:
            typer.echo(f"{r['path']}\tERROR\t{r['error']}")
        else:
            typer.echo(f"{r['path']}\t{r['label']}\t{r['probability']:.3f}\t{r['heatmap']}")
    if any("error" in r for r in results):
        raise typer.Exit(code=1)



@app.command(
    epilog="**Examples**\n\n"
    "derm-accel serve --model runs/effnet_b3/best --port 8000\n\n"
    "curl -F file=@lesion.jpg http://127.0.0.1:8000/predict\n\n"
    "curl --data-binary @lesion.jpg http://127.0.0.1:8000/predict\n\n"
    "derm-accel serve --model my-lab/effnet-b3-derm35 --cors-origin https://lab.example.org",
)
def serve(
    model: Annotated[str, typer.Option(help="Model folder (RUN/best) or Hub repo id ORG/NAME.")],
    host: Annotated[str, typer.Option(help="Address to bind; keep 127.0.0.1 unless a proxy sits in front.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    top_k: Annotated[int, typer.Option(help="Classes per answer (a request may ask ?top_k=N).")] = 3,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Origin allowed to call the API from a browser (repeatable; '*' for any). Default: none."),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body accepted, in MB (413 above it).")] = 32.0,
    max_connections: Annotated[
        int, typer.Option(help="Most connections open at once (a request on one more gets 503).")
    ] = 64,
) -> None:
    """HTTP API (FastAPI): POST /predict (multipart `file` or raw bytes), POST /predict/batch, GET /health,
    OpenAPI at /docs. Answers like `predict --json`. For research tools, not clinics."""
    # loaded when the command runs: the CLI starts without torch
    from derm_accel.serving.serve import check_max_connections, create_app, run, upload_limit_bytes

    max_bytes = upload_limit_bytes(max_upload_mb)  # bad option values are refused before the model loads
    check_max_connections(max_connections)
    api = create_app(model, top_k=top_k, cors_origins=cors_origin or (), max_bytes=max_bytes)
    typer.echo(f"serving {model} on http://{host}:{port} (POST /predict, POST /predict/batch, GET /health, /docs)")
    run(api, host=host, port=port, max_connections=max_connections)



@app.command(
    epilog="**Examples**\n\n"
    "derm-accel demo --model runs/effnet_b3/best\n\n"
    "derm-accel demo --model my-lab/effnet-b3-derm35 --host 0.0.0.0 --port 7860",
)
def demo(
    model: Annotated[str, typer.Option(help="Model folder (RUN/best) or Hub repo id ORG/NAME.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 makes the page reachable from the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 7860,
    share: Annotated[
        bool, typer.Option("--share/--no-share", help="Also open a temporary public gradio.live link.")
    ] = False,
    top_k: Annotated[int, typer.Option(help="Classes shown per image.")] = 3,
    examples: Annotated[
        Path | None, typer.Option(help="Folder of example images (default: the model folder's examples/).")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted, in MB (as serve).")] = 32.0,
) -> None:
    """A web page on the model (Gradio): upload or webcam, top classes, Grad-CAM, the domain guard's verdict,
    the model card. Same answers as `predict`. Research use only; needs `pip install "derm-accel[demo]"`.
    Uploads are deleted once answered, and every file of the page when it stops."""
    from derm_accel.serving.demo import build_demo, launch  # loaded when the command runs: the CLI starts without torch
    from derm_accel.serving.serve import upload_limit_bytes  # (the same)

    upload_limit_bytes(max_upload_mb)  # a bad value is refused before the model loads
    launch(build_demo(model, top_k=top_k, examples=examples), server_name=host, server_port=port, share=share,
           max_upload_mb=max_upload_mb)



@app.command(
    epilog="**Examples**\n\n"
    "derm-accel quickstart\n\n"
    "derm-accel quickstart --data ../shared/data/derm-sample --model tf_efficientnet_lite0 "
    "--pretrained-file ../shared/weights/efficientnet_lite0.in1k --epochs 3",
)
def quickstart(
    workdir: Annotated[Path, typer.Option(help="Where every output of the run lands.")] = Path(
        "derm-accel-quickstart"
    ),
    data: Annotated[Path | None, typer.Option(help="Your own class folders (default: a generated sample).")] = None,
    model: Annotated[str | None, typer.Option(help="timm model name.")] = None,
    pretrained_file: Annotated[
        Path | None, typer.Option(help="Local ImageNet weights in timm's layout (folder).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
) -> None:
    """Run the whole pipeline on a small sample: convert, train, evaluate, push (dry run), predict."""
    from derm_accel.quickstart import run_quickstart  # loaded when the command runs: the CLI starts without torch

    summary = run_quickstart(workdir, data=data, model=model, pretrained_file=pretrained_file, epochs=epochs)
    typer.echo(summary["text"])



# Benchmark kinds whose script has another name (the rest are benchmarks/KIND.py); the checkout's
# benchmarks/harness.py holds the same table, which is not importable from an installed wheel.
BENCH_SCRIPTS = {"comm": "ddp_comm", "onnx": "onnx_runtime"}



@app.command(
    epilog="**Examples**\n\n"
    "derm-accel bench data --opt workers=1,2\n\n"
    "derm-accel bench steps --opt images=64\n\n"
    "derm-accel bench train --opt models=efficientnet_b3 --opt batch_size=8 --opt steps=3\n\n"
    "derm-accel bench infer --opt batch_size=64",
)
def bench(
    kind: Annotated[BenchKind, typer.Argument(help="What to measure.")],
    out: Annotated[Path | None, typer.Option(help="JSON output (default bench_results/KIND.json).")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--opt", help="Benchmark option key=value (repeatable), e.g. --opt steps=5.")
    ] = None,
    update_docs: Annotated[bool, typer.Option(help="Also rewrite its table in docs/benchmarks.md.")] = False,
) -> None:
    """Run a benchmark script of the source checkout: `derm-accel bench KIND --opt k=v` is
    `python benchmarks/KIND.py --k v` (its `--help` lists the options). The benchmarks are not installed."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "harness.py").is_file():
        raise FileNotFoundError(
            "The benchmarks are scripts in the source checkout's benchmarks/ folder, not part of the installed "
            f"package: clone the repository and run python benchmarks/{BENCH_SCRIPTS.get(kind.value, kind.value)}.py"
            " --help."
        )
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in (key_value(o) for o in option or [])]
    argv += [f"--out={out}"] * (out is not None) + ["--update-docs"] * update_docs
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks.harness import main

    main(kind.value, argv)



@app.command(
    epilog="**Examples**\n\n"
    "derm-accel export runs/effnet_b3/best --format onnx exports/effnet_b3-onnx\n\n"
    "derm-accel predict lesion.jpg --model exports/effnet_b3-onnx --backend onnxruntime",
)
def export(
    model: Annotated[str, typer.Argument(help="Model folder (RUN/best) or Hub repo id ORG/NAME.")],
    out: Annotated[Path, typer.Argument(help="Output folder: model.onnx + preprocessing.json.")],
    format: Annotated[ExportFormat, typer.Option(help="Export format.")] = ExportFormat("onnx"),
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
) -> None:
    """Export for deployment: an ONNX graph (dynamic batch) and a sidecar with labels and preprocessing, checked
    against PyTorch. Needs `pip install "derm-accel[onnx]"`."""
    from derm_accel.models.onnx import export_onnx  # loaded when the command runs: the CLI starts without torch

    where = export_onnx(model, out, opset=opset)
    typer.echo(f"exported {format.value}: {where} (model.onnx, preprocessing.json)")

