"""The adaptive attack on a detector, on many held-out images, with its sanity checks.

    python scripts/eval_adaptive.py --detector runs/mix-delete-800 --n 600
    python scripts/eval_adaptive.py --detector runs/mix-hard-800 --n 600 --restarts 2
    python scripts/eval_adaptive.py --detector runs/mix-delete-800 --path exact --attackers surrogate,unrolled

``--path fast`` (default): the attacker knows the classifier, the mask network, the fast detector and
its threshold, and differentiates all of them (PGD on the classifier's margin + the detector's score,
no surrogate; :func:`advdetect.evaluation.adaptive.adaptive_sweep`, what ``advdetect evaluate`` runs
on the fast path). ``--path exact``: the detector on optimised masks, which ``detect --exact`` and
``evaluate`` judge; PGD differentiates, in turn (each run starting from the best images so far),
the ``--attackers``: ``surrogate`` (a network fitted to the real maps of the detector's own training
sets, as ``evaluate`` does) and ``unrolled`` (the real optimisation, warm-started, differentiated
through ``--unroll`` steps; :class:`advdetect.evaluation.unrolled.UnrolledMaps`); every candidate is
judged on the real pipeline. It attacks the correctly classified ones of ``--n`` test images of the
detector's data taken after ``--offset`` in a seeded order, checked to be none the detector was fitted
or calibrated on. Prints one JSON line: per eps the share of images that fool classifier and detector
together (``success``), that fool the classifier (``fooled``) and the share of those the detector
flags; the 4x-steps and 4x-restarts runs at ``--check-eps`` (unless ``--no-iterations-check``); the
sanity checks. ``--probe``
attacks nothing: it prints, per attacker, :func:`advdetect.evaluation.probe.gradient_probe` on the
clean images (does its gradient move the real detector score?).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect.data import DataSpec, images_for, shared_images  # noqa: E402
from advdetect.detector.inputs import maps_for_result  # noqa: E402
from advdetect.evaluation.adaptive import (adaptive_sweep, fast_path_target, surrogate_pairs,  # noqa: E402
                                           train_surrogate)
from advdetect.evaluation.probe import gradient_probe  # noqa: E402
from advdetect.evaluation.unrolled import UnrolledMaps  # noqa: E402
from advdetect.masks import make_explainer  # noqa: E402
from advdetect.splits import load_split  # noqa: E402
from advdetect.evaluation.config import EvaluateConfig, parse_eps_list, parse_settings  # noqa: E402
from advdetect.evaluation.guard import reserved_images  # noqa: E402
from advdetect.inference import load_deployment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, help="a detector directory (with a fast path for --path fast)")
    parser.add_argument("--path", choices=("fast", "exact"), default="fast", help="which of the detector's paths")
    parser.add_argument("--attackers", default="surrogate,unrolled",
                        help="--path exact: what PGD differentiates, in turn (surrogate, unrolled)")
    parser.add_argument("--unroll", type=int, default=5, help="unrolled steps of the mask optimisation")
    parser.add_argument("--refine", type=int, default=10,
                        help="iterations of the warm-started optimisation per PGD step (unrolled attacker)")
    parser.add_argument("--data-dir", default=None, help="where CIFAR-10 lives (e.g. ../shared/data)")
    parser.add_argument("--n", type=int, default=600, help="test images (the correctly classified ones are attacked)")
    parser.add_argument("--offset", type=int, default=2000, help="skip this many images of the seeded test order")
    parser.add_argument("--eps", default="2/255,4/255,8/255,16/255")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--settings", default="1:2,0.3:2,0.1:2",
                        help="the attacker's runs lam:kappa (detector-term weight : classifier margin aimed for), "
                             "in turn, each keeping the best images so far")
    parser.add_argument("--targets", type=int, default=0,
                        help="multi-targeted runs after each untargeted one: this many classes ranked next")
    parser.add_argument("--check-eps", default="8/255", help="eps of the 4x-steps and 4x-restarts sanity checks")
    parser.add_argument("--no-iterations-check", action="store_true",
                        help="skip the 4x-steps and 4x-restarts sanity checks")
    parser.add_argument("--probe", action="store_true",
                        help="no attack: per attacker, how its maps' scores agree with the real ones and what one "
                             "signed step of its gradient (--probe-step) does to the real score, beside a random step")
    parser.add_argument("--probe-step", default="1/255")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    start = time.time()
    deployed = load_deployment(args.detector, device=args.device)
    if args.path == "fast" and deployed.fast is None:
        sys.exit(f"{args.detector}: no fast path to attack (train with --fast, or pass --path exact)")
    attackers = [a.strip() for a in args.attackers.split(",") if a.strip()]
    if args.path == "exact" and (not attackers or set(attackers) - {"surrogate", "unrolled"}):
        sys.exit(f"--attackers: choose among surrogate, unrolled; got {args.attackers!r}")
    model, fast = deployed.model, deployed.fast
    recorded = deployed.meta.get("data")
    data = DataSpec.recorded(recorded, *(() if args.data_dir is None else (None, args.data_dir, None)))
    images = images_for(model.info, data, "test", args.n, args.seed + 1, offset=args.offset)
    overlap = shared_images(reserved_images(deployed.meta), images.identify())
    if overlap:
        sys.exit(f"{len(overlap)} of these images fitted or calibrated the detector; raise --offset")
    x, labels, _ = images.load()
    correct = model.logits(x).argmax(1).cpu() == labels
    x, labels = x[correct], labels[correct]
    eps = parse_eps_list(args.eps)
    config = EvaluateConfig(eps=parse_eps_list(args.check_eps), n=max(8, 2 * len(x)), n_baseline=0, n_methods=0,
                            adaptive_n=len(x), adaptive_eps=eps,
                            adaptive_steps=args.steps, adaptive_restarts=args.restarts, seed=args.seed,
                            adaptive_settings=parse_settings(args.settings), adaptive_targets=args.targets)
    if args.path == "fast":
        fast_meta = json.loads((Path(args.detector) / "fast" / "detector.json").read_text())
        with torch.no_grad():
            clean_scores = fast.scores(x.to(model.device)).cpu()
        target, judge, real = fast_path_target(fast)
        mask_config, threshold = fast.explainer.config, fast.threshold
        extra = {"margin": fast.margin is not None, "hardening": fast_meta.get("hardening")}
    else:
        target, surrogate_fit = exact_attackers(deployed, attackers, args)
        judge, real, mask_config = deployed.detector, None, deployed.mask_config
        threshold = judge.threshold_
        explainer = make_explainer(model, mask_config)
        clean_maps = maps_for_result(judge.input_names(), x, explainer.attribute(x.to(model.device)))
        clean_scores = torch.as_tensor(judge.decision_function(clean_maps.cpu())).float()
        extra = {"attackers": attackers, "unroll": args.unroll if "unrolled" in attackers else 0,
                 "refine": args.refine, "surrogate": surrogate_fit}
    if args.probe:
        attacked = target if isinstance(target, list) else [target]
        names = attackers if args.path == "exact" else ["fast path"]
        real_maps = real if real is not None else (  # noqa: E731
            lambda z: maps_for_result(judge.input_names(), z, explainer.attribute(z)))
        step = parse_eps_list(args.probe_step)[0]
        probes = {name: gradient_probe(module, judge, real_maps, x, step=step, seed=args.seed)
                  for name, module in zip(names, attacked)}
        print(json.dumps({"detector": args.detector, "path": args.path, "n_images": int(len(x)), **extra,
                          "probe": probes, "seconds": round(time.time() - start, 1)}))
        return
    result = adaptive_sweep(model, target, judge, mask_config, x, labels, config, sys.stderr.isatty(), real,
                            iterations_check=not args.no_iterations_check)
    print(json.dumps({"detector": args.detector, "path": args.path, "n_images": int(len(x)), "n_test_images": args.n,
                      "offset": args.offset, "steps": args.steps, "restarts": args.restarts,
                      "targets": args.targets, "clean_flagged": float((clean_scores > threshold).float().mean()),
                      **extra, **result, "seconds": round(time.time() - start, 1)}))


def exact_attackers(deployed, attackers: list[str], args: argparse.Namespace) -> tuple[list[torch.nn.Module],
                                                                                       dict | None]:
    """What PGD differentiates for the exact path, in turn: the surrogate fitted on the real maps of the detector's
    own training sets (its work folder) and/or the unrolled real optimisation."""
    out: list[torch.nn.Module] = []
    fit_stats = None
    inputs = deployed.detector.input_names()
    for name in attackers:
        if name == "surrogate":
            sets = sorted((Path(args.detector) / "work").glob("train-*"))
            if not sets:
                sys.exit(f"{args.detector}/work holds no train-* attack sets to fit the surrogate on")
            splits = [load_split(d, deployed.mask_config.kind, inputs=inputs) for d in sets]
            images, maps = surrogate_pairs(splits)
            surrogate, fit_stats = train_surrogate(images, maps, seed=args.seed, device=deployed.model.device,
                                                   progress=sys.stderr.isatty())
            out.append(surrogate)
        else:
            out.append(UnrolledMaps(make_explainer(deployed.model, deployed.mask_config), inputs, unroll=args.unroll,
                                    refine=args.refine))
    return out, fit_stats


if __name__ == "__main__":
    main()
