"""Markdown tables for docs/recipes.md from $XC_WORK/res/*.json (the cross-collection study)."""
# ruff: noqa: E501, B023, B007 (one table row per print)

import collections
import glob
import json
from pathlib import Path

import harness as xc
import numpy as np
from scipy import stats

R = collections.defaultdict(dict)
for f in sorted(glob.glob(str(xc.WORK / "res" / "*.json"))):
    if "old" in f:
        continue
    d = json.loads(Path(f).read_text())
    R[(d["protocol"], d["candidate"])][d["fold"]] = d
SH3 = {"d2h": ("nevus", "melanoma", "basal_cell_carcinoma"), "h2d": ("nv", "mel", "bcc")}


def ba3(m, proto):
    return float(np.mean([m["recall"][k] for k in SH3[proto]]))


def ms(v):
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def pdiff(a, b):
    d = np.array(a) - np.array(b)
    if len(d) < 2:
        return f"{d.mean():+.3f}"
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - h:+.3f}, {d.mean() + h:+.3f}]"


def get(proto, cand, sec, view, fn):
    name, _, only = cand.partition(":")  # "base:1,2": base on those folds only (to set beside a candidate)
    folds = R.get((proto, name), {})
    if only:
        folds = {k: v for k, v in folds.items() if str(k) in only.split(",")}
    return [fn(folds[k][sec][view]) for k in sorted(folds) if view in folds[k][sec]], sorted(folds)


for proto, title in (
    ("d2h", "derm-sample folds -> ham10000-dev"),
    ("h2d", "ham10000-dev lesion-grouped folds -> derm-sample"),
):
    print(f"\n#### {title}\n")
    print(
        "| candidate | view | folds | within: macro-F1 | Δ vs base | across: bal. acc. (3 classes) | Δ vs base | across: macro-F1 (3) | across: bal. acc. (4 classes) | across: bal. acc. (6) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cands = sorted({c for p, c in R if p == proto}, key=lambda c: (c != "base", c))
    base_folds = sorted(R.get((proto, "base"), {}))
    for c in list(cands):
        other = sorted(R[(proto, c)])
        if c != "base" and other != base_folds and f"base:{','.join(map(str, other))}" not in cands:
            cands.insert(1, f"base:{','.join(map(str, other))}")
    for c in cands:
        for view in ("best+tta", "best+tta@squash", "best+tta@restricted6", "best", "last", "ema"):
            w, folds = get(proto, c, "within", view, lambda m: m["macro_f1"])
            a3, _ = get(proto, c, "cross4", view, lambda m: ba3(m, proto))
            if not a3:
                continue
            f3 = []
            a4, _ = get(proto, c, "cross4", view, lambda m: m["balanced_accuracy"])
            a6, _ = get(proto, c, "cross6", view, lambda m: m["balanced_accuracy"])
            ref = "base" if ":" not in c else c
            bw, bf = get(proto, "base", "within", view, lambda m: m["macro_f1"])
            b3, _ = get(proto, "base", "cross4", view, lambda m: ba3(m, proto))
            common = [i for i, k in enumerate(folds) if k in bf]
            dw = (
                pdiff([w[i] for i in common], [bw[bf.index(folds[i])] for i in common])
                if (not c.startswith("base") and w and bw)
                else ""
            )
            d3 = pdiff([a3[i] for i in common], [b3[bf.index(folds[i])] for i in common]) if not c.startswith("base") and b3 else ""
            m3, _ = get(proto, c, "cross4", view, lambda m: m["macro_f1"])
            print(
                f"| {c} | {view} | {','.join(map(str, folds))} | {ms(w) if w else '-'} | {dw} | {ms(a3)} | {d3} | {ms(m3)} | {ms(a4)} | {ms(a6)} |"
            )
# weight choice wins (single view): within and across
wins = collections.Counter()
n = 0
for (p, c), folds in R.items():
    if p not in ("d2h", "h2d"):
        continue
    for k, d in folds.items():
        for sec, fn in (("within", lambda m: m["macro_f1"]), ("cross4", lambda m: ba3(m, p))):
            vals = {w: fn(d[sec][w]) for w in ("best", "last", "ema")}
            top = max(vals.values())
            for w, v in vals.items():
                if v == top:
                    wins[(sec, w)] += 1
            n += 1
print("\nweight choice wins (ties count for each):", dict(wins), "comparisons per section:", n // 2)
# image vs lesion split
print("\n| split on ham10000-dev | folds | macro-F1 (6 classes present) | balanced acc. | accuracy |")
print("|---|---|---|---|---|")
for p, name in (("h2d", "lesion-grouped"), ("himg", "image-level")):
    for view in ("best+tta",):
        mf, folds = get(p, "base", "within", view, lambda m: m["macro_f1"])
        if not mf:
            continue
        ba, _ = get(p, "base", "within", view, lambda m: m["balanced_accuracy"])
        ac, _ = get(p, "base", "within", view, lambda m: m["accuracy"])
        print(f"| {name} | {','.join(map(str, folds))} | {ms(mf)} | {ms(ba)} | {ms(ac)} |")
mf_l, fl = get("h2d", "base", "within", "best+tta", lambda m: m["macro_f1"])
mf_i, fi = get("himg", "base", "within", "best+tta", lambda m: m["macro_f1"])
ac_l, _ = get("h2d", "base", "within", "best+tta", lambda m: m["accuracy"])
ac_i, _ = get("himg", "base", "within", "best+tta", lambda m: m["accuracy"])
k = min(len(mf_l), len(mf_i))
if k:
    print(
        f"\nimage-level minus lesion-level (fold k with fold k): macro-F1 {pdiff(mf_i[:k], mf_l[:k])}, accuracy {pdiff(ac_i[:k], ac_l[:k])}"
    )
# nevus predictions on HAM (d2h base)
for c in ("base", "sog"):
    cnt = np.sum([R[("d2h", c)][k]["ham_pred_counts_nv"] for k in R[("d2h", c)]], 0)
    names = ["ak", "bcc", "df", "mel", "nv", "pbk", "sk", "scc", "vasc"]
    print(
        f"\nHAM nevi (300 per fold) called, {c}, folds {sorted(R[('d2h', c)])}:",
        {n: int(v) for n, v in zip(names, cnt, strict=False)},
    )
