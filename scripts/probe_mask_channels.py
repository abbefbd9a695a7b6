"""Probe: does the discriminator gain from reading deletion *and* preservation masks together?

Reuses the cached mask sets of two finished runs over the same images (the training images of
``--preserve`` are a prefix of those of ``--delete``: same seed, fewer images) and fits the
default MaskDetector on preservation masks alone and on [preservation, deletion] stacked as
two channels; prints ROC-AUC, TPR at 5% FPR and the best accuracy over thresholds on the
held-out test set of ``--preserve`` (which holds both kinds). An exploration, not a product
feature (``train`` reads one kind of mask).

    python scripts/probe_mask_channels.py --preserve runs/detector-bim-preserve --delete runs/detector-bim --n 1500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect.detector import MaskDetector  # noqa: E402
from advdetect.training import labelled_masks  # noqa: E402


def stacked(preserve_dir: Path, delete_dir: Path, n_max: int | None = None) -> dict[str, torch.Tensor]:
    """Per kind (clean / adv): [preservation, deletion] masks of the images both sets hold, by index."""
    lp, ld = labelled_masks(preserve_dir, kind="preserve"), labelled_masks(delete_dir, kind="delete")
    out = {}
    for k in ("clean", "adv"):
        ip, idd = lp[f"{k}_index"], ld[f"{k}_index"]
        keep = ip if n_max is None else ip[ip < n_max]
        pos_p = {int(i): j for j, i in enumerate(ip)}
        pos_d = {int(i): j for j, i in enumerate(idd)}
        common = [int(i) for i in keep if int(i) in pos_d]
        out[k] = torch.cat([lp[k][[pos_p[i] for i in common]], ld[k][[pos_d[i] for i in common]]], 1)
    return out


def main() -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preserve", default="runs/detector-bim-preserve")
    p.add_argument("--delete", default="runs/detector-bim")
    p.add_argument("--attack", default="bim")
    p.add_argument("--n", type=int, default=1500, help="training images of the preservation run")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pw, dw = Path(args.preserve) / "work", Path(args.delete) / "work"
    train = stacked(pw / f"train-{args.attack}", dw / f"train-{args.attack}", args.n)
    test = stacked(pw / f"test-{args.attack}", pw / f"test-{args.attack}")
    labels = np.r_[np.zeros(len(test["clean"])), np.ones(len(test["adv"]))]
    result = {"n_fit": [len(train["clean"]), len(train["adv"])], "n_test": [len(test["clean"]), len(test["adv"])]}
    for name, channels in (("preserve", [0]), ("preserve+delete", [0, 1])):
        t = time.time()
        X = torch.cat([train["clean"][:, channels], train["adv"][:, channels]])
        y = torch.cat([torch.zeros(len(train["clean"])), torch.ones(len(train["adv"]))])
        det = MaskDetector(seed=0).fit(X, y)
        scores = np.r_[det.decision_function(test["clean"][:, channels]), det.decision_function(test["adv"][:, channels])]
        fpr, tpr, _ = roc_curve(labels, scores)
        result[name] = {"roc_auc": float(roc_auc_score(labels, scores)), "tpr_at_5fpr": float(np.interp(0.05, fpr, tpr)),
                        "best_accuracy": float(max((1 - f + r) / 2 for f, r in zip(fpr, tpr))),
                        "seconds": round(time.time() - t, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
