"""Reproduce the detector's headline numbers in one command.

    python scripts/eval_detection.py --data-dir ../shared/data
    python scripts/eval_detection.py --data-dir ../shared/data --game preserve --n 4000 --fpr 0.04 \
        --transfer fgsm,pgd --out runs/detector-bim-preserve-4k-fpr4

Trains (or, when ``--out`` already holds the finished stages, reuses) a detector on BIM at
eps 8/255 for the built-in model, evaluates it on held-out CIFAR-10 test images, also under
FGSM and PGD (transfer), and prints one JSON object: ``accuracy``, ``roc_auc``,
``tpr_at_5fpr``, ``tpr_at_1fpr``, ``recovery_top1``, ``recovery_top5``,
``recovery_ground_truth``, ``harm``, ``mask_recovery_top1/5`` (the paper's recovery, for
reference) (fractions) for the (first) training attack, the same under ``trained`` for the
other training attacks (``--attack bim,fgsm``) and under ``transfer`` for each other attack;
``attacks`` holds every attack's row, ``min_roc_auc`` / ``min_tpr_at_5fpr`` the worst over them,
``fpr_per_class`` / ``max_class_fpr`` the held-out clean images flagged per class, and with
``--leave-one-out`` ``leave_one_out`` (per training attack X: a detector fitted on the others,
tested on X) and ``min_leave_one_out_roc_auc``; ``fast`` the fast path's rows (amortized masks; not
with ``--no-fast``) and ``fast_auc_gap_max``, its largest ROC-AUC shortfall behind the optimised masks;
``fast_hardening`` what ``--adaptive-rounds`` did (per round: the attack's success on the fitting images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect.data import DataSpec  # noqa: E402
from advdetect.recovery import RECOVERY_METHODS, RecoveryConfig  # noqa: E402
from advdetect.training import run_train  # noqa: E402

KEYS = ("accuracy", "roc_auc", "tpr_at_5fpr", "tpr_at_1fpr", "flagged_recovery_top1", "flagged_recovery_top5",
        "pipeline_recovery_top1", "n_flagged", "recovery_top1", "recovery_top5",
        "recovery_ground_truth", "harm", "harm_unconditional", "mask_recovery_top1", "mask_recovery_top5", "n_clean", "n_adversarial", "success_rate",
        "clean_accuracy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cifar10-cnn")
    p.add_argument("--attack", default="bim")
    p.add_argument("--data", default=None, help="an image folder of your own instead of CIFAR-10 (see README)")
    p.add_argument("--transfer", default="fgsm,pgd")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--n", type=int, default=4000, help="training images (all fit the detector unless --calibrate-on train)")
    p.add_argument("--n-eval", type=int, default=2300, help="held-out test images (~2000 correctly classified)")
    p.add_argument("--out", default="runs/detector-bim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--game", default="delete", choices=["delete", "preserve", "both"],
                   help="masks the detector reads (mask recovery always uses deletion masks)")
    p.add_argument("--recovery", default="blur", choices=list(RECOVERY_METHODS),
                   help="recovery method: a light blur with the flagged label ruled out, or the paper's mask")
    p.add_argument("--calibrate-on", default="test", choices=["test", "train"],
                   help="clean images that set the threshold (test: beside the held-out ones)")
    p.add_argument("--n-calibration", type=int, default=1000)
    p.add_argument("--inputs", default=None, help="what the discriminator reads, e.g. masks,residual,confidence")
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate the threshold is calibrated to")
    p.add_argument("--leave-one-out", action="store_true",
                   help="also fit, for each training attack X, a detector on the others and test it on X "
                        "(reuses this run's attack and mask sets)")
    p.add_argument("--no-fast", action="store_true", help="do not train the fast path (amortized masks)")
    p.add_argument("--no-margin", action="store_true",
                   help="the fast path's verdict without train's default margin combination (its own score)")
    p.add_argument("--adaptive-rounds", type=int, default=0,
                   help="harden the fast detector: rounds of adversarial training against the white-box adaptive "
                        "attacker (see advdetect/hardening.py)")
    args = p.parse_args()
    settings = dict(model=args.model, eps=args.eps, n=args.n, n_eval=args.n_eval, seed=args.seed,
                    data=DataSpec(path=args.data, data_dir=args.data_dir), device=args.device,
                    progress=sys.stderr.isatty(),
                    mask_config={"game": args.game, "seed": args.seed},  # on the settings for the input size
                    recovery=RecoveryConfig(method=args.recovery), calibrate_on=args.calibrate_on,
                    n_calibration=args.n_calibration, fpr=args.fpr, inputs=args.inputs)
    fast = not args.no_fast
    report = run_train(attack=args.attack, out=args.out, transfer=args.transfer or None, fast=fast,
                       margin=False if args.no_margin else None, adaptive_rounds=args.adaptive_rounds,
                       **settings).to_dict()
    metrics = report["metrics"]
    trained = [a.strip() for a in args.attack.split(",") if a.strip()]
    main_attack = trained[0]
    result = {k: metrics[main_attack][k] for k in KEYS}
    result["attacks"] = {name: {**{k: m[k] for k in KEYS}, "trained_on": m["trained_on"],
                                "max_class_fpr": m["max_class_fpr"]} for name, m in metrics.items()}
    result["transfer"] = {name: {k: m[k] for k in KEYS} for name, m in metrics.items() if not m["trained_on"]}
    result["trained"] = {name: {k: m[k] for k in KEYS} for name, m in metrics.items()
                         if m["trained_on"] and name != main_attack}
    result["min_roc_auc"] = min(m["roc_auc"] for m in metrics.values())
    result["min_tpr_at_5fpr"] = min(m["tpr_at_5fpr"] for m in metrics.values())
    result["fpr_per_class"] = metrics[main_attack]["fpr_per_class"]  # every attack set holds the same clean images
    result["max_class_fpr"] = metrics[main_attack]["max_class_fpr"]
    if report.get("fast"):  # the fast path's held-out rows, and how far it falls behind the optimised masks
        result["fast"] = {name: {k: m[k] for k in ("roc_auc", "tpr_at_5fpr", "tpr_at_1fpr", "fpr_at_threshold",
                                                   "tpr_at_threshold")} for name, m in report["fast"]["metrics"].items()}
        result["fast_auc_gap_max"] = max(metrics[n]["roc_auc"] - m["roc_auc"] for n, m in result["fast"].items())
        result["fast_hardening"] = report["fast"].get("hardening")
    if args.leave_one_out and len(trained) > 1:
        result["leave_one_out"] = {}
        for left_out in trained:
            others = ",".join(a for a in trained if a != left_out)
            loao = run_train(attack=others, transfer=left_out, out=Path(args.out) / f"leave-out-{left_out}",
                             work=Path(args.out) / "work", fast=False, **settings).to_dict()["metrics"][left_out]
            result["leave_one_out"][left_out] = {k: loao[k] for k in ("roc_auc", "tpr_at_5fpr", "tpr_at_1fpr")}
        result["min_leave_one_out_roc_auc"] = min(v["roc_auc"] for v in result["leave_one_out"].values())
    result.update(game=args.game, inputs=args.inputs, recovery=args.recovery, attack=main_attack, eps=args.eps,
                  n_train=args.n, n_eval=args.n_eval, threshold=report["threshold"],
                  calibrated_on=report["calibrated_on"], n_calibration=report["n_calibration"],
                  calibration_fpr=report["calibration_fpr"], seconds=report["seconds"], out=args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
