"""The model card of an ensemble repo: members, how they were combined, their scores beside the ensemble's and how
to load it (the members are plain timm models; the ensemble is not).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from derm_accel.core.artifacts import METRICS, RECIPE, TRAINING_INFO, fmt
from derm_accel.core.errors import InputError
from derm_accel.core.escape import md_code
from derm_accel.core.fileio import read_optional_json, read_optional_yaml
from derm_accel.evaluation.subgroups import model_card_section as subgroup_card_section
from derm_accel.hub.card import (
    CARD_TAGS,
    INTENDED_USE,
    LIMITATIONS,
    MissingLicenseError,
    check_timm_config,
    hub_dataset_id,
    hub_license,
    model_card_data,
    provenance_lines,
    read_report,
    resolve_license,
    run_dataset_info,
    section_citation,
    section_evaluation,
    section_out_of_domain,
    section_training_data,
)

ENSEMBLE_TAGS = [t for t in CARD_TAGS if t != "timm"] + ["ensemble"]  # no root config.json: not a timm repo



def _ensemble_license(explicit: str | None, members: list[tuple[str, Path, dict, dict]]) -> str:
    """``--license``, else the one license every member's recipe or training info records."""
    if explicit and explicit.strip():
        return explicit.strip()
    found = {}
    for name, path, recipe, info in members:
        try:
            found[name] = resolve_license(None, recipe, info)
        except MissingLicenseError as e:
            raise MissingLicenseError(f"Ensemble member {name} ({path}): {e}") from e
    if len(set(found.values())) > 1:
        raise InputError(
            f"The ensemble's members record different licenses ({found}); pass --license with the one that "
            "covers all of them."
        )
    return next(iter(found.values()))



def _ensemble_rows(metrics: Mapping[str, Any], names: list[str], report_dir: Path | None) -> list[dict[str, Any]]:
    """The report's ``ensemble.members`` rows, named by the members' subfolders (evaluate lists the members in
    ``ensemble.json`` order). A report of another model is refused rather than published with this one."""
    if not metrics:
        return []
    block = metrics.get("ensemble")
    rows = block.get("members") if isinstance(block, Mapping) else None
    if not isinstance(rows, list) or len(rows) != len(names):
        got = f"an ensemble of {len(rows)}" if isinstance(rows, list) else "a single model"
        raise InputError(
            f"{Path(str(report_dir)) / METRICS} reports {got}, but this ensemble has {len(names)} members. Evaluate "
            "the ensemble folder itself (`derm-accel evaluate --model RUN --data DATA`) and pass that --report."
        )
    return [{**row, "member": name} for row, name in zip(rows, names, strict=True)]



def _section_ensemble_details(
    repo_id: str, configs: list[Mapping[str, Any]], names: list[str], license_id: str, info: Mapping[str, Any]
) -> str:
    config = configs[0]
    pcfg = config["pretrained_cfg"]
    size = pcfg["input_size"]
    archs = ", ".join(f"`{a}`" for a in dict.fromkeys(c["architecture"] for c in configs))
    lines = [
        "## Model details",
        "",
        f"- **Ensemble:** {len(names)} members ({', '.join(f'`{n}/`' for n in names)}); its prediction is the mean "
        "of the members' class probabilities (`ensemble.json`: `combine: mean_probability`)",
        f"- **Architecture:** {archs} ([timm](https://github.com/huggingface/pytorch-image-models))",
        f"- **Classes:** {config['num_classes']} ({', '.join(map(md_code, config['label_names']))})",
        f"- **Input (shared by all members):** RGB, {size[-1]}x{size[-2]} px, resize to "
        f"{fmt(pcfg['crop_pct'], 3)} crop, `{pcfg['interpolation']}` interpolation, mean {list(pcfg['mean'])}, "
        f"std {list(pcfg['std'])}",
        "- **Weights:** each member's `model.safetensors` with its config in timm's format (`config.json`)",
        *provenance_lines(license_id, info, repo_id),
    ]
    return "\n".join(lines)



def _section_ensemble_members(members: list[tuple[str, Path, dict, dict]], configs: list[Mapping[str, Any]]) -> str:
    lines = [
        "## Members",
        "",
        "Each member folder is a complete timm model (`config.json`, `model.safetensors`) with what its run "
        "recorded (`recipe.yaml`, `training_info.json`, `val_metrics.json`, the domain guard).",
        "",
        "| Member | Architecture | Epochs | Best epoch | Validation macro F1 | Domain guard |",
        "|---|---|---|---|---|---|",
    ]
    for (name, path, recipe, info), config in zip(members, configs, strict=True):
        epochs = info.get("epochs_run") or ((recipe.get("train") or {}).get("epochs") if recipe else None)
        guard = "yes" if (path / "domain_guard.safetensors").is_file() else "no"
        lines.append(
            f"| {md_code(f'{name}/')} | {md_code(config['architecture'])} "
            f"| {fmt(epochs)} | {fmt(info.get('best_epoch'))} "
            f"| {fmt(info.get('best_val_macro_f1'))} | {guard} |"
        )
    return "\n".join(lines)



def _section_ensemble_evaluation(metrics: Mapping[str, Any], files: set[str], rows: list[dict[str, Any]]) -> str:
    text = section_evaluation(metrics, files)
    if not rows:
        return text
    lines = [
        "",
        "### Each member and the ensemble",
        "",
        f"Each member alone on the same images{' with the same test-time augmentation' if metrics.get('tta') else ''}"
        " (before any calibration), and the ensemble:",
        "",
        "| Model | Accuracy | Balanced accuracy | Macro F1 |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if "macro_f1" not in row:
            lines.append(f"| {md_code(row['member'] + '/')} | (not scored alone with a label map) | | |")
            continue
        lines.append(
            f"| {md_code(row['member'] + '/')} | {fmt(row['accuracy'])} "
            f"| {fmt(row.get('balanced_accuracy'))} "
            f"| {fmt(row['macro_f1'])} |"
        )
    lines.append(
        f"| **ensemble** | **{fmt(metrics.get('accuracy'))}** | **{fmt(metrics.get('balanced_accuracy'))}** "
        f"| **{fmt(metrics.get('macro_f1'))}** |"
    )
    return text + "\n" + "\n".join(lines)



def _section_ensemble_out_of_domain(
    first: str, first_dir: Path, config: Mapping[str, Any], metrics: Mapping[str, Any], files: set[str]
) -> str:
    text = section_out_of_domain(config, metrics, files).replace(
        "(`domain_guard.safetensors`)", f"(`{first}/domain_guard.safetensors`)"
    )
    if not (first_dir / "domain_guard.safetensors").is_file():
        return text  # says there is no guard
    heading, _, rest = text.partition("\n\n")
    return (
        f"{heading}\n\nAn ensemble's out-of-domain verdicts come from its first member's domain guard "
        f"(`{first}/domain_guard.safetensors`).\n\n{rest}"
    )



def _section_ensemble_how_to_use(repo_id: str, names: list[str], labels: list[str]) -> str:
    first = names[0]
    return f"""## How to use

This repo is an ensemble: `ensemble.json` names the member folders ({", ".join(f"`{n}/`" for n in names)}), and
its answer is the mean of their class probabilities. There is no `config.json` at the top of the repo, so
`timm.create_model("hf-hub:{repo_id}")` does **not** load it: load the whole ensemble with derm-accel, or one
member with timm.

The whole ensemble with derm-accel (`pip install derm-accel`; it downloads `ensemble.json` and the members'
JSON and safetensors files only):

```bash
derm-accel predict lesion.jpg --model {repo_id} --top-k 3 --json
derm-accel evaluate --model {repo_id} --data DATA --split test
```

```python
from derm_accel import predict

print(predict("lesion.jpg", model="{repo_id}", top_k=3))  # files or folders
```

```python
from derm_accel import load_models

net, labels = load_models("{repo_id}")  # one torch module: softmax of its output is the members' mean
```

One member with timm alone:

```python
import huggingface_hub
import timm

path = huggingface_hub.snapshot_download(
    "{repo_id}", allow_patterns=["{first}/*.json", "{first}/*.safetensors"]
)
model = timm.create_model("local-dir:" + path + "/{first}", pretrained=True).eval()
labels = model.pretrained_cfg["label_names"]
```

The labels are: {", ".join(map(md_code, labels))}."""



def build_ensemble_card(
    members: list[tuple[str, Path]],
    repo_id: str,
    *,
    report_dir: str | Path | None = None,
    license: str | None = None,
) -> ModelCard:
    """The README.md of an ensemble repo: ``members`` are (subfolder name in the repo, local model folder)."""
    named, configs = [], []
    for name, path in members:
        path = Path(path)
        config = read_optional_json(path / "config.json")
        check_timm_config(config, path / "config.json")
        configs.append(config)
        named.append((name, path, read_optional_yaml(path / RECIPE), read_optional_json(path / TRAINING_INFO)))
    license_id = _ensemble_license(license, named).lower()
    license_id, license_name = hub_license(license_id)
    metrics, report_files = read_report(report_dir)
    names = [n for n, *_ in named]
    rows = _ensemble_rows(metrics, names, report_dir)

    _, first_dir, recipe, info = named[0]
    dataset = run_dataset_info(recipe, info)
    hub_dataset = hub_dataset_id(dataset)
    dataset_name = str(dataset.get("name") or hub_dataset or "skin lesion images")
    labels = list(configs[0]["label_names"])
    # No library: the Hub would offer a timm snippet that cannot load an ensemble repo.
    card_data = model_card_data(
        repo_id, metrics, info, (license_id, license_name), (hub_dataset, dataset_name), ENSEMBLE_TAGS
    )
    archs = list(dict.fromkeys(c["architecture"] for c in configs))
    kind = f"`{archs[0]}` classifiers" if len(archs) == 1 else f"classifiers ({', '.join(f'`{a}`' for a in archs)})"
    title = (
        f"# {repo_id.split('/')[-1]}\n\nAn ensemble of {len(names)} {kind} of {len(labels)} skin-disease classes, "
        "trained with derm-accel. It averages the members' probabilities: its answer is the mean of their "
        "class probabilities."
    )
    sections = [
        title,
        _section_ensemble_details(repo_id, configs, names, license_name or license_id, info),
        _section_ensemble_members(named, configs),
        INTENDED_USE,
        section_training_data(dataset, info, labels),
        _section_ensemble_evaluation(metrics, report_files, rows),
        *filter(None, [subgroup_card_section(metrics, report_files)]),
        _section_ensemble_out_of_domain(names[0], first_dir, configs[0], metrics, report_files),
        LIMITATIONS,
        _section_ensemble_how_to_use(repo_id, names, labels),
        section_citation(repo_id, f"{len(names)}-member {' + '.join(archs)} ensemble"),
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")

