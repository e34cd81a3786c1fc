"""The pipeline's commands: convert, train, evaluate, push and predict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from derm_accel.cli.app import TTA, Backend, Conflicts, Quiet, app, is_main_rank


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
    quality: Annotated[
        int, typer.Option(help="JPEG quality of re-encoded images (a source JPEG that needs no change is kept).")
    ] = 95,
    near_threshold: Annotated[
        int, typer.Option(help="Perceptual-hash distance (bits) that makes two images near-copy candidates.")
    ] = 4,
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
    from derm_accel.data.convert import convert_folders  # loaded when the command runs: the CLI starts without torch
    from derm_accel.data.metadata import metadata_spec  # loaded when the command runs: the CLI starts without torch

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
    conflicts = sum(s.get("reason") == "conflict" for s in report.get("skipped", []))
    if conflicts:  # never "first wins": an image labelled two ways is left out, and said so
        typer.echo(
            f"{conflicts} files skipped as label conflicts (the same image under different labels, in the metadata "
            f"rows or among duplicates); each is listed with reason 'conflict' in {out}/conversion_report.json"
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
        from derm_accel.training.kfold import (  # loaded when the command runs: the CLI starts without torch
            REPORT_MD,
            train_folds,
        )

        run_dir = train_folds(recipe, folds, set_ or [], group_column=group_column, holdout=holdout)
        if is_main_rank():
            typer.echo(f"run folder: {run_dir}\ncross-validation report: {Path(run_dir) / REPORT_MD}")
        return
    if group_column or holdout:
        raise typer.BadParameter("--group-column and --holdout apply to --folds runs only", param_hint="--folds")
    from derm_accel.training.train import (
        train as run_training,  # loaded when the command runs: the CLI starts without torch
    )

    run_dir = run_training(recipe, overrides=set_ or [], resume=resume, resume_with_changes=resume_with_changes)
    if is_main_rank():
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
    from derm_accel.evaluation.run import evaluate_model  # loaded when the command runs: the CLI starts without torch

    metrics = evaluate_model(
        model if len(model) > 1 else model[0], data, split=split, out_dir=out, batch_size=batch_size,
        num_workers=num_workers,
        tta=tta.value if tta else None,
        calibrate=calibrate, ood=[str(p) for p in ood or []], label_map=label_map, subgroups=subgroups,
        progress=not quiet,
    )
    if metrics and is_main_rank():
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
        str | None, typer.Option(help="How the Space installs derm-accel: one pip requirement line that becomes "
                                      "its requirements.txt (default: a wheel of this derm-accel staged in the "
                                      "Space, and its dependencies pinned at the versions installed here).")
    ] = None,
) -> None:
    """Publish weights (safetensors), a timm config.json, the evaluation and a model card to the Hub; with
    --space also a Gradio Space running `derm-accel demo` on the model. An ensemble folder is published as one
    repo: ensemble.json, each member in its subfolder, and a card saying how to load the whole or one member."""
    from derm_accel.hub.push import (  # loaded when the command runs: the CLI starts without torch
        ENSEMBLE_FILE,
        push_model,
    )

    if space:
        from derm_accel.core.errors import InputError  # loaded when the command runs: the CLI starts without torch
        from derm_accel.hub.space import check_space_id  # loaded when the command runs: the CLI starts without torch

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
        from derm_accel.hub.space import push_space  # loaded when the command runs: the CLI starts without torch

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
    from derm_accel.inference.predict import (
        predict as run_predict,  # loaded when the command runs: the CLI starts without torch
    )

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

