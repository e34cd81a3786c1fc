
"""Origin probe: can frozen ImageNet features (lite0, no fine-tuning) tell HAM-id images from other-ISIC images?"""

import json

import harness as xc
import numpy as np
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

derm = xc.load_derm()
ham, dx, _ = xc.load_ham()
rng = np.random.default_rng(0)
hsel = np.concatenate([rng.choice(np.flatnonzero(dx == c), 300, replace=False) for c in ("nv", "mel")])
m = timm.create_model(
    "tf_efficientnet_lite0", pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(xc.WEIGHTS)}
).eval()


@torch.no_grad()
def feats(xs):
    b = xc.eval_batch(xs, 128)
    return torch.cat([m(xc.normalize(b[i : i + 128])) for i in range(0, len(b), 128)]).numpy()


paths = list(derm)
lab = np.array([derm[p][1] for p in paths])
origin = np.array([xc.ham_origin(p) for p in paths])
out = {}
for sog in (False, True):
    pre = (lambda x: xc.shades_of_gray(x, 6)) if sog else (lambda x: x)
    fd = feats([pre(derm[p][0]) for p in paths])
    fh = feats([pre(ham[i]) for i in hsel])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    pd_ = cross_val_predict(
        clf, fd, origin, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba"
    )[:, 1]
    clf.fit(fd, origin)
    ph = clf.predict_proba(fh)[:, 1]
    nvm = np.isin(lab, [3, 4])  # derm-sample mel + nevus
    res = {
        "cv_auc_origin_derm": roc_auc_score(origin, pd_),
        "cv_acc_origin_derm": float(np.mean((pd_ > 0.5) == origin)),
        "ham_called_HAM_origin_nv": float(np.mean(ph[:300] > 0.5)),
        "ham_called_HAM_origin_mel": float(np.mean(ph[300:] > 0.5)),
        "derm_nv_HAMid_called_HAM": float(np.mean(pd_[(lab == 4) & origin] > 0.5))
        if ((lab == 4) & origin).any()
        else None,
    }

    # colour-only probe: the 3-channel SoG illuminant + mean RGB (6 numbers) of the raw image
    def cstats(xs):
        return np.array(
            [np.r_[x.float().mean((-2, -1)).numpy(), x.float().pow(6).mean((-2, -1)).pow(1 / 6).numpy()] for x in xs]
        )

    cd = cstats([pre(derm[p][0]) for p in paths])
    pc = cross_val_predict(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        cd,
        origin,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        method="predict_proba",
    )[:, 1]
    res["cv_auc_origin_colour_stats_only"] = roc_auc_score(origin, pc)
    out["sog" if sog else "raw"] = res
print(json.dumps(out, indent=1))
(xc.WORK / "probe.json").write_text(json.dumps(out, indent=1))
