"""Experiment: randomness the attacker can't see (a fresh draw per verdict), measured without and with EOT.

    python scripts/exp_random_defense.py --detector runs/mix-delete-800
    python scripts/exp_random_defense.py --detector runs/mix-delete-800 --adaptive-n 60 --eot 4

The defense: the fast path reads ``x + sigma * N(0, I)`` (clamped to [0, 1]) instead of ``x``, a
fresh draw on every call, so the maps the detector reads change from call to call (the verdict's
label is still the classifier's on ``x``). The fast detector is kept and its threshold recalibrated,
at its own false-positive rate, on one draw for each clean calibration image (``work/calibration-*``).
For each ``--sigma`` it prints the held-out detection (``work/test-*``: correct clean vs successful
attacks, one draw per image). With ``--adaptive-n N`` the white-box attack (PGD on classifier margin +
detector score, ``--settings`` in turn, eps warm-started) runs at ``--adaptive-sigma`` on N correct
held-out clean images of the first test set, twice: an attacker who ignores the randomness
(differentiates the deterministic fast path) and one who averages each step's gradient over
``--eot`` draws (expectation over transformation). Both choose their images on one draw of the
real randomised pipeline; ``success_fresh`` judges the chosen images on ``--draws`` fresh draws
(the defender's draws at inference, which the attacker can't see): the headline figure.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect import Guard  # noqa: E402
from advdetect.detector import detection_metrics  # noqa: E402
from advdetect.evaluation.adaptive import AdaptiveConfig, FastPathMaps, evaluate_adaptive  # noqa: E402
from advdetect.evaluation.config import parse_eps_list, parse_settings  # noqa: E402
from advdetect.splits import load_split  # noqa: E402


def noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x + sigma * torch.randn_like(x)).clamp(0, 1) if sigma else x


class NoisyMaps(nn.Module):
    """The fast path's maps of a fresh noisy copy of the image on every call (differentiable)."""

    def __init__(self, maps: nn.Module, sigma: float) -> None:
        super().__init__()
        self.maps, self.sigma = maps, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps(noisy(x, self.sigma))


def real_maps(fast, sigma: float):
    def maps(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fast.maps(noisy(x[i:i + 512], sigma))[0] for i in range(0, len(x), 512)])
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--sigma", default="0,2/255,8/255", help="noise levels for the held-out detection table")
    parser.add_argument("--adaptive-n", type=int, default=0)
    parser.add_argument("--adaptive-sigma", default="8/255")
    parser.add_argument("--eps", default="2/255,4/255", help="adaptive attack budgets, ascending")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--settings", default="1:2,0.3:2")
    parser.add_argument("--eot", type=int, default=4, help="draws per step of the EOT attacker")
    parser.add_argument("--draws", type=int, default=8, help="fresh draws that judge the chosen images")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    guard = Guard.load(args.detector, device="cpu")
    if guard.path != "fast":
        raise SystemExit(f"{args.detector} has no fast path")
    fast, model = guard.deployment.fast, guard.model
    if fast.margin is not None:
        raise SystemExit("this experiment randomises the fast detector alone; use a fast path without margin.json")
    inputs, kind = fast.detector.input_names(), guard.deployment.mask_config.kind
    work = Path(args.detector, "work")
    tests = {p.name.split("-", 1)[1]: p for p in sorted(work.glob("test-*"))}
    calibration = sorted(work.glob("calibration-*"))
    if not tests or not calibration:
        raise SystemExit(f"{work} needs calibration-* and test-* sets")
    cal = load_split(calibration[0], kind, inputs=inputs)
    splits = {name: load_split(path, kind, inputs=inputs) for name, path in tests.items()}
    first = next(iter(splits.values()))
    clean = first.clean[first.correct]

    def randomised(sigma: float):
        detector = copy.deepcopy(fast.detector)
        detector.calibrate(real_maps(fast, sigma)(cal.clean[cal.correct]), fpr=fast.detector.calibration_fpr_)
        return detector

    detection = {}
    for sigma in [0.0 if v.strip() == "0" else parse_eps_list(v)[0] for v in args.sigma.split(",") if v.strip()]:
        detector = randomised(sigma)
        maps = real_maps(fast, sigma)
        c = detector.decision_function(maps(clean))
        table = {}
        for name, split in splits.items():
            a = detector.decision_function(maps(split.adv[split.successful]))
            table[name] = detection_metrics(np.r_[np.zeros(len(c)), np.ones(len(a))], np.r_[c, a], detector.threshold_)
        detection[f"{sigma * 255:g}/255"] = {"threshold": detector.threshold_,
                                             "clean_flagged": float((c > detector.threshold_).mean()),
                                             "attacks": table,
                                             "min_roc_auc": min(r["roc_auc"] for r in table.values())}
    result = {"detector": args.detector, "detection": detection}
    if args.adaptive_n:
        result["adaptive"] = adaptive(fast, model, first, args, randomised)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))


def adaptive(fast, model, split, args, randomised) -> dict:
    sigma = parse_eps_list(args.adaptive_sigma)[0]
    detector, real = randomised(sigma), real_maps(fast, sigma)
    x, y = split.clean[split.correct][:args.adaptive_n], split.labels[split.correct][:args.adaptive_n]
    settings = parse_settings(args.settings)
    out = {"sigma": sigma, "n": len(x), "steps": args.steps, "settings": settings, "draws": args.draws,
           "clean_flagged_fresh": fresh(x, y, x, model, detector, real, args.draws)[1]}
    attackers = {"ignores_randomness": (FastPathMaps(fast), 1), "eot": (NoisyMaps(FastPathMaps(fast), sigma), args.eot)}
    for name, (target, eot) in attackers.items():
        rows, previous = [], None
        for eps in parse_eps_list(args.eps):
            for lam, kappa in settings:  # each run keeps the previous best as an untouched candidate
                cfg = AdaptiveConfig(eps=eps, steps=args.steps, lam=lam, kappa=kappa, eot=eot)
                outcome, previous = evaluate_adaptive(model, target, detector, fast.explainer.config, x, y, cfg,
                                                      init=previous, real_maps=real)
            success, _ = fresh(previous, y, x, model, detector, real, args.draws)
            rows.append({**outcome.to_dict(), "eot": eot, "success_fresh": success})
        out[name] = rows
    return out


def fresh(adv: torch.Tensor, y: torch.Tensor, x: torch.Tensor, model, detector, real, draws: int) -> tuple[float, float]:
    """Over ``draws`` fresh draws: the share of (image, draw) where the classifier is fooled and the verdict
    passes, and the share the detector flags."""
    fooled = model.logits(adv).argmax(1).cpu() != y
    passes = torch.stack([torch.as_tensor(detector.decision_function(real(adv))) <= detector.threshold_
                          for _ in range(draws)]).float()
    return float((passes * fooled).mean()), float(1 - passes.mean())


if __name__ == "__main__":
    main()
