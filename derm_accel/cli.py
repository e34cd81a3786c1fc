"""The ``derm-accel`` command line: parse options, call one stage function, print. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from derm_accel.errors import exit_code


def _is_main_process() -> bool:
    """Under `accelerate launch` every rank runs the command; only rank 0 prints the summary."""
    return os.environ.get("RANK", "0") == "0"


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--opt {item!r} is not key=value (e.g. --opt steps=5)")
    return key, value


class _Commands(TyperGroup):
    """Reports the errors a stage raises for the user (see :func:`derm_accel.errors.exit_code`) in one place:
    ``error: MESSAGE`` on stderr and exit code 2 for a usage error, 1 for a failure while running. Any other
    exception is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            code = exit_code(e)
            if code is None:
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=code) from None


def _print_version(value: bool) -> None:
    if value:
        import derm_accel

        typer.echo(f"derm-accel {derm_accel.__version__}")
        raise typer.Exit()


Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (it is also off when stderr is no terminal).")
]


def _choices(name: str, *values: str) -> type[Enum]:
    """An enumerated option for typer: the help lists the values, and a typo is refused before anything runs."""
    return Enum(name, [(v.replace("-", "_"), v) for v in values], type=str)


Conflicts = _choices("Conflicts", "drop", "keep-majority")
TTA = _choices("TTA", "flip", "none")
Backend = _choices("Backend", "torch", "onnxruntime")
BenchKind = _choices("BenchKind", "data", "steps", "train", "infer", "comm", "convert", "guard", "onnx")
ExportFormat = _choices("ExportFormat", "onnx")


app = typer.Typer(
    name="derm-accel",
    help="Train, evaluate and publish skin-disease image classifiers: class folders -> Arrow dataset -> "
    "timm model -> report -> Hugging Face Hub.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
    cls=_Commands,
)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command(
    epilog="**Examples**\n\n"
    "derm-accel convert ~/kaggle/skin-diseases data/derm\n\n"
    "derm-accel convert SRC data/derm --class-map classes.yaml --max-size 384 --num-proc 8 --overwrite\n\n"
    "derm-accel convert HAM10000/ data/ham --metadata HAM10000/HAM10000_metadata.csv --preset ham10000\n\n"
    "derm-accel convert imgs/ data/ext --metadata meta.csv --image-column file --label-column dx "
    "--group-column patient_id --eval-only",
)
def convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="Folder with one sub-folder per class, or (with --metadata) any folder of images (searched "
            "recursively)."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output folder for the DatasetDict (datasets.load_from_disk).")],
    class_map: Annotated[
        Path | None, typer.Option(help="YAML/JSON mapping folder -> class name; null drops a folder.")
    ] = None,
    val_frac: Annotated[float, typer.Option(help="Fraction of each class for validation.")] = 0.1,
    test_frac: Annotated[float, typer.Option(help="Fraction of each class for test.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the stratified split.")] = 42,
    max_size: Annotated[
        int, typer.Option(help="Shorter side of stored images in px (never upscaled; 0 = keep).")
    ] = 320,
    quality: Annotated[int, typer.Option(help="JPEG quality of stored images.")] = 95,
    near_threshold: Annotated[int, typer.Option(help="Perceptual-hash distance (bits) for near duplicates.")] = 4,
    conflicts: Annotated[Conflicts, typer.Option(help="Duplicates with different labels.")] = Conflicts("drop"),
    num_proc: Annotated[int, typer.Option(help="Worker processes for decoding and hashing.")] = 1,
    license: Annotated[str | None, typer.Option(help="License of the images, recorded in the dataset card.")] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="Also push the dataset to this Hub repo (ORG/NAME).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    metadata: Annotated[
        list[Path] | None,
        typer.Option(
            help="CSV/TSV/Parquet with one row per image (label, patient, age...); repeat to join several tables "
            "on the image column."
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Column names of a public layout: ham10000|isic2019|isic2020|pad-ufes-20|fitzpatrick17k|ddi."
        ),
    ] = None,
    image_column: Annotated[
        str | None, typer.Option(help="Metadata column naming each image file (with or without extension).")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Metadata column holding the label; 'A,B,C' reads one-hot columns.")
    ] = None,
    group_column: Annotated[
        list[str] | None,
        typer.Option(help="Patient/lesion column whose images stay in one split (repeatable; 'none' for none)."),
    ] = None,
    eval_only: Annotated[bool, typer.Option(help="Put every image in the test split (external validation).")] = False,
    drop_empty_classes: Annotated[
        bool, typer.Option(help="Leave out classes whose files were all skipped (default: fail and name them).")
    ] = False,
    follow_external_links: Annotated[
        bool, typer.Option(help="Include files reached through links that lead outside SRC (default: skip them).")
    ] = False,
) -> None:
    """Convert class folders into a stratified, leakage-free Hugging Face Arrow dataset (train/validation/test).

    With --metadata, SRC is a folder of images and labels, patient/lesion groups and typed extra columns come from
    the table.

    Every file ends up either as a row or in OUT/conversion_report.json with its reason.
    """
    from derm_accel.data.convert import convert_folders
    from derm_accel.data.metadata import metadata_spec

    if not metadata and (preset or image_column or label_column or group_column):
        raise ValueError("--preset, --image-column, --label-column and --group-column need --metadata FILE.")
    spec = None
    if metadata:
        spec = metadata_spec(
            metadata, preset=preset, image_column=image_column, label_column=label_column,
            group_columns=group_column,
        )
    report = convert_folders(
        src, out, class_map=class_map, val_frac=val_frac, test_frac=test_frac, seed=seed, max_size=max_size,
        quality=quality, near_threshold=near_threshold, conflicts=conflicts.value, num_proc=num_proc,
        overwrite=overwrite, license=license, push_to_hub=push_to_hub, metadata=spec, eval_only=eval_only,
        drop_empty_classes=drop_empty_classes, follow_external_links=follow_external_links,
    )
    typer.echo(
        f"wrote {report.get('rows_total')} images to {out} "
        f"({len(report.get('skipped', []))} files skipped; see {out}/conversion_report.json)"
    )


@app.command(
    epilog="**Examples**\n\n"
    "derm-accel train --recipe recipes/smoke.yaml --set data.path=data/derm\n\n"
    "accelerate launch --config_file accelerate_configs/4xa100.yaml -m derm_accel train "
    "--recipe recipes/effnet_b3.yaml\n\n"
    "derm-accel train --recipe recipes/effnet_b3.yaml --resume latest\n\n"
    "derm-accel train --recipe recipes/effnet_b3.yaml --folds 5 --set output_dir=runs/effnet_b3_cv",
)
def train(
    recipe: Annotated[Path, typer.Option(help="YAML training recipe (see recipes/).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value, e.g. --set optim.lr=3e-4 (repeatable).")
    ] = None,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint folder to resume from.")] = None,
    resume_with_changes: Annotated[
        bool,
        typer.Option(
            help="Apply recipe changes a resume refuses by default (e.g. optim.lr), from the checkpoint's step on; "
            "recorded in run_info.json."
        ),
    ] = False,
    folds: Annotated[
        int | None,
        typer.Option(
            help="k-fold cross-validation: pool all splits of data.path into K stratified, duplicate-grouped folds; "
            "write RUN/fold_1..K, out-of-fold predictions, RUN/cv_report.md and RUN/ensemble.json (the fold "
            "models as one ensemble for evaluate/predict/push). Rerun to resume.",
            min=2,
        ),
    ] = None,
    group_column: Annotated[
        str | None, typer.Option(help="With --folds: rows sharing this column (e.g. patient_id) stay in one fold.")
    ] = None,
    holdout: Annotated[
        str | None,
        typer.Option(
            help="With --folds: keep this split (e.g. test) out of every fold; the fold models, their ensemble and "
            "their weight average (soup) are compared on it, and RUN/soup is kept if it does not lose."
        ),
    ] = None,
) -> None:
    """Train a timm classifier with a plain PyTorch loop driven by Accelerate (CPU, one GPU, or DDP).

    On --resume the recipe is compared with the checkpoint's: epochs, checkpoint and logging cadence, early
    stopping, stop_after_steps and loader settings may change; any other change is refused with the list of keys
    unless --resume-with-changes.
    """
    if folds is not None:
        if resume is not None:
            raise typer.BadParameter("--folds resumes by itself when run again; drop --resume", param_hint="--resume")
        from derm_accel.kfold import REPORT_MD, train_folds

        run_dir = train_folds(recipe, folds, set_ or [], group_column=group_column, holdout=holdout)
        if _is_main_process():
            typer.echo(f"run folder: {run_dir}\ncross-validation report: {Path(run_dir) / REPORT_MD}")
        return
    if group_column or holdout:
        raise typer.BadParameter("--group-column and --holdout apply to --folds runs only", param_hint="--folds")
    from derm_accel.train import train as run_training

    run_dir = run_training(recipe, overrides=set_ or [], resume=resume, resume_with_changes=resume_with_changes)
    if _is_main_process():
        typer.echo(f"run folder: {run_dir}\nbest model: {Path(run_dir) / 'best'}")


@app.command(
    epilog="**Examples**\n\n"
    "derm-accel evaluate --model runs/effnet_b3/best --data data/derm --split test --out reports/effnet_b3\n\n"
    "derm-accel evaluate --model ORG/NAME --data data/derm --tta flip --calibrate\n\n"
    "derm-accel evaluate --model runs/cv5 --data data/derm-test  (the `train --folds 5` fold models as one ensemble)"
    "\n\n"
    "derm-accel evaluate --model runs/x/best --data data/pad-ufes --label-map pad_to_model.yaml "
    "--subgroups fitspatrick,age\n\n"
    "accelerate launch --config_file accelerate_configs/4xa100.yaml -m derm_accel evaluate --model runs/x/best "
    "--data data/derm",
)
def evaluate(
    model: Annotated[
        list[str],
        typer.Option(
            help="Model folder (RUN/best) or Hub repo id ORG/NAME. Repeat it (or pass an ensemble folder such as a "
            "`train --folds` run) to evaluate an ensemble: probabilities averaged, each member reported too."
        ),
    ],
    data: Annotated[Path, typer.Option(help="Dataset folder written by `derm-accel convert`.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Report folder (default reports/MODEL-SPLIT).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers.")] = 2,
    tta: Annotated[
        TTA | None,
        typer.Option(
            help="Test-time augmentation: flip (original + flips, softmax averaged) or none. Default: the model's own "
            "(config.json derm_accel.tta, set by the recipe's model.tta)."
        ),
    ] = None,
    calibrate: Annotated[bool, typer.Option(help="Fit temperature scaling on the validation split.")] = False,
    label_map: Annotated[
        Path | None,
        typer.Option(
            help="YAML/JSON mapping the dataset's class names onto the model's (external validation); classes "
            "the model does not know are reported apart, not scored."
        ),
    ] = None,
    subgroups: Annotated[
        str | None,
        typer.Option(
            help="Dataset columns to break the metrics down by, e.g. 'fitzpatrick_scale,age,sex' "
            "(COL:decade|fitzpatrick|quartile|value sets the binning)."
        ),
    ] = None,
    ood: Annotated[
        list[Path] | None,
        typer.Option(
            help="Out-of-domain images (a folder, or a converted dataset) to score the domain guard against; "
            "repeatable."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate a model: accuracy, macro-F1, per-class metrics, ROC-AUC, calibration, plots and a report.

    With a domain guard in the model (or `--ood`), the report also covers out-of-domain inputs and abstention.
    """
    from derm_accel.evaluation.run import evaluate_model

    metrics = evaluate_model(
        model if len(model) > 1 else model[0], data, split=split, out_dir=out, batch_size=batch_size,
        num_workers=num_workers,
        tta=tta.value if tta else None,
        calibrate=calibrate, ood=[str(p) for p in ood or []], label_map=label_map, subgroups=subgroups,
        progress=not quiet,
    )
    if metrics and _is_main_process():
        typer.echo(
            f"{split}: accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
            f"report: {metrics['report_dir']}"
        )


@app.command(
    epilog="**Examples**\n\n"
    "derm-accel push runs/effnet_b3/best --repo-id my-lab/effnet-b3-derm35 --report reports/effnet_b3\n\n"
    "derm-accel push runs/effnet_b3/best --repo-id my-lab/effnet-b3-derm35 --dry-run --out staged/\n\n"
    "derm-accel push runs/effnet_b3/best --repo-id my-lab/effnet-b3-derm35 --space my-lab/effnet-b3-derm35-demo\n\n"
    "derm-accel push runs/cv5 --repo-id ORG/NAME-cv5 --report reports/cv5  (an ensemble: `train --folds 5` run)",
)
def push(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="Model folder written by training (RUN/best), or an ensemble folder holding ensemble.json (a "
            "`train --folds K` run): its members go into one repo as subfolders fold_1..K."
        ),
    ],
    repo_id: Annotated[str, typer.Option(help="Hub repo id, ORG/NAME.")],
    report: Annotated[Path | None, typer.Option(help="Evaluation report folder to publish with the model.")] = None,
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to.")] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Hub token. Prefer HF_TOKEN or `hf auth login` (the default): other local users can read a "
            "--token value in `ps`. Never printed or stored."
        ),
    ] = None,
    license: Annotated[str | None, typer.Option(help="License of the weights (else from the recipe/dataset).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Stage the upload into --out instead of pushing.")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for --dry-run (a Space goes into OUT-space).")] = None,
    space: Annotated[
        str | None, typer.Option(help="Also create this Gradio Space (ORG/NAME-demo): the demo, loading the model.")
    ] = None,
    space_requirement: Annotated[
        str | None, typer.Option(help="How the Space installs derm-accel (a pip requirement line; default: "
                                      "derm-accel[demo] at this version).")
    ] = None,
) -> None:
    """Publish weights (safetensors), a timm config.json, the evaluation and a model card to the Hub; with
    --space also a Gradio Space running `derm-accel demo` on the model. An ensemble folder is published as one
    repo: ensemble.json, each member in its subfolder, and a card saying how to load the whole or one member."""
    from derm_accel.hub import ENSEMBLE_FILE, push_model

    if space:
        from derm_accel.errors import InputError
        from derm_accel.space import check_space_id

        check_space_id(space, repo_id)  # before the model is pushed
        if (model_dir / ENSEMBLE_FILE).is_file():
            raise InputError(
                f"--space does not take an ensemble yet ({model_dir / ENSEMBLE_FILE}); push the ensemble without "
                "--space, or push one member folder (e.g. RUN/fold_1/best) with --space."
            )
    where = push_model(
        model_dir, repo_id, report_dir=report, private=private, revision=revision,
        commit_message=commit_message, token=token, dry_run=dry_run, out=out, license=license,
    )
    typer.echo(f"{'staged' if dry_run else 'pushed'}: {where}")
    if space:
        from derm_accel.space import push_space

        space_where = push_space(
            model_dir, repo_id, space, revision=revision, private=private, token=token, license=license,
            requirement=space_requirement, dry_run=dry_run, out=f"{out}-space" if out is not None else None,
        )
        typer.echo(f"{'staged Space' if dry_run else 'pushed Space'}: {space_where}")


@app.command(
    epilog="**Examples**\n\n"
    "derm-accel predict lesion.jpg --model runs/effnet_b3/best\n\n"
    "derm-accel predict photos/ --model my-lab/effnet-b3-derm35 --top-k 5 --json",
)
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    model: Annotated[
        list[str],
        typer.Option(
            help="Model folder (RUN/best) or Hub repo id ORG/NAME; repeat it (or pass an ensemble folder) to average "
            "several models' probabilities."
        ),
    ],
    top_k: Annotated[int, typer.Option(help="How many classes to list per image.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    guard: Annotated[
        bool, typer.Option("--guard/--no-guard", help="Check each image against the model's domain guard.")
    ] = True,
    backend: Annotated[
        Backend,
        typer.Option(
            help="torch, or onnxruntime with --model a folder from `derm-accel export --format onnx` (CPU, no guard)."
        ),
    ] = Backend("torch"),
    tta: Annotated[
        TTA | None,
        typer.Option(help="Test-time augmentation: flip or none. Default: the model's own (config.json)."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Predict the class of images with a local or Hub model. Unreadable files get a per-file error.

    Models trained by derm-accel carry a domain guard: every result says whether the image looks like the
    training data (`in_domain`, `ood_score`) and whether to trust the answer (`abstain`, `reason`).
    """
    from derm_accel.predict import predict as run_predict

    results = run_predict(
        [str(p) for p in images], model=model if len(model) > 1 else model[0], top_k=top_k, batch_size=batch_size,
        guard=guard, backend=backend.value, tta=tta.value if tta else None,
        progress=not quiet,
    )
    failed = 0
    for r in results:
        if as_json:
            typer.echo(json.dumps(r))
        elif "error" in r:
            typer.echo(f"{r['path']}\tERROR\t{r['error']}")
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"][1:])
            answer = "ABSTAIN" if r.get("abstain") else "answer"
            typer.echo(f"{r['path']}\t{r['label']}\t{r['probability']:.3f}\t{answer}\t{others}")
        if r.get("in_domain") is False:
            typer.secho(f"warning: {r['path']}: {r['reason']}", fg=typer.colors.YELLOW, err=True)
        failed += "error" in r
    unguarded = all(r.get("in_domain") is None for r in results if "error" not in r)
    if guard and backend.value == "torch" and results and unguarded:
        typer.echo("note: this model has no domain guard; fit one with `derm-accel guard MODEL --data DATA`", err=True)
    if failed:
        raise typer.Exit(code=1)


@app.command(
    epilog="**Examples**\n\n"
    "derm-accel guard runs/effnet_b3/best --data data/derm35\n\n"
    "derm-accel guard RUN/best --data DATA --in-domain-share 0.97 --target-error 0.05",
)
def guard(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (RUN/best) to fit the guard for.")],
    data: Annotated[Path, typer.Option(help="The converted dataset the model was trained on.")],
    train_split: Annotated[str, typer.Option(help="Split whose features the guard models.")] = "train",
    val_split: Annotated[str, typer.Option(help="Split that sets the confidence threshold.")] = "validation",
    in_domain_share: Annotated[
        float, typer.Option(help="Share of held-out in-domain images the ood_score threshold lets pass.")
    ] = 0.95,
    target_error: Annotated[
        float, typer.Option(help="Error rate allowed among answered validation images (abstention).")
    ] = 0.10,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
) -> None:
    """Fit (or refit) the domain guard and abstention threshold of a trained model.

    Writes `domain_guard.safetensors` into the model folder and its settings into `config.json` under
    `derm_accel`; plain timm ignores both. `train` does this itself when it ends.
    """
    from derm_accel.guard.fit import fit_model_guard

    config = fit_model_guard(
        model_dir, data, train_split=train_split, val_split=val_split, in_domain_share=in_domain_share,
        target_error=target_error, batch_size=batch_size,
    )
    g, sel = config["domain_guard"], config["selective_prediction"]
    typer.echo(
        f"domain guard: ood_score threshold {g['threshold']:.2f} ({g['in_domain_share']:.0%} of "
        f"{g['threshold_images']} held-out in-domain images pass)"
    )
    met = "" if sel["target_met"] else f" (target {sel['target_error']:.0%} not reachable: lowest error kept)"
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
    from derm_accel.explain import explain as run_explain

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
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body accepted (413 above it).")] = 32.0,
) -> None:
    """HTTP API (FastAPI): POST /predict (multipart `file` or raw bytes), POST /predict/batch, GET /health,
    OpenAPI at /docs. Answers like `predict --json`. For research tools, not clinics."""
    from derm_accel.serve import create_app, run

    api = create_app(model, top_k=top_k, cors_origins=cors_origin or (), max_bytes=int(max_upload_mb * 2**20))
    typer.echo(f"serving {model} on http://{host}:{port} (POST /predict, POST /predict/batch, GET /health, /docs)")
    run(api, host=host, port=port)


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
) -> None:
    """A web page on the model (Gradio): upload or webcam, top classes, Grad-CAM, the domain guard's verdict,
    the model card. Same answers as `predict`. Research use only; needs `pip install "derm-accel[demo]"`."""
    from derm_accel.demo import build_demo, launch

    launch(build_demo(model, top_k=top_k, examples=examples), server_name=host, server_port=port, share=share)


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
    from derm_accel.quickstart import run_quickstart

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
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "harness.py").is_file():
        raise FileNotFoundError(
            "The benchmarks are scripts in the source checkout's benchmarks/ folder, not part of the installed "
            f"package: clone the repository and run python benchmarks/{BENCH_SCRIPTS.get(kind.value, kind.value)}.py"
            " --help."
        )
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in (_key_value(o) for o in option or [])]
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
    from derm_accel.onnx_export import export_onnx

    where = export_onnx(model, out, opset=opset)
    typer.echo(f"exported {format.value}: {where} (model.onnx, preprocessing.json)")


if __name__ == "__main__":
    app()
