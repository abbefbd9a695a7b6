"""Faithfulness of fast-path deletion masks refined by K steps of the mask optimisation.

    python scripts/eval_refine.py --detector runs/mix-delete-800 --attack bim --n 100 --refine 0,10,30

On the first ``--n`` correctly classified clean images and ``--n`` successful attacks of the detector's
held-out set ``work/test-<attack>``: the share of masks whose perturbed image keeps at most 10% of the
target probability, for each K (``Guard.explain(..., exact=False, refine=K)``) and for the stored
optimised masks; mean mask value and wall-clock ms per image. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect import Guard  # noqa: E402
from advdetect.splits import load_mask_set, load_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--attack", default="bim")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--refine", default="0,10,30")
    args = parser.parse_args()
    guard = Guard.load(args.detector, device="cpu")
    if guard.path != "fast":
        raise SystemExit(f"{args.detector} has no fast path")
    directory = Path(args.detector, "work", f"test-{args.attack}")
    kind = guard.deployment.mask_config.kind
    split = load_split(directory, kind, inputs=guard.deployment.detector.input_names())
    stored = load_mask_set(directory, kind, [f"{s}_{f}" for s in ("clean", "adv") for f in ("prob_before", "prob_after")])
    keep = {"clean": split.correct, "adv": split.successful}
    x = torch.cat([getattr(split, side)[k][:args.n] for side, k in keep.items()])
    ratio = torch.cat([(stored[f"{side}_prob_after"] / stored[f"{side}_prob_before"].clamp(min=1e-12))[k][:args.n]
                       for side, k in keep.items()])
    out = {"detector": args.detector, "attack": args.attack, "n": len(x),
           "faithfulness_optimized": round(float((ratio <= 0.1).float().mean()), 4)}
    for k in [int(v) for v in args.refine.split(",") if v.strip()]:
        start = time.perf_counter()
        result = guard.explain(x, exact=False, refine=k)
        seconds = time.perf_counter() - start
        out[f"refine_{k}"] = {"faithfulness": round(float((result.deletion_ratio <= 0.1).float().mean()), 4),
                              "mean_mask": round(float(result.masks.mean()), 4),
                              "ms_per_image": round(1000 * seconds / len(x), 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
