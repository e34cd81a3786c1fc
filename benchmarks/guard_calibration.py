"""Does the domain guard's threshold hold on new images of the same collection, and does the model answer?

1. Splits derm-sample (class folders) per class, seeded, into a part the model is trained on and a held-out
   third the model and its guard never see (copies under ``--workdir``; the shared data stays read-only).
2. Converts the first part (train / validation / test; images stored at ``--max-size`` px on the shorter side,
   never upscaled) and trains on it with the quickstart's recipe (tf_efficientnet_lite0 from local ImageNet
   weights); train fits the guard when it ends (thresholds from the validation split).
3. Scores, with the model's own preprocessing and TTA: its test split, the held-out third ("new images of the
   same collection", once as convert would store them and once as files, the way predict reads them), a
   clinical-photo proxy made from the held-out lesions (each lesion shrunk onto a
   skin-coloured frame with uneven light, as a phone photo of a body site looks: no real smartphone set is
   available here), scikit-image's everyday photos, and HAM10000 dermoscopy (another collection).
4. For each: the share the guard flags and the share the model answers by default (in domain and confident),
   with the error among those answered; beside them the rules of the previous guard (threshold at the 95%
   quantile of cross-fitted training + validation scores; abstention at 10% validation error), recomputed on
   the same model so the two can be compared.

    python benchmarks/guard_calibration.py --workdir /tmp/guardcal --epochs 4               # stored at 320 px
    python benchmarks/guard_calibration.py --workdir /tmp/guardcal --epochs 4 --max-size 160  # as the quickstart
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as `python benchmarks/guard_calibration.py`: import benchmarks.* from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, markdown_table, now_iso

SHARED = Path("/work/shared")
SUFFIXES = {".jpg", ".jpeg", ".png"}


def split_folders(src: Path, fit: Path, held: Path, held_share: float, seed: int) -> dict[str, int]:
    """Copy each class folder's files into ``fit`` and ``held`` (``held_share`` of each class, seeded)."""
    rng = np.random.default_rng(seed)
    counts = {"fit": 0, "held_out": 0}
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in cls.iterdir() if p.suffix.lower() in SUFFIXES)
        order = rng.permutation(len(files))
        n_held = round(held_share * len(files))
        for rank, i in enumerate(order):
            part, key = (held, "held_out") if rank < n_held else (fit, "fit")
            (part / cls.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[i], part / cls.name / files[i].name)
            counts[key] += 1
    return counts


def clinical_proxy(held: Path, out: Path, seed: int, limit: int = 120) -> int:
    """Phone-photo-like images: a held-out lesion at ~1/3 of the frame on skin tone with a light gradient."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    files = sorted(p for p in held.rglob("*") if p.suffix.lower() in SUFFIXES)
    files = [files[i] for i in rng.permutation(len(files))[:limit]]
    out.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(files):
        lesion = Image.open(path).convert("RGB")
        side = 360
        tone = np.array([rng.uniform(170, 235), rng.uniform(120, 180), rng.uniform(95, 150)])
        yy, xx = np.mgrid[0:side, 0:side] / side
        light = 0.75 + 0.35 * (np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy)
        canvas = np.clip(tone[None, None, :] * light[..., None] + rng.normal(0, 4, (side, side, 3)), 0, 255)
        frame = Image.fromarray(canvas.astype(np.uint8))
        small = lesion.resize((side // 3, side // 3))
        mask = Image.new("L", small.size, 0)
        mask.paste(255, (8, 8, small.size[0] - 8, small.size[1] - 8))
        frame.paste(small, (int(rng.uniform(0.2, 0.5) * side),) * 2, mask.filter(ImageFilter.GaussianBlur(6)))
        frame.save(out / f"clinical_{k:03d}.jpg", quality=70)
    return len(files)


def _labelled_folder(folder: Path, labels: list[str]) -> tuple[list[str], np.ndarray]:
    paths, y = [], []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(p for p in cls.iterdir() if p.suffix.lower() in SUFFIXES):
            paths.append(str(f))
            y.append(labels.index(cls.name))
    return paths, np.array(y)


def _score_paths(prepared: Any, paths: list[str], batch_size: int = 32, stored_at: int | None = None) -> Any:
    """Files scored as predict reads them, or (``stored_at``) as convert would have stored them first."""
    import torch

    from derm_accel.data.images import read_image
    from derm_accel.guard.scoring import score_batches

    def load(path: str) -> Any:
        return read_image(path, prepared.min_size) if stored_at is None else as_stored(path, stored_at)

    def batches():
        for i in range(0, len(paths), batch_size):
            chunk = [prepared.transform(load(p)) for p in paths[i : i + batch_size]]
            yield torch.stack(chunk), None

    return score_batches(prepared.net, batches(), "cpu", prepared.guard.max_dim, prepared.tta,
                         guard=prepared.guard)


def _row(name: str, scored: Any, y: np.ndarray | None, rules: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Flagged and answered shares (and error among answered, with labels) under each rule."""
    scores = scored.ood_scores.numpy()
    conf = scored.confidence
    row: dict[str, Any] = {"images": len(scores)}
    for rule, (threshold, floor) in rules.items():
        in_domain = scores <= threshold
        answered = in_domain & (conf >= floor)
        entry = {"flagged": float((~in_domain).mean()), "answered": float(answered.mean())}
        if y is not None:
            right = scored.logits.argmax(-1).numpy() == y
            entry["error_among_answered"] = float(1 - right[answered].mean()) if answered.any() else None
            entry["error_all"] = float(1 - right.mean())
        row[rule] = entry
    return {"set": name, **row}


def previous_rules(best: Path, data: Path) -> tuple[float, float]:
    """The previous guard's thresholds on this model: the 95% quantile of cross-fitted training + validation
    scores, and the lowest confidence keeping validation error at or under 10%."""
    from datasets import load_from_disk

    from derm_accel.guard.fit import fit_guard, selective_threshold
    from derm_accel.guard.scoring import score_batches, split_batches
    from derm_accel.inference.predict import prepared_model
    from derm_accel.models.build import data_config

    prepared = prepared_model(str(best), "cpu")
    dataset = load_from_disk(str(data))
    cfg = data_config(prepared.net)
    train = score_batches(prepared.net, split_batches(dataset["train"], cfg, batch_size=32), "cpu")
    val = score_batches(prepared.net, split_batches(dataset["validation"], cfg, batch_size=32), "cpu",
                        tta=prepared.tta)
    _, diag = fit_guard(train, val)
    pooled = np.concatenate([diag["cross_fitted_train_scores"], diag["validation_ood_scores"]])
    correct = val.logits.argmax(-1).numpy() == val.labels.numpy()
    floor = selective_threshold(val.confidence, correct, target_error=0.10)["confidence_threshold"]
    return float(np.quantile(pooled, 0.95)), floor


def train_like_quickstart(src: Path, workdir: Path, epochs: int, max_size: int) -> Path:
    """convert (images stored at ``max_size`` px on the shorter side, never upscaled) and train with the
    quickstart's recipe for tf_efficientnet_lite0 from local weights; train fits the guard when it ends."""
    import yaml

    from derm_accel.data.convert import convert_folders
    from derm_accel.quickstart import _recipe
    from derm_accel.training.train import train

    workdir.mkdir(parents=True, exist_ok=True)
    convert_folders(src, workdir / "data", overwrite=True, seed=0, max_size=max_size, progress=False)
    recipe = _recipe(workdir / "data", workdir / "run", "tf_efficientnet_lite0",
                     SHARED / "weights" / "efficientnet_lite0.in1k", epochs, "other")
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return Path(train(workdir / "recipe.yaml"))


def as_stored(path: str, max_size: int, quality: int = 95) -> Any:
    """A file as convert stores it (shorter side capped at ``max_size``, bicubic, JPEG ``quality``)."""
    import io

    from PIL import Image

    from derm_accel.data.decode import target_size

    image = Image.open(path).convert("RGB")
    size = target_size(image.width, image.height, max_size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def run(workdir: Path, epochs: int, seed: int, held_share: float, ham_images: int, max_size: int) -> dict[str, Any]:
    from datasets import load_from_disk

    from derm_accel.guard.scoring import split_batches
    from derm_accel.inference.predict import prepared_model
    from derm_accel.models.build import data_config

    fit, held, qs = workdir / "fit", workdir / "held_out", workdir / f"run_max{max_size}"
    if not fit.is_dir():
        split_folders(SHARED / "data" / "derm-sample", fit, held, held_share, seed)
    if not (qs / "run" / "best" / "domain_guard.safetensors").is_file():
        train_like_quickstart(fit, qs, epochs, max_size)
    best = qs / "run" / "best"
    prepared = prepared_model(str(best), "cpu")
    guard = prepared.guard
    rules = {"new": (guard.threshold, guard.confidence_threshold), "previous": previous_rules(best, qs / "data")}

    rows = []
    test = load_from_disk(str(qs / "data"))["test"]
    from derm_accel.guard.scoring import score_batches

    scored = score_batches(prepared.net, split_batches(test, data_config(prepared.net), batch_size=32), "cpu",
                           guard.max_dim, prepared.tta, guard=guard)
    rows.append(_row("test split (in domain)", scored, scored.labels.numpy(), rules))
    paths, y = _labelled_folder(held, prepared.labels)
    rows.append(_row("held-out derm-sample, stored as convert stores it", _score_paths(prepared, paths,
                     stored_at=max_size), y, rules))
    rows.append(_row("held-out derm-sample, files as predict reads them", _score_paths(prepared, paths), y, rules))
    clinical = workdir / "clinical_proxy"
    if not clinical.is_dir():
        clinical_proxy(held, clinical, seed)
    rows.append(_row("clinical-photo proxy", _score_paths(prepared, sorted(map(str, clinical.iterdir()))), None,
                     rules))
    import skimage

    photos = sorted(str(p) for p in (Path(skimage.__file__).parent / "data").iterdir() if p.suffix in (".png", ".jpg"))
    rows.append(_row("scikit-image everyday photos", _score_paths(prepared, photos), None, rules))
    ham = sorted((SHARED / "data" / "ham10000-dev" / "images").glob("*.jpg"))
    ham = [str(ham[i]) for i in np.sort(np.random.default_rng(seed).permutation(len(ham))[:ham_images])]
    rows.append(_row("HAM10000 dermoscopy (other collection)", _score_paths(prepared, ham), None, rules))
    config = json.loads((best / "config.json").read_text())["derm_accel"]
    settings = {"workdir": str(workdir), "epochs": epochs, "seed": seed, "held_share": held_share,
                "ham_images": ham_images, "max_size": max_size}
    return {"created": now_iso(), "machine": machine_info(), "settings": settings, "rules": rules, "rows": rows,
            "guard_config": config}


def markdown(results: dict[str, Any]) -> str:
    body = []
    for r in results["rows"]:
        cells = [r["set"], r["images"]]
        for rule in ("new", "previous"):
            e = r[rule]
            err = e.get("error_among_answered")
            cells += [f"{e['flagged']:.1%}", f"{e['answered']:.1%}", "" if err is None else f"{err:.1%}"]
        body.append(cells)
    return markdown_table(
        ["images", "n", "flagged", "answered", "error among answered", "flagged (previous)", "answered (previous)",
         "error among answered (previous)"], body)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/guardcal"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-share", type=float, default=1 / 3)
    parser.add_argument("--ham-images", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=320, help="convert's --max-size (the quickstart uses 160)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/guard_calibration.json"))
    args = parser.parse_args()
    results = run(args.workdir, args.epochs, args.seed, args.held_share, args.ham_images, args.max_size)
    results["command"] = "python " + " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results["guard_config"], indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
