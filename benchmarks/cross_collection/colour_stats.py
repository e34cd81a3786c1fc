# ruff: noqa: E501 (one table row per print)
import collections

import harness as xc
import numpy as np

derm = xc.load_derm()
ham, dx, _ = xc.load_ham()


def stats(x):
    f = x.float()
    m = f.mean((-2, -1))
    il = f.pow(6).mean((-2, -1)).pow(1 / 6)
    il = il / il.sum()
    return m.numpy(), il.numpy(), x.shape[-1] / x.shape[-2]


rows = collections.defaultdict(list)
for p, (x, lab) in derm.items():
    o = "HAM-id" if xc.ham_origin(p) else "other-ISIC"
    rows[("derm-sample", xc.DERM_CLASSES[lab], o)].append(stats(x))
    rows[("derm-sample", "ALL", o)].append(stats(x))
for x, d in zip(ham, dx, strict=False):
    rows[("ham10000-dev", d, "HAM")].append(stats(x))
    rows[("ham10000-dev", "ALL", "HAM")].append(stats(x))
print("| collection | class | origin | n | mean R,G,B | SoG illuminant r,g,b (sum 1) |")
print("|---|---|---|---|---|---|")
for k in sorted(rows):
    v = rows[k]
    if len(v) < 3:
        continue
    m = np.mean([a for a, _, _ in v], 0)
    il = np.mean([b for _, b, _ in v], 0)
    ils = np.std([b for _, b, _ in v], 0)
    print(
        f"| {k[0]} | {k[1]} | {k[2]} | {len(v)} | {m[0]:.0f}, {m[1]:.0f}, {m[2]:.0f} | {il[0]:.3f}, {il[1]:.3f}, {il[2]:.3f} (sd {ils[0]:.3f}, {ils[1]:.3f}, {ils[2]:.3f}) |"
    )
