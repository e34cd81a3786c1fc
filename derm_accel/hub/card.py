"""The model card (README.md) published with a model: Hub metadata, model-index and the sections to read.

Built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``/``EvalResult`` so the YAML header is what the
Hub expects (library_name timm, model-index with the test metrics). The card is a pure function of the model
folder and the evaluation report: no timestamps, so pushing the same run twice uploads the same README.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from derm_accel.core.artifacts import METRIC_NAMES, METRICS, RECIPE, TRAINING_INFO, fmt, number
from derm_accel.core.errors import InputError
from derm_accel.core.escape import md_code, md_text
from derm_accel.core.fileio import read_optional_json, read_optional_yaml
from derm_accel.data.color import numpy_snippet
from derm_accel.evaluation.ood import render_ood_section
from derm_accel.evaluation.subgroups import model_card_section as subgroup_card_section
from derm_accel.models.build import declared_color_constancy
from derm_accel.models.tta import declared_tta

CARD_TAGS = ["dermatology", "medical", "timm", "image-classification", "derm-accel"]

# License ids the Hub knows (https://huggingface.co/docs/hub/repositories-licenses), the common ones.
HUB_LICENSES = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigcode-openrail-m",
    "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0",
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0",
    "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "afl-3.0",
    "artistic-2.0", "bsl-1.0", "ecl-2.0", "epl-1.0", "epl-2.0", "eupl-1.1", "mpl-2.0", "odc-by", "odbl",
    "pddl", "unlicense", "wtfpl", "zlib", "cdla-permissive-2.0", "cdla-sharing-1.0", "other",
}  # fmt: skip

# metrics.json key -> (Hub metric type, metric args) in the model-index; display names: artifacts.METRIC_NAMES.
_HUB_METRICS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "accuracy": ("accuracy", None),
    "balanced_accuracy": ("balanced_accuracy", None),
    "top3_accuracy": ("top_k_accuracy", {"k": 3}),
    "macro_f1": ("f1", {"average": "macro"}),
    "macro_precision": ("precision", {"average": "macro"}),
    "macro_recall": ("recall", {"average": "macro"}),
    "weighted_f1": ("f1", {"average": "weighted"}),
    "roc_auc_macro": ("roc_auc", {"average": "macro", "multi_class": "ovr"}),
    "ece": ("expected_calibration_error", None),
}
REQUIRED_CONFIG_KEYS = ("architecture", "num_classes", "num_features", "label_names", "pretrained_cfg")
REQUIRED_PRETRAINED_CFG_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std", "label_names")


class MissingLicenseError(InputError):
    """No license is known for the weights; the user has to state one."""


def check_timm_config(config: Mapping[str, Any], where: Path) -> None:
    """Fail early if ``config.json`` would not let ``timm.create_model("hf-hub:...")`` rebuild the model."""
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    pcfg = config.get("pretrained_cfg") or {}
    missing += [f"pretrained_cfg.{k}" for k in REQUIRED_PRETRAINED_CFG_KEYS if k not in pcfg]
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(missing)}; it is not a timm config written by derm-accel. "
            f"Re-export the model with derm_accel.models.build.export_model (train does this for RUN/best)."
        )
    labels = config["label_names"]
    if len(labels) != config["num_classes"] or list(pcfg["label_names"]) != list(labels):
        raise ValueError(
            f"{where}: label_names ({len(labels)}) disagree with num_classes ({config['num_classes']}) or "
            f"with pretrained_cfg.label_names. Re-export the model with export_model."
        )


def run_dataset_info(recipe: Mapping[str, Any], training_info: Mapping[str, Any]) -> dict[str, Any]:
    """Whatever the run recorded about its dataset, as a dict (a string becomes ``{"name": ...}``)."""
    sources = (
        training_info.get("dataset"),
        training_info.get("dataset_path"),
        recipe.get("dataset"),
        recipe.get("data"),
    )
    for source in sources:
        if isinstance(source, Mapping):
            return dict(source)
        if isinstance(source, str) and source:
            return {"name": source}
    return {}


def resolve_license(explicit: str | None, recipe: Mapping[str, Any], training_info: Mapping[str, Any]) -> str:
    """The weights' license: ``--license``, else the recipe, training info or dataset. Never a default."""
    dataset = run_dataset_info(recipe, training_info)
    for value in (explicit, recipe.get("license"), training_info.get("license"), dataset.get("license")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise MissingLicenseError(
        "No license is known for these weights: neither recipe.yaml nor training_info.json nor the dataset "
        "records one. Pass --license (e.g. --license cc-by-nc-4.0), and choose one compatible with the "
        "license of the training images."
    )


def hub_dataset_id(dataset: Mapping[str, Any]) -> str | None:
    """A Hub dataset id if the run recorded one (``ORG/NAME``), never a local path."""
    for key in ("hub_id", "repo_id", "push_to_hub"):
        value = dataset.get(key)
        if isinstance(value, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            return value
    return None


def _evaluated_on(metrics: Mapping[str, Any], hub_dataset: str | None, training_name: str) -> tuple[str, str]:
    """The model-index dataset of the report: the training data's, or for an external validation
    (``--label-map``) the evaluated folder's own name."""
    if metrics.get("external_validation") and metrics.get("data"):
        return "imagefolder", Path(str(metrics["data"])).name
    return hub_dataset or "imagefolder", Path(training_name).name


def eval_results(metrics: Mapping[str, Any], dataset_type: str, dataset_name: str) -> list[EvalResult]:
    """The test metrics of ``metrics.json`` as model-index entries."""
    split = metrics.get("split") or "test"
    results = []
    for key, (metric_type, args) in _HUB_METRICS.items():
        value = number(metrics.get(key))
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=metric_type,
                metric_name=METRIC_NAMES[key],
                metric_value=round(value, 4),
                metric_args=args,
            )
        )
    return results


def provenance_lines(license_id: str, info: Mapping[str, Any], repo_id: str) -> list[str]:
    """License, pretrained weights, derm-accel version and repository lines of a card's model details."""
    lines = [
        f"- **License:** `{license_id}`",
        f"- **Pretrained weights:** {_base_weights_text(info)}",
        f"- **Trained with:** derm-accel {info.get('derm_accel_version', '')}".rstrip(),
        f"- **Repository:** `{repo_id}`",
    ]
    if license_id == "other":
        lines.append("- The license of the training images was not stated; check it before any use beyond research.")
    return lines


def _section_model_details(repo_id: str, config: Mapping[str, Any], license_id: str, info: Mapping[str, Any]) -> str:
    pcfg = config["pretrained_cfg"]
    size = pcfg["input_size"]
    lines = [
        "## Model details",
        "",
        f"- **Architecture:** `{config['architecture']}` ([timm](https://github.com/huggingface/pytorch-image-models))",
        f"- **Classes:** {config['num_classes']} ({', '.join(map(md_code, config['label_names']))})",
        f"- **Input:** RGB, {size[-1]}x{size[-2]} px, resize to {fmt(pcfg['crop_pct'], 3)} crop, "
        f"`{pcfg['interpolation']}` interpolation, mean {list(pcfg['mean'])}, std {list(pcfg['std'])}",
        "- **Weights:** `model.safetensors`; config in timm's format (`config.json`)",
        *provenance_lines(license_id, info, repo_id),
    ]
    return "\n".join(lines)


def _base_hub_id(base: Any) -> str | None:
    """The Hub id of the pretrained weights the model started from (the card's ``base_model``), if recorded."""
    hub_id = base.get("hub_id") if isinstance(base, Mapping) else None
    return hub_id if isinstance(hub_id, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id) else None


def _base_weights_text(info: Mapping[str, Any]) -> str:
    base = info.get("base_model")
    if not isinstance(base, Mapping) or not base:
        return "none (trained from scratch)" if "base_model" in info and base is None else "not recorded"
    hub_id = _base_hub_id(base)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    text = f"local folder `{base.get('name', '?')}`" + (f" (tag `{base['tag']}`)" if base.get("tag") else "")
    return text + (f", from {base['origin_url']}" if base.get("origin_url") else "")


INTENDED_USE = """## Intended use

- Research on automated classification of skin-lesion images, benchmarking, and teaching.
- A starting point for fine-tuning on a clinic's own, properly consented and labelled data.

### Out-of-scope use

- **This model is not a medical device and gives no diagnosis.** It has not been cleared or approved by any
  regulator, and it was not validated prospectively or in a clinical workflow.
- Do not use its output to decide on treatment, to rule out cancer, or to delay seeing a clinician. Anyone
  worried about a skin lesion should see a dermatologist.
- Images unlike the training data (other body sites, other cameras, non-skin images, children if not
  in the data) give confident-looking but meaningless outputs: the model always answers with one of its
  classes."""


def section_training_data(dataset: Mapping[str, Any], info: Mapping[str, Any], labels: list[str]) -> str:
    name = dataset.get("name") or dataset.get("path") or "the training image collection"
    if "/" in str(name) or "\\" in str(name):
        name = Path(str(name)).name  # a local folder: its name only, never the user's directory layout
    lines = ["## Training data", "", f"- **Dataset:** {md_text(name)}"]
    hub_id = hub_dataset_id(dataset)
    if hub_id:
        lines.append(f"- **On the Hub:** [{hub_id}](https://huggingface.co/datasets/{hub_id})")
    for key, label in (("license", "Dataset license"), ("num_images", "Images"), ("source", "Source")):
        if dataset.get(key):
            lines.append(f"- **{label}:** {md_text(dataset[key])}")
    splits = dataset.get("splits") or info.get("split_sizes")
    if isinstance(splits, Mapping):
        lines.append("- **Splits:** " + ", ".join(f"{md_text(k)}: {md_text(v)}" for k, v in splits.items()))
    lines.append(f"- **Classes:** {len(labels)}")
    lines += [
        "",
        "### How the split kept duplicates apart",
        "",
        "`derm-accel convert` hashes every image before splitting: exact copies (same pixels) and "
        "near-duplicates (perceptual hash within a small Hamming distance, e.g. the same lesion re-saved, "
        "resized or slightly cropped) are grouped, and a whole group goes to one split, so no test image has "
        "a copy in training or "
        "validation and the test metrics below are not inflated by leakage. Copies filed under different "
        "labels are dropped or resolved by majority (`--conflicts`); the dataset's `conversion_report.json` "
        "lists them.",
    ]
    return "\n".join(lines)


def _short(value: float) -> str:
    """Four significant digits for small numbers, one decimal for throughputs and times."""
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def _section_training(recipe: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    train = recipe.get("train") if isinstance(recipe.get("train"), Mapping) else {}
    optim = recipe.get("optim") if isinstance(recipe.get("optim"), Mapping) else {}

    first = info.get  # training_info.json, written by the train stage

    rows = [
        ("Epochs", first("epochs_run") or train.get("epochs")),
        ("Best epoch (by validation)", first("best_epoch")),
        ("Best validation macro F1", first("best_val_macro_f1")),
        ("Mixed precision", first("mixed_precision") or train.get("mixed_precision")),
        ("Hardware", first("device_name")),
        ("Processes", first("num_processes")),
        ("Distributed", first("distributed_type")),
        ("EMA of weights", first("ema")),
        ("Throughput (train images/s)", first("train_images_per_s")),
        ("Wall time (s)", first("wall_time_s")),
        ("Optimizer", optim.get("name")),
        ("Learning rate", optim.get("lr")),
        (
            "Batch size per process",
            (recipe.get("data") or {}).get("batch_size") if isinstance(recipe.get("data"), Mapping) else None,
        ),
    ]
    lines = ["## Training procedure", ""]
    known = [(k, v) for k, v in rows if v is not None]
    if known:
        lines += [
            "| Setting | Value |",
            "|---|---|",
            *[f"| {k} | {_short(v) if isinstance(v, float) else v} |" for k, v in known],
        ]
    else:
        lines.append("The run recorded no training details (training_info.json was not found).")
    if recipe:
        lines += [
            "",
            "The full recipe is in [`recipe.yaml`](recipe.yaml); reproduce with "
            "`derm-accel train --recipe recipe.yaml`.",
        ]
    return "\n".join(lines)


def section_evaluation(metrics: Mapping[str, Any], report_files: set[str]) -> str:
    if not metrics:
        return (
            "## Evaluation\n\nNo evaluation report was published with this model. Run "
            "`derm-accel evaluate` on a held-out split and push again with `--report` to add one."
        )
    split = metrics.get("split", "test")
    lines = [
        "## Evaluation",
        "",
        f"On the held-out **{split}** split ({fmt(metrics.get('num_samples'))} images); "
        "the full report is in "
        f"[`eval/`](eval/){' ([report](eval/report.md))' if 'report.md' in report_files else ''}.",
        "",
        "| Metric | Value |",
        "|---|---|",
    ]
    for key in _HUB_METRICS:
        if number(metrics.get(key)) is not None:
            value = fmt(metrics[key])
            ci = (metrics.get("ci95") or {}).get({"accuracy": "accuracy", "macro_f1": "macro_f1"}.get(key, ""), None)
            if isinstance(ci, (list, tuple)) and len(ci) == 2:
                value += f" (95% CI {fmt(ci[0])}-{fmt(ci[1])})"
            lines.append(f"| {METRIC_NAMES[key]} | {value} |")
    per_class = metrics.get("per_class") or {}
    if per_class:
        lines += [
            "",
            "### Per class",
            "",
            "| Class | Precision | Recall | F1 | ROC AUC | Support |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in per_class.items():
            lines.append(
                f"| {md_text(name)} | {fmt(m.get('precision'))} | {fmt(m.get('recall'))} | {fmt(m.get('f1'))} "
                f"| {fmt(m.get('roc_auc'))} | {fmt(m.get('support'))} |"
            )
    missing = metrics.get("classes_without_samples") or []
    if missing:
        lines += ["", f"Classes without test images (no metrics): {', '.join(map(md_text, missing))}."]
    if "confusion_matrix.png" in report_files:
        lines += ["", "### Confusion matrix", "", "![Confusion matrix](eval/confusion_matrix.png)"]
    lines += ["", "### Calibration", ""]
    if number(metrics.get("ece")) is not None:
        lines.append(
            f"Expected calibration error: **{fmt(metrics['ece'])}**; lower means the predicted "
            "probabilities match observed frequencies better."
        )
    calibration = metrics.get("calibration")
    if isinstance(calibration, Mapping):
        lines += ["", *_stage_lines(calibration, "uncalibrated", "calibrated")]
    if "reliability.png" in report_files:
        lines += ["", "![Reliability diagram](eval/reliability.png)"]
    if "roc_curves.png" in report_files:
        lines += ["", "![ROC curves](eval/roc_curves.png)"]
    tta = metrics.get("tta")
    if isinstance(tta, Mapping):
        lines += ["", "### Test-time augmentation", "", *_stage_lines(tta, "single view", "with TTA")]
    return "\n".join(lines)


def _stage_lines(stage: Mapping[str, Any], before_name: str, after_name: str) -> list[str]:
    """Settings of a post-processing stage (calibration, TTA) and its before/after metrics."""
    lines = [
        f"- {k.replace('_', ' ')}: {fmt(v) if not isinstance(v, (list, tuple)) else ', '.join(map(str, v))}"
        for k, v in stage.items()
        if not isinstance(v, Mapping)
    ]
    before, after = stage.get("before"), stage.get("after")
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        keys = [k for k in before if k in after and number(before[k]) is not None]
        if keys:
            lines += ["", f"| Metric | {before_name} | {after_name} |", "|---|---|---|"]
            lines += [f"| {k.replace('_', ' ')} | {fmt(before[k])} | {fmt(after[k])} |" for k in keys]
    return lines


def section_out_of_domain(config: Mapping[str, Any], metrics: Mapping[str, Any], report_files: set[str]) -> str:
    """What the model does with images unlike its training data: the guard, abstention and their figures."""
    block = metrics.get("out_of_domain")
    if isinstance(block, Mapping):
        figure = "eval/risk_coverage.png" if "risk_coverage.png" in report_files else None
        text = "\n".join(render_ood_section(dict(block), figure)).strip()
    else:
        guard = (config.get("derm_accel") or {}).get("domain_guard")
        if guard:
            text = (
                "## Out-of-domain inputs and abstention\n\n"
                f"This model ships a domain guard (`domain_guard.safetensors`): images whose `ood_score` exceeds "
                f"{fmt(guard.get('threshold'))} are flagged as unlike the training data "
                f"({fmt(guard.get('in_domain_share'))} of held-out in-domain images pass). No evaluation of it "
                "was published with this model."
            )
        else:
            text = (
                "## Out-of-domain inputs and abstention\n\n"
                "This model has no domain guard: it answers every image, including photos that are not skin "
                "lesions, with one of its classes."
            )
    return text + (
        "\n\nderm-accel's `predict`, `serve` and demo read the guard and say when an image should not be "
        "answered (`in_domain`, `abstain`, `reason`); plain timm ignores the guard file and always answers."
    )


LIMITATIONS = """## Limitations and bias

- **Skin-tone coverage is unknown.** Public dermatology collections are dominated by light skin (Fitzpatrick
  I-III); the training data did not record skin type, so performance on darker skin was not measured and is
  likely worse.
- **Dermoscopic and clinical photos differ.** Dermoscopy images (polarised, magnified, contact) and phone or
  clinical close-ups look very different; a model trained on one kind transfers poorly to the other.
- Labels come from the source collection; some are not histopathologically confirmed, and class balance
  differs from what any clinic sees, so predicted probabilities are not prevalence-calibrated.
- Rare classes have few test images: their per-class metrics have wide confidence intervals.
- Artefacts (rulers, ink marks, hair, vignetting) can be shortcuts the model relies on."""


_TTA_NOTE = """
This model answers with **flip test-time augmentation** (`config.json`: `derm_accel.tta: flip`): derm-accel's
predict, evaluate, serve and demo average the softmax over the image and its horizontal and vertical flips (`--tta
none` for the single view). The timm snippet below is the single view; to match derm-accel, average
`model(x).softmax(-1)`, `model(x.flip(-1)).softmax(-1)` and `model(x.flip(-2)).softmax(-1)`.
"""


def _color_note(color: dict | None) -> str:
    if not color:
        return ""
    return (
        f"\nThis model expects **{color['method'].replace('_', ' ').title()} colour constancy** (power "
        f"{color['power']:g}; `config.json`: `derm_accel.color_constancy`) on the whole image before timm's "
        "transform: derm-accel's predict, evaluate, serve, demo and ONNX export apply it; with timm alone, run "
        "the marked lines below (timm does not know this step).\n"
    )


def _section_how_to_use(repo_id: str, labels: list[str], tta: str | None = None, color: dict | None = None) -> str:
    color_lines = numpy_snippet(color, "image") if color else ""
    imports = "import numpy as np\n" if color else ""
    return f"""## How to use
{_TTA_NOTE if tta == "flip" else ""}{_color_note(color)}
With timm alone:

```python
{imports}import timm
import torch
from PIL import Image

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)
labels = model.pretrained_cfg["label_names"]

image = Image.open("lesion.jpg").convert("RGB")
{color_lines}with torch.no_grad():
    probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]
top = probs.topk(3)
print([(labels[i], round(p, 3)) for p, i in zip(top.values.tolist(), top.indices.tolist())])
```

With derm-accel (`pip install derm-accel`):

```python
from derm_accel import predict

print(predict("lesion.jpg", model="{repo_id}", top_k=3))  # files or folders
```

```bash
derm-accel predict lesion.jpg photos/ --model {repo_id} --top-k 3 --json
```

The labels are: {", ".join(map(md_code, labels))}."""


def section_citation(repo_id: str, arch: str) -> str:
    key = re.sub(r"[^A-Za-z0-9]+", "_", repo_id)
    return f"""## Citation

```bibtex
@misc{{{key},
  title        = {{{repo_id}: a {arch} skin-lesion image classifier}},
  howpublished = {{\\url{{https://huggingface.co/{repo_id}}}}},
  note         = {{Trained and evaluated with derm-accel}}
}}

@misc{{rw2019timm,
  author       = {{Ross Wightman}},
  title        = {{PyTorch Image Models}},
  year         = {{2019}},
  howpublished = {{\\url{{https://github.com/huggingface/pytorch-image-models}}}}
}}
```

Please also cite the dataset the model was trained on."""


def hub_license(license_id: str) -> tuple[str, str | None]:
    """A Hub license id, or ``("other", slug)`` for a license the Hub does not list."""
    if license_id in HUB_LICENSES:
        return license_id, None
    return "other", re.sub(r"[^a-z0-9.-]+", "-", license_id).strip("-") or "unknown"


def read_report(report_dir: str | Path | None) -> tuple[dict[str, Any], set[str]]:
    """An evaluation report's metrics.json and the names of its files (empty without a report)."""
    if report_dir is None:
        return {}, set()
    report_dir = Path(report_dir)
    files = {p.name for p in report_dir.iterdir() if p.is_file()} if report_dir.is_dir() else set()
    return read_optional_json(report_dir / METRICS), files


def model_card_data(
    repo_id: str,
    metrics: Mapping[str, Any],
    info: Mapping[str, Any],
    license_pair: tuple[str, str | None],
    data: tuple[str | None, str],
    tags: list[str],
    library: str | None = None,
) -> ModelCardData:
    """The card's YAML metadata: license, base model, tags, dataset, metric names and the model-index."""
    hub_dataset, dataset_name = data
    return ModelCardData(
        library_name=library,
        pipeline_tag="image-classification",
        license=license_pair[0],
        license_name=license_pair[1],
        base_model=_base_hub_id(info.get("base_model")),
        tags=tags,
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=sorted({m for k, (m, _) in _HUB_METRICS.items() if number(metrics.get(k)) is not None}) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(metrics, *_evaluated_on(metrics, hub_dataset, dataset_name)) or None,
    )


def build_model_card(
    model_dir: str | Path,
    repo_id: str,
    *,
    report_dir: str | Path | None = None,
    license: str | None = None,
) -> ModelCard:
    """The README.md for ``repo_id`` from a model folder (RUN/best) and an optional evaluation report."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; point at a model folder (RUN/best) written by train.")
    config = read_optional_json(config_path)
    check_timm_config(config, config_path)
    recipe = read_optional_yaml(model_dir / RECIPE)
    info = read_optional_json(model_dir / TRAINING_INFO)
    license_id = resolve_license(license, recipe, info).lower()
    license_id, license_name = hub_license(license_id)
    metrics, report_files = read_report(report_dir)

    dataset = run_dataset_info(recipe, info)
    hub_dataset = hub_dataset_id(dataset)
    dataset_name = str(dataset.get("name") or hub_dataset or "skin lesion images")
    labels = list(config["label_names"])
    card_data = model_card_data(
        repo_id, metrics, info, (license_id, license_name), (hub_dataset, dataset_name), CARD_TAGS, library="timm"
    )
    title = (
        f"# {repo_id.split('/')[-1]}\n\nA `{config['architecture']}` classifier of {len(labels)} "
        "skin-disease classes, trained with derm-accel."
    )
    sections = [
        title,
        _section_model_details(repo_id, config, license_name or license_id, info),
        INTENDED_USE,
        section_training_data(dataset, info, labels),
        _section_training(recipe, info),
        section_evaluation(metrics, report_files),
        *filter(None, [subgroup_card_section(metrics, report_files)]),
        section_out_of_domain(config, metrics, report_files),
        LIMITATIONS,
        _section_how_to_use(repo_id, labels, declared_tta(config), declared_color_constancy(config)),
        section_citation(repo_id, config["architecture"]),
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


