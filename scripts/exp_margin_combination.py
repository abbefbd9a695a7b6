"""Experiment: the fast detector's score combined with the classifier's log-probability gap
(and, with ``--squeeze 0.75,1.5``, how far a blur of each sigma moves the classifier's softmax; with
``--noise 0.01``, how far Gaussian pixel noise of each sigma moves it; ``--hidden 32``: an MLP combiner).

    python scripts/exp_margin_combination.py --detector runs/mix-delete-800
    python scripts/exp_margin_combination.py --detector runs/mix-delete-800 --adaptive-n 100
    python scripts/exp_margin_combination.py --detector runs/mix-delete-800 --adaptive-n 100 \
        --eps 2/255,4/255 --targets combined --settings 1:2,0.3:2,3:5

Fits :class:`advdetect.detector.margin.MarginCombination` on the fast detector's scores and the
classifier's gaps of the detector's *training* sets (``work/train-*``: correct clean images of the
first, successful attacks of each), calibrates it to the fast detector's false-positive rate on the
correct clean images of ``work/calibration-*`` (the fast detector's own calibration images) and
compares both on the held-out ``work/test-*`` sets. With ``--adaptive-n N``, also runs the white-box
adaptive attack (PGD through classifier, mask network and detector; eps 2, 4, 8/255, each warm-started
from the previous) on N correct held-out clean images (the first of the first test set) against the
fast detector alone and against the combination, which the attacker differentiates too;
``--settings lam:kappa,...`` runs the attack with each weight of the detector term (lam) and
classifier margin aimed for (kappa) in turn, each run also keeping the best images so far (chosen on
the real pipeline), so the result is the best over the settings. Prints one JSON line.
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
from advdetect.detector.margin import (CombinedDetector, MarginCombination, WithEvidence,  # noqa: E402
                                       parse_squeeze, with_evidence_planes)
from advdetect.detector.metrics import fpr_per_class, tpr_at_fpr  # noqa: E402
from advdetect.splits import load_split  # noqa: E402


def scores_and_evidence(guard: Guard, images: torch.Tensor, combination: MarginCombination) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """The fast detector's scores and the classifier's evidence (gap, blur shifts, noise shifts) of ``images``."""
    fast = guard.deployment.fast
    scores, evidence = [], []
    with torch.no_grad():
        for start in range(0, len(images), 512):
            x = images[start:start + 512]
            scores.append(fast.scores(x).numpy())
            evidence.append(combination.evidence(guard.model, x).cpu().numpy())
    return np.concatenate(scores), np.concatenate(evidence)


def off_centre(gaps: np.ndarray, clean_gaps: np.ndarray) -> np.ndarray:
    """The gap alone as a two-sided score: distance of log1p(gap) from the clean images' median."""
    return np.abs(np.log1p(gaps) - np.median(np.log1p(clean_gaps)))


def row(clean: np.ndarray, adv: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    labels, values = np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv]
    return {"roc_auc": round(float(roc_auc_score(labels, values)), 4),
            "tpr_at_5fpr": round(tpr_at_fpr(labels, values, 0.05), 4),
            "tpr_at_threshold": round(float((adv > threshold).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--adaptive-n", type=int, default=0)
    parser.add_argument("--squeeze", default="none",
                        help="blur sigmas whose softmax shift joins the combination, e.g. 0.75,1.5 "
                             "(none: the gap alone)")
    parser.add_argument("--noise", default="none",
                        help="Gaussian pixel-noise sigmas whose softmax shift joins the combination, e.g. 0.01")
    parser.add_argument("--hidden", type=int, default=0,
                        help="0: logistic regression; > 0: an MLP with two hidden layers of this width")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eps", default="2/255,4/255,8/255", help="adaptive attack budgets, ascending")
    parser.add_argument("--targets", default="fast,combined", help="which verdicts to attack: fast, combined")
    parser.add_argument("--settings", default="1:2",
                        help="attacker settings lam:kappa, comma-separated: at each eps every setting runs in turn, "
                             "each also keeping the best images so far (chosen on the real pipeline)")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    guard = Guard.load(args.detector, device="cpu")
    if guard.path != "fast":
        raise SystemExit(f"{args.detector} has no fast path")
    fast = guard.deployment.fast
    inputs, kind = fast.detector.input_names(), guard.deployment.mask_config.kind
    work = Path(args.detector, "work")
    sets = {stage: {p.name.split("-", 1)[1]: p for p in sorted(work.glob(f"{stage}-*"))}
            for stage in ("train", "calibration", "test")}
    if not all(sets.values()):
        raise SystemExit(f"{work} needs train-*, calibration-* and test-* sets")

    squeeze, noise = parse_squeeze(args.squeeze), parse_squeeze(args.noise)
    combination = MarginCombination(fpr=fast.detector.fpr, squeeze=squeeze, noise=noise, hidden=args.hidden)
    fit_s, fit_g, fit_y = [], [], []
    for number, path in enumerate(sets["train"].values()):
        split = load_split(path, kind, inputs=inputs)
        sides = ((("clean", split.clean[split.correct], 0),) if number == 0 else ()) + \
            (("adv", split.adv[split.successful], 1),)
        for _, images, label in sides:
            s, g = scores_and_evidence(guard, images, combination)
            fit_s.append(s), fit_g.append(g), fit_y.append(np.full(len(s), label))
    cal = load_split(next(iter(sets["calibration"].values())), kind, inputs=inputs)
    cal_s, cal_g = scores_and_evidence(guard, cal.clean[cal.correct], combination)
    combination.fit(np.concatenate(fit_s), np.concatenate(fit_g), np.concatenate(fit_y))
    combination.calibrate(cal_s, cal_g)

    detection, clean_done, class_fpr = {}, None, {}
    for name, path in sets["test"].items():
        split = load_split(path, kind, inputs=inputs)
        if clean_done is None:
            cs, cg = scores_and_evidence(guard, split.clean[split.correct], combination)
            clean_done = (cs, cg, combination.decision_function(cs, cg))
            classes = split.clean_pred[split.correct].numpy()
            class_fpr = {"fast": fpr_per_class(cs, classes, fast.detector.threshold_),
                         "combined": fpr_per_class(clean_done[2], classes, combination.threshold_)}
        s, g = scores_and_evidence(guard, split.adv[split.successful], combination)
        detection[name] = {"fast": row(clean_done[0], s, fast.detector.threshold_),
                           "combined": row(clean_done[2], combination.decision_function(s, g),
                                           combination.threshold_),
                           "gap_only": row(off_centre(clean_done[1][:, 0], clean_done[1][:, 0]),
                                           off_centre(g[:, 0], clean_done[1][:, 0]), np.inf)}
    result = {"detector": args.detector, "combination": {k: v for k, v in combination.to_dict().items() if k != "mlp"}, "detection": detection,
              "min_roc_auc": {k: min(d[k]["roc_auc"] for d in detection.values()) for k in ("fast", "combined")},
              "clean_flagged": {"fast": float((clean_done[0] > fast.detector.threshold_).mean()),
                                "combined": float((clean_done[2] > combination.threshold_).mean())},
              "max_class_fpr": {k: max(v.values()) for k, v in class_fpr.items()}, "class_fpr": class_fpr}
    if args.adaptive_n:
        result["adaptive"] = adaptive(guard, combination, sets["test"], kind, inputs, args)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))


def adaptive(guard: Guard, combination: MarginCombination, tests: dict[str, Path], kind: str, inputs, args) -> dict:
    from advdetect.evaluation.adaptive import AdaptiveConfig, FastPathMaps, evaluate_adaptive
    from advdetect.evaluation.config import parse_eps_list

    fast, model = guard.deployment.fast, guard.model
    split = load_split(next(iter(tests.values())), kind, inputs=inputs)
    x, y = split.clean[split.correct][:args.adaptive_n], split.labels[split.correct][:args.adaptive_n]
    combined = CombinedDetector(fast.detector, combination)
    targets = {"fast": (FastPathMaps(fast), fast.detector, lambda b: fast.maps(b)[0]),
               "combined": (WithEvidence(FastPathMaps(fast), model, combination), combined,
                            lambda b: with_evidence_planes(fast.maps(b)[0], combination.evidence(model, b)))}
    settings = [tuple(float(v) for v in item.split(":")) for item in args.settings.split(",")]
    out = {"n": len(x), "steps": args.steps, "settings": settings}
    for name in args.targets.split(","):
        maps, detector, real = targets[name]
        rows, previous = [], None
        for eps in parse_eps_list(args.eps):
            for lam, kappa in settings:  # each run keeps the previous best as an untouched candidate
                cfg = AdaptiveConfig(eps=eps, steps=args.steps, restarts=1, lam=lam, kappa=kappa)
                outcome, previous = evaluate_adaptive(model, maps, detector, fast.explainer.config, x, y, cfg,
                                                      init=previous, real_maps=real)
                rows.append({**outcome.to_dict(), "lam": lam, "kappa": kappa})
        out[name] = rows
    return out


if __name__ == "__main__":
    main()
