"""Experiment: does the fast path's detector get better with more training images than the exact one had?

    python scripts/exp_fast_scale.py --detector runs/mix-300-mlp --data-dir ../shared/data --extra 2000

The fast path's detector reads the mask network's maps (one pass), so unlike the exact detector it needs
no optimised masks to be trained: only attacks, which cost a small share of the mask optimisation. This
keeps a detector's mask network as it is and refits its fast detector (a :class:`MaskDetector` with the
same parameters) and an MLP margin combination (gap, blur shifts at 0.75 and 1.5 px, noise shift at
0.01, as ``train --margin --noise 0.01 --combiner mlp``) on

* ``base``: the detector's own training sets (``work/train-*``: correct clean images of the first,
  successful attacks of each), and
* ``scaled``: those plus ``--extra`` further CIFAR-10 training images (the same seeded order, after the
  detector's own, so disjoint from them), attacked here with every attack of the detector;

both calibrated to the detector's rate on ``work/calibration-*`` and scored on the held-out ``work/test-*``
sets: ROC-AUC and TPR at the calibrated threshold, per attack, for the detector alone and combined.
``--leave-one-out``: for ``scaled``, also refit detector and combination without one attack's images and
score that attack (a genuine leave-one-out: neither part saw it); ``--loo-only fgsm,cw``: only that, for
the attacks named (no base and scaled fits). ``--reuse-extra``: the extra images are the detector's own
``work/fast-train-*`` sets (``train --fast-n``) instead of ``--extra`` images attacked here; ``--more N``
adds N further training images after them, attacked here. ``--no-base``: no fit on the detector's own
training sets alone. Prints one JSON line.

    python scripts/exp_fast_scale.py --detector runs/headline-300 --reuse-extra --more 3200 --no-base

    python scripts/exp_fast_scale.py --detector runs/mix-300-fast1800 --reuse-extra --loo-only cw,deepfool
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
from advdetect.attacks import AttackConfig, attack_batch  # noqa: E402
from advdetect.data import load_cifar10  # noqa: E402
from advdetect.detector import MaskDetector  # noqa: E402
from advdetect.detector.margin import MarginCombination  # noqa: E402
from advdetect.fastpath import FastPath, fit_fast_detector, fit_margin, read_attack_images  # noqa: E402
from advdetect.splits import load_split  # noqa: E402


def attacked(model, images: torch.Tensor, labels: torch.Tensor, attacks: list[AttackConfig], batch: int = 256,
             seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The correct clean images, and per attack its successful adversarial images (of correct ones)."""
    pred = model.predict(images)
    correct = pred == labels
    advs = {}
    for number, config in enumerate(attacks):
        t0 = time.time()
        out = torch.cat([attack_batch(model, images[i:i + batch], labels[i:i + batch], config, seed=seed + number)
                         for i in range(0, len(images), batch)])
        advs[config.name] = out[correct & (model.predict(out) != labels)]
        print(f"attack {config.name}: {len(advs[config.name])} successful, {time.time() - t0:.0f} s",
              file=sys.stderr)
    return images[correct], advs


def reused(work: Path, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The correct clean images and each attack's successful images of ``work/fast-train-<attack>``."""
    dirs = [work / f"fast-train-{name}" for name in names]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"--reuse-extra: no {', '.join(missing)} (train with --fast-n makes them)")
    sets = read_attack_images(dirs)
    advs = {name: sets.images[sets.adversarial & (sets.attack == number)] for number, name in enumerate(names)}
    return sets.images[~sets.adversarial], advs


def scores_of(fast: FastPath, maps: torch.Tensor, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = torch.as_tensor(fast.detector.decision_function(maps))
    return s.numpy(), fast.combine(s, images).numpy()


def fit(fast: FastPath, clean: tuple[torch.Tensor, torch.Tensor], advs: dict[str, tuple[torch.Tensor, torch.Tensor]],
        cal: tuple[torch.Tensor, torch.Tensor], seed: int) -> FastPath:
    """A fast path with ``fast``'s mask network and a detector + MLP combination fitted on (images, maps)."""
    detector = MaskDetector(**fast.detector.get_params())
    fit_fast_detector(detector, clean[1], [m for _, m in advs.values()], cal[1], seed)
    out = FastPath(fast.explainer, detector)
    images = torch.cat([clean[0], *(x for x, _ in advs.values())])
    maps = torch.cat([clean[1], *(m for _, m in advs.values())])
    adversarial = torch.cat([torch.zeros(len(clean[0]), dtype=torch.bool),
                             torch.ones(sum(len(x) for x, _ in advs.values()), dtype=torch.bool)])
    config = MarginCombination(squeeze=(0.75, 1.5), noise=(0.01,), hidden=32, seed=seed)
    out.margin = fit_margin(out, images, maps, adversarial, cal[0], cal[1], config)
    return out


def judge(fast: FastPath, tests: dict[str, tuple[torch.Tensor, torch.Tensor]], only: str | None = None) -> dict:
    from sklearn.metrics import roc_auc_score

    clean_alone, clean_combined = scores_of(fast, tests["clean"][1], tests["clean"][0])
    out: dict = {"clean_flagged": {"detector": round(float((clean_alone > fast.detector.threshold_).mean()), 4),
                                   "combined": round(float((clean_combined > fast.margin.threshold_).mean()), 4)}}
    for name, (images, maps) in tests.items():
        if name == "clean" or (only is not None and name != only):
            continue
        alone, combined = scores_of(fast, maps, images)
        labels = np.r_[np.zeros(len(clean_alone)), np.ones(len(alone))]
        out[name] = {
            "detector": [round(float(roc_auc_score(labels, np.r_[clean_alone, alone])), 4),
                         round(float((alone > fast.detector.threshold_).mean()), 4)],
            "combined": [round(float(roc_auc_score(labels, np.r_[clean_combined, combined])), 4),
                         round(float((combined > fast.margin.threshold_).mean()), 4)]}
    attacks = [k for k in out if k != "clean_flagged"]
    if attacks:
        out["min_roc_auc"] = {k: min(out[a][k][0] for a in attacks) for k in ("detector", "combined")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--extra", type=int, default=2000)
    parser.add_argument("--leave-one-out", action="store_true")
    parser.add_argument("--loo-only", default=None, help="comma-separated attacks: only their leave-one-out")
    parser.add_argument("--reuse-extra", action="store_true", help="the detector's work/fast-train-* sets")
    parser.add_argument("--more", type=int, default=0,
                        help="with --reuse-extra: this many further training images, after the fast-train ones, "
                             "attacked here")
    parser.add_argument("--no-base", action="store_true", help="skip the fit on the detector's own training sets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    guard = Guard.load(args.detector, device="cpu")
    fast, model = guard.deployment.fast, guard.model
    if fast is None:
        raise SystemExit(f"{args.detector} has no fast path")
    report = json.loads(Path(args.detector, "report.json").read_text())
    kind, inputs = guard.deployment.mask_config.kind, fast.detector.input_names()
    work = Path(args.detector, "work")

    def with_maps(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return images, fast.maps(images)[0].cpu()

    base_clean, base_advs = None, {}
    for number, path in enumerate(sorted(work.glob("train-*"))):
        split = load_split(path, kind, inputs=inputs)
        if number == 0:
            base_clean = with_maps(split.clean[split.correct])
        base_advs[path.name[len("train-"):]] = with_maps(split.adv[split.successful])
    cal_split = load_split(next(work.glob("calibration-*")), kind, inputs=inputs)
    cal = with_maps(cal_split.clean[cal_split.correct])
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in sorted(work.glob("test-*")):
        split = load_split(path, kind, inputs=inputs)
        tests.setdefault("clean", with_maps(split.clean[split.correct]))
        tests[path.name[len("test-"):]] = with_maps(split.adv[split.successful])
    loaded = time.time()

    configs = [AttackConfig(**{k: v for k, v in a.items() if k in ("name", "eps", "alpha", "steps")})
               for a in report["attacks"]]
    if args.more and not args.reuse_extra:
        raise SystemExit("--more adds images after the detector's work/fast-train-* sets: pass --reuse-extra too")
    if args.reuse_extra:
        clean_x, adv_x = reused(work, [c.name for c in configs])
        args.extra = f"work/fast-train-* ({len(clean_x)} correct clean images)"
        if args.more:
            more = load_cifar10("train", n=args.more, seed=0, data_dir=args.data_dir,
                                offset=int(report["fast"]["n_train"]))
            more_x, more_adv = attacked(model, more.images, more.labels, configs, seed=args.seed)
            clean_x = torch.cat([clean_x, more_x])
            adv_x = {name: torch.cat([adv_x[name], more_adv[name]]) for name in adv_x}
            args.extra += f" + {args.more} more ({len(more_x)} correct)"
    else:
        extra = load_cifar10("train", n=args.extra, seed=0, data_dir=args.data_dir, offset=int(report["n_train"]))
        clean_x, adv_x = attacked(model, extra.images, extra.labels, configs, seed=args.seed)
    attacked_at = time.time()
    scaled_clean = tuple(torch.cat(p) for p in zip(base_clean, with_maps(clean_x)))
    scaled_advs = {name: tuple(torch.cat(p) for p in zip(base_advs[name], with_maps(adv_x[name])))
                   for name in base_advs}
    result = {"detector": args.detector, "extra": args.extra,
              "n_fit": {"base": {"clean": len(base_clean[0]), **{k: len(v[0]) for k, v in base_advs.items()}},
                        "scaled": {"clean": len(scaled_clean[0]), **{k: len(v[0]) for k, v in scaled_advs.items()}}},
              "n_calibration": len(cal[0]), "n_test": {k: len(v[0]) for k, v in tests.items()},
              "seconds": {"load": round(loaded - start), "attacks": round(attacked_at - loaded)}}
    loo = args.loo_only.split(",") if args.loo_only else list(scaled_advs) if args.leave_one_out else []
    if not args.loo_only:
        if not args.no_base:
            t0 = time.time()
            result["base"] = judge(fit(fast, base_clean, base_advs, cal, args.seed), tests)
            result["seconds"]["fit_base"] = round(time.time() - t0)
        t0 = time.time()
        result["scaled"] = judge(fit(fast, scaled_clean, scaled_advs, cal, args.seed), tests)
        result["seconds"]["fit_scaled"] = round(time.time() - t0)
        print(json.dumps(result), flush=True)
    if loo:
        t0 = time.time()
        result["leave_one_out"] = {}
        for name in loo:
            others = {k: v for k, v in scaled_advs.items() if k != name}
            held = judge(fit(fast, scaled_clean, others, cal, args.seed), tests, only=name)[name]
            result["leave_one_out"][name] = {"detector": held["detector"][0], "combined": held["combined"][0]}
            print(json.dumps({"leave_one_out": name, **result["leave_one_out"][name],
                              "seconds": round(time.time() - t0)}), file=sys.stderr, flush=True)
        result["seconds"]["leave_one_out"] = round(time.time() - t0)
    result["seconds"]["total"] = round(time.time() - start)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
