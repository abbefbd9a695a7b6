"""Probe: does a light blur move the classifier's prediction more on adversarial images?

Feature squeezing's signal (Xu et al., NDSS 2018) with the blur the masks already use: the L1
distance between the classifier's softmax on an image and on its Gaussian blur. On the cached
attack sets of a finished ``train`` / ``eval_detection.py`` run, prints one JSON object: per
held-out attack set and blur sigma, the ROC-AUC of that score alone (correct clean images
against successful attacks). A candidate detector input, measured before it is built.

    python scripts/probe_squeeze.py --run runs/mix-delete-800 --sigmas 0.75,1.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect.detector.margin import blur_shift  # noqa: E402
from advdetect.masks.perturbation import gaussian_blur  # noqa: E402
from advdetect.models import load_recorded_model  # noqa: E402
from advdetect.splits import load_attack_set  # noqa: E402


def squeeze_score(model, images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Half the L1 distance between the softmax of the images and of their blur (what ``train --margin
    --squeeze`` reads)."""
    return blur_shift(model.logits(images), model.logits(gaussian_blur(images, sigma)))


def main() -> None:
    from sklearn.metrics import roc_auc_score

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a train / eval_detection.py output folder")
    p.add_argument("--sigmas", default="0.75,1.0")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
    result: dict[str, dict[str, float]] = {}
    model = None
    for directory in sorted(Path(args.run, "work").glob("test-*")):
        split = load_attack_set(directory)
        model = model or load_recorded_model(split.manifest["job"]["model"], args.device, str(directory))
        correct, successful = split.correct, split.successful
        labels = [0] * int(correct.sum()) + [1] * int(successful.sum())
        result[directory.name] = {
            f"sigma_{sigma:g}": round(float(roc_auc_score(labels, torch.cat([
                squeeze_score(model, split.clean, sigma)[correct],
                squeeze_score(model, split.adv, sigma)[successful]]).cpu().numpy())), 4)
            for sigma in sigmas}
    print(json.dumps({"run": args.run, "roc_auc": result}))


if __name__ == "__main__":
    main()
