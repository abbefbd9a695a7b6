"""Fit amortized mask networks on a training run's stored sets and measure them against the optimised masks.

    python scripts/eval_fast_path.py --work runs/mix-delete-800/work --losses distill,objective,both

Reads the ``train-<attack>``, ``calibration-<attack>`` and ``test-<attack>`` sets of a
``train`` / ``eval_detection.py`` work folder (deletion masks). For each loss it trains a mask
network on the training sets' clean and adversarial images, then on held-out test images reports
the deletion faithfulness of predicted and optimised masks (share whose perturbed image keeps at
most 10% of the target probability), mean |difference| and correlation between them; then fits and
calibrates a fast detector on the predicted maps (same inputs as the exact one) and reports ROC-AUC
and TPR at 5% FPR per attack for the fast detector and an exact detector fitted the same way.
Prints one JSON line; ``--save DIR`` writes the best loss's fast path under DIR/fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advdetect.detector import MaskDetector  # noqa: E402
from advdetect.detector.inputs import detector_maps, parse_inputs  # noqa: E402
from advdetect.detector.metrics import tpr_at_fpr  # noqa: E402
from advdetect.fastpath import FastPath, amortized_maps, save_fast_path  # noqa: E402
from advdetect.masks import MaskConfig  # noqa: E402
from advdetect.masks.amortized import AmortizedMasks, mask_net_for  # noqa: E402
from advdetect.masks.amortized_training import MaskNetFit, fit_mask_net  # noqa: E402
from advdetect.models import load_model  # noqa: E402
from advdetect.splits import balanced, load_mask_set, load_split  # noqa: E402
from advdetect.storage import ShardStore  # noqa: E402


def read(directory: Path) -> dict:
    """Images, labels, predictions and the stored deletion masks' fields of one attack set."""
    split = load_split(directory, "delete")
    extra = load_mask_set(directory, "delete", [f"{s}_{f}" for s in ("clean", "adv")
                                                for f in ("iterations", "prob_before", "prob_after")])
    return {"split": split, **extra}


def exact_maps(d: dict, side: str, inputs, budget: int) -> torch.Tensor:
    split = d["split"]
    return detector_maps(inputs, getattr(split, f"masks_{side}"), images=getattr(split, side),
                         prob_before=d[f"{side}_prob_before"], prob_after=d[f"{side}_prob_after"],
                         iterations=d[f"{side}_iterations"], budget=budget)


def fit_detector(clean: torch.Tensor, adv: list[torch.Tensor], cal: torch.Tensor, inputs, seed: int) -> MaskDetector:
    adv_all = balanced(adv, len(clean), seed)
    X = torch.cat([clean, adv_all])
    y = torch.cat([torch.zeros(len(clean)), torch.ones(len(adv_all))])
    return MaskDetector(seed=seed, inputs=",".join(inputs)).fit(X, y).calibrate(cal)


def scores_row(det: MaskDetector, clean: torch.Tensor, adv: torch.Tensor) -> dict:
    c, a = det.decision_function(clean), det.decision_function(adv)
    labels, s = np.r_[np.zeros(len(c)), np.ones(len(a))], np.r_[c, a]
    return {"roc_auc": round(float(roc_auc_score(labels, s)), 4), "tpr_at_5fpr": round(tpr_at_fpr(labels, s, 0.05), 4),
            "fpr_at_threshold": round(float((c > det.threshold_).mean()), 4),
            "tpr_at_threshold": round(float((a > det.threshold_).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--model", default="cifar10-cnn")
    parser.add_argument("--losses", default="distill,objective,both")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--inputs", default="masks,residual,confidence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goal", type=float, default=None,
                        help="train the objective's class term down to GOAL x the original probability (default: "
                             "the optimiser's stopping ratio, 0.05): lower gives fuller masks")
    parser.add_argument("--save", default=None, help="Write the best loss's fast path under SAVE/fast.")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    work, inputs = Path(args.work), parse_inputs(args.inputs)
    model = load_model(args.model)
    attacks = sorted(p.name[len("train-"):] for p in work.glob("train-*"))
    config = MaskConfig.from_dict(ShardStore(work / f"train-{attacks[0]}" / "masks").manifest()["job"]["mask_config"])
    train = {a: read(work / f"train-{a}") for a in attacks}
    test = {a: read(work / f"test-{a}") for a in attacks if (work / f"test-{a}").is_dir()}
    cal = read(next(work.glob("calibration-*")))
    first = train[attacks[0]]
    # the network learns from every training image the detector will fit on: the clean ones and each attack's
    images = torch.cat([first["split"].clean] + [train[a]["split"].adv for a in attacks])
    teacher = torch.cat([first["split"].masks_clean] + [train[a]["split"].masks_adv for a in attacks])
    iters = torch.cat([first["clean_iterations"]] + [train[a]["adv_iterations"] for a in attacks])

    def fit_sets(maps_of):  # clean correct, adversarial successful per attack, calibration clean correct
        clean = maps_of(first, "clean")[first["split"].correct]
        adv = [maps_of(train[a], "adv")[train[a]["split"].successful] for a in attacks]
        return clean, adv, maps_of(cal, "clean")[cal["split"].correct]

    out = {"work": str(work), "goal": args.goal, "attacks": attacks, "inputs": list(inputs), "n_images": len(images),
           "losses": {}}
    start = time.time()
    exact = lambda d, side: exact_maps(d, side, inputs, config.iterations)  # noqa: E731
    det_exact = fit_detector(*fit_sets(exact), inputs, args.seed)
    out["exact"] = {a: scores_row(det_exact, exact(test[a], "clean")[test[a]["split"].correct],
                                  exact(test[a], "adv")[test[a]["split"].successful]) for a in test}
    out["exact_seconds"] = round(time.time() - start, 1)
    best = None
    for loss in args.losses.split(","):
        start = time.time()
        torch.manual_seed(args.seed)
        net = mask_net_for(model.info, config, width=args.width)
        settings = MaskNetFit(loss=loss, epochs=args.epochs, seed=args.seed, goal=args.goal)
        fit_mask_net(model, net, images, config, teacher_masks=teacher, teacher_iterations=iters, settings=settings,
                     progress=True)
        fit_seconds = time.time() - start
        explainer = AmortizedMasks(model, net, config)
        cache: dict = {}

        def fast(d, side, explainer=explainer, cache=cache):
            key = (id(d), side)
            if key not in cache:
                cache[key] = amortized_maps(explainer, inputs, getattr(d["split"], side))
            return cache[key][0]

        det_fast = fit_detector(*fit_sets(fast), inputs, args.seed)
        row = {"fit_seconds": round(fit_seconds, 1), "history_last": settings.history[-1], "attacks": {}}
        faith_fast, faith_opt, diffs, corrs = [], [], [], []
        for a, d in test.items():
            row["attacks"][a] = scores_row(det_fast, fast(d, "clean")[d["split"].correct],
                                           fast(d, "adv")[d["split"].successful])
            for side in ("clean", "adv") if a == attacks[0] else ("adv",):
                _, result = cache[(id(d), side)]
                faith_fast.append(result.deletion_ratio <= 0.1)
                faith_opt.append(d[f"{side}_prob_after"] / d[f"{side}_prob_before"].clamp(min=1e-12) <= 0.1)
                opt = getattr(d["split"], f"masks_{side}")
                diffs.append((result.masks - opt).abs().flatten(1).mean(1))
                p, o = result.masks.flatten(1), opt.flatten(1)
                p, o = p - p.mean(1, keepdim=True), o - o.mean(1, keepdim=True)
                corrs.append((p * o).sum(1) / (p.norm(dim=1) * o.norm(dim=1)).clamp(min=1e-8))
        row["faithfulness_fast"] = round(float(torch.cat(faith_fast).float().mean()), 4)
        row["faithfulness_optimized"] = round(float(torch.cat(faith_opt).float().mean()), 4)
        row["mean_abs_diff"] = round(float(torch.cat(diffs).mean()), 4)
        row["mean_correlation"] = round(float(torch.cat(corrs).nanmean()), 4)
        row["auc_gap_max"] = round(max(out["exact"][a]["roc_auc"] - row["attacks"][a]["roc_auc"] for a in test), 4)
        row["seconds"] = round(time.time() - start, 1)
        out["losses"][loss] = row
        print(json.dumps({loss: row}), file=sys.stderr, flush=True)
        if best is None or row["auc_gap_max"] < out["losses"][best[0]]["auc_gap_max"]:
            best = (loss, FastPath(explainer, det_fast))
    if args.save and best is not None:
        save_fast_path(args.save, best[1], model.info.identity(), extra={"mask_net_loss": best[0]})
        out["saved"] = {"dir": args.save, "loss": best[0]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
