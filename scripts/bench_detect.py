"""What a verdict costs and how good it is: the classifier alone, the optimised-mask path, the fast path.

    python scripts/bench_detect.py --detector runs/mix-delete-800            # full
    python scripts/bench_detect.py --detector runs/mix-delete-800 --quick    # under 10 minutes

``--detector``: a detector directory with a fast path (``advdetect train`` makes one) and its work
folder (the held-out ``work/test-<attack>`` sets). In one warm process (model and detector loaded
once, as :class:`advdetect.Guard` holds them), prints one JSON line:

* ``layout``: which networks the guard runs with channels-last weights (``--no-channels-last``: none);
* ``latency_ms``: p50 / p95 at batch 1 and ``images_per_second`` at batch 256 for the classifier's
  forward pass, the fast path's whole verdict (classifier + mask network + perturbed forward +
  detector) and the optimised path's whole verdict;
* ``fast_parts_ms_batch1``: p50 at batch 1 of each part of a fast verdict run alone (classifier
  forward, mask network, upsampling + blur perturbation, the residual plane, the detector network):
  where the time goes (the classifier runs twice: on the image and on the image perturbed by the mask);
* ``detection``: per attack, ROC-AUC and TPR at 5% FPR of both paths on the same held-out images
  (the optimised path's maps are the stored held-out masks, which are what it computes), and the
  share of held-out clean images each path flags at its own calibrated threshold;
* ``faithfulness_fast`` / ``faithfulness_optimized``: share of held-out deletion masks whose perturbed
  image keeps at most 10% of the target probability; ``mask_abs_diff`` / ``mask_correlation``
  between predicted and optimised masks;
* with ``--size224``, ``masks_per_second_224``: masks/s at 224 px with torchvision's resnet18 (random
  weights, timing only), a mask network of the paper's mask shape vs the paper's 300-iteration optimisation;
* with ``--refine K,...``, ``refined``: per K, the faithfulness of fast masks refined by K iterations
  of the mask optimisation and their cost (ms per image, batches of a split's held-out images);
* with ``--adaptive``, ``adaptive_fast``: white-box PGD through the fast path (classifier margin +
  fast detector score, no surrogate) on held-out correct clean images at eps 2, 4 and 8/255;
* summary keys ``fast_latency_ms_batch1``, ``cost_ratio_batch256`` (fast verdict time / classifier
  forward time at batch 256, same run), ``auc_gap_max`` (largest optimised-minus-fast ROC-AUC).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect import Guard  # noqa: E402
from advdetect.detector.metrics import tpr_at_fpr  # noqa: E402
from advdetect.splits import load_mask_set, load_split  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def latency(fn, images: torch.Tensor, repeats1: int, repeats256: int) -> dict[str, float]:
    one = timed(lambda: fn(images[:1]), repeats1)
    many = timed(lambda: fn(images), repeats256)
    return {"p50_ms_batch1": round(statistics.median(one), 3),
            "p95_ms_batch1": round(float(np.percentile(one, 95)), 3),
            "ms_batch256": round(statistics.median(many), 2),
            "images_per_second_batch256": round(len(images) / (statistics.median(many) / 1000), 1)}


def fast_parts(guard: Guard, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """p50 ms of each part of a fast verdict on the batch ``x``, each run alone."""
    from advdetect.detector.inputs import residual_map

    explainer, model = guard.deployment.fast.explainer, guard.model
    network = guard.deployment.judge._fitted()
    with torch.no_grad():
        probs = model(x).softmax(1)
        targets = probs.argmax(1)
        low, _ = explainer.predict(x, targets, probs)
        maps, _ = guard.deployment.fast.maps(x, probs=probs)
        parts = {"classifier": lambda: model(x), "mask_network": lambda: explainer.net(x, targets, probs),
                 "perturbation": lambda: explainer.perturb(x, explainer.upsample(low, x.shape[-2:])),
                 "residual_plane": lambda: residual_map(x), "detector_network": lambda: network(maps)}
        return {name: round(statistics.median(timed(fn, repeats)), 3) for name, fn in parts.items()}


def auc_row(clean: np.ndarray, adv: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    labels, scores = np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv]
    return {"roc_auc": round(float(roc_auc_score(labels, scores)), 4),
            "tpr_at_5fpr": round(tpr_at_fpr(labels, scores, 0.05), 4),
            "fpr_at_threshold": round(float((clean > threshold).mean()), 4),
            "tpr_at_threshold": round(float((adv > threshold).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images: under 10 minutes")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adaptive", action="store_true",
                        help="also attack the fast path white box (PGD through the mask network) at 2, 4, 8/255")
    parser.add_argument("--adaptive-n", type=int, default=200)
    parser.add_argument("--size224", action="store_true",
                        help="also masks/s at 224 px with resnet18 (random weights): mask network vs optimised")
    parser.add_argument("--adaptive-steps", type=int, default=40)
    parser.add_argument("--no-channels-last", action="store_true",
                        help="keep every network's default (NCHW) weight layout, as before Guard converted them")
    parser.add_argument("--refine", default="",
                        help="comma-separated iteration counts K: faithfulness and time of fast masks refined by K "
                             "iterations of the optimisation (Guard.explain(..., exact=False, refine=K))")
    args = parser.parse_args()
    refine_steps = [int(k) for k in args.refine.split(",") if k.strip()]
    torch.manual_seed(0)
    layout = {"channels_last": not args.no_channels_last}
    fast, exact = Guard.load(args.detector, device="cpu", **layout), Guard.load(args.detector, device="cpu", exact=True,
                                                                                   **layout)
    if fast.path != "fast":
        raise SystemExit(f"{args.detector} has no fast path; train it with `advdetect train` (--fast is the default)")
    deployed = exact.deployment
    tests = sorted(Path(args.detector, "work").glob("test-*"))
    if not tests:
        raise SystemExit(f"{args.detector}/work holds no held-out test sets")
    inputs, kind = deployed.detector.input_names(), deployed.mask_config.kind
    paths = {p.name[len("test-"):]: p for p in tests}
    splits = {name: load_split(path, kind, inputs=inputs) for name, path in paths.items()}
    first = next(iter(splits.values()))
    images = torch.cat([first.clean, first.adv])[:args.batch]
    model = fast.model
    result: dict = {"detector": args.detector, "quick": args.quick, "torch_threads": torch.get_num_threads(),
                    "batch": len(images), "layout": fast.layout, "latency": {}}
    reps = (20, 3) if args.quick else (100, 10)
    result["latency"]["classifier"] = latency(lambda x: model.logits(x), images, *reps)
    result["latency"]["fast"] = latency(lambda x: fast.check(x), images, *reps)
    result["fast_parts_ms_batch1"] = fast_parts(fast, images[:1], reps[0])
    exact_images = images[:32] if args.quick else images  # the optimised path: seconds per batch
    exact_lat = latency(lambda x: exact.check(x), exact_images, 3 if args.quick else 10, 1)
    exact_lat["batch"] = len(exact_images)
    result["latency"]["optimized"] = exact_lat
    forward = result["latency"]["classifier"]["ms_batch256"]
    result["cost_ratio_batch256"] = round(result["latency"]["fast"]["ms_batch256"] / forward, 2)
    result["cost_ratio_optimized"] = round(exact_lat["ms_batch256"] / len(exact_images) * len(images) / forward, 1)
    result["fast_latency_ms_batch1"] = result["latency"]["fast"]["p50_ms_batch1"]

    detection, faith_fast, faith_opt, diffs, corrs = {}, [], [], [], []
    refined: dict[int, dict[str, list]] = {k: {"faithful": [], "seconds": [], "n": []} for k in refine_steps}
    exact_det = deployed.detector
    for name, split in splits.items():
        ok, hit = split.correct, split.successful
        sides = {"clean": split.clean[ok], "adv": split.adv[hit]}
        fast_scores = {s: fast.check(x).scores.numpy() for s, x in sides.items()}
        exact_scores = {"clean": exact_det.decision_function(split.masks_clean[ok]),
                        "adv": exact_det.decision_function(split.masks_adv[hit])}
        detection[name] = {"fast": auc_row(fast_scores["clean"], fast_scores["adv"], fast.deployment.threshold),
                           "optimized": auc_row(exact_scores["clean"], exact_scores["adv"], exact_det.threshold_)}
        if deployed.mask_config.game != "delete":
            continue
        stored = load_mask_set(paths[name], kind,
                               [f"{s}_{f}" for s in ("clean", "adv") for f in ("mask", "prob_before", "prob_after")])
        for side, keep in (("clean", ok), ("adv", hit)):
            if side == "clean" and name != next(iter(splits)):
                continue  # every set holds the same clean images
            predicted = fast.explain(getattr(split, side)[keep], exact=False)
            faith_fast.append(predicted.deletion_ratio <= 0.1)
            for k, acc in refined.items():
                start = time.perf_counter()
                acc["faithful"].append(fast.explain(getattr(split, side)[keep], exact=False, refine=k).deletion_ratio
                                       <= 0.1)
                acc["seconds"].append(time.perf_counter() - start)
                acc["n"].append(int(keep.sum()))
            ratio = stored[f"{side}_prob_after"][keep] / stored[f"{side}_prob_before"][keep].clamp(min=1e-12)
            faith_opt.append(ratio <= 0.1)
            opt = stored[f"{side}_mask"][keep]
            diffs.append((predicted.masks - opt).abs().flatten(1).mean(1))
            p, o = predicted.masks.flatten(1), opt.flatten(1)
            p, o = p - p.mean(1, keepdim=True), o - o.mean(1, keepdim=True)
            corrs.append((p * o).sum(1) / (p.norm(dim=1) * o.norm(dim=1)).clamp(min=1e-8))
    result["detection"] = detection
    result["auc_gap_max"] = round(max(d["optimized"]["roc_auc"] - d["fast"]["roc_auc"] for d in detection.values()), 4)
    if faith_fast:
        result["faithfulness_fast"] = round(float(torch.cat(faith_fast).float().mean()), 4)
        result["faithfulness_optimized"] = round(float(torch.cat(faith_opt).float().mean()), 4)
        result["mask_abs_diff"] = round(float(torch.cat(diffs).mean()), 4)
        result["mask_correlation"] = round(float(torch.cat(corrs).nanmean()), 4)
        result["refined"] = {str(k): {"faithfulness": round(float(torch.cat(acc["faithful"]).float().mean()), 4),
                                      "ms_per_image": round(1000 * sum(acc["seconds"]) / sum(acc["n"]), 2)}
                             for k, acc in refined.items() if acc["n"]}
    if args.adaptive:
        result["adaptive_fast"] = adaptive_fast(fast, first, args)
    if args.size224:
        result["masks_per_second_224"] = masks_per_second_224(first.clean[:16], quick=args.quick)
    print(json.dumps(result))


def masks_per_second_224(images: torch.Tensor, quick: bool) -> dict:
    """Masks/s at 224 px with torchvision's resnet18 (random weights: timing only): an (untrained) mask network
    of the paper's mask shape vs the optimised masks with the paper's settings, on CIFAR-10 images upsampled."""
    from advdetect.masks import MaskConfig, MeaningfulPerturbation
    from advdetect.masks.amortized import AmortizedMasks, mask_net_for
    from advdetect.models import load_model

    model = load_model("torchvision:resnet18")
    config = MaskConfig.for_input_size(224)
    x = torch.nn.functional.interpolate(images, size=224, mode="bilinear", align_corners=False).clamp(0, 1)
    torch.manual_seed(0)
    fast = AmortizedMasks(model, mask_net_for(model.info, config), config)
    fast_ms = statistics.median(timed(lambda: fast.attribute(x), 3))
    n_opt = 1 if quick else 2
    start = time.perf_counter()
    MeaningfulPerturbation(model, config).attribute(x[:n_opt])
    opt_s = time.perf_counter() - start
    return {"fast": round(len(x) / (fast_ms / 1000), 2), "optimized": round(n_opt / opt_s, 4),
            "fast_batch": len(x), "optimized_images": n_opt, "optimized_iterations": config.iterations}


def adaptive_fast(guard: Guard, split, args) -> dict:
    """White-box PGD on the fast path (no surrogate) against held-out correct clean images, at each eps,
    each eps also starting from the previous one's result; success = classifier wrong and fast detector passes."""
    from advdetect.evaluation.adaptive import AdaptiveConfig, evaluate_adaptive, fast_path_target

    fast = guard.deployment.fast
    target, judge, real = fast_path_target(fast)
    x, y = split.clean[split.correct][:args.adaptive_n], split.labels[split.correct][:args.adaptive_n]
    rows, previous = [], None
    for eps in (2 / 255, 4 / 255, 8 / 255):
        cfg = AdaptiveConfig(eps=eps, steps=args.adaptive_steps, restarts=1)
        outcome, previous = evaluate_adaptive(guard.model, target, judge, fast.explainer.config, x, y, cfg,
                                              init=previous, real_maps=real)
        rows.append(outcome.to_dict())
    return {"n": len(x), "steps": args.adaptive_steps, "sweep": rows}


if __name__ == "__main__":
    main()
