"""Experiment: one threshold for every class, or one per predicted class (``train --class-calibration``)?

    python scripts/exp_class_calibration.py --detector runs/mix-300-squeeze --data-dir ../shared/data

Takes a detector whose fast path has a margin combination and recalibrates that combination (the
same fitted weights) on clean CIFAR-10 test images the detector never used: its held-out and
calibration images are test seed 1, offsets 0..n_eval+n_calibration; this takes the next ``--n-pool``
of that order for calibration and the rest of the split (or ``--n-heldout``) as held-out clean images.
For each calibration size in ``--sizes`` (the first n correct images of the pool) it calibrates with
one global threshold and with one per predicted class (:class:`MarginCombination`'s ``per_class``: a
class with fewer than 2/fpr images keeps the global one) and reports, on the held-out clean images,
the share flagged overall and per class, and on the detector's held-out attack sets (``work/test-*``,
successful attacks, each judged by the threshold of the class the classifier gives it) the share
detected; ``as_saved``: the same for the combination as the detector saved it. Prints one JSON line.
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

from advdetect import Guard  # noqa: E402
from advdetect.data import DataSpec, images_for  # noqa: E402
from advdetect.detector.margin import MarginCombination, classifier_evidence  # noqa: E402
from advdetect.splits import load_split  # noqa: E402


def scores_and_evidence(guard: Guard, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast detector's scores and the classifier's evidence (gap, blur shifts, predicted class)."""
    fast = guard.deployment.fast
    scores, evidence = [], []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = images[start:start + 256]
            scores.append(torch.as_tensor(fast.detector.decision_function(fast.maps(x)[0])))
            evidence.append(classifier_evidence(guard.model, x, tuple(fast.margin.squeeze), with_class=True,
                                                 noise=tuple(fast.margin.noise)).cpu())
    return torch.cat(scores), torch.cat(evidence)


def recalibrated(fitted: MarginCombination, per_class: bool, scores: torch.Tensor, evidence: torch.Tensor,
                 n_classes: int) -> MarginCombination:
    """``fitted``'s weights, calibrated anew on these clean images (globally or per class)."""
    out = MarginCombination(**(fitted.get_params() | {"per_class": per_class}))
    for name in ("coef_", "intercept_", "mlp_", "mean_", "scale_"):  # an MLP has mlp_, a logistic one coef_
        if hasattr(fitted, name):
            setattr(out, name, getattr(fitted, name))
    return out.calibrate(scores, evidence if per_class else evidence[:, :-1], n_classes=n_classes)


def summary(combination: MarginCombination, clean: tuple[torch.Tensor, torch.Tensor], attacks: dict,
            names: tuple[str, ...]) -> dict:
    def flagged(scores: torch.Tensor, evidence: torch.Tensor) -> np.ndarray:
        evidence = evidence if combination.per_class else evidence[:, :-1]
        return combination.decision_function(scores, evidence) > combination.threshold_

    flags, classes = flagged(*clean), clean[1][:, -1].long().numpy()
    per_class = {names[c]: round(float(flags[classes == c].mean()), 4) for c in sorted(set(classes.tolist()))}
    return {"clean_flagged": round(float(flags.mean()), 4), "max_class_fpr": max(per_class.values()),
            "class_fpr": per_class, "tpr": {name: round(float(flagged(*v).mean()), 4) for name, v in attacks.items()},
            "offsets": [round(v, 3) for v in combination.class_offsets_.tolist()] if combination.per_class else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n-pool", type=int, default=2000)
    parser.add_argument("--n-heldout", type=int, default=0, help="held-out clean images (0: the rest of the split)")
    parser.add_argument("--sizes", default="300,1000,2000", help="calibration sizes (images drawn, before "
                                                                 "keeping the correctly classified ones)")
    args = parser.parse_args()
    start = time.time()
    guard = Guard.load(args.detector, device="cpu")
    fast = guard.deployment.fast
    if fast is None or fast.margin is None:
        raise SystemExit(f"{args.detector}: needs a fast path with a margin combination (train --margin)")
    meta, info = guard.deployment.meta, guard.model.info
    used = int(meta["n_eval"]) + int(meta["n_calibration"])
    spec = DataSpec(data_dir=args.data_dir)
    total = len(images_for(info, spec, "test", None, 1))
    held = args.n_heldout or total - used - args.n_pool
    pools = []
    for offset, n in ((used, args.n_pool), (used + args.n_pool, held)):
        images, labels, _ = images_for(info, spec, "test", n, 1, offset).load()
        scores, evidence = scores_and_evidence(guard, images)
        pools.append((scores, evidence, evidence[:, -1].long() == labels))  # correct clean images count
    attacks = {}
    for path in sorted(Path(args.detector, "work").glob("test-*")):
        split = load_split(path, guard.deployment.mask_config.kind)
        attacks[path.name[5:]] = scores_and_evidence(guard, split.adv[split.successful])
    heldout = (pools[1][0][pools[1][2]], pools[1][1][pools[1][2]])
    n_classes = len(info.classes)
    out = {"detector": args.detector, "fpr": fast.margin.calibration_fpr_, "n_heldout_clean": int(len(heldout[0])),
           "heldout_per_class": np.bincount(heldout[1][:, -1].long().numpy(), minlength=n_classes).tolist(),
           "n_attack": {k: int(len(v[0])) for k, v in attacks.items()},
           "as_saved": summary(fast.margin, heldout, attacks, info.classes), "rows": []}
    for size in (int(s) for s in args.sizes.split(",")):
        keep = pools[0][2].clone()
        keep[size:] = False
        cal = (pools[0][0][keep], pools[0][1][keep])
        out["rows"].append({"n_calibration": int(keep.sum()), **{
            name: summary(recalibrated(fast.margin, per_class, *cal, n_classes), heldout, attacks, info.classes)
            for name, per_class in (("global", False), ("per_class", True))}})
    out["seconds"] = round(time.time() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
