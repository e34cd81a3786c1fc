"""Cross-collection study (docs/recipes.md, "Across collections"): derm-sample <-> ham10000-dev, lite0 at 128 px.

A plain in-memory loop with the quickstart's recipe (AdamW 1e-3, weight decay 0.01, cosine after a 0.3-epoch
warmup, label smoothing 0.1, dropout 0.1, RandomResizedCrop 0.5-1 + both flips, batch 32), so that every
candidate of the study runs on a shared 2-core CPU in 2-5 minutes and differs from the others only in what it
names. Its Shades of Gray is a copy of derm_accel.data.color.shades_of_gray on the 0-255 scale (the same gains).

    derm-accel convert ../shared/data/derm-sample $XC_WORK/derm160 --max-size 160 --seed 0
    python benchmarks/cross_collection/run.py d2h base 1      # protocol, candidate, fold
    python benchmarks/cross_collection/table.py               # the tables of docs/recipes.md
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn
from PIL import Image
from sklearn.metrics import f1_score, recall_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout
from derm_accel.data.transforms import RandomResizedCropFlip

torch.set_num_threads(2)
WORK = Path(os.environ.get("XC_WORK", "/tmp/r26"))  # derm160 (convert --max-size 160 --seed 0), dfolds, res
HAM = Path("/work/shared/data/ham10000-dev")
WEIGHTS = Path("/work/shared/weights/efficientnet_lite0.in1k/model.safetensors")
DERM_CLASSES = [
    "actinic_keratosis",
    "basal_cell_carcinoma",
    "dermatofibroma",
    "melanoma",
    "nevus",
    "pigmented_benign_keratosis",
    "seborrheic_keratosis",
    "squamous_cell_carcinoma",
    "vascular_lesion",
]
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv"]
# HAM dx -> derm-sample class (same diagnosis; bkl/akiec by provenance: derm-sample's pbk and ak are HAM ids)
HAM_TO_DERM = {
    "nv": "nevus",
    "mel": "melanoma",
    "bcc": "basal_cell_carcinoma",
    "df": "dermatofibroma",
    "bkl": "pigmented_benign_keratosis",
    "akiec": "actinic_keratosis",
}
SHARED4 = ("nv", "mel", "bcc", "df")


def ham_origin(path: str) -> bool:
    i = int(path.split("ISIC_")[1][:7])
    return 24306 <= i <= 34320


# ------------------------------------------------------------------------------------------- data
def load_derm():
    from datasets import load_from_disk

    d = load_from_disk(str(WORK / "derm160"))
    rows = {}
    for split in d:
        ds = d[split].cast_column("image", __import__("datasets").Image(decode=False))
        for r in ds:
            im = Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")
            rows[r["source_path"]] = (torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous(), r["label"])
    return rows


def derm_folds():
    from derm_accel.data.folds import make_fold_datasets
    from derm_accel.data.selection import load_converted

    dirs = make_fold_datasets(WORK / "derm160", WORK / "dfolds", 5, seed=0)
    out = []
    for d in dirs:
        ds = load_converted(d)
        out.append({s: list(ds[s]["source_path"]) for s in ("train", "validation", "test")})
    return out


def load_ham():
    with open(HAM / "HAM10000_metadata.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    imgs, dx, lesion = [], [], []
    for r in meta:
        im = Image.open(HAM / "images" / f"{r['image_id']}.jpg").convert("RGB")
        imgs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous())
        dx.append(r["dx"])
        lesion.append(r["lesion_id"])
    return imgs, np.array(dx), np.array(lesion)


def ham_folds(dx, lesion, grouped=True, k=5, seed=0):
    idx = np.arange(len(dx))
    if grouped:
        splits = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(idx, dx, lesion)
    else:
        splits = StratifiedKFold(k, shuffle=True, random_state=seed).split(idx, dx)
    out = []
    for tr, te in splits:
        # inner validation: a tenth of the training part, grouped the same way
        if grouped:
            itr, iva = next(StratifiedGroupKFold(10, shuffle=True, random_state=seed).split(tr, dx[tr], lesion[tr]))
        else:
            itr, iva = next(StratifiedKFold(10, shuffle=True, random_state=seed).split(tr, dx[tr]))
        out.append({"train": tr[itr], "validation": tr[iva], "test": te})
    return out


# ------------------------------------------------------------------------------------ preprocessing
def shades_of_gray(x: torch.Tensor, power: float = 6.0) -> torch.Tensor:
    """uint8 (N,)3,H,W -> uint8: each channel scaled so the image's Minkowski p-norm illuminant is gray."""
    f = x.float()
    dims = (-2, -1)
    illum = f.pow(power).mean(dim=dims, keepdim=True).pow(1.0 / power)  # (...,3,1,1)
    illum = illum / illum.pow(2).sum(dim=-3, keepdim=True).sqrt().clamp_min(1e-6)
    gain = 1.0 / (illum * math.sqrt(3.0))
    return (f * gain).clamp_(0, 255).round_().to(torch.uint8)


def aspect(x: torch.Tensor, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    if mode == "crop" or h == w:
        return x
    s = min(h, w) if mode == "squash" else max(h, w)
    if mode == "squash":
        return F.resize(x, [s, s], antialias=True)
    if mode == "pad":
        ph, pw = s - h, s - w
        return Fn.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0)
    raise ValueError(mode)


def eval_batch(xs, size, mode="crop"):
    resize = math.floor(size / 0.875)
    out = []
    for x in xs:
        x = aspect(x, mode)
        x = F.resize(x, [resize], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        out.append(F.center_crop(x, [size, size]))
    return torch.stack(out)


def normalize(b):
    return (b.float() / 255 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------ model
def make_model(num_classes):
    import timm

    return timm.create_model(
        "tf_efficientnet_lite0",
        pretrained=True,
        num_classes=num_classes,
        drop_rate=0.1,
        pretrained_cfg_overlay={"file": str(WEIGHTS)},
    )


_EVAL_CACHE = {}


@torch.no_grad()
def logits_of(model, xs, size, mode="crop", tta=True, bs=128):
    model.eval()
    out = []
    key = (id(xs), len(xs), size, mode)
    if key not in _EVAL_CACHE:
        _EVAL_CACHE[key] = eval_batch(xs, size, mode)  # inputs do not depend on the model: prepare once
    pre = _EVAL_CACHE[key]
    for i in range(0, len(xs), bs):
        b = normalize(pre[i : i + bs]).contiguous(memory_format=torch.channels_last)
        views = [b, b.flip(-1), b.flip(-2)] if tta else [b]
        out.append(torch.stack([model(v) for v in views]).softmax(-1).mean(0))
    return torch.cat(out)


def train_run(xs, ys, val_xs, val_ys, num_classes, cfg, seed):
    """Quickstart-like recipe: AdamW 1e-3 wd .01, cosine after .3-epoch warmup, LS .1, RRC .5-1 + flips."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = make_model(num_classes).to(memory_format=torch.channels_last)
    size, epochs, bs = cfg["size"], cfg["epochs"], 32
    interp = v2.InterpolationMode.BICUBIC
    rrc = RandomResizedCropFlip(
        (size, size), scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.5, interpolation=interp
    )
    jitter = None
    if cfg.get("jitter"):
        b, c, s, h = cfg["jitter"]
        jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
    steps_per_epoch = len(xs) // bs
    total = steps_per_epoch * epochs
    warm = max(1, int(0.3 * steps_per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))
    )
    ema = ModelEmaV3(model, decay=cfg.get("ema_decay", 0.9))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    ys_t = torch.as_tensor(ys)
    best, best_f1, best_epoch, history = None, -1.0, 0, []
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=g)
        for s in range(steps_per_epoch):
            ids = perm[s * bs : (s + 1) * bs]
            crops = []
            for i in ids.tolist():
                x = aspect(xs[i], cfg.get("train_aspect", "crop"))
                x = rrc(x)
                if jitter is not None:
                    x = jitter(x)
                crops.append(x)
            b = normalize(torch.stack(crops)).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(b), ys_t[ids])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            ema.update(model)
        p = logits_of(model, val_xs, size, cfg.get("eval_aspect", "crop"), tta=False).argmax(-1).numpy()
        f1 = f1_score(val_ys, p, average="macro", labels=sorted(set(val_ys)), zero_division=0)
        history.append(round(float(f1), 4))
        if f1 > best_f1:
            best_f1, best_epoch = f1, epoch + 1
            best = {k: v.clone() for k, v in model.state_dict().items()}
    last = {k: v.clone() for k, v in model.state_dict().items()}
    return (
        model,
        {"best": best, "last": last, "ema": ema.module.state_dict()},
        {"best_epoch": best_epoch, "val_f1": history},
    )


def metrics(y_true, y_pred, classes):
    """balanced accuracy and macro-F1 over the classes present in y_true (other predictions count as errors)."""
    present = sorted(set(y_true.tolist()))
    rec = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    f1 = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    return {
        "balanced_accuracy": float(np.mean(rec)),
        "macro_f1": float(f1),
        "accuracy": float(np.mean(y_true == y_pred)),
        "n": len(y_true),
        "recall": {classes[c]: round(float(r), 3) for c, r in zip(present, rec, strict=False)},
    }
