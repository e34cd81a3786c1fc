"""Out-of-domain inputs and abstention in the evaluation report.

Three scores are compared on the same images, each oriented so that higher means "less like the training
data": the model's domain guard (``ood_score``), softmax confidence (1 - max probability) and energy
(-logsumexp of the logits). For each out-of-domain set: AUROC against the evaluated in-domain split, the false
positive rate at 95% true positive rate (the share of out-of-domain images that pass when 95% of in-domain
images pass) and, for the guard, the share it flags at its own threshold. The risk-coverage curve of the
evaluated split (error among answered images vs share answered, answering the most confident first) and its
area (AURC, lower is better) describe selective prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from derm_accel.core.escape import md_text
from derm_accel.data.images import expand_inputs, read_image
from derm_accel.guard.scoring import Scored, operating_points, risk_coverage, score_batches, split_batches
from derm_accel.inference.predict import prepared_model
from derm_accel.models.build import data_config
from derm_accel.models.features import MAX_DIM
from derm_accel.models.tta import combine

SCORES = ("ood_score", "softmax_confidence", "energy")


def fpr_at_95_tpr(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Share of out-of-domain images scored at or below the level that lets 95% of in-domain images pass."""
    level = np.quantile(in_scores, 0.95)
    return float((out_scores <= level).mean())


def separation(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return {
        "auroc": float(roc_auc_score(y, np.r_[in_scores, out_scores])),
        "fpr_at_95_tpr": fpr_at_95_tpr(in_scores, out_scores),
    }


def _width(prepared: Any) -> int:
    return prepared.guard.max_dim if prepared.guard is not None else MAX_DIM


def _oriented(scored: Any, guard: Any) -> dict[str, np.ndarray]:
    out = {"softmax_confidence": 1.0 - scored.confidence, "energy": scored.energy}
    if guard is not None:
        out["ood_score"] = guard.score(scored.features).cpu().numpy()
    return out


def score_folder(
    prepared: Any, folder: str | Path, *, batch_size: int = 32, device: str = "cpu"
) -> tuple[Any, list[dict[str, str]]]:
    """Score every image file under ``folder`` as predict would read it; unreadable files are listed, not lost."""
    tensors, skipped = [], []
    for path, error in expand_inputs(str(folder)):
        if error is None:
            try:
                tensors.append(prepared.transform(read_image(path, prepared.min_size)))
                continue
            except Exception as e:  # a broken file is reported, never the end of the evaluation
                error = f"{type(e).__name__}: {e}"
        skipped.append({"path": path, "error": error})
    if not tensors:
        raise FileNotFoundError(f"--ood {folder}: no readable images ({len(skipped)} skipped)")
    batches = ((torch.stack(tensors[i : i + batch_size]), None) for i in range(0, len(tensors), batch_size))
    return score_batches(prepared.net, batches, device, _width(prepared), prepared.tta), skipped


def score_ood_source(
    prepared: Any, source: str | Path, *, batch_size: int = 32, device: str = "cpu"
) -> tuple[Any, list[dict]]:
    """A folder of images, or a converted dataset (all its splits), scored by the model."""
    source = Path(source)
    if (source / "dataset_dict.json").is_file():
        from datasets import concatenate_datasets, load_from_disk

        dataset = load_from_disk(str(source))
        pooled = concatenate_datasets([dataset[s] for s in sorted(dataset)])
        cfg = data_config(prepared.net)
        batches = split_batches(pooled, cfg, batch_size=batch_size)
        return score_batches(prepared.net, batches, device, _width(prepared), prepared.tta), []
    if not source.is_dir():
        raise FileNotFoundError(f"--ood {source} is neither a folder of images nor a converted dataset")
    return score_folder(prepared, source, batch_size=batch_size, device=device)


def in_domain_scores(logits: torch.Tensor, labels: torch.Tensor, features: list[torch.Tensor] | None) -> Scored:
    """The evaluated split as the out-of-domain section scores it, from evaluate's one pass: the answer logits
    (softmax averaged over the TTA views of ``logits`` (N, V, C), as predict answers) and the guard's features."""
    return Scored(combine(logits), features or [], labels)


def evaluate_ood(
    models: list[str],
    in_dom: Scored,
    ood_sources: list[str],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    tta: str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The report block for out-of-domain sets, and the in-domain confidence/correctness for the plot.

    ``in_dom`` is the evaluated split scored by the model (:func:`in_domain_scores`, labels in the model's
    indices); each ``--ood`` set is scored by ``models`` (one model, or an ensemble's members: the ensemble's
    answers, with its first member's guard) with ``tta`` ("flip" or "none"), as predict answers.
    """
    prepared = prepared_model(models, device, tta=tta)
    guard = prepared.guard
    in_scores = _oriented(in_dom, guard)
    correct = (in_dom.logits.argmax(-1) == in_dom.labels).numpy()
    curve = risk_coverage(in_dom.confidence, correct)
    block: dict[str, Any] = {
        "guard": None if guard is None else {
            "threshold": guard.threshold,
            "confidence_threshold": guard.confidence_threshold,
            "in_domain_flagged": float((in_scores["ood_score"] > guard.threshold).mean()),
        },
        "in_domain_images": len(correct),
        "aurc": curve["aurc"],
        "operating_points": operating_points(in_dom.confidence, correct),
        "sets": [],
    }
    if guard is not None and guard.confidence_threshold is not None:
        answered = (in_scores["ood_score"] <= guard.threshold) & (in_dom.confidence >= guard.confidence_threshold)
        block["guard"]["answered"] = float(answered.mean())
        block["guard"]["error_among_answered"] = (
            float(1 - correct[answered].mean()) if answered.any() else None
        )
    for source in ood_sources:
        scored, skipped = score_ood_source(prepared, source, batch_size=batch_size, device=device)
        out_scores = _oriented(scored, guard)
        entry: dict[str, Any] = {"source": Path(source).name, "images": len(scored.logits), "skipped": skipped}
        entry["scores"] = {name: separation(in_scores[name], out_scores[name]) for name in SCORES if name in out_scores}
        if guard is not None:
            entry["guard_flagged"] = float((out_scores["ood_score"] > guard.threshold).mean())
        block["sets"].append(entry)
    return block, {"confidence": in_dom.confidence, "correct": correct}


def render_ood_section(block: dict[str, Any], risk_png: str | None = None) -> list[str]:
    """Markdown lines of the section "Out-of-domain inputs and abstention" (report.md and the model card)."""
    lines = ["## Out-of-domain inputs and abstention", ""]
    guard = block.get("guard")
    if guard is None:
        lines += ["This model has no domain guard: it answers every image with one of its classes. Fit one with "
                  "`derm-accel guard MODEL --data DATA`.", ""]
    else:
        lines += [
            f"The domain guard flags an image as out of domain when its `ood_score` exceeds {guard['threshold']:.2f}; "
            f"it flagged {guard['in_domain_flagged']:.1%} of the {block['in_domain_images']} in-domain images "
            "evaluated here.",
        ]
        if guard.get("confidence_threshold") is not None:
            err = guard.get("error_among_answered")
            err_text = "n/a" if err is None else f"{err:.1%}"
            lines += [
                f"The model abstains when its top-1 probability is under {guard['confidence_threshold']:.3f}: with "
                f"both rules it answered {guard['answered']:.1%} of these images, with an error of {err_text} "
                "among those answered.",
            ]
        lines.append("")
    lines += [f"Risk-coverage: AURC {block['aurc']:.3f} (mean error over all coverage levels; lower is better; "
              "tied confidences count their mean error)."]
    points = block.get("operating_points") or []
    if points:
        lines += [
            "",
            "| operating point | answered | error among answered | answers when top-1 probability >= |",
            "|---|---:|---:|---:|",
        ]
        for p in points:
            name = "answer every image" if p["coverage"] >= 1 else f"the {p['coverage']:.0%} most confident"
            lines.append(f"| {name} | {p['coverage']:.1%} | {p['risk']:.1%} | {p['confidence_threshold']:.3f} |")
        if guard is not None and guard.get("answered") is not None:
            err = guard.get("error_among_answered")
            lines.append(
                f"| the model's rule (guard + abstention threshold) | {guard['answered']:.1%} | "
                f"{'n/a' if err is None else f'{err:.1%}'} | {guard['confidence_threshold']:.3f} |"
            )
    if risk_png:
        lines += ["", f"![risk-coverage]({risk_png})"]
    lines.append("")
    if block["sets"]:
        lines += [
            "Separation of each out-of-domain set from the in-domain images (AUROC: 1 is perfect, 0.5 is chance; "
            "FPR@95%TPR: share of out-of-domain images that pass when 95% of in-domain images pass, lower is better).",
            "",
            "| out-of-domain set | images | guard flags | guard AUROC | guard FPR@95 | confidence AUROC "
            "| confidence FPR@95 | energy AUROC | energy FPR@95 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in block["sets"]:
            sc = s["scores"]
            cells = []
            for name in SCORES:
                v = sc.get(name)
                cells += ["n/a", "n/a"] if v is None else [f"{v['auroc']:.3f}", f"{v['fpr_at_95_tpr']:.3f}"]
            flagged = "n/a" if s.get("guard_flagged") is None else f"{s['guard_flagged']:.1%}"
            lines.append(f"| {md_text(s['source'])} | {s['images']} | {flagged} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
