"""Experiment: which evidence, and which combiner, for the fast verdict (issue "every attack", CW above all)?

    python scripts/exp_evidence_combiners.py --detector runs/mix-delete-300 --noise 0.01,0.03 --draws 4

Per image of a detector's stored sets (``work/train-*``: correct clean images of the first, successful
attacks of each; ``work/calibration-*``: correct clean images; ``work/test-*``: held out), the evidence
beside the fast detector's score s: h = log(1 + gap) and h^2 (the classifier's log-probability gap),
the blur shifts at 0.75 and 1.5 px (:func:`advdetect.detector.margin.blur_shift`), and for each
``--noise`` sigma the mean over ``--draws`` seeded draws of the softmax shift under Gaussian pixel
noise, as l = log(shift + 1e-6) and l^2 (two-sided: CW and DeepFool move under noise, BIM and PGD
move less than clean images). Feature sets x combiners (logistic regression as
:class:`MarginCombination` fits it, scikit-learn's MLP (32, 32) and histogram gradient boosting),
each fitted on the training sets (classes balanced), thresholded at 5% of the calibration images and
scored on the held-out sets: ROC-AUC and TPR at that threshold per attack, the worst ROC-AUC, clean
images flagged; and the ROC-AUC of each noise shift alone. Prints one JSON line.
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
from advdetect.detector.margin import blur_shift, classifier_evidence  # noqa: E402
from advdetect.splits import load_split  # noqa: E402

BASE = ["score", "h", "h2"]
BLUR = ["blur0.75", "blur1.5"]


def counter_step_gap(model: torch.nn.Module, x: torch.Tensor, step: float) -> torch.Tensor:
    """N: the classifier's logit gap (predicted class minus the best other; negative once it flips) after one
    signed-gradient step of ``step`` (pixels) against the class it predicts for ``x``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        pred = logits.argmax(1)
        chosen = logits.log_softmax(1).gather(1, pred[:, None]).sum()
        (grad,) = torch.autograd.grad(chosen, x)
    with torch.no_grad():
        moved = model((x - step * grad.sign()).clamp(0, 1)).float()
        own = moved.gather(1, pred[:, None])[:, 0]
        other = moved.scatter(1, pred[:, None], float("-inf")).max(1).values
    return own - other


def features(guard: Guard, images: torch.Tensor, noise: list[float], draws: int, seed: int,
             steps: tuple[float, ...] = ()) -> np.ndarray:
    """N x (5 + 2 * len(noise) + len(steps)): score, h, h^2, the two blur shifts, (l, l^2) per noise sigma,
    then the :func:`counter_step_gap` of each step."""
    fast, model = guard.deployment.fast, guard.model
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = images[start:start + 256]
            score = torch.as_tensor(fast.detector.decision_function(fast.maps(x)[0])).float()
            logits = model.logits(x)
            evidence = classifier_evidence(model, x, (0.75, 1.5), logits).cpu()
            h = torch.log1p(evidence[:, 0].clamp_min(0))
            cols = [score, h, h * h, evidence[:, 1], evidence[:, 2]]
            for sigma in noise:
                noisy = [(x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1) for _ in range(draws)]
                shift = sum(blur_shift(logits, model.logits(n)) for n in noisy) / draws
                log_shift = torch.log(shift.cpu() + 1e-6)
                cols += [log_shift, log_shift * log_shift]
            cols += [counter_step_gap(model, x, step).cpu() for step in steps]
            out.append(torch.stack(cols, 1))
    return torch.cat(out).numpy()


def combiner(kind: str):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    return {"logistic": lambda: LogisticRegression(class_weight="balanced", max_iter=2000),
            "mlp": lambda: MLPClassifier(hidden_layer_sizes=(32, 32), alpha=1e-3, max_iter=2000, random_state=0),
            "hgb": lambda: HistGradientBoostingClassifier(random_state=0)}[kind]()


def evaluate(kind: str, cols: list[int], X: np.ndarray, y: np.ndarray, cal: np.ndarray,
             tests: dict[str, np.ndarray]) -> dict:
    from sklearn.metrics import roc_auc_score

    mean, scale = X[:, cols].mean(0), X[:, cols].std(0) + 1e-6
    Z = (X[:, cols] - mean) / scale
    model = combiner(kind)
    if kind == "mlp":  # no sample weights: balance by repeating clean rows
        clean, adv = np.where(y == 0)[0], np.where(y == 1)[0]
        rows = np.r_[np.tile(clean, max(1, round(len(adv) / len(clean)))), adv]
        model.fit(Z[rows], y[rows])
    elif kind == "hgb":
        model.fit(Z, y, sample_weight=np.where(y == 1, (y == 0).sum() / (y == 1).sum(), 1.0))
    else:
        model.fit(Z, y)

    def score(F: np.ndarray) -> np.ndarray:
        return model.predict_proba((F[:, cols] - mean) / scale)[:, 1]

    threshold = np.sort(score(cal))[::-1][int(0.05 * len(cal))]
    clean = score(tests["clean"])
    rows = {}
    for name, F in tests.items():
        if name == "clean":
            continue
        adv = score(F)
        labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
        rows[name] = {"roc_auc": round(float(roc_auc_score(labels, np.r_[clean, adv])), 4),
                      "tpr_at_threshold": round(float((adv > threshold).mean()), 4)}
    return {"attacks": rows, "min_roc_auc": min(r["roc_auc"] for r in rows.values()),
            "clean_flagged": round(float((clean > threshold).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--noise", default="0.01,0.03", help="Gaussian pixel-noise sigmas (images in [0, 1])")
    parser.add_argument("--draws", type=int, default=4, help="noise draws averaged per sigma")
    parser.add_argument("--combiners", default="logistic,mlp,hgb")
    parser.add_argument("--steps", default="none",
                        help="counter-step sizes in pixels (e.g. 0.002,0.004): the classifier's logit gap after "
                             "one signed-gradient step against its own prediction joins the evidence")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also fit each feature set without one attack's training images and score that attack")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    guard = Guard.load(args.detector, device="cpu")
    if guard.deployment.fast is None:
        raise SystemExit(f"{args.detector} has no fast path")
    noise = [float(s) for s in args.noise.split(",") if s.strip()]
    steps = () if args.steps.strip().lower() in ("", "none") else tuple(float(s) for s in args.steps.split(","))
    kind, inputs = guard.deployment.mask_config.kind, guard.deployment.fast.detector.input_names()
    work = Path(args.detector, "work")

    def feats(images: torch.Tensor, seed: int) -> np.ndarray:
        return features(guard, images, noise, args.draws, seed, steps)

    fit_clean, fit_adv = None, {}
    for number, path in enumerate(sorted(work.glob("train-*"))):
        split = load_split(path, kind, inputs=inputs)
        if number == 0:
            fit_clean = feats(split.clean[split.correct], 1)
        fit_adv[path.name[len("train-"):]] = feats(split.adv[split.successful], 2 + number)

    def fit_set(without: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        advs = [F for name, F in fit_adv.items() if name != without]
        return (np.concatenate([fit_clean, *advs]),
                np.r_[np.zeros(len(fit_clean)), np.ones(sum(len(F) for F in advs))])

    X_all, y_all = fit_set()
    cal_split = load_split(next(work.glob("calibration-*")), kind, inputs=inputs)
    cal = feats(cal_split.clean[cal_split.correct], 100)
    tests: dict[str, np.ndarray] = {}
    for number, path in enumerate(sorted(work.glob("test-*"))):
        split = load_split(path, kind, inputs=inputs)
        if "clean" not in tests:
            tests["clean"] = feats(split.clean[split.correct], 200)
        tests[path.name[len("test-"):]] = feats(split.adv[split.successful], 201 + number)
    names = BASE + BLUR + [f"{p}{s}" for s in noise for p in ("noise_l", "noise_l2_")] + [f"step{s}" for s in steps]
    noise_cols = list(range(5, 5 + 2 * len(noise)))
    step_cols = list(range(5 + 2 * len(noise), len(names)))
    sets = {"score+gap+blur": list(range(5)), "score+gap+noise": [0, 1, 2, *noise_cols],
            "score+gap+blur+noise": list(range(5 + 2 * len(noise)))}
    if steps:
        sets.update({"score+gap+step": [0, 1, 2, *step_cols], "score+gap+noise+step": [0, 1, 2, *noise_cols, *step_cols],
                     "score+gap+blur+noise+step": list(range(len(names))),
                     "gap+blur+noise+step (no score)": list(range(1, len(names)))})
    result = {"detector": args.detector, "noise": noise, "draws": args.draws, "steps": list(steps), "features": names,
              "n_fit": {"clean": int((y_all == 0).sum()), "adversarial": int((y_all == 1).sum())},
              "n_calibration": int(len(cal)), "n_test": {k: int(len(v)) for k, v in tests.items()}, "results": {}}
    for kind_name in args.combiners.split(","):
        for set_name, cols in sets.items():
            result["results"][f"{kind_name}:{set_name}"] = evaluate(kind_name, cols, X_all, y_all, cal, tests)
            if args.leave_one_out:  # the combiner never sees the left-out attack (the fast detector's score did)
                loo = {}
                for attack in fit_adv:
                    X, y = fit_set(without=attack)
                    held = evaluate(kind_name, cols, X, y, cal, {"clean": tests["clean"], attack: tests[attack]})
                    loo[attack] = held["attacks"][attack]["roc_auc"]
                result["results"][f"{kind_name}:{set_name}"]["leave_one_out"] = loo
                result["results"][f"{kind_name}:{set_name}"]["min_leave_one_out"] = min(loo.values())
    from sklearn.metrics import roc_auc_score

    clean = tests["clean"]
    result["noise_shift_alone_roc_auc"] = {  # higher shift = adversarial; under 0.5: it moves less than clean
        f"{sigma:g}": {name: round(float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(F))],
                                                        np.r_[clean[:, 5 + 2 * i], F[:, 5 + 2 * i]])), 4)
                       for name, F in tests.items() if name != "clean"} for i, sigma in enumerate(noise)}
    result["step_gap_alone_roc_auc"] = {  # lower gap after the step = adversarial (scored as minus the gap)
        f"{step:g}": {name: round(float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(F))],
                                                       -np.r_[clean[:, col], F[:, col]])), 4)
                      for name, F in tests.items() if name != "clean"} for step, col in zip(steps, step_cols)}
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
