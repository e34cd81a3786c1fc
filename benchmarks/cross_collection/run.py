"""python run.py PROTOCOL CANDIDATE FOLD: one run of the cross-collection study, cached in $XC_WORK/res.

d2h: train on a derm-sample fold (derm_accel.data.folds, 5 folds, seed 0), score its held-out fold and
ham10000-dev (every bcc/bkl/akiec/df image, 300 melanomas, 300 nevi). h2d: train on 1,000 images of a
lesion-grouped ham10000-dev fold (StratifiedGroupKFold by lesion_id), score its held-out fold and derm-sample's
six shared classes. himg: h2d with an image-level split (StratifiedKFold), scored on the held-out fold only.
"""

import json
import sys
import time

import harness as xc
import numpy as np
import torch

CANDS = {
    "base": {},
    "sog": {"sog": 6},
    "jitter": {"jitter": (0.4, 0.4, 0.4, 0.1)},
    "sog_jitter": {"sog": 6, "jitter": (0.4, 0.4, 0.4, 0.1)},
    "sog_mild_jitter": {"sog": 6, "jitter": (0.2, 0.2, 0.1, 0.02)},  # casts SoG leaves, not a new device
    "squash": {"train_aspect": "squash", "eval_aspect": "squash"},
    "gray": {"gray": True},  # diagnostic: no colour at all, train and test  # h2d only: HAM squashed to square
}
RES = xc.WORK / "res"
RES.mkdir(exist_ok=True)


def prep(imgs, cfg):
    if cfg.get("gray"):
        return [
            (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1))
            .sum(0)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            .expand(3, -1, -1)
            .contiguous()
            for x in imgs
        ]
    if cfg.get("sog"):
        return [xc.shades_of_gray(x, cfg["sog"]) for x in imgs]
    return imgs


def ham_subset(dx, seed=0):
    rng = np.random.default_rng(seed)
    # every bcc/bkl/akiec/df image, 300 melanomas and 300 nevi (recall per class is unbiased by the sampling)
    keep = [np.flatnonzero(~np.isin(dx, ["nv", "mel"]))]
    keep += [rng.choice(np.flatnonzero(dx == c), 300, replace=False) for c in ("nv", "mel")]
    return np.sort(np.concatenate(keep))


def d2h(name, fold):
    cfg = {"size": 128, "epochs": 4, **CANDS[name]}
    derm = xc.load_derm()
    f = xc.derm_folds()[fold - 1]
    ham_imgs, dx, _ = xc.load_ham()
    sub = ham_subset(dx)
    hx = prep([ham_imgs[i] for i in sub], cfg)
    hy = np.array([xc.DERM_CLASSES.index(xc.HAM_TO_DERM[d]) for d in dx[sub]])
    four = np.isin(dx[sub], xc.SHARED4)

    def split(s):
        paths = f[s]
        return prep([derm[p][0] for p in paths], cfg), np.array([derm[p][1] for p in paths]), paths

    trx, try_, _ = split("train")
    vax, vay, _ = split("validation")
    tex, tey, tep = split("test")
    t = time.time()
    model, states, info = xc.train_run(trx, try_, vax, vay, 9, cfg, seed=fold)
    info["train_s"] = round(time.time() - t, 1)
    out = {
        "protocol": "d2h",
        "candidate": name,
        "fold": fold,
        "cfg": {k: v for k, v in cfg.items()},
        **info,
        "n_train": len(trx),
        "within": {},
        "cross4": {},
        "cross6": {},
    }
    for w in ("best", "last", "ema"):
        model.load_state_dict(states[w])
        for tta in (False, True):
            key = f"{w}{'+tta' if tta else ''}"
            p = xc.logits_of(model, tex, 128, tta=tta).argmax(-1).numpy()
            out["within"][key] = xc.metrics(tey, p, xc.DERM_CLASSES)
            if tta and w != "best":
                continue  # weight choice is compared on the single view; only best answers with TTA
            modes = ("crop", "squash") if (w == "best" and tta) else ("crop",)
            for mode in modes:
                prob = xc.logits_of(model, hx, 128, mode=mode, tta=tta)
                p = prob.argmax(-1).numpy()
                k2 = key + ("" if mode == "crop" else f"@{mode}")
                out["cross4"][k2] = xc.metrics(hy[four], p[four], xc.DERM_CLASSES)
                out["cross6"][k2] = xc.metrics(hy, p, xc.DERM_CLASSES)
                if key == "best+tta" and mode == "crop":
                    out["ham_pred_counts_nv"] = np.bincount(p[dx[sub] == "nv"], minlength=9).tolist()
                    # restricted to the classes HAM can contain (the label map's six)
                    allowed = sorted({xc.DERM_CLASSES.index(v) for v in xc.HAM_TO_DERM.values()})
                    pr = np.array(allowed)[prob[:, allowed].argmax(-1).numpy()]
                    out["cross4"]["best+tta@restricted6"] = xc.metrics(hy[four], pr[four], xc.DERM_CLASSES)
                    out["cross6"]["best+tta@restricted6"] = xc.metrics(hy, pr, xc.DERM_CLASSES)
        if w == "best":
            model.load_state_dict(states["best"])
            p = xc.logits_of(model, tex, 128, tta=True).argmax(-1).numpy()
            out["within_test_preds"] = [[path, int(y), int(q)] for path, y, q in zip(tep, tey, p, strict=False)]
    return out


def h2d(name, fold, grouped=True):
    cfg = {"size": 128, "epochs": 2, **CANDS[name]}
    ham_imgs, dx, lesion = xc.load_ham()
    f = xc.ham_folds(dx, lesion, grouped=grouped)[fold - 1]
    rng = np.random.default_rng(fold)  # the same 1,000 training images for every candidate of this fold
    f["train"] = np.sort(rng.choice(f["train"], 1000, replace=False))
    ham_imgs = prep(ham_imgs, cfg)
    y = np.array([xc.HAM_CLASSES.index(d) for d in dx])
    derm = xc.load_derm()
    inv = {v: k for k, v in xc.HAM_TO_DERM.items()}
    dpaths = [p for p, (_, lab) in derm.items() if xc.DERM_CLASSES[lab] in inv]
    dxs = prep([derm[p][0] for p in dpaths], cfg)
    dys = np.array([xc.HAM_CLASSES.index(inv[xc.DERM_CLASSES[derm[p][1]]]) for p in dpaths])
    four = np.isin(np.array(xc.HAM_CLASSES)[dys], xc.SHARED4)
    t = time.time()
    model, states, info = xc.train_run(
        [ham_imgs[i] for i in f["train"]],
        y[f["train"]],
        [ham_imgs[i] for i in f["validation"]],
        y[f["validation"]],
        6,
        cfg,
        seed=fold,
    )
    info["train_s"] = round(time.time() - t, 1)
    out = {
        "protocol": "h2d" if grouped else "himg",
        "candidate": name,
        "fold": fold,
        "cfg": cfg,
        **info,
        "n_train": len(f["train"]),
        "within": {},
        "cross4": {},
        "cross6": {},
    }
    tex = [ham_imgs[i] for i in f["test"]]
    mode = cfg.get("eval_aspect", "crop")
    for w in ("best", "last", "ema"):
        model.load_state_dict(states[w])
        for tta in (False, True):
            key = f"{w}{'+tta' if tta else ''}"
            p = xc.logits_of(model, tex, 128, mode=mode, tta=tta).argmax(-1).numpy()
            out["within"][key] = xc.metrics(y[f["test"]], p, xc.HAM_CLASSES)
            if grouped and (w == "best" or not tta):
                p = xc.logits_of(model, dxs, 128, tta=tta).argmax(-1).numpy()
                out["cross4"][key] = xc.metrics(dys[four], p[four], xc.HAM_CLASSES)
                out["cross6"][key] = xc.metrics(dys, p, xc.HAM_CLASSES)
    return out


if __name__ == "__main__":
    proto, name, fold = sys.argv[1], sys.argv[2], int(sys.argv[3])
    path = RES / f"{proto}-{name}-{fold}.json"
    if path.exists():
        print("cached", path)
        sys.exit(0)
    t = time.time()
    out = d2h(name, fold) if proto == "d2h" else h2d(name, fold, grouped=(proto == "h2d"))
    out["seconds"] = round(time.time() - t, 1)
    path.write_text(json.dumps(out, indent=1))
    print(path, out["seconds"], json.dumps({k: out[k].get("best+tta") for k in ("within", "cross4", "cross6")}))
